"""Corpora at scale: pre-tokenized, memory-mapped token shards and random access to main sequences.

Nothing here holds a corpus in memory. :func:`build_token_store` streams the documents of
the configured sources (built-in corpora, ``.txt`` / ``.jsonl`` files, folders, globs)
through the tokenizer once and writes them into a cache folder::

    <cache_dir>/<key>/
        meta.json                 # sources, tokenizer, counts, dtype, shard list
        shard-00000.ids           # token ids of many documents, concatenated (raw uint16/uint32)
        shard-00000.offsets.npy   # int64, (docs_in_shard + 1,): document d spans ids[o[d]:o[d+1]]
        ...

``<key>`` hashes the sources (built-in corpus name and package version plus the reader's
code; for files their absolute path, size and modification time), the tokenizer (class and
file bytes) and ``max_docs``: change any of them and a new cache is built, reuse them and
the cache is opened after checking each shard file against the size and CRC-32 that
``meta.json`` records (a damaged cache -- a truncated shard, garbage in ``meta.json`` -- is
rebuilt, with a warning naming the file). The folder is written under a temporary name and
renamed when complete, so a killed run never leaves a half-written cache behind.

:class:`TokenStore` opens a cache with ``numpy.memmap``; :class:`StoreSequences` turns it
into random access to main sequences ``[CLS] A [SEP] B [SEP]`` exactly as
:func:`pmlm_engine.data.main_sequences` would build them from the same documents (same
chunking, same seeded split points, empty documents counted in the document index), so
:class:`pmlm_engine.data.PretrainData` reads a rank's examples by index and touches only
their pages.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .data import MainSequence, document_seed, main_sequence
from .layout import SpecialIds
from .manifest import file_crc32

log = logging.getLogger(__name__)

FORMAT = 2
"""Version of the cache layout; part of the key (2: per-file sizes and CRC-32s in ``meta.json``)."""
META = "meta.json"
TEXT_SUFFIXES = (".txt", ".jsonl")
GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One input of a corpus: a built-in corpus or one text file."""

    kind: str
    """``"builtin"`` or ``"file"``."""
    name: str
    """The corpus name, or the file's absolute path."""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this source's content for the cache key."""
        if self.kind == "builtin":
            from . import corpus

            name, version = corpus.CORPORA[self.name].package
            reader = hashlib.sha256(Path(corpus.__file__).read_bytes()).hexdigest()[:16]
            return {"corpus": self.name, "package": f"{name}=={version}", "reader": reader}
        st = os.stat(self.name)
        return {"file": self.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def documents(self) -> Iterator[str]:
        """The source's documents, read lazily; errors name the file (see ``pmlm_engine.corpus``)."""
        from .corpus import load_corpus, read_text_files

        if self.kind == "builtin":
            return load_corpus(self.name)
        return read_text_files([self.name])


def resolve_sources(specs: Sequence[str]) -> list[Source]:
    """Expand ``data.corpus`` entries into sources, checking that every file exists.

    An entry is a built-in corpus name (``news``, ``wiki``, ``acl``), a ``.txt`` / ``.jsonl``
    file, a folder (its ``.txt`` and ``.jsonl`` files, sorted, not recursive) or a glob
    pattern (matches sorted). Missing files, empty folders, patterns matching nothing and
    unknown names are errors naming the entry.
    """
    from .corpus import CORPORA

    out: list[Source] = []
    for spec in specs:
        if spec in CORPORA:
            out.append(Source("builtin", spec))
            continue
        if GLOB_CHARS & set(spec) and not Path(spec).exists():  # an existing "a[1].txt" is a file, not a pattern
            matches = sorted(p for p in glob.glob(spec) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"data.corpus entry {spec!r} matches no file")
            out.extend(_file_source(Path(m), spec) for m in matches)
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"data.corpus folder {path} holds no .txt or .jsonl file")
            out.extend(_file_source(p, spec) for p in files)
            continue
        if path.suffix in TEXT_SUFFIXES or path.exists():
            if not path.exists():
                raise FileNotFoundError(f"data.corpus file {path} does not exist: fix the path, or use a built-in "
                                        f"corpus ({', '.join(sorted(CORPORA))})")
            out.append(_file_source(path, spec))
            continue
        raise ValueError(f"data.corpus entry {spec!r} is neither a built-in corpus ({', '.join(sorted(CORPORA))}) "
                         f"nor an existing .txt/.jsonl file, folder or glob pattern")
    if not out:
        raise ValueError("data.corpus is empty: name at least one corpus or file")
    return out


def _file_source(path: Path, spec: str) -> Source:
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"data.corpus file {path} (from {spec!r}) has suffix {path.suffix!r}: use .txt (documents "
                         f"separated by blank lines) or .jsonl (one {{\"text\": ...}} object per line)")
    if path.stat().st_size == 0:
        raise ValueError(f"data.corpus file {path} is empty (0 bytes): remove it from data.corpus or fill it")
    return Source("file", str(path.resolve()))


