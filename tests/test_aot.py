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


def _compile(code: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", "import json\nfrom pmlm_engine.kernels import aot_report\n" + code],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_configs_use_wgmma_and_tma_on_sm90_without_spills():
    """Every pass of the sm_90 defaults (bf16, every supported head dim, bias on) compiles with 0
    spill bytes; the forward, dK/dV and dQ passes use ``wgmma`` and TMA (``cp.async.bulk.tensor``),
    the forward tile is at least 128 x 64; the sm_80 defaults (fp16, D = 64) use ``mma.sync`` and
    do not spill either. Registers stay within 255 and shared memory within the architecture's
    per-block limit, and the figures of autotuned head dims equal ``autotune.MEASURED`` (the table
    the cost model prunes with must describe what the compiler produces today)."""
    from pmlm_engine.kernels import autotune

    rows = _compile("print(json.dumps(aot_report.compile_rows([90], ['bf16'], [16, 32, 64, 128]) + "
                    "aot_report.compile_rows([80], ['fp16'], [64])))")
    assert sorted((r["target"], r["head_dim"], r["kernel"]) for r in rows) == sorted(
        (t, hd, k) for t, hds in (("sm_90", (16, 32, 64, 128)), ("sm_80", (64,))) for hd in hds
        for k in ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"))
    for r in rows:
        arch = int(r["target"][3:])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared"] <= autotune.ARCHS[arch].smem_per_block, r
        assert r["occupancy"] >= r["num_warps"], r
        if r["kernel"] == "bwd_preprocess":
            assert r["instruction"] == "-" and not r["tma"], r
            continue
        assert r["instruction"] == ("wgmma" if arch == 90 else "mma.sync"), r
        assert r["tma"] == (arch == 90), r
        if r["head_dim"] in autotune.AUTOTUNE_SETS[arch]:
            key = (arch, r["head_dim"], r["kernel"], r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
            res = autotune.MEASURED[key]
            assert (res.registers, res.spills, res.shared, res.instruction) == (
                r["registers"], 0, r["shared"], r["instruction"]), (key, res, r)
        if arch == 90 and r["kernel"] == "fwd":
            assert r["block_m"] >= 128 and r["block_m"] * r["block_n"] >= 128 * 64, r


def test_report_cli_refuses_the_interpreter():
    """Run in a process with TRITON_INTERPRET=1, the report fails with an explanation instead of
    reporting numbers from a compiler that is not there."""
    env = _env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT, "--targets", "90", "--dtypes", "fp16", "--head-dims", "64"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr


def test_fused_ce_kernel_compiles_for_sm80_and_sm90_without_spills():
    """The fused linear cross-entropy's chunk kernel (with and without label smoothing) compiles
    for sm_80 and sm_90 at its launch configuration with 0 spill bytes."""
    rows = _compile("print(json.dumps(aot_report.compile_fused_ce_rows([80, 90])))")
    assert sorted((r["kernel"], r["target"]) for r in rows) == [
        ("fused_ce", "sm_80"), ("fused_ce", "sm_90"), ("fused_ce_smooth", "sm_80"), ("fused_ce_smooth", "sm_90")]
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and 0 < r["registers"] <= 255, r
