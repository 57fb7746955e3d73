"""Source -> target pairs for fine-tuning, decoding and evaluation: reading, splitting, encoding.

A *pair spec* names where pairs come from:

* a ``.jsonl`` file: one JSON object per line with ``"src"`` and (for training and
  references) ``"tgt"``, each a string or a list of token ids, and an optional ``"id"``
  (string or integer; default: the line number). Blank lines hold no record and are
  skipped. Every other problem is a ``ValueError`` naming ``file:line`` and the fix:
  invalid JSON, a record that is not an object, a missing or mistyped field, an empty
  ``src`` / ``tgt`` (also one that tokenizes to nothing), an id outside the vocabulary,
  a repeated id. Nothing is dropped silently.
* ``NAME`` or ``NAME:SPLIT`` for a built-in pair corpus (:data:`pmlm_engine.corpus.CORPORA`:
  ``news`` article -> headline, ``wiki`` lead -> description, ``acl`` paper -> summary) with
  ``SPLIT`` one of ``train``, ``test``, ``all``, ``valid``, ``fit``.

**Held-out splits** (fixed, documented, independent of file order): for ``news`` and
``wiki`` the test split is the :data:`TEST_SIZE` = 200 pairs whose
``sha256("<corpus>:<id>")`` hex digests are smallest; the rest is ``train``. ``acl`` uses
the dataset's own split (train + val -> ``train``, test -> ``test``). For ``news``
(3,695 pairs) that is 3,495 train / 200 test.

**Validation** (for choosing settings without looking at the test split): ``valid`` is the
:data:`VALID_SIZE` = 200 ``train`` pairs whose ``sha256("<corpus>:valid:<id>")`` digests are
smallest, ``fit`` is ``train`` without them (fine-tune on ``fit``, choose on ``valid``, report
on ``test``). ``train`` itself is unchanged (``fit`` + ``valid``). For ``acl``, ``valid`` is the dataset's own
validation part and ``fit`` its training part.

**Truncation** (:func:`encode_pairs`), counted and logged, never silent: the source keeps
its first ``max_src_len`` tokens (the lead of an article, where a headline's content
usually is); the target keeps its first ``max_tgt_len - 1`` tokens and gets ``[SEP]`` as
end-of-sequence token, so a target is at most ``max_tgt_len`` tokens *including* ``[SEP]``.
Token-id lists are the text's tokens without ``[CLS]`` / ``[SEP]``; the same rules apply.

CLI (writes a split as JSONL, e.g. the references for :mod:`pmlm_engine.evaluate`)::

    python -m pmlm_engine.s2s_data export news:test runs/news/test.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import run_cli
from .outputs import atomic_file, check_output_file, json_safe

log = logging.getLogger(__name__)

TEST_SIZE = 200
VALID_SIZE = 200
SPLITS = ("train", "test", "all", "valid", "fit")
Text = Union[str, list[int]]


@dataclass
class PairRecord:
    """One source -> target example as read (text or token ids)."""

    id: str
    src: Text
    tgt: Optional[Text]
    where: str
    """``file:line`` or ``corpus:id``, for messages."""


# --------------------------------------------------------------------------- reading


def _check_text(value: Any, name: str, where: str) -> Text:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f'{where}: empty "{name}": every example needs a non-empty {name}; fix or remove the line')
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError(f'{where}: empty "{name}" token list: every example needs a non-empty {name}')
        bad = [v for v in value if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f'{where}: "{name}" holds non-integer entries {bad[:3]}; a token-id list holds integers')
        return list(value)
    raise ValueError(f'{where}: "{name}" must be a string or a list of token ids, got {type(value).__name__}')


def read_jsonl_pairs(path: str | os.PathLike, require_tgt: bool = True) -> list[PairRecord]:
    """Pairs of a JSONL file (see the module docstring for the format and the errors).

    ``require_tgt=False`` (decoding inputs): ``"tgt"`` is not needed and, if present, not read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    records: list[PairRecord] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                                 "re-encode the file as UTF-8") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one object '
                                 'such as {"src": "...", "tgt": "..."}') from None
            if not isinstance(rec, dict):
                raise ValueError(f'{where}: expected a JSON object with "src" and "tgt", got a JSON {type(rec).__name__}')
            wanted = ("src", "tgt") if require_tgt else ("src",)
            missing = [k for k in wanted if k not in rec]
            if missing:
                raise ValueError(f"{where}: the record lacks {missing} (keys present: {sorted(rec)})")
            rid = rec.get("id", str(lineno))
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise ValueError(f'{where}: "id" must be a string or an integer, got {type(rid).__name__}')
            rid = str(rid)
            if rid in seen:
                raise ValueError(f"{where}: id {rid!r} repeats line {seen[rid]}; ids must be unique")
            seen[rid] = lineno
            tgt = _check_text(rec["tgt"], "tgt", where) if require_tgt else None  # decoding ignores targets
            records.append(PairRecord(rid, _check_text(rec["src"], "src", where), tgt, where))
    if not records:
        raise ValueError(f"{path} holds no records; expected one JSON object per line")
    return records



