"""Ahead-of-time compilation of the pseudo-mask attention kernels for a real GPU target.

The interpreter tests prove the numerics; they cannot prove the kernels compile for a GPU, nor
that the default block configuration fits in registers. These tests compile with Triton's real
compiler in a separate process (``TRITON_INTERPRET`` removed: the interpreter replaces the
compiler in any process where it is set) and read registers / spills from ptxas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "kernels", "aot_report.py")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_default_config_compiles_for_sm90_without_spills():
    """Forward, backward preprocess, dK/dV and dQ kernels compile for sm_90 (fp16, D=64, default
    block configuration, bias on) and ptxas reports 0 spill bytes for each; registers stay within
    the hardware's 255 and shared memory within sm_90's 227 KiB per block."""
    code = ("import json\n"
            "from pmlm_engine.kernels import aot_report\n"
            "print(json.dumps(aot_report.compile_rows([90], ['fp16'], [64])))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(r["kernel"] for r in rows) == ["bwd_dkdv", "bwd_dq", "bwd_preprocess", "fwd"]
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared"] <= 227 * 1024, r


def test_report_cli_refuses_the_interpreter():
    """Run in a process with TRITON_INTERPRET=1, the report fails with an explanation instead of
    reporting numbers from a compiler that is not there."""
    env = _env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT, "--targets", "90", "--dtypes", "fp16", "--head-dims", "64"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr
