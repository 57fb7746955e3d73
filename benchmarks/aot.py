"""Ahead-of-time compile suite: instruction, TMA, registers, spills, shared memory, occupancy of the Triton kernels.

Runs ``pmlm_engine.kernels.aot_report.compile_rows`` in a subprocess with ``TRITON_INTERPRET``
removed from the environment: ahead-of-time compilation cannot run under the interpreter.
Nothing here runs on a GPU; it only compiles for sm_80 / sm_90.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_SCRIPT = (
    "import json, sys\n"
    "from pmlm_engine.kernels.aot_report import compile_fused_ce_rows, compile_rows\n"
    "args = json.loads(sys.argv[1])\n"
    "print(json.dumps(compile_rows(**args) + compile_fused_ce_rows(args['targets'])))\n"
)


def run_aot_suite(quick: bool, smoke: bool = False) -> list[dict]:
    """One row per (kernel, target, dtype, head dim), then the fused cross-entropy kernel's rows.
    ``quick``: D=64 fp16 only; ``smoke``: and the attention forward only."""
    args = dict(targets=[80, 90], dtypes=["fp16"] if quick or smoke else ["fp16", "bf16"],
                head_dims=[64] if quick or smoke else [64, 128], kernels=["fwd"] if smoke else None)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import markdown_table

    print(markdown_table(run_aot_suite(quick="--quick" in sys.argv)))
