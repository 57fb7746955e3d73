"""Blockwise masking and factorization order: docs/layout.md, paper Algorithm 1.

This module owns the masking rule. It is the Python reference of the hot loop; the
C++ fast path (``csrc/layout.cpp``) reproduces it draw for draw from the same
:class:`~pmlm_engine.rng.SplitMix64` stream. The order of random draws is part of
the contract:

1. span sampling, per attempt: ``start = randbelow(n)``, ``u = uniform()``, and if
   ``u < span_prob`` then ``length = span_min + randbelow(span_max - span_min + 1)``;
2. the factorization order: Fisher-Yates, ``for i = S-1 .. 1: j = randbelow(i + 1)``;
3. corruption, per masked position in increasing position order: ``u = uniform()``,
   and for a random replacement ``randbelow(random_hi - random_lo)``.
"""

from __future__ import annotations

import math

import numpy as np

from .config import MaskingConfig
from .rng import SplitMix64

Span = tuple[int, int]  # [start, end) in main-sequence positions


def sample_spans(maskable: np.ndarray, rng: SplitMix64, cfg: MaskingConfig) -> list[Span]:
    """Sample non-overlapping spans until ``ceil(mask_ratio * n)`` tokens are masked.

    Args:
        maskable: ``(L,)`` bool, True for text tokens (special tokens are never masked).
            A span must lie inside one run of maskable tokens.
    Returns:
        The accepted spans in acceptance order.
    """
    positions = np.flatnonzero(maskable)
    n = len(positions)
    if n == 0:
        return []
    budget = math.ceil(cfg.mask_ratio * n)
    taken = np.zeros(len(maskable), dtype=bool)
    spans: list[Span] = []
    count = 0
    length_range = cfg.span_max - cfg.span_min + 1
    # With span_prob == 1 and every untaken maskable run shorter than span_min no span can ever
    # be accepted. After many rejections in a row, check that progress is still possible; the
    # check draws nothing (the C++ twin does the same), so the stream is unchanged.
    check_every = 4096 + 64 * len(maskable)
    rejected = 0
    while count < budget:
        start = int(positions[rng.randbelow(n)])
        length = 1
        if rng.uniform() < cfg.span_prob:
            length = cfg.span_min + rng.randbelow(length_range)
        end = start + length
        if end > len(maskable) or not maskable[start:end].all() or taken[start:end].any():
            rejected += 1
            if rejected >= check_every:
                if not _can_progress(maskable, taken, cfg):
                    raise ValueError(
                        f"span sampling cannot reach its budget: {count} of {budget} tokens masked and no "
                        f"span can be accepted with span_prob={cfg.span_prob}, span_min={cfg.span_min} "
                        "(every untaken maskable run is shorter than span_min); lower span_min or use "
                        "span_prob < 1")
                rejected = 0
            continue
        rejected = 0
        taken[start:end] = True
        spans.append((start, end))
        count += length
    return spans


def _can_progress(maskable: np.ndarray, taken: np.ndarray, cfg: MaskingConfig) -> bool:
    """True when some span could still be accepted. Length 1 is drawable iff ``span_prob < 1``
    (``uniform() < 1`` always); a multi-token span needs ``span_prob > 0`` and an untaken
    maskable run of at least ``span_min`` tokens."""
    run = 0
    for free in (maskable & ~taken).tolist():
        if not free:
            run = 0
            continue
        if cfg.span_prob < 1.0:
            return True
        run += 1
        if run >= cfg.span_min and cfg.span_prob > 0.0:
            return True
    return False


def shuffle_spans(spans: list[Span], rng: SplitMix64) -> list[Span]:
    """A random factorization order (Fisher-Yates); step ``s`` is ``order[s - 1]``."""
    order = list(spans)
    for i in range(len(order) - 1, 0, -1):
        j = rng.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def corrupt(
    input_ids: np.ndarray,
    spans: list[Span],
    rng: SplitMix64,
    cfg: MaskingConfig,
    mask_id: int,
    random_range: tuple[int, int],
) -> np.ndarray:
    """BERT's 80/10/10 corruption of the masked positions (a copy; the input is kept).

    ``random_range = (lo, hi)``: random replacements are drawn uniformly from ``[lo, hi)``.
    """
    out = input_ids.copy()
    lo, hi = random_range
    masked = sorted(p for start, end in spans for p in range(start, end))
    for p in masked:
        u = rng.uniform()
        if u < cfg.mask_prob:
            out[p] = mask_id
        elif u < cfg.mask_prob + cfg.random_prob:
            out[p] = lo + rng.randbelow(hi - lo)
    return out
