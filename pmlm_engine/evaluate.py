"""ROUGE-1/2/L/Lsum and BLEU-4 of predictions against references, with an optional lead baseline.

    python -m pmlm_engine.evaluate --pred runs/news-ft/pred.jsonl --ref news:test --lead 10 --output rouge.json

Metrics:

* ROUGE (``rouge-score``, Porter stemming, its own tokenizer: lowercase, alphanumeric tokens):
  the F-measure of ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum per example, averaged, times 100.
  ROUGE-Lsum treats newlines as sentence boundaries; texts are split into sentences after
  ``. ! ?`` followed by whitespace (a one-sentence headline has ROUGE-Lsum = ROUGE-L).
* BLEU-4 (``sacrebleu.corpus_bleu``, its ``13a`` tokenizer, one reference per example),
  lowercased by default because the project's models are uncased (``--cased-bleu`` to keep case).

Inputs:

* predictions: JSONL with ``"prediction"`` (and ``"id"``), as :mod:`pmlm_engine.decode` writes,
  or a plain text file, one prediction per line;
* references: JSONL with ``"tgt"`` (or ``"reference"``) and optional ``"id"`` / ``"src"``, a
  plain text file, or a built-in split such as ``news:test`` (:mod:`pmlm_engine.s2s_data`).

When both sides carry ids (JSONL or built-in) they are matched by id and every reference
needs exactly one prediction; otherwise they are matched by line order and the counts must be
equal. Mismatches are errors naming the ids or counts. Empty predictions score 0 and are counted.

``--lead N`` adds the baseline "first N words of the source" (needs sources: JSONL references
with ``"src"`` or a built-in split).

``--bootstrap N`` adds 95% confidence intervals for ROUGE-1/2/L (percentile bootstrap: N
resamples of the examples with replacement, seeded by ``--bootstrap-seed``), and, for every
prediction file against every lead baseline, the interval of the paired difference on the
same resamples (a win is a win when that interval is above 0). BLEU, a corpus statistic, gets
no interval.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("pmlm_engine.evaluate")

_SENT_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Scores:
    """Corpus-level scores (all times 100)."""

    system: str
    examples: int
    rouge1: float
    rouge2: float
    rougeL: float
    rougeLsum: float
    bleu4: float
    empty_predictions: int


@dataclass
class TextSet:
    """Texts read from one file or split, with ids if the source had them."""

    texts: list[str]
    ids: Optional[list[str]]
    sources: Optional[list[str]] = None
    where: str = ""


def _sentences(text: str) -> str:
    return "\n".join(s for s in _SENT_END.split(text.strip()) if s)


def score(predictions: Sequence[str], references: Sequence[str], system: str = "model",
          lowercase_bleu: bool = True) -> Scores:
    """ROUGE-1/2/L/Lsum F-measures (mean over examples) and corpus BLEU-4, all times 100."""
    from rouge_score import rouge_scorer
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    sums = dict(rouge1=0.0, rouge2=0.0, rougeL=0.0, rougeLsum=0.0)
    for pred, ref in zip(predictions, references):
        result = scorer.score(_sentences(ref), _sentences(pred))  # (target, prediction)
        for key in sums:
            sums[key] += result[key].fmeasure
    n = len(references)
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], lowercase=lowercase_bleu)
    empty = sum(1 for p in predictions if not p.strip())
    if empty:
        log.warning("%s: %d of %d predictions are empty (they score 0)", system, empty, n)
    return Scores(system, n, *(100 * sums[k] / n for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")),
                  bleu.score, empty)


BOOTSTRAP_METRICS = ("rouge1", "rouge2", "rougeL")


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measures of each example (fractions, not percents): what the bootstrap resamples."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(BOOTSTRAP_METRICS), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in BOOTSTRAP_METRICS}
    for pred, ref in zip(predictions, references):
        result = scorer.score(_sentences(ref), _sentences(pred))
        for key in BOOTSTRAP_METRICS:
            out[key].append(result[key].fmeasure)
    return out


def bootstrap_indices(n: int, resamples: int, seed: int) -> Any:
    """``(resamples, n)`` example indices drawn with replacement; the same draws serve every system so
    that differences between systems are paired."""
    import numpy as np

    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs examples and resamples, got n={n}, resamples={resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(values: Sequence[float], indices: Any, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval (times 100) of the mean of ``values`` over the resamples ``indices``."""
    import numpy as np

    means = np.asarray(values, dtype=np.float64)[indices].mean(axis=1) * 100
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def lead(text: str, n_words: int) -> str:
    """The first ``n_words`` whitespace-separated words of ``text``."""
    return " ".join(text.split()[:n_words])