# --------------------------------------------------------------------------- keys


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's class and the bytes of the file it was read from."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    source = Path(getattr(tokenizer, "source", ""))
    if source.is_file():
        h.update(source.read_bytes())
    else:
        raise ValueError(f"tokenizer {tokenizer!r} has no readable source file to fingerprint; load it with "
                         f"pmlm_engine.tokenizer.load_tokenizer(PATH)")
    h.update(f"{tokenizer.vocab_size}:{tokenizer.special_ids()}".encode())
    return h.hexdigest()


def cache_key(sources: Sequence[Source], tokenizer: Any, max_docs: int = 0) -> str:
    """The cache folder name for these sources, tokenizer and document limit."""
    ident = {"format": FORMAT, "sources": [s.fingerprint() for s in sources],
             "tokenizer": tokenizer_fingerprint(tokenizer), "max_docs": max_docs}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$PMLM_CACHE/tokens`` (default ``~/.cache/pmlm_engine/tokens``)."""
    from .corpus import cache_root

    return cache_root() / "tokens"


# --------------------------------------------------------------------------- store


def cache_damage(folder: str | os.PathLike) -> str | None:
    """None when a token cache folder is complete and every shard file matches the size and
    CRC-32 recorded in its ``meta.json``; else what is wrong, naming the file."""
    folder = Path(folder)
    meta_file = folder / META
    if not meta_file.is_file():
        return f"{meta_file} is missing"
    try:
        meta = json.loads(meta_file.read_text())
        shards = meta["shards"]
        files = {name: rec for shard in shards for name, rec in shard["files"].items()}
        np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{meta_file} is not a readable format-{FORMAT} cache description ({type(exc).__name__}: {exc})"
    for name, rec in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != rec["size"]:
            return f"{path} has {path.stat().st_size} bytes, {META} says {rec['size']}"
    for name, rec in files.items():
        if file_crc32(folder / name) != rec["crc32"]:
            return f"{folder / name} does not match its checksum in {META}"
    return None


class TokenStore:
    """Documents of a token cache, memory-mapped: ``store.doc(d)`` is a view, nothing is loaded up front.

    Attributes:
        folder: the cache folder.
        meta: its ``meta.json``.
        num_docs: documents, empty ones included (they keep their index).
        num_tokens: token ids over all documents.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        meta_file = self.folder / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.folder} is not a token cache (no {META}); build it with "
                                    "pmlm_engine.stream.build_token_store")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: token cache format {self.meta.get('format')} is not {FORMAT}; "
                             f"delete the folder to rebuild it")
        dtype = np.dtype(self.meta["dtype"])
        self._ids: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for shard in self.meta["shards"]:
            n = shard["tokens"]
            path = self.folder / shard["ids"]
            self._ids.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
            self._offsets.append(np.load(self.folder / shard["offsets"], mmap_mode="r"))
        counts = [len(o) - 1 for o in self._offsets]
        self._shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (shards + 1,)
        self.num_docs = int(self._shard_start[-1])
        self.num_tokens = int(sum(s["tokens"] for s in self.meta["shards"]))

    def _locate(self, d: int) -> tuple[int, int]:
        if not 0 <= d < self.num_docs:
            raise IndexError(f"document {d} is outside [0, {self.num_docs})")
        s = int(np.searchsorted(self._shard_start, d, side="right")) - 1
        return s, d - int(self._shard_start[s])

    def doc(self, d: int) -> np.ndarray:
        """Token ids of document ``d`` (a read-only view into the memory map)."""
        s, local = self._locate(d)
        off = self._offsets[s]
        return self._ids[s][int(off[local]):int(off[local + 1])]

    def doc_lengths(self) -> np.ndarray:
        """``(num_docs,)`` int64 token counts (reads the offsets only)."""
        if not self._offsets:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(np.asarray(o)) for o in self._offsets]).astype(np.int64)

    def __repr__(self) -> str:
        return f"TokenStore({str(self.folder)!r}, docs={self.num_docs}, tokens={self.num_tokens})"


