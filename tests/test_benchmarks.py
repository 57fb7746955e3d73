"""The benchmark report runs end to end and writes its outputs (not how fast anything is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_py_smoke_writes_every_output(tmp_path):
    """`benchmarks/run.py --quick --smoke` runs every suite on tiny shapes and writes report.md, results.jsonl
    (an environment header plus rows of every suite, none failed) and the plots."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the AOT suite compiles for real
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    suites = {r["suite"] for r in rows}
    assert suites == {"environment", "attention", "tiles", "layout", "step", "decode", "data", "aot"}
    envrow = rows[0]
    for key in ("cpu", "cores", "torch", "triton", "deepspeed", "git", "date"):
        assert envrow.get(key) not in (None, ""), key
    assert not [r for r in rows if "FAILED" in str(r.get("variant", ""))]
    attention = [r for r in rows if r["suite"] == "attention"]
    assert {r["impl"] for r in attention} >= {"torch", "sdpa", "eager"}
    assert all(r["fwd_ms"] and r["fwd_ms"] > 0 and 0 < r["kernel_tile_fraction"] <= 1 for r in attention)
    assert all(r["spill_stores"] == 0 for r in rows if r["suite"] == "aot")
    tiles = [r for r in rows if r["suite"] == "tiles"]
    # The exact classifier computes no more tiles than the summary one and as many as FlexAttention's
    # block mask (both exact), at every tile size, on packed and padded rows.
    assert {r["layout"] for r in tiles} == {"packed", "padded"}
    assert all(0 < r["exact_fraction"] <= r["summary_fraction"] <= 1 for r in tiles)
    assert all(r["exact_fraction"] == pytest.approx(r["flex_fraction"]) for r in tiles)
    layout = [r for r in rows if r["suite"] == "layout"]
    assert all(r["layout_ms"] > 0 for r in layout if "layout_ms" in r)
    assert all(r["prepass_ops_per_step_now"] < r["prepass_ops_per_step_before"] for r in layout
               if "prepass_ops_per_step_now" in r)
    report = (tmp_path / "report.md").read_text()
    assert "## attention" in report and "## aot" in report and "| impl |" in report
    assert (tmp_path / "attention_fwd.png").stat().st_size > 0
    assert (tmp_path / "step.png").stat().st_size > 0
