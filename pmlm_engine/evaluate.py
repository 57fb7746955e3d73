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

Repetition (``--repetition``): per system, the share of predictions that repeat a content word
(a lowercase alphanumeric word outside :data:`STOPWORDS`, e.g. "perl module for perl") and the
share that repeat a word bigram (:func:`repetition_rates`).

Baselines (``--baseline``, repeatable; they need sources: JSONL references with ``"src"`` or a
built-in split):

* ``lead-words:N``: the first ``N`` whitespace-separated words of the source (``--lead N`` is
  the same; its row is named ``lead-N``);
* ``lead-sentences:K``: the first ``K`` sentences of the source (row ``lead-K-sentences``), split
  by :func:`split_sentences`' rule: a sentence ends at ``.``, ``!`` or ``?`` (plus any closing
  quotes or brackets) followed by whitespace and an uppercase letter, a digit or an opening
  quote, unless the word ending in ``.`` is a known abbreviation (``Mr.``, ``Dr.``, ``St.``,
  ``Jan.``, ``Inc.``, ``e.g.``, ...), a single letter (an initial) or letters joined by dots
  (``U.S.``). Newlines always end a sentence. A rule, not a model: it misses boundaries after
  an abbreviation that really ends a sentence.

``--bootstrap N`` adds 95% confidence intervals for ROUGE-1/2/L (percentile bootstrap: N
resamples of the examples with replacement, seeded by ``--bootstrap-seed``), and, for every
prediction file against every baseline, the interval of the paired difference on the
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

from .errors import run_cli
from .outputs import atomic_file, check_output_file, json_safe

log = logging.getLogger("pmlm_engine.evaluate")