class StoreSequences:
    """Main sequences of a :class:`TokenStore` by index, equal to ``main_sequences(docs, max_len, special, seed)``.

    Document ``d`` of ``n`` tokens gives ``ceil(n / (max_len - 3))`` sequences (none when
    empty); sequence ``i`` is found by binary search over the cumulative counts
    (``8 bytes`` a document in memory).
    """

    def __init__(self, store: TokenStore, max_len: int, special: SpecialIds, seed: int) -> None:
        self.store = store
        self.max_len = max_len
        self.special = special
        self.seed = seed
        self.body = max_len - 3
        lengths = store.doc_lengths()
        self._chunk_end = np.cumsum(-(-lengths // self.body)).astype(np.int64)  # (num_docs,)
        self.longest = max_len
        """Upper bound of every sequence's length (``PretrainData`` does not scan)."""

    def __len__(self) -> int:
        return int(self._chunk_end[-1]) if len(self._chunk_end) else 0

    def __getitem__(self, index: int) -> MainSequence:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} is outside [0, {len(self)})")
        d = int(np.searchsorted(self._chunk_end, index, side="right"))
        c = index - (int(self._chunk_end[d - 1]) if d else 0)
        ids = self.store.doc(d)[c * self.body:(c + 1) * self.body]
        return main_sequence(np.asarray(ids, dtype=np.int64), c, document_seed(self.seed, d), self.special)


# --------------------------------------------------------------------------- building


def _documents(sources: Sequence[Source], max_docs: int) -> Iterator[str]:
    count = 0
    for source in sources:
        for doc in source.documents():
            yield doc
            count += 1
            if max_docs and count >= max_docs:
                return


class _ShardWriter:
    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        i = len(self.shards)
        self.name = f"shard-{i:05d}"
        self.fh = open(self.folder / f"{self.name}.ids", "wb")
        self.offsets = [0]

    def _close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        np.save(self.folder / f"{self.name}.offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        ids, offsets = f"{self.name}.ids", f"{self.name}.offsets.npy"
        self.shards.append({"ids": ids, "offsets": offsets, "docs": len(self.offsets) - 1, "tokens": self.offsets[-1],
                            "files": {f: {"size": (self.folder / f).stat().st_size,
                                          "crc32": file_crc32(self.folder / f)} for f in (ids, offsets)}})

    def add(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.fh.write(arr.tobytes())
        self.offsets.append(self.offsets[-1] + len(arr))
        if self.offsets[-1] >= self.shard_tokens:
            self._close()
            self._open()

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        if len(self.shards) > 1 and self.shards[-1]["docs"] == 0:  # the shard opened after a full one
            last = self.shards.pop()
            for f in (last["ids"], last["offsets"]):
                (self.folder / f).unlink()
        return self.shards


def build_token_store(
    corpus: Sequence[str],
    tokenizer: Any,
    cache_dir: str | os.PathLike | None = None,
    max_docs: int = 0,
    shard_tokens: int = 1 << 26,
    batch_docs: int = 256,
    progress: bool = True,
) -> TokenStore:
    """Open the token cache of ``corpus`` under ``tokenizer``, building it first if needed.

    Args:
        corpus: ``data.corpus`` entries (see :func:`resolve_sources`).
        tokenizer: a :mod:`pmlm_engine.tokenizer` tokenizer (``encode_batch``, ``vocab_size``, ``source``).
        cache_dir: parent of the cache folders (default :func:`default_cache_dir`).
        max_docs: only the first N documents (0 = all).
        shard_tokens: ids per shard file before a new one is started.
        batch_docs: documents per ``encode_batch`` call.
        progress: show a tqdm bar while tokenizing.

    Raises:
        FileNotFoundError / ValueError: a missing corpus, an empty or non-UTF-8 file (naming the
            file, the line and the fix), or a corpus with no text at all.
    """
    sources = resolve_sources(corpus)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(sources, tokenizer, max_docs)
    target = root / key
    if target.exists():
        damage = cache_damage(target)
        if damage is None:
            store = TokenStore(target)
            log.info("token cache %s: %d documents, %d tokens", target, store.num_docs, store.num_tokens)
            return store
        log.warning("token cache %s is damaged (%s): rebuilding it", target, damage)
        trash = root / f".damaged-{key}-{os.getpid()}"
        os.replace(target, trash)  # out of the way at once; only this program writes cache folders
        shutil.rmtree(trash, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    t0 = time.perf_counter()
    try:
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        docs = empty = tokens = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="tokenizing", unit="doc", leave=False)
        for chunk in _batched(_documents(sources, max_docs), batch_docs):
            for ids in tokenizer.encode_batch(chunk):
                writer.add(ids)
                docs += 1
                tokens += len(ids)
                empty += len(ids) == 0
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        shards = writer.finish()
        if tokens == 0:
            names = ", ".join(s.name for s in sources)
            raise ValueError(f"the corpus ({names}) has no text: {docs} document(s), every one empty after "
                             f"tokenization; check data.corpus")
        meta = {"format": FORMAT, "key": key, "sources": [s.fingerprint() for s in sources],
                "tokenizer": {"class": type(tokenizer).__name__, "source": str(tokenizer.source),
                              "vocab_size": tokenizer.vocab_size, "sha256": tokenizer_fingerprint(tokenizer)},
                "max_docs": max_docs, "dtype": dtype.name, "num_docs": docs, "empty_docs": empty,
                "num_tokens": tokens, "shards": shards}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / META).is_file():  # not a concurrent build of the same key that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if empty:
        log.info("skipped %d empty document(s)", empty)
    log.info("tokenized %d documents (%d tokens) in %.1f s into %s", docs, tokens, time.perf_counter() - t0, target)
    return TokenStore(target)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
