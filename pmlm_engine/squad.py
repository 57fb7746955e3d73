"""Question generation from SQuAD-format data: (passage, answer) -> question pairs for fine-tuning.

    python -m pmlm_engine.squad train-v1.1.json runs/qg/train.jsonl
    python -m pmlm_engine.squad --fixture runs/qg/fixture.jsonl     # the real SQuAD fixture of allennlp 0.9.0

Source format (our choice): ``src = "<answer> [SEP] <passage>"``, ``tgt = question``. The
answer goes first so that the source truncation of fine-tuning and decoding, which keeps the
*head* of the source (``max_src_len`` tokens, :mod:`pmlm_engine.s2s_data`), can never cut the
answer away; the ``[SEP]`` text becomes the ``[SEP]`` id in both tokenizers, separating answer
and passage inside the source segment. (UniLM's QG data instead marks the answer inside the
passage; with long passages truncation could then remove it.) A passage longer than
``max_src_len`` loses its tail, possibly the sentence holding the answer: raise the limit
(the paper used 464 source tokens) if that matters.

Rules, all documented and counted (nothing is dropped silently):

* a question with several answers (SQuAD dev sets: one per annotator) uses the first;
* SQuAD 2.0 unanswerable questions (``is_impossible`` or no answers) are skipped, counted
  and logged: there is no answer to condition on;
* structural problems are a ``ValueError`` naming the file and the JSON path
  (``data[0].paragraphs[1].qas[2]``): missing or mistyped fields, an empty question or
  passage, an answer whose ``answer_start`` does not point at its text, a repeated id.

Output records: ``{"id", "src", "tgt", "answer", "title"}``; evaluate BLEU-4 with
``python -m pmlm_engine.evaluate --pred PRED.jsonl --ref PAIRS.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

ALLENNLP_PACKAGE = ("allennlp", "0.9.0")
FIXTURE = "allennlp/tests/fixtures/data/squad.json"


@dataclass
class SquadStats:
    """Counts of one conversion."""

    articles: int = 0
    paragraphs: int = 0
    questions: int = 0
    pairs: int = 0
    unanswerable_skipped: int = 0
    multi_answer: int = 0
    """Questions with several answers (the first was used)."""


def fixture_path(cache_dir: str | Path | None = None) -> Path:
    """The real SQuAD fixture shipped in the ``allennlp==0.9.0`` wheel (two paragraphs, five questions)."""
    from .corpus import package_file

    return package_file(*ALLENNLP_PACKAGE, FIXTURE, cache_dir)


def _need(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing field {key!r}; SQuAD format is data[].paragraphs[].qas[] with context, "
                         "question, id and answers[].text / answer_start")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def squad_qg_pairs(path: str | os.PathLike) -> tuple[list[dict[str, Any]], SquadStats]:
    """Question-generation pairs of a SQuAD v1.1 / v2.0 JSON file (rules in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    stats = SquadStats()
    pairs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for a, article in enumerate(_need(data, "data", list, str(path))):
        stats.articles += 1
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, para in enumerate(_need(article, "paragraphs", list, f"{path}: data[{a}]")):
            where_p = f"{path}: data[{a}].paragraphs[{p}]"
            stats.paragraphs += 1
            context = _need(para, "context", str, where_p)
            if not context.strip():
                raise ValueError(f"{where_p}.context is empty")
            for q, qa in enumerate(_need(para, "qas", list, where_p)):
                where = f"{where_p}.qas[{q}]"
                stats.questions += 1
                if not isinstance(qa, dict) or not isinstance(qa.get("id"), (str, int)) or isinstance(qa["id"], bool):
                    raise ValueError(f"{where}: missing or mistyped field 'id' (a string)")
                qid = str(qa["id"])
                if qid in seen:
                    raise ValueError(f"{where}: id {qid!r} repeats; SQuAD ids are unique")
                seen.add(qid)
                question = _need(qa, "question", str, where).strip()
                if not question:
                    raise ValueError(f"{where}.question is empty")
                answers = _need(qa, "answers", list, where)
                if qa.get("is_impossible") or not answers:
                    stats.unanswerable_skipped += 1
                    continue
                if len(answers) > 1:
                    stats.multi_answer += 1
                text = _need(answers[0], "text", str, f"{where}.answers[0]")
                start = _need(answers[0], "answer_start", int, f"{where}.answers[0]")
                if not text.strip() or context[start:start + len(text)] != text:
                    raise ValueError(f"{where}.answers[0]: answer_start={start} does not point at the answer text "
                                     f"{text!r} (the context there reads {context[start:start + len(text)]!r})")
                pairs.append({"id": qid, "src": f"{text.strip()} [SEP] {context.strip()}", "tgt": question,
                              "answer": text, "title": title})
    stats.pairs = len(pairs)
    if stats.unanswerable_skipped:
        log.warning("%s: skipped %d unanswerable questions (SQuAD 2.0 is_impossible / no answers)", path,
                    stats.unanswerable_skipped)
    log.info("%s: %d articles, %d paragraphs, %d questions -> %d pairs (%d with several answers: first used)",
             path, stats.articles, stats.paragraphs, stats.questions, stats.pairs, stats.multi_answer)
    if not pairs:
        raise ValueError(f"{path} holds no answerable question")
    return pairs, stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pmlm_engine.squad``, inside the shared error boundary."""
    from .errors import run_cli

    return run_cli(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.squad", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", default=None, help="SQuAD JSON file (omit with --fixture)")
    p.add_argument("output", help="JSONL of {id, src, tgt, answer, title} to write")
    p.add_argument("--fixture", action="store_true", help="read allennlp 0.9.0's real SQuAD fixture")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.fixture == (args.input is not None):
        raise ValueError("give either a SQuAD file or --fixture")
    from .outputs import check_output_file
    from .s2s_data import write_jsonl

    check_output_file(args.output, inputs=[args.input], what="output")  # before any work
    pairs, stats = squad_qg_pairs(fixture_path() if args.fixture else args.input)
    write_jsonl(pairs, args.output)
    print(f"wrote {stats.pairs} pairs to {args.output} ({stats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