# --------------------------------------------------------------------------- reading


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}; re-encode the file") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_predictions(path: str | os.PathLike) -> TextSet:
    """Predictions from JSONL (``prediction`` + ``id``) or plain text (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    lines = _read_lines(path)
    if path.suffix != ".jsonl":
        return TextSet(lines, None, where=str(path))
    texts, ids = [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prediction"), str):
            raise ValueError(f'{path}:{lineno}: expected an object with a string "prediction" (as decode writes)')
        texts.append(rec["prediction"])
        ids.append(str(rec.get("id", lineno)))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: repeated ids; each example must be predicted once")
    return TextSet(texts, ids, where=str(path))


def read_references(spec: str) -> TextSet:
    """References from JSONL (``tgt`` or ``reference``), plain text, or a built-in split (``news:test``)."""
    from .corpus import CORPORA
    from .s2s_data import load_pair_spec

    path = Path(spec)
    if spec.partition(":")[0] in CORPORA and not path.exists():
        recs = load_pair_spec(spec, default_split="test")
        return TextSet([str(r.tgt) for r in recs], [r.id for r in recs], [str(r.src) for r in recs], spec)
    if not path.is_file():
        raise FileNotFoundError(f"references {spec} is neither a file nor a built-in split (news:test, ...)")
    lines = _read_lines(path)
    if path.suffix != ".jsonl":
        return TextSet(lines, None, where=spec)
    texts, ids, srcs = [], [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        ref = rec.get("tgt", rec.get("reference")) if isinstance(rec, dict) else None
        if not isinstance(ref, str) or not ref.strip():
            raise ValueError(f'{path}:{lineno}: expected an object with a non-empty string "tgt" or "reference"')
        texts.append(ref)
        ids.append(str(rec.get("id", lineno)))
        srcs.append(rec.get("src") if isinstance(rec.get("src"), str) else None)
    return TextSet(texts, ids, srcs if all(s is not None for s in srcs) else None, spec)


def align(preds: TextSet, refs: TextSet) -> list[str]:
    """Predictions in reference order (by id when both have ids, else by position)."""
    if preds.ids is not None and refs.ids is not None:
        by_id = dict(zip(preds.ids, preds.texts))
        missing = [i for i in refs.ids if i not in by_id]
        extra = sorted(set(by_id) - set(refs.ids))
        if missing or extra:
            raise ValueError(f"{preds.where} and {refs.where} do not match: {len(missing)} references without a "
                             f"prediction (e.g. ids {missing[:3]}), {len(extra)} predictions without a reference "
                             f"(e.g. ids {extra[:3]})")
        return [by_id[i] for i in refs.ids]
    if len(preds.texts) != len(refs.texts):
        raise ValueError(f"{preds.where} has {len(preds.texts)} predictions but {refs.where} has "
                         f"{len(refs.texts)} references (matched by line order)")
    return preds.texts


def markdown(rows: Sequence[Scores]) -> str:
    head = "| system | examples | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | BLEU-4 |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.system} | {r.examples} | {r.rouge1:.2f} | {r.rouge2:.2f} | {r.rougeL:.2f} | "
                     f"{r.rougeLsum:.2f} | {r.bleu4:.2f} |")
    return "\n".join(lines)


def bootstrap_report(rows: Sequence[Scores], outputs: Sequence[Sequence[str]], references: Sequence[str],
                     n_systems: int, resamples: int, seed: int) -> dict[str, Any]:
    """95% intervals of every row's ROUGE-1/2/L, and of each of the first ``n_systems`` rows minus
    each later (baseline) row, all on the same resamples."""
    idx = bootstrap_indices(len(references), resamples, seed)
    per = [rouge_per_example(texts, references) for texts in outputs]
    ci = {r.system: {k: bootstrap_ci(p[k], idx) for k in BOOTSTRAP_METRICS} for r, p in zip(rows, per)}
    diffs: dict[str, dict[str, tuple[float, float]]] = {}
    for i in range(n_systems):
        for j in range(n_systems, len(rows)):
            diffs[f"{rows[i].system} - {rows[j].system}"] = {
                k: bootstrap_ci([a - b for a, b in zip(per[i][k], per[j][k])], idx) for k in BOOTSTRAP_METRICS}
    lines = [f"95% bootstrap intervals ({resamples} resamples, seed {seed})", "",
             "| system | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.system} | " + " | ".join(
            f"{getattr(r, k):.2f} [{ci[r.system][k][0]:.2f}, {ci[r.system][k][1]:.2f}]" for k in BOOTSTRAP_METRICS)
            + " |")
    for name, d in diffs.items():
        lines.append(f"| {name} | " + " | ".join(f"[{d[k][0]:+.2f}, {d[k][1]:+.2f}]" for k in BOOTSTRAP_METRICS)
                     + " |")
    return {"resamples": resamples, "seed": seed, "level": 0.95, "intervals": ci, "differences": diffs,
            "markdown": "\n".join(lines)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", nargs="*", default=[], help="prediction files (JSONL from decode, or plain text)")
    p.add_argument("--ref", required=True, help="references: JSONL, plain text, or a built-in split (news:test)")
    p.add_argument("--lead", type=int, nargs="*", default=[], metavar="N",
                   help="add lead-N baselines (first N words of the source)")
    p.add_argument("--cased-bleu", action="store_true", help="case-sensitive BLEU (default: lowercased)")
    p.add_argument("--output", default=None, help="write the scores as JSON here")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="95%% bootstrap intervals of ROUGE-1/2/L from N resamples, and of each prediction file's "
                        "difference to each lead baseline (default 0: off; 1000 is usual)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resamples (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not args.pred and not args.lead:
            raise ValueError("nothing to score: give --pred FILE and/or --lead N")
        refs = read_references(args.ref)
        rows: list[Scores] = []
        outputs: list[list[str]] = []  # each row's texts, for the bootstrap
        for f in args.pred:
            texts = align(read_predictions(f), refs)
            rows.append(score(texts, refs.texts, Path(f).name, not args.cased_bleu))
            outputs.append(texts)
        for n in args.lead:
            if refs.sources is None:
                raise ValueError(f"--lead needs sources: {args.ref} has no \"src\" field")
            if n < 1:
                raise ValueError(f"--lead {n}: expected a positive number of words")
            outputs.append([lead(s, n) for s in refs.sources])
            rows.append(score(outputs[-1], refs.texts, f"lead-{n}", not args.cased_bleu))
        if args.bootstrap < 0:
            raise ValueError(f"--bootstrap {args.bootstrap}: expected 0 (off) or a number of resamples")
        intervals = (bootstrap_report(rows, outputs, refs.texts, len(args.pred), args.bootstrap, args.bootstrap_seed)
                     if args.bootstrap else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown(rows))
    if intervals:
        print(intervals["markdown"])
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"references": args.ref, "scores": [asdict(r) for r in rows]}
        if intervals:
            result["bootstrap"] = {k: v for k, v in intervals.items() if k != "markdown"}
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
