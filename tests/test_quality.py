"""benchmarks/quality.py --smoke: every row of the ablation and the peer runs end to end, with the wiring checked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quality_smoke_runs_every_row_and_resumes(tmp_path):
    """The smoke plan pre-trains the three objectives (their loss weights reach the configs), fine-tunes and
    decodes every row, scores them with intervals that bracket the means, writes report, plot and JSON, keeps
    the test sources out of the pre-training text, and a rerun reuses every finished unit."""
    q = _quality()
    out = tmp_path / "q"
    assert q.main(["--smoke", "--out", str(out)]) == 0
    for objective, weights in q.OBJECTIVES.items():
        cfg = json.loads((out / "pretrain" / f"{objective}-s0" / "train_config.json").read_text())
        assert (cfg["ae_weight"], cfg["par_weight"]) == (weights["ae_weight"], weights["par_weight"])
    result = json.loads((out / "results.json").read_text())
    table = {(x["row"], x["task"]): x for x in result["table"]}
    assert set(table) == {(r, "news") for r in (*q.ROWS, "lead-10")}
    for x in table.values():
        for k in ("rouge1", "rouge2", "rougeL"):
            lo, hi = x[f"{k}_ci"]
            assert lo <= x[k] + 1e-9 and x[k] <= hi + 1e-9
    assert table[("lead-10", "news")]["rouge1"] > 0  # the references were read and scored
    assert all(table[(r, "news")]["steps"] == 3 for r in q.ROWS)
    assert table[("bert2bert", "news")]["params"] > 2 * table[("minilm", "news")]["params"]  # 2 BERTs + cross-attn
    assert table[("pmlm", "news")]["params"] == table[("none", "news")]["params"]  # the same small model
    assert {p["objective"] for p in result["pretrain"]} == set(q.OBJECTIVES)
    assert (out / "quality.png").stat().st_size > 10_000 and "| news | lead-10 |" in (out / "report.md").read_text()
    test_sources = {json.loads(line)["src"] for line in (out / "data" / "news_test.jsonl").read_text().splitlines()}
    pretrain_text = {json.loads(line)["text"] for line in (out / "data" / "pretrain.jsonl").read_text().splitlines()}
    assert len(pretrain_text) == 40 and not test_sources & pretrain_text
    stamp = (out / "finetune" / "pmlm-news-s0" / "result.json").stat().st_mtime_ns
    again = q.run(q.Plan(**q.SMOKE), out, threads=1, smoke=True)
    assert (out / "finetune" / "pmlm-news-s0" / "result.json").stat().st_mtime_ns == stamp
    assert [x["rougeL"] for x in again["table"]] == [x["rougeL"] for x in result["table"]]