_SENT_END = re.compile(r"(?<=[.!?])\s+")
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset("""mr mrs ms dr st jr sr prof gen gov sen rep lt col sgt capt cmdr adm maj rev hon pres
    inc ltd co corp bros dept univ assn ave blvd rd mt ft vs etc e.g i.e al approx est fig
    jan feb mar apr jun jul aug sep sept oct nov dec""".split())


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


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` by the rule in the module docstring (whitespace inside kept as is)."""
    out: list[str] = []
    for line in text.split("\n"):
        start = 0
        for m in _BOUNDARY.finditer(line):
            if line[m.start()] == ".":
                word = line[start:m.start()].split()[-1:] or [""]
                w = word[0].lstrip("\"'(\u201c\u2018[").lower()
                if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()) or re.fullmatch(r"(?:[a-z]\.)+[a-z]", w):
                    continue
            out.append(line[start:m.end()].strip())
            start = m.end()
        rest = line[start:].strip()
        if rest:
            out.append(rest)
    return [s for s in out if s]


def lead_sentences(text: str, k: int) -> str:
    """The first ``k`` sentences of ``text`` (:func:`split_sentences`), joined by a space."""
    return " ".join(split_sentences(text)[:k])


BASELINES = ("lead-words", "lead-sentences")

STOPWORDS = frozenset("""a an the of in on at to for from by with and or but as is are was were be been it its
    this that these those he she they we you i his her their our your not no s t""".split())
_WORD = re.compile(r"[a-z0-9]+")


def repetition_rates(texts: Sequence[str]) -> dict[str, float]:
    """Percent of ``texts`` repeating a content word / a word bigram (lowercased alphanumeric words)."""
    word = bigram = 0
    for text in texts:
        words = _WORD.findall(text.lower())
        content = [w for w in words if w not in STOPWORDS]
        word += len(set(content)) < len(content)
        pairs = list(zip(words, words[1:]))
        bigram += len(set(pairs)) < len(pairs)
    n = max(len(texts), 1)
    return {"repeated_word_pct": 100.0 * word / n, "repeated_bigram_pct": 100.0 * bigram / n}


def parse_baseline(spec: str) -> tuple[str, int]:
    """``"lead-words:N"`` / ``"lead-sentences:K"`` -> ``(kind, count)`` (``ValueError`` naming the fix)."""
    kind, _, count = spec.partition(":")
    if kind not in BASELINES or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--baseline {spec!r}: expected lead-words:N or lead-sentences:K with a positive count")
    return kind, int(count)


def baseline(kind: str, count: int, source: str) -> str:
    """The baseline ``kind`` (:data:`BASELINES`) of one source."""
    return lead(source, count) if kind == "lead-words" else lead_sentences(source, count)


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
    """``python -m pmlm_engine.evaluate``, inside the shared error boundary."""
    return run_cli(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", nargs="*", default=[], help="prediction files (JSONL from decode, or plain text)")
    p.add_argument("--ref", required=True, help="references: JSONL, plain text, or a built-in split (news:test)")
    p.add_argument("--lead", type=int, nargs="*", default=[], metavar="N",
                   help="add lead-N baselines (first N words of the source; = --baseline lead-words:N)")
    p.add_argument("--baseline", action="append", default=[], metavar="KIND:N",
                   help="add a baseline: lead-words:N (first N words) or lead-sentences:K (first K sentences); "
                        "repeatable")
    p.add_argument("--cased-bleu", action="store_true", help="case-sensitive BLEU (default: lowercased)")
    p.add_argument("--repetition", action="store_true",
                   help="also report the share of predictions repeating a content word / a word bigram")
    p.add_argument("--output", default=None, help="write the scores as JSON here")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="95%% bootstrap intervals of ROUGE-1/2/L from N resamples, and of each prediction file's "
                        "difference to each baseline (default 0: off; 1000 is usual)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resamples (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .cli import quiet_dependencies

    quiet_dependencies()  # absl's "Using default tokenizer." once per system
    baselines = [("lead-words", n) for n in args.lead] + [parse_baseline(b) for b in args.baseline]
    if not args.pred and not baselines:
        raise ValueError("nothing to score: give --pred FILE and/or --baseline lead-words:N | lead-sentences:K")
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap}: expected 0 (off) or a number of resamples")
    if args.output:  # before any work: not a folder, not one of the inputs
        check_output_file(args.output, inputs=[args.ref, *args.pred])
    refs = read_references(args.ref)
    rows: list[Scores] = []
    outputs: list[list[str]] = []  # each row's texts, for the bootstrap
    repetition: dict[str, dict[str, float]] = {}
    for f in args.pred:
        preds = align(read_predictions(f), refs)
        rows.append(score(preds, refs.texts, Path(f).name, not args.cased_bleu))
        outputs.append(preds)
        if args.repetition:
            repetition[Path(f).name] = repetition_rates(preds)
    for kind, n in baselines:
        if refs.sources is None:
            raise ValueError(f"baselines need sources: {args.ref} has no \"src\" field")
        if n < 1:
            raise ValueError(f"--lead {n}: expected a positive number of words")
        name = f"lead-{n}" if kind == "lead-words" else f"lead-{n}-sentences"
        outputs.append([baseline(kind, n, s) for s in refs.sources])
        rows.append(score(outputs[-1], refs.texts, name, not args.cased_bleu))
    intervals = (bootstrap_report(rows, outputs, refs.texts, len(args.pred), args.bootstrap, args.bootstrap_seed)
                 if args.bootstrap else None)
    print(markdown(rows))
    if intervals:
        print(intervals["markdown"])
    if args.repetition:
        repetition["references"] = repetition_rates(refs.texts)
        for name, rates in repetition.items():
            print(f"{name}: {rates['repeated_word_pct']:.1f}% repeat a content word, "
                  f"{rates['repeated_bigram_pct']:.1f}% a word bigram")
    if args.output:
        out: dict[str, Any] = {"references": args.ref, "scores": [asdict(r) for r in rows]}
        if args.repetition:
            out["repetition"] = repetition
        if intervals:
            out["bootstrap"] = {k: v for k, v in intervals.items() if k != "markdown"}
        with atomic_file(args.output) as fh:
            fh.write(json.dumps(json_safe(out), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
