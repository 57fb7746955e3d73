"""Tokenizers: one interface, a WordPiece and a sentencepiece implementation, and training.

* :class:`WordPieceTokenizer`: a BERT ``vocab.txt`` (or a WordPiece ``tokenizer.json``)
  through the Hugging Face ``tokenizers`` library: BERT's normalizer (lowercasing and
  accent stripping for uncased vocabularies), BERT's pre-tokenizer, greedy WordPiece.
  With the bert-base-uncased vocabulary (UniLMv2's, docs/model.md; fetch it with
  :func:`pmlm_engine.corpus.minilm_dir`) the ids are bert-base-uncased's:
  ``[PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103``, ``"hello world" -> [7592, 2088]``.
* :class:`SentencePieceTokenizer`: a sentencepiece ``.model`` holding ``[PAD] [UNK] [CLS]
  [SEP] [MASK] [P]`` as pieces, as :func:`train_sentencepiece` writes them (ids 0-5).
* :func:`load_tokenizer` picks the implementation from the file.

Conventions shared by both:

* :meth:`Tokenizer.encode` adds no ``[CLS]``/``[SEP]``: the data pipeline lays them out.
* Special-token text in the input (``"the [MASK] sat"``) becomes the special id, so
  fill-in-the-blank inputs can be written by hand.
* :meth:`Tokenizer.decode` drops ``[CLS] [SEP] [MASK] [PAD] [P]`` and keeps ``[UNK]``.
* Random replacements of the 80/10/10 rule (:class:`pmlm_engine.layout.SpecialIds`) are
  drawn from ``[random_lo, vocab_size)``: every id after the leading block of special and
  ``[unusedN]`` tokens (999 for bert-base-uncased, 6 for the models trained here).

CLI::

    python -m pmlm_engine.tokenizer train --input corpus.txt --vocab-size 8000 --output runs/spm8k
    python -m pmlm_engine.tokenizer train --corpus news wiki --vocab-size 16000 --lowercase --output runs/spm16k
    python -m pmlm_engine.tokenizer encode --tokenizer runs/spm8k.model "The [MASK] sat on the mat."
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import DamagedInputError, run_cli
from .layout import SpecialIds
from .outputs import atomic_file, check_output_file

logger = logging.getLogger(__name__)

CLS, SEP, MASK, PAD, UNK, PSEUDO = "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "[P]"
_UNUSED_RE = re.compile(r"^\[unused\d+\]$")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_TRAIN_HINT = "train one with `python -m pmlm_engine.tokenizer train --input FILE --vocab-size N --output PREFIX`"


class Tokenizer(ABC):
    """What the engine needs from a tokenizer.

    Attributes:
        cls_id, sep_id, mask_id, pad_id, unk_id: ids of ``[CLS] [SEP] [MASK] [PAD] [UNK]``.
        pseudo_id: id of the ``[P]`` token, or ``None`` when the vocabulary has none
            (the layout then uses ``[MASK]`` for pseudo tokens, as the released code does).
        random_lo: first id of ordinary tokens; random replacements come from
            ``[random_lo, vocab_size)``.
        source: the file this tokenizer was read from (for messages).
    """

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    unk_id: int
    pseudo_id: int | None
    random_lo: int
    source: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id is in ``[0, vocab_size)``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without ``[CLS]``/``[SEP]``."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text; implementations batch it natively."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids from which the special tokens were already removed."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, numpy array or tensor), skipping special tokens except ``[UNK]``.

        Raises:
            ValueError: an id outside ``[0, vocab_size)`` (e.g. the ``-100`` of ignored labels).
        """
        skip = self.skipped_ids()
        out: list[int] = []
        n = self.vocab_size
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"cannot decode id {i}: ids of {self.source} lie in [0, {n}); "
                                 f"filter out padding and ignored labels (-100) first")
            if i not in skip:
                out.append(i)
        return self._decode(out)

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry; ``ValueError`` if absent."""

    @abstractmethod
    def id_to_token(self, i: int) -> str:
        """Vocabulary entry of an id; ``ValueError`` if out of range."""

    def tokenize(self, text: str) -> list[str]:
        """The tokens :meth:`encode` produces, as strings (for inspection)."""
        return [self.id_to_token(i) for i in self.encode(text)]

    def skipped_ids(self) -> frozenset[int]:
        """Ids :meth:`decode` drops: ``[CLS] [SEP] [MASK] [PAD]`` and ``[P]``."""
        ids = {self.cls_id, self.sep_id, self.mask_id, self.pad_id}
        if self.pseudo_id is not None:
            ids.add(self.pseudo_id)
        return frozenset(ids)

    def special_ids(self) -> SpecialIds:
        """The ids the PMLM layout needs (:class:`pmlm_engine.layout.SpecialIds`)."""
        return SpecialIds(cls=self.cls_id, sep=self.sep_id, mask=self.mask_id, pad=self.pad_id,
                          pseudo=self.pseudo_id, random_lo=self.random_lo, random_hi=self.vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, cls={self.cls_id}, "
                f"sep={self.sep_id}, mask={self.mask_id}, pad={self.pad_id}, unk={self.unk_id}, "
                f"pseudo={self.pseudo_id}, random=[{self.random_lo}, {self.vocab_size}))")


def _leading_special_block(tokens: Iterator[str], specials: set[str]) -> int:
    """Count of leading entries that are special or ``[unusedN]`` tokens."""
    n = 0
    for tok in tokens:
        if tok not in specials and not _UNUSED_RE.match(tok):
            break
        n += 1
    return n


# --------------------------------------------------------------------------- WordPiece


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece through Hugging Face ``tokenizers``; build it with :meth:`from_vocab` or :meth:`from_json`."""

    def __init__(self, tokenizer: Any, source: str, pseudo_token: str | None = None) -> None:
        """Wrap a ``tokenizers.Tokenizer`` whose vocabulary holds ``[CLS] [SEP] [MASK] [PAD] [UNK]``.

        Args:
            tokenizer: the ``tokenizers.Tokenizer``; padding and truncation are turned off.
            source: file it came from, for messages.
            pseudo_token: an existing vocabulary entry to use as ``[P]`` (e.g.
                ``"[unused0]"``); ``None`` (default) uses ``[MASK]``, as UniLMv2 does.
        """
        from tokenizers import AddedToken

        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.source = source
        ids: dict[str, int] = {}
        wanted = [CLS, SEP, MASK, PAD, UNK] + ([pseudo_token] if pseudo_token else [])
        for token in wanted:
            i = self._tok.token_to_id(token)
            if i is None:
                raise ValueError(f"{source} has no {token} entry: a BERT vocabulary lists [PAD] [UNK] [CLS] [SEP] "
                                 f"[MASK] (and the pseudo token if one is asked for); check the file is a BERT "
                                 f"vocab.txt, or {_TRAIN_HINT}")
            ids[token] = i
        self.cls_id, self.sep_id, self.mask_id = ids[CLS], ids[SEP], ids[MASK]
        self.pad_id, self.unk_id = ids[PAD], ids[UNK]
        self.pseudo_id = ids[pseudo_token] if pseudo_token else None
        # Special-token text in the input maps to the special id; already in the vocabulary, so ids are unchanged.
        self._tok.add_special_tokens([AddedToken(t, normalized=False) for t in wanted])
        self._size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        by_id = sorted(vocab, key=vocab.__getitem__)
        self.random_lo = _leading_special_block(iter(by_id), set(wanted))
        if self.random_lo >= self._size:
            raise ValueError(f"{source}: every entry is a special or [unusedN] token; no ordinary tokens")

    @classmethod
    def from_vocab(cls, path: str | Path, lowercase: bool | None = None,
                   pseudo_token: str | None = None) -> WordPieceTokenizer:
        """Read a BERT ``vocab.txt`` (one token per line, the line number is the id).

        Args:
            lowercase: lowercase and strip accents (uncased BERT). ``None`` detects it: a
                vocabulary with under 1% entries holding capitals is uncased.
            pseudo_token: see :meth:`__init__`.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        path = Path(path)
        vocab = _read_vocab_txt(path)
        if lowercase is None:
            cased = sum(1 for t in vocab if not t.startswith("[") and t != t.lower())
            lowercase = cased < 0.01 * len(vocab)
        model = WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=UNK, max_input_chars_per_word=100)
        tok = HFTokenizer(model)
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        return cls(tok, str(path), pseudo_token)

    @classmethod
    def from_json(cls, path: str | Path, pseudo_token: str | None = None) -> WordPieceTokenizer:
        """Read a Hugging Face ``tokenizer.json`` with a WordPiece model (e.g. MiniLM's)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            kind = json.loads(path.read_text(encoding="utf-8"))["model"]["type"]
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # json, key, unicode and the library's own errors
            raise DamagedInputError(f"{path} is not a readable Hugging Face tokenizer.json ({type(e).__name__}: {e}); "
                               f"check the file was copied completely, or use the vocab.txt beside it") from None
        if kind != "WordPiece":
            raise ValueError(f"{path} holds a {kind} model; only WordPiece tokenizer.json files are supported. "
                             f"Use a BERT vocab.txt or a sentencepiece .model")
        return cls(tok, str(path), pseudo_token)

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` and each token's ``(start, end)`` character span in ``text``
        (for :func:`pmlm_engine.detok.detokenize`'s surface restoration)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=False)
        # transformers' clean_up_tokenization: the library's decoder cleans token by token and
        # misses the patterns that span tokens ("didn ' t").
        for old, new in _CLEANUP:
            text = text.replace(old, new)
        return text

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary of {self.source}")
        return i

    def id_to_token(self, i: int) -> str:
        tok = self._tok.id_to_token(int(i)) if 0 <= int(i) < self._size else None
        if tok is None:
            raise ValueError(f"id {i} is outside the vocabulary of {self.source} ([0, {self._size}))")
        return tok


def _read_vocab_txt(path: Path) -> list[str]:
    """Entries of a BERT ``vocab.txt``; clear errors for empty, non-UTF-8 or binary files."""
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"tokenizer file {path} is empty; pass a BERT vocab.txt (one token per line), "
                         f"e.g. pmlm_engine.corpus.minilm_dir() / 'vocab.txt'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not UTF-8 text (byte offset {e.start}): a vocab.txt lists one "
                         f"token per line; is it a binary file with a .txt name?") from None
    vocab = text.split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    vocab = [t.rstrip("\r") for t in vocab]
    missing = [t for t in (PAD, UNK, CLS, SEP, MASK) if t not in set(vocab)]
    if missing:
        raise ValueError(f"tokenizer file {path} has no {' '.join(missing)} lines, so it is not a BERT vocab.txt "
                         f"(one token per line, the line number is the id); pass e.g. "
                         f"pmlm_engine.corpus.minilm_dir() / 'vocab.txt', or {_TRAIN_HINT}")
    if "\x00" in text or len(set(vocab)) != len(vocab):
        dup = len(vocab) - len(set(vocab))
        raise ValueError(f"tokenizer file {path} is not a BERT vocab.txt ({dup} repeated lines or NUL bytes); "
                         f"a vocab.txt lists each token once, one per line")
    return vocab


# --------------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model whose pieces include ``[CLS] [SEP] [MASK] [PAD]`` (``[P]`` optional).

    :func:`train_sentencepiece` writes such models: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3
    [MASK]=4 [P]=5``, the special pieces user-defined so that their text in the input
    maps to them. Text normalization (NFKC, optional lowercasing) lives in the model.
    """

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        path = Path(path)
        self.source = str(path)
        self._proto = path.read_bytes()
        if not self._proto:
            raise ValueError(f"tokenizer file {path} is empty; {_TRAIN_HINT}")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with "ParseFromArray failed"
            raise DamagedInputError(f"{path} is not a valid sentencepiece model ({e}); it may be truncated or "
                               f"another kind of file. Copy it again, or {_TRAIN_HINT}") from None
        self._size = self._sp.get_piece_size()
        self.unk_id = self._sp.unk_id()
        self.cls_id, self.sep_id, self.mask_id = self._required(CLS), self._required(SEP), self._required(MASK)
        self.pad_id = self._required(PAD)
        self.pseudo_id = self._piece(PSEUDO)
        self._space_id = self._piece("\u2581")  # "▁": sentencepiece's word boundary
        specials = {CLS, SEP, MASK, PAD, PSEUDO, self._sp.id_to_piece(self.unk_id)}
        self.random_lo = _leading_special_block(
            (self._sp.id_to_piece(i) if not (self._sp.is_control(i) or self._sp.is_unknown(i)) else CLS
             for i in range(self._size)), specials)
        if self.random_lo >= self._size:
            raise ValueError(f"{path}: every piece is special; no ordinary tokens")
        self._skip = self.skipped_ids()

    def _piece(self, piece: str) -> int | None:
        """Id of ``piece``, or ``None``: sentencepiece answers the unknown id for absent pieces."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def _required(self, piece: str) -> int:
        i = self._piece(piece)
        if i is None:
            raise ValueError(f"sentencepiece model {self.source} has no {piece} piece; the engine needs "
                             f"{CLS} {SEP} {MASK} {PAD}: {_TRAIN_HINT} (it adds them)")
        return i

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_sp"]  # rebuilt from the serialized model
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import sentencepiece as spm

        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    @property
    def vocab_size(self) -> int:
        return self._size

    def _drop_space_before_special(self, ids: list[int]) -> list[int]:
        # "a [MASK] b" encodes as ▁a ▁ [MASK] ▁b: the lone ▁ only carries the space before a
        # special piece, which decode drops anyway.
        sp_id, skip = self._space_id, self._skip
        return [i for k, i in enumerate(ids) if not (i == sp_id and k + 1 < len(ids) and ids[k + 1] in skip)]

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        return self._drop_space_before_special(ids) if "[" in text and self._space_id is not None else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        out = self._sp.encode(texts)
        if self._space_id is not None:
            out = [self._drop_space_before_special(ids) if "[" in t else ids for t, ids in zip(texts, out)]
        return out

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int:
        i = self._piece(token)
        if i is None:
            raise ValueError(f"token {token!r} is not a piece of {self.source}")
        return i

    def id_to_token(self, i: int) -> str:
        if not 0 <= int(i) < self._size:
            raise ValueError(f"id {i} is outside the vocabulary of {self.source} ([0, {self._size}))")
        return self._sp.id_to_piece(int(i))


# --------------------------------------------------------------------------- loading


DEFAULT_TOKENIZER = "bert-base-uncased"
"""The tokenizer name that means MiniLM's ``vocab.txt`` (bert-base-uncased's vocabulary, shipped offline)."""


def resolve_tokenizer(spec: str | None, recorded: str | None = None) -> str:
    """The tokenizer file to use: ``spec``, else ``recorded`` (e.g. the one a checkpoint names), else
    :data:`DEFAULT_TOKENIZER`, which resolves to MiniLM's ``vocab.txt``.

    Lives here (not in the training modules) so decoding can load a tokenizer without importing them.
    """
    choice = spec or recorded or DEFAULT_TOKENIZER
    if choice == DEFAULT_TOKENIZER:
        from .corpus import minilm_dir

        return str(minilm_dir() / "vocab.txt")
    return choice


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored at ``path``, chosen by file name.

    * ``*.txt`` (e.g. ``vocab.txt``): :meth:`WordPieceTokenizer.from_vocab`;
    * ``*.json`` (``tokenizer.json``): :meth:`WordPieceTokenizer.from_json`;
    * ``*.model``: :class:`SentencePieceTokenizer`;
    * a folder: its ``vocab.txt``, else ``tokenizer.json``, else its one ``*.model``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown file type, empty file, or a vocabulary without the special tokens.
        RuntimeError: a corrupt ``.model`` or ``tokenizer.json``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} does not exist: pass a BERT vocab.txt (e.g. "
                                f"pmlm_engine.corpus.minilm_dir() / 'vocab.txt'), a tokenizer.json or a "
                                f"sentencepiece .model, or {_TRAIN_HINT}")
    if path.is_dir():
        for name in ("vocab.txt", "tokenizer.json"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return load_tokenizer(models[0])
        raise ValueError(f"tokenizer folder {path} holds no vocab.txt or tokenizer.json and "
                         f"{len(models)} *.model files; pass the file itself")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return WordPieceTokenizer.from_vocab(path)
    if suffix == ".json":
        return WordPieceTokenizer.from_json(path)
    if suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"tokenizer file {path}: unknown type {suffix or '(no suffix)'!r}; pass a BERT vocab.txt, "
                     f"a WordPiece tokenizer.json or a sentencepiece .model")


# --------------------------------------------------------------------------- training


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(doc: str, max_chars: int = 2000) -> Iterator[str]:
    """Lines of ``doc`` cut after ``. ! ?`` and, if still longer than ``max_chars``, at spaces.

    sentencepiece trains on sentences and skips inputs over 4,192 bytes; news articles
    arrive as single lines of up to 30k characters.
    """
    for line in doc.split("\n"):
        for sent in _SENTENCE_END.split(line.strip()):
            while len(sent) > max_chars:
                cut = sent.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                yield sent[:cut]
                sent = sent[cut:].lstrip()
            if sent:
                yield sent


def train_sentencepiece_from_documents(
    docs: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    lowercase: bool = False,
    character_coverage: float = 0.9999,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    progress: bool = False,
    verbose: bool = False,
    input_paths: Sequence[str | Path] = (),
) -> Path:
    """Train a sentencepiece model on documents; see :func:`train_sentencepiece`.

    ``input_paths`` (the files ``docs`` come from) may not be outputs. The outputs are checked
    before training and written atomically (nothing is left behind on failure)."""
    import sentencepiece as spm

    if not isinstance(vocab_size, int) or vocab_size < 16:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 16 (6 special pieces plus characters)")
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type={model_type!r}: choose 'unigram' or 'bpe'")
    if not 0.9 <= character_coverage <= 1.0:
        raise ValueError(f"character_coverage={character_coverage}: expected a value in [0.9, 1.0] (0.9999 default)")
    if max_sentences < 1:
        raise ValueError(f"max_sentences={max_sentences} must be >= 1")
    model_prefix = Path(model_prefix)
    if model_prefix.suffix == ".model":
        model_prefix = model_prefix.with_suffix("")
    path = model_prefix.with_suffix(".model")
    vocab_path = model_prefix.with_suffix(".vocab")  # human-readable piece list, like spm_train writes
    for out in (path, vocab_path):  # before any work: a folder or an input here fails now, not after training
        check_output_file(out, inputs=input_paths, what="--output")
    threads = num_threads or max(1, min(2, os.cpu_count() or 1))  # shared machines: stay small by default
    counts = {"docs": 0, "sentences": 0}
    reader_error: list[BaseException] = []  # an input error, re-raised as is rather than wrapped by sentencepiece

    def sentences() -> Iterator[str]:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit=" docs", desc="reading", file=sys.stderr)
        try:
            for doc in docs:
                counts["docs"] += 1
                for sent in split_sentences(doc):
                    counts["sentences"] += 1
                    yield sent
                if bar is not None:
                    bar.update(1)
                    if counts["docs"] % 200 == 0:
                        bar.set_postfix(sentences=counts["sentences"], refresh=False)
        except Exception as e:
            reader_error.append(e)
            raise
        finally:
            if bar is not None:
                bar.set_postfix(sentences=counts["sentences"])
                bar.close()

    model = io.BytesIO()
    logger.info("training a %s sentencepiece model of %d pieces on %d threads", model_type, vocab_size, threads)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            hard_vocab_limit=False,  # else a small corpus fails with "Vocabulary size too high"
            pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
            user_defined_symbols=[CLS, SEP, MASK, PSEUDO],  # matched in text, never split
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            character_coverage=character_coverage, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=threads, minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        if reader_error:
            raise reader_error[0] from None
        if counts["sentences"] == 0:
            raise ValueError("the training input holds no text; pass non-empty files") from None
        raise RuntimeError(f"sentencepiece training failed on {counts['sentences']} sentences: {e}") from None
    with atomic_file(path, "wb") as fh:
        fh.write(model.getvalue())
    tok = SentencePieceTokenizer(path)
    with atomic_file(vocab_path) as fh:
        fh.write("".join(f"{tok.id_to_token(i)}\t{i}\n" for i in range(tok.vocab_size)))
    logger.info("wrote %s: %d pieces from %d documents (%d sentences, at most %d sampled)",
                path, tok.vocab_size, counts["docs"], counts["sentences"], max_sentences)
    return path


def train_sentencepiece(
    input_files: str | Path | Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    **kwargs: Any,
) -> Path:
    """Train a sentencepiece model with the engine's special pieces; return ``<prefix>.model``.

    The inputs are read with :func:`pmlm_engine.corpus.read_text_files` (``.txt``
    documents separated by blank lines, or ``.jsonl`` with a ``"text"`` field) and cut
    into sentences (:func:`split_sentences`). Pieces: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3
    [MASK]=4 [P]=5``, then the learned ones. ``hard_vocab_limit=False``: on a small
    corpus the model may have fewer than ``vocab_size`` pieces.

    Args:
        input_files: ``.txt`` / ``.jsonl`` paths.
        model_prefix: writes ``<prefix>.model`` and a readable ``<prefix>.vocab``.
        vocab_size: pieces wanted (an upper bound).
        model_type: ``"unigram"`` (default) or ``"bpe"``.
        lowercase: fold case (``nmt_nfkc_cf``), for uncased models.
        character_coverage: share of characters covered; rarer ones become ``[UNK]``.
        max_sentences: at most this many sentences, sampled uniformly, are trained on.
        num_threads: trainer threads (default ``min(2, cpu_count)``).
        progress: show a progress bar while reading the inputs.
        verbose: show sentencepiece's own log.
    """
    from .corpus import read_text_files

    paths = [input_files] if isinstance(input_files, (str, Path)) else list(input_files)
    return train_sentencepiece_from_documents(read_text_files(input_files), model_prefix, vocab_size,
                                              input_paths=paths, **kwargs)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m pmlm_engine.tokenizer {train,encode}``, inside the shared error boundary."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pmlm_engine.tokenizer",
        description="Train a sentencepiece tokenizer with the engine's special pieces, or inspect a tokenizer.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_train = sub.add_parser(
        "train", help="train a sentencepiece model",
        description="Train a sentencepiece model with pieces [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 [P]=5. "
                    "Inputs: .txt files (documents separated by blank lines), .jsonl files ({\"text\": ...} per "
                    "line) and/or built-in corpora (news, wiki, acl).")
    p_train.add_argument("--input", nargs="+", default=[], metavar="FILE", help=".txt or .jsonl training files")
    p_train.add_argument("--corpus", nargs="+", default=[], metavar="NAME",
                         help="built-in corpora to add (see `python -m pmlm_engine.corpus list`)")
    p_train.add_argument("--vocab-size", type=int, required=True, help="pieces wanted (an upper bound on small data)")
    p_train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    p_train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                         help="sentencepiece algorithm (default: %(default)s)")
    p_train.add_argument("--lowercase", action="store_true", help="fold case (for uncased models)")
    p_train.add_argument("--character-coverage", type=float, default=0.9999,
                         help="share of characters kept; rarer ones become [UNK] (default: %(default)s)")
    p_train.add_argument("--max-sentences", type=int, default=2_000_000,
                         help="train on at most this many sentences, sampled uniformly (default: %(default)s)")
    p_train.add_argument("--threads", type=int, default=None, help="trainer threads (default: min(2, CPUs))")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar")
    p_train.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")

    p_enc = sub.add_parser("encode", help="show the tokens and ids of a text",
                           description="Print the tokens and ids of TEXT (or of each stdin line).")
    p_enc.add_argument("--tokenizer", required=True, metavar="PATH",
                       help="vocab.txt, tokenizer.json, a sentencepiece .model, or a folder holding one")
    p_enc.add_argument("text", nargs="*", help="text to encode (default: read lines from stdin)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.cmd == "train":
        from .corpus import load_corpus, read_text_files

        if not args.input and not args.corpus:
            parser.error("train: give --input FILE... and/or --corpus NAME...")

        def docs() -> Iterator[str]:
            if args.input:
                yield from read_text_files(args.input)
            for name in args.corpus:
                yield from load_corpus(name)

        if args.input:
            read_text_files(args.input)  # report missing or empty files before any work
        path = train_sentencepiece_from_documents(
            docs(), args.output, args.vocab_size, model_type=args.model_type, lowercase=args.lowercase,
            character_coverage=args.character_coverage, max_sentences=args.max_sentences,
            num_threads=args.threads, progress=not args.quiet, verbose=args.verbose, input_paths=args.input)
        tok = SentencePieceTokenizer(path)
        print(f"wrote {path} ({tok.vocab_size} pieces) and {path.with_suffix('.vocab')}")
        print(tok)
    else:
        tok = load_tokenizer(args.tokenizer)
        print(tok)
        texts = [" ".join(args.text)] if args.text else (line.rstrip("\n") for line in sys.stdin)
        for text in texts:
            ids = tok.encode(text)
            print(f"text:   {text}")
            print(f"tokens: {tok.tokenize(text)}")
            print(f"ids:    {ids}")
            print(f"decode: {tok.decode(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
