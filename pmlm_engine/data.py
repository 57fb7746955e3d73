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
from typing import Iterable, Iterator, Sequence

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
    """Examples per batch (per rank)."""
    batching: str = "padded"
    """``padded``: one example per row; ``packed``: several examples share a row (never attending each other)."""
    row_len: int = 0
    """Row length for ``packed`` batches; 0 = the longest possible example (see ``max_example_len``)."""
    seed: int = 0
    """Seed of masking and order."""
    layout_backend: str = "auto"
    """``auto`` | ``cpp`` | ``python``: the layout builder (identical output)."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.masking, dict):
            self.masking = MaskingConfig(**self.masking)
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


def chunk_document(ids: Sequence[int], max_len: int, special: SpecialIds, seed: int) -> Iterator[MainSequence]:
    """Cut one tokenized document into main sequences ``[CLS] A [SEP] B [SEP]``."""
    body = max_len - 3
    ids = np.asarray(ids, dtype=np.int64)
    for c, start in enumerate(range(0, len(ids), body)):
        chunk = ids[start:start + body]
        if len(chunk) >= 2:
            split = 1 + SplitMix64(derive_seed(seed, c)).randbelow(len(chunk) - 1)
            a, b = chunk[:split], chunk[split:]
            tokens = np.concatenate([[special.cls], a, [special.sep], b, [special.sep]])
            segments = np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)])
            maskable = np.ones(len(tokens), dtype=bool)
            maskable[[0, split + 1, -1]] = False  # [CLS], the middle [SEP], the final [SEP]
        else:
            tokens = np.concatenate([[special.cls], chunk, [special.sep]])
            segments = np.zeros(len(tokens), np.int64)
            maskable = np.array([False, True, False])
        yield MainSequence(tokens.astype(np.int64), segments, maskable)


def main_sequences(docs: Iterable[Sequence[int]], max_len: int, special: SpecialIds, seed: int) -> list[MainSequence]:
    """Chunk tokenized documents; skips and counts empty ones (logged once)."""
    out: list[MainSequence] = []
    empty = 0
    for d, ids in enumerate(docs):
        if len(ids) == 0:
            empty += 1
            continue
        out.extend(chunk_document(ids, max_len, special, derive_seed(seed, 0x5EC, d)))
    if empty:
        log.info("skipped %d empty document(s)", empty)
    if not out:
        raise ValueError("the corpus has no text: every document was empty after tokenization")
    return out


class PretrainData:
    """Deterministic stream of PMLM batches over in-memory main sequences."""

    def __init__(self, sequences: Sequence[MainSequence], special: SpecialIds, cfg: DataConfig) -> None:
        if not sequences:
            raise ValueError("PretrainData needs at least one main sequence")
        self.sequences = sequences
        self.special = special
        self.cfg = cfg
        longest = max(len(s) for s in sequences)
        if longest > cfg.max_len:
            raise ValueError(f"a main sequence has {longest} tokens, more than max_len={cfg.max_len}")

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.sequences) // self.cfg.batch_size)

    def example(self, epoch: int, index: int) -> Example:
        seq = self.sequences[index]
        return build_example(seq.tokens, seq.segment_ids, seq.maskable, derive_seed(self.cfg.seed, epoch, index),
                             self.cfg.masking, self.special, backend=self.cfg.layout_backend)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64(derive_seed(self.cfg.seed, epoch))).permutation(len(self.sequences))

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of global step ``step`` (0-based)."""
        epoch, b = divmod(step, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        idx = [int(order[(b * self.cfg.batch_size + j) % len(order)]) for j in range(self.cfg.batch_size)]
        examples = [self.example(epoch, i) for i in idx]
        if self.cfg.batching == "packed":
            return collate_packed(examples, self.special.pad, self.cfg.row_len or self.cfg.max_example_len)
        return collate_padded(examples, self.special.pad, pad_to_multiple=8)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1