def hash_test_ids(corpus: str, ids: Sequence[str], size: int = TEST_SIZE) -> frozenset[str]:
    """The ``size`` ids with the smallest ``sha256(f"{corpus}:{id}")`` digests."""
    if size > len(ids):
        raise ValueError(f"test split of {size} pairs asked from {len(ids)} pairs of {corpus}")
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{corpus}:{i}".encode()).hexdigest())
    return frozenset(ranked[:size])


def builtin_pairs(name: str, split: str, cache_dir: str | Path | None = None) -> list[PairRecord]:
    """Pairs of built-in corpus ``name`` in ``split`` (``train``, ``test``, ``all``), in corpus order."""
    from .corpus import CORPORA, load_pairs

    if name not in CORPORA:
        raise ValueError(f"unknown pair corpus {name!r}: choose one of {sorted(CORPORA)} or pass a .jsonl file")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}: choose one of {SPLITS}")
    pairs = list(load_pairs(name, cache_dir))
    if name == "acl":
        which = {"train": ("train", "val"), "test": ("test",), "all": ("train", "val", "test"),
                 "valid": ("val",), "fit": ("train",)}[split]
        keep = [p for p in pairs if p["split"] in which]
    else:
        test = hash_test_ids(name, [p["id"] for p in pairs])
        keep = [p for p in pairs if split == "all" or (p["id"] in test) == (split == "test")]
        if split in ("valid", "fit"):
            valid = hash_test_ids(f"{name}:valid", [p["id"] for p in keep], VALID_SIZE)
            keep = [p for p in keep if (p["id"] in valid) == (split == "valid")]
    return [PairRecord(str(p["id"]), p["src"], p["tgt"], f"{name}:{p['id']}") for p in keep]


def load_pair_spec(spec: str, default_split: str = "train", require_tgt: bool = True) -> list[PairRecord]:
    """Pairs of a spec: a ``.jsonl`` path, ``NAME`` (``default_split``) or ``NAME:SPLIT``."""
    from .corpus import CORPORA

    name, _, split = spec.partition(":")
    if name in CORPORA and not Path(spec).exists():
        return builtin_pairs(name, split or default_split)
    if Path(spec).suffix == ".jsonl" or Path(spec).is_file():
        return read_jsonl_pairs(spec, require_tgt)
    raise ValueError(f"pairs {spec!r}: not a .jsonl file nor a built-in corpus ({', '.join(sorted(CORPORA))}, "
                     "optionally with :train / :test / :all)")


# --------------------------------------------------------------------------- encoding


@dataclass
class TruncationStats:
    """How many examples :func:`encode_pairs` cut, and how many tokens it cut away."""

    examples: int = 0
    src_truncated: int = 0
    tgt_truncated: int = 0
    src_tokens_cut: int = 0
    tgt_tokens_cut: int = 0
    longest_src: int = 0
    longest_tgt: int = 0

    def log(self, what: str, targets: bool = True) -> None:
        """One log line; ``targets=False`` (decoding: targets are not read) leaves the target counts out."""
        src = (f"{what}: {self.examples} examples; source truncated in {self.src_truncated} ({self.src_tokens_cut} "
               f"tokens cut, longest {self.longest_src})")
        if targets:
            src += (f", target truncated in {self.tgt_truncated} ({self.tgt_tokens_cut} tokens cut, longest "
                    f"{self.longest_tgt})")
        log.info("%s", src)


