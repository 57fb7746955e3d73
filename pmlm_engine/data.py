"""Documents -> token ids -> main sequences -> PMLM examples -> batches.

Deterministic by construction: the example at (epoch, index) is built from the random
stream ``derive_seed(seed, epoch, index)`` and the order of an epoch from
``derive_seed(seed, epoch)``, so the batch of any global step is a pure function of the
seed and the step: a resumed run sees exactly the batches it would have seen.

Documented handling of awkward input:

* empty documents (no tokens after tokenization) are skipped and counted;
* a document longer than one example is cut into consecutive chunks of at most
  ``max_len - 3`` text tokens, each laid out as ``[CLS] A [SEP] B [SEP]`` with the split
  point of A and B drawn from the seed (BERT-style segments; a one-token chunk has no B).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from .config import MaskingConfig
from .layout import Example, SpecialIds, build_example, collate_packed, collate_padded
from .rng import SplitMix64, derive_seed

log = logging.getLogger(__name__)

MIN_MAX_LEN = 5  # [CLS] a [SEP] b [SEP]


@dataclass
class DataConfig:
    """How examples are cut, masked and batched."""

    max_len: int = 128
    """Tokens in the main part of an example, [CLS] and [SEP]s included (the appended region comes on top)."""
    batch_size: int = 16
    """Examples per micro-batch and rank (the global batch is batch_size * grad_accum * world size)."""
    batching: str = "padded"
    """``padded``: one example per row; ``packed``: several examples share a row (never attending each other)."""
    row_len: int = 0
    """Row length for ``packed`` batches; 0 = the longest possible example (see ``max_example_len``)."""
    seed: int = 0
    """Seed of masking and order."""
    layout_backend: str = "auto"
    """``auto`` | ``cpp`` | ``python``: the layout builder (identical output)."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Blockwise masking (docs/layout.md)."""
    corpus: list[str] = field(default_factory=lambda: ["news"])
    """Where the text comes from: built-in corpora (``news``, ``wiki``, ``acl``), ``.txt`` / ``.jsonl``
    files, folders of them, or glob patterns (``shards/*.jsonl``). Read by the training job only."""
    tokenizer: str = "bert-base-uncased"
    """``bert-base-uncased`` (the real WordPiece vocabulary shipped with MiniLM), a ``vocab.txt``,
    a ``tokenizer.json`` or a sentencepiece ``.model``."""
    max_docs: int = 0
    """Use only the first N documents of the corpus (0 = all)."""
    cache_dir: str = ""
    """Folder of pre-tokenized shards, keyed by corpus and tokenizer ("" = ``$PMLM_CACHE/tokens``,
    by default ``~/.cache/pmlm_engine/tokens``)."""

    def __post_init__(self) -> None:
        if isinstance(self.masking, dict):
            self.masking = MaskingConfig(**self.masking)
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not self.corpus or not all(isinstance(c, str) and c for c in self.corpus):
            raise ValueError(f"corpus={self.corpus!r} is invalid: expected a non-empty list of corpus names or paths")
        if self.max_docs < 0:
            raise ValueError(f"max_docs={self.max_docs} is invalid: expected 0 (all) or a positive count")
        if self.max_len < MIN_MAX_LEN:
            raise ValueError(f"max_len={self.max_len} is too small for any masked span: an example needs "
                             f"[CLS] + text + [SEP] + text + [SEP], so use max_len >= {MIN_MAX_LEN}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid: expected a positive integer")
        if self.batching not in ("padded", "packed"):
            raise ValueError(f"batching={self.batching!r} is invalid: choose 'padded' or 'packed'")
        if self.row_len and self.row_len < self.max_example_len:
            raise ValueError(f"row_len={self.row_len} cannot hold the longest example ({self.max_example_len} "
                             f"tokens for max_len={self.max_len}): raise row_len or set it to 0")

    @property
    def max_example_len(self) -> int:
        """Main part plus the largest appended region: masking stops at ceil(ratio * n) tokens
        and the last span may overshoot by span_max - 1."""
        text = self.max_len - 3
        masked = min(text, math.ceil(self.masking.mask_ratio * text) + self.masking.span_max - 1)
        return self.max_len + 2 * masked


@dataclass
class MainSequence:
    """The main part of one example before masking."""

    tokens: np.ndarray  # (M,) with [CLS]/[SEP]
    segment_ids: np.ndarray  # (M,)
    maskable: np.ndarray  # (M,) bool

    def __len__(self) -> int:
        return len(self.tokens)


def main_sequence(chunk: np.ndarray, chunk_number: int, doc_seed: int, special: SpecialIds) -> MainSequence:
    """Lay out chunk ``chunk_number`` of a document (at most ``max_len - 3`` text ids) as a main sequence.

    The split point of segments A and B is drawn from ``derive_seed(doc_seed, chunk_number)``,
    so it depends only on the document's seed and the chunk's place in it: the in-memory
    path (:func:`chunk_document`) and the memory-mapped one (:class:`pmlm_engine.stream.StoreSequences`)
    build identical sequences.
    """
    chunk = np.asarray(chunk, dtype=np.int64)
    if len(chunk) >= 2:
        split = 1 + SplitMix64(derive_seed(doc_seed, chunk_number)).randbelow(len(chunk) - 1)
        a, b = chunk[:split], chunk[split:]
        tokens = np.concatenate([[special.cls], a, [special.sep], b, [special.sep]])
        segments = np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)])
        maskable = np.ones(len(tokens), dtype=bool)
        maskable[[0, split + 1, -1]] = False  # [CLS], the middle [SEP], the final [SEP]
    else:
        tokens = np.concatenate([[special.cls], chunk, [special.sep]])
        segments = np.zeros(len(tokens), np.int64)
        maskable = np.array([False, True, False])
    return MainSequence(tokens.astype(np.int64), segments, maskable)


