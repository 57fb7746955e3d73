"""scripts/demo.sh's argument handling and its closing summary (without running the demo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_sh_help_and_bad_arguments():
    """--help prints the header (knobs included) and exits 0; a stray argument is refused before any work with
    a message naming the step sections."""
    ok = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--help"], check=False, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "THREADS" in ok.stdout and "--fast" in ok.stdout and "FINETUNE_STEPS" in ok.stdout
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--beam", "3"], check=False, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unexpected argument '--beam'" in bad.stderr and "--decode" in bad.stderr


def test_demo_summary_quotes_the_steps_and_counts_empty_predictions(tmp_path):
    """The summary quotes each step's last loss line verbatim, its wall time, the empty-prediction count and
    the bootstrap intervals from scores.json."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "pretrain.log").write_text("noise\nloss 17.390 -> 14.050 over steps 1-100 in 95 s; outputs in x\n")
    (logs / "finetune.log").write_text("INFO loss 8.350 -> 5.900 (mean of first/last 20 steps) in 199 s; model\n")
    (logs / "seconds.txt").write_text("pretrain 101\nfinetune 210\ndecode 17\n")
    scores = {"scores": [{"system": "predictions.jsonl", "examples": 200, "rouge1": 21.5, "rouge2": 6.5,
                          "rougeL": 19.0, "bleu4": 2.0, "empty_predictions": 1},
                         {"system": "lead-10", "examples": 200, "rouge1": 20.25, "rouge2": 6.02, "rougeL": 17.68,
                          "bleu4": 2.73, "empty_predictions": 0}],
              "bootstrap": {"intervals": {"predictions.jsonl": {"rouge1": [19.0, 24.0], "rouge2": [5.0, 8.0],
                                                                "rougeL": [17.0, 21.0]},
                                          "lead-10": {"rouge1": [18.0, 22.4], "rouge2": [4.4, 7.8],
                                                      "rougeL": [15.7, 19.7]}},
                            "differences": {"predictions.jsonl - lead-10": {"rouge1": [-0.5, 3.0],
                                                                            "rouge2": [-1.0, 2.0],
                                                                            "rougeL": [0.1, 2.5]}}}}
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_summary.py"), str(tmp_path), "--threads",
                           "1", "--load", "3.5", "--seconds", "330"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "330 s end to end" in out and "load 3.5" in out
    assert "101 s  loss 17.390 -> 14.050 over steps 1-100" in out
    assert "210 s  loss 8.350 -> 5.900 (mean of first/last 20 steps)" in out
    assert "200 predictions, 1 empty" in out
    assert "21.50 [19.00, 24.00] / 6.50 [5.00, 8.00] / 19.00 [17.00, 21.00]" in out
    assert "[-0.50, +3.00] / [-1.00, +2.00] / [+0.10, +2.50]" in out
