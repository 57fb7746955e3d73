"""Evaluation: known ROUGE/BLEU values, stemming, id alignment, lead baseline and the CLI's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pmlm_engine.evaluate import TextSet, align, lead, main, read_predictions, score


def test_known_values_and_stemming():
    """Identical texts score 100; a one-word substitution gives ROUGE-1 5/6 and ROUGE-2 3/5; stemming matches
    inflections; BLEU is lowercased by default."""
    same = score(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same.rouge1 == same.rouge2 == same.rougeL == same.rougeLsum == 100.0 and same.bleu4 == pytest.approx(100)
    one = score(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert one.rouge1 == pytest.approx(500 / 6) and one.rouge2 == pytest.approx(60.0)
    assert score(["runs quickly"], ["running quickly"]).rouge1 == 100.0
    assert score(["trump signs new immigration order"], ["Trump Signs New Immigration Order"]).bleu4 == pytest.approx(100)
    assert score(["trump signs new immigration order"], ["Trump Signs New Immigration Order"], lowercase_bleu=False).bleu4 < 100


def test_rouge_lsum_uses_sentences():
    """ROUGE-Lsum splits sentences (union LCS), so swapping two sentences keeps it at 100 while ROUGE-L drops."""
    s = score(["b c d. a b c."], ["a b c. b c d."])
    assert s.rougeLsum == pytest.approx(100.0) and s.rougeL < 100


def test_alignment_by_id_and_by_order():
    """Predictions are matched to references by id when both have ids, else by order with equal counts."""
    refs = TextSet(["r1", "r2"], ["a", "b"])
    assert align(TextSet(["p2", "p1"], ["b", "a"]), refs) == ["p1", "p2"]
    with pytest.raises(ValueError, match="without a prediction"):
        align(TextSet(["p1"], ["a"]), refs)
    with pytest.raises(ValueError, match="1 predictions but"):
        align(TextSet(["p1"], None), refs)
    assert lead("one two  three four", 2) == "one two"


def test_cli_scores_files_with_lead_baseline(tmp_path: Path, capsys):
    """The CLI reads decode's JSONL and JSONL references, adds a lead baseline, prints a table and writes JSON."""
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"id": "x", "src": "council approves budget after long debate", "tgt":
                               "Council Approves Budget"}) + "\n" + json.dumps(
        {"id": "y", "src": "storm hits coast overnight", "tgt": "Storm Hits Coast"}) + "\n")
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"id": "y", "prediction": "storm hits coast"}) + "\n" +
                    json.dumps({"id": "x", "prediction": "council passes budget"}) + "\n")
    out = tmp_path / "scores.json"
    assert main(["--pred", str(pred), "--ref", str(ref), "--lead", "3", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| pred.jsonl | 2 |" in table and "| lead-3 | 2 |" in table
    scores = {r["system"]: r for r in json.loads(out.read_text())["scores"]}
    assert scores["lead-3"]["rouge1"] == pytest.approx(100.0)  # both sources start with their headline
    assert scores["pred.jsonl"]["rouge1"] == pytest.approx(100 * (1.0 + 2 / 3) / 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_predictions(bad)


def test_bootstrap_interval_matches_a_direct_loop():
    """The vectorised percentile interval equals a plain loop over the same resamples; it brackets the mean,
    is degenerate for constant scores, and the paired difference of a system with itself is exactly 0."""
    import numpy as np

    from pmlm_engine.evaluate import bootstrap_ci, bootstrap_indices

    rng = np.random.default_rng(5)
    values = rng.random(37).tolist()
    idx = bootstrap_indices(len(values), 500, seed=3)
    assert idx.shape == (500, 37) and idx.min() >= 0 and idx.max() < 37
    means = sorted(100 * sum(values[j] for j in row) / 37 for row in idx.tolist())
    lo, hi = bootstrap_ci(values, idx)
    assert lo == pytest.approx(np.percentile(means, 2.5)) and hi == pytest.approx(np.percentile(means, 97.5))
    assert lo < 100 * np.mean(values) < hi and hi - lo > 1  # 37 uniform scores: a wide interval
    assert bootstrap_ci([0.25] * 10, bootstrap_indices(10, 50, 0)) == pytest.approx((25.0, 25.0))
    assert (bootstrap_indices(37, 500, 3) == idx).all() and not (bootstrap_indices(37, 500, 4) == idx).all()
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_indices(5, 0, 0)


def test_cli_bootstrap_reports_intervals_and_paired_differences(tmp_path: Path, capsys):
    """--bootstrap adds per-system intervals and system-minus-baseline intervals to the table and the JSON."""
    ref = tmp_path / "ref.jsonl"
    srcs = ["council approves budget after debate", "storm hits coast overnight", "team wins cup final again",
            "court blocks new rule today"]
    tgts = ["council approves budget", "storm hits coast", "team wins final", "judge halts rule"]
    ref.write_text("".join(json.dumps({"id": str(i), "src": s, "tgt": t}) + "\n"
                           for i, (s, t) in enumerate(zip(srcs, tgts))))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"id": str(i), "prediction": p}) + "\n" for i, p in enumerate(
        ["council approves budget", "storm hits coast", "team wins final", "court blocks rule"])))
    out = tmp_path / "scores.json"
    assert main(["--pred", str(pred), "--ref", str(ref), "--lead", "3", "--bootstrap", "300", "--output",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "95% bootstrap intervals (300 resamples, seed 0)" in printed and "| pred.jsonl - lead-3 |" in printed
    boot = json.loads(out.read_text())["bootstrap"]
    scores = {r["system"]: r for r in json.loads(out.read_text())["scores"]}
    for system in ("pred.jsonl", "lead-3"):
        for k in ("rouge1", "rouge2", "rougeL"):
            lo, hi = boot["intervals"][system][k]
            assert lo <= scores[system][k] <= hi
    lo, hi = boot["differences"]["pred.jsonl - lead-3"]["rouge1"]
    assert 0 <= lo < hi  # the predictions are never worse than lead-3 on any example
    assert main(["--pred", str(pred), "--ref", str(ref), "--bootstrap", "-1"]) == 2  # usage (pmlm_engine/errors.py)
    assert "--bootstrap -1" in capsys.readouterr().err


def test_sentence_split_rule():
    """The documented rule: . ! ? (+ closing quotes) before whitespace and an uppercase letter, digit or quote;
    abbreviations, initials and dotted acronyms do not end a sentence; newlines do."""
    from pmlm_engine.evaluate import split_sentences

    assert split_sentences("Mr. Smith went to Washington. He met Dr. J. Doe at 5 p.m. on Jan. 5. Then he left!") == [
        "Mr. Smith went to Washington.", "He met Dr. J. Doe at 5 p.m. on Jan. 5.", "Then he left!"]
    assert split_sentences('The U.S. said "no." Later, 3 came. "Why?" he asked.') == [
        'The U.S. said "no."', "Later, 3 came.", '"Why?" he asked.']
    assert split_sentences("a first line\nsecond one. lowercase stays") == ["a first line",
                                                                           "second one. lowercase stays"]
    assert split_sentences("   ") == []


def test_cli_lead_sentences_and_words_baselines(tmp_path: Path, capsys):
    """--baseline lead-sentences:K and lead-words:N score the first K sentences / N words; bad specs are errors."""
    from pmlm_engine.evaluate import lead_sentences, parse_baseline

    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"id": "x", "src": "Council approves budget. Debate was long. Mr. Lee objected.",
                               "tgt": "Council approves budget."}) + "\n")
    out = tmp_path / "s.json"
    assert main(["--ref", str(ref), "--baseline", "lead-sentences:1", "--baseline", "lead-sentences:2",
                 "--baseline", "lead-words:3", "--output", str(out)]) == 0
    scores = {r["system"]: r for r in json.loads(out.read_text())["scores"]}
    assert set(scores) == {"lead-1-sentences", "lead-2-sentences", "lead-3"}
    assert scores["lead-1-sentences"]["rouge1"] == pytest.approx(100.0)
    assert scores["lead-2-sentences"]["rouge1"] < 100.0
    assert scores["lead-3"]["rouge1"] == pytest.approx(100.0)
    assert lead_sentences("Ab cd. Ef gh. Mr. Lee ij.", 2) == "Ab cd. Ef gh."
    for bad in ("lead-sentences", "lead-sentences:0", "lead-paragraphs:2", "lead-words:x"):
        with pytest.raises(ValueError, match="lead-words:N or lead-sentences:K"):
            parse_baseline(bad)
    assert main(["--ref", str(ref), "--baseline", "lead-lines:2"]) == 2  # usage (pmlm_engine/errors.py)
    capsys.readouterr()