def chunk_document(ids: Sequence[int], max_len: int, special: SpecialIds, seed: int) -> Iterator[MainSequence]:
    """Cut one tokenized document into main sequences ``[CLS] A [SEP] B [SEP]``."""
    body = max_len - 3
    ids = np.asarray(ids, dtype=np.int64)
    for c, start in enumerate(range(0, len(ids), body)):
        yield main_sequence(ids[start:start + body], c, seed, special)


def document_seed(seed: int, doc_index: int) -> int:
    """Seed of document ``doc_index`` (its index in the corpus, empty documents counted)."""
    return derive_seed(seed, 0x5EC, doc_index)


def main_sequences(docs: Iterable[Sequence[int]], max_len: int, special: SpecialIds, seed: int) -> list[MainSequence]:
    """Chunk tokenized documents; skips and counts empty ones (logged once)."""
    out: list[MainSequence] = []
    empty = 0
    for d, ids in enumerate(docs):
        if len(ids) == 0:
            empty += 1
            continue
        out.extend(chunk_document(ids, max_len, special, document_seed(seed, d)))
    if empty:
        log.info("skipped %d empty document(s)", empty)
    if not out:
        raise ValueError("the corpus has no text: every document was empty after tokenization")
    return out


class SequenceSource(Protocol):
    """Random access to main sequences: a list, or a memory-mapped :class:`pmlm_engine.stream.StoreSequences`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> MainSequence: ...


class PretrainData:
    """Deterministic stream of PMLM batches over main sequences, split across ranks and micro-steps.

    One optimizer step consumes a *global batch* of ``batch_size * grad_accum * world_size``
    examples: positions ``[b * G, (b + 1) * G)`` of epoch ``e``'s order (``G`` the global batch,
    ``e, b = divmod(step, batches_per_epoch)``). Rank ``r`` at micro-step ``m`` takes the
    ``batch_size`` examples at offsets ``(m * world_size + r) * batch_size`` of that block, so the
    ranks and micro-steps partition the global batch and each rank reads (from a memory map)
    only its own examples. With one rank and no accumulation this is the single-process stream.

    ``sequences`` may be a list of :class:`MainSequence` or any :class:`SequenceSource`; a source
    with a ``longest`` attribute (an upper bound of its sequence lengths) is not scanned.
    """

    def __init__(self, sequences: SequenceSource, special: SpecialIds, cfg: DataConfig,
                 world_size: int = 1, grad_accum: int = 1) -> None:
        if len(sequences) == 0:
            raise ValueError("PretrainData needs at least one main sequence")
        if world_size < 1 or grad_accum < 1:
            raise ValueError(f"world_size={world_size} and grad_accum={grad_accum} must be positive integers")
        self.sequences = sequences
        self.special = special
        self.cfg = cfg
        self.world_size = world_size
        self.grad_accum = grad_accum
        longest = getattr(sequences, "longest", None)
        if longest is None:
            longest = max(len(s) for s in sequences)
        if longest > cfg.max_len:
            raise ValueError(f"a main sequence has {longest} tokens, more than max_len={cfg.max_len}")
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step over all ranks and micro-steps."""
        return self.cfg.batch_size * self.grad_accum * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.sequences) // self.global_batch_size)

    def example(self, epoch: int, index: int) -> Example:
        seq = self.sequences[index]
        return build_example(seq.tokens, seq.segment_ids, seq.maskable, derive_seed(self.cfg.seed, epoch, index),
                             self.cfg.masking, self.special, backend=self.cfg.layout_backend)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of sequence indices of ``epoch`` (the latest one is cached: 8 bytes a sequence)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = np.random.Generator(np.random.PCG64(derive_seed(self.cfg.seed, epoch))).permutation(
                len(self.sequences))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def indices(self, step: int, rank: int = 0, micro: int = 0) -> tuple[int, list[int]]:
        """``(epoch, sequence indices)`` of rank ``rank``'s micro-batch ``micro`` at optimizer step ``step``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside [0, {self.world_size})")
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro={micro} is outside [0, {self.grad_accum})")
        epoch, b = divmod(step, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        first = b * self.global_batch_size + (micro * self.world_size + rank) * self.cfg.batch_size
        return epoch, [int(order[(first + j) % len(order)]) for j in range(self.cfg.batch_size)]

    def batch(self, step: int, rank: int = 0, micro: int = 0) -> dict[str, torch.Tensor]:
        """The micro-batch of rank ``rank`` at micro-step ``micro`` of global step ``step`` (0-based)."""
        epoch, idx = self.indices(step, rank, micro)
        examples = [self.example(epoch, i) for i in idx]
        if self.cfg.batching == "packed":
            return collate_packed(examples, self.special.pad, self.cfg.row_len or self.cfg.max_example_len)
        return collate_padded(examples, self.special.pad, pad_to_multiple=8)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1