@dataclass
class EncodedPairs:
    """Token ids ready for :func:`pmlm_engine.layout.build_seq2seq_example`."""

    ids: list[str]
    src: list[list[int]]
    """Source tokens, truncated, without ``[CLS]`` / ``[SEP]``."""
    tgt: list[Optional[list[int]]]
    """Target tokens, truncated, ending with the ``[SEP]`` end-of-sequence token (None if absent)."""
    stats: TruncationStats = field(default_factory=TruncationStats)


def _ids(records: Sequence[PairRecord], which: str, tokenizer: Any) -> list[Optional[list[int]]]:
    texts = [(i, getattr(r, which)) for i, r in enumerate(records) if isinstance(getattr(r, which), str)]
    out: list[Optional[list[int]]] = [getattr(r, which) if isinstance(getattr(r, which), list) else None
                                      for r in records]
    if texts:
        for (i, _), ids in zip(texts, tokenizer.encode_batch([t for _, t in texts])):
            out[i] = list(ids)
    vocab = tokenizer.vocab_size
    for r, ids in zip(records, out):
        if getattr(r, which) is None:
            continue
        if not ids:
            raise ValueError(f'{r.where}: "{which}" tokenizes to nothing (only characters the tokenizer drops); '
                             f"fix or remove the example")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f'{r.where}: "{which}" holds token ids {bad[:3]} outside the vocabulary [0, {vocab})')
    return out


def encode_pairs(records: Sequence[PairRecord], tokenizer: Any, max_src_len: int, max_tgt_len: int) -> EncodedPairs:
    """Tokenize and truncate (rules in the module docstring); the counts are in ``.stats``.

    Args:
        tokenizer: a :class:`pmlm_engine.tokenizer.Tokenizer`.
        max_src_len: source tokens kept (``[CLS]`` and ``[SEP]`` come on top).
        max_tgt_len: target tokens kept, including the appended ``[SEP]``; at least 2.
    """
    if max_src_len < 1:
        raise ValueError(f"max_src_len={max_src_len} must be >= 1")
    if max_tgt_len < 2:
        raise ValueError(f"max_tgt_len={max_tgt_len} must be >= 2 (one token plus [SEP])")
    srcs, tgts = _ids(records, "src", tokenizer), _ids(records, "tgt", tokenizer)
    stats = TruncationStats(examples=len(records))
    out_src: list[list[int]] = []
    out_tgt: list[Optional[list[int]]] = []
    for s, t in zip(srcs, tgts):
        if s is None:
            raise ValueError("internal: a record without a source reached encode_pairs")
        stats.longest_src = max(stats.longest_src, len(s))
        if len(s) > max_src_len:
            stats.src_truncated += 1
            stats.src_tokens_cut += len(s) - max_src_len
        out_src.append(s[:max_src_len])
        if t is None:
            out_tgt.append(None)
            continue
        stats.longest_tgt = max(stats.longest_tgt, len(t) + 1)
        if len(t) > max_tgt_len - 1:
            stats.tgt_truncated += 1
            stats.tgt_tokens_cut += len(t) - (max_tgt_len - 1)
        out_tgt.append(t[:max_tgt_len - 1] + [tokenizer.sep_id])
    return EncodedPairs([r.id for r in records], out_src, out_tgt, stats)


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSONL through a temporary file renamed into place (removed on failure)."""
    path = Path(path)
    with atomic_file(check_output_file(path)) as f:
        for row in rows:  # non-finite numbers (a -inf score) become null: the file stays valid JSON
            f.write(json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False) + "\n")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pmlm_engine.s2s_data export SPEC OUT``, inside the shared error boundary."""
    return run_cli(_main, argv)


def _main(argv: Optional[list[str]]) -> int:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.s2s_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    p_exp = sub.add_parser("export", help="write the pairs of a spec (e.g. news:test) as JSONL {id, src, tgt}")
    p_exp.add_argument("spec", help="news:test, wiki:train, acl:test, or a .jsonl file")
    p_exp.add_argument("out", help="JSONL file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_output_file(args.out, inputs=[args.spec], what="out")
    records = load_pair_spec(args.spec, default_split="all")
    write_jsonl([{"id": r.id, "src": r.src, "tgt": r.tgt} for r in records], args.out)
    print(f"wrote {len(records)} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
