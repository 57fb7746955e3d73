"""Masking statistics (docs/layout.md) match the spec within sampling error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pmlm_engine.config import MaskingConfig
from pmlm_engine.layout import IGNORE
from pmlm_engine.masking import sample_spans, shuffle_spans
from pmlm_engine.rng import SplitMix64

from .helpers import SPECIAL, random_example

BIG = SPECIAL.__class__(cls=1, sep=2, mask=3, pad=0, pseudo=4, random_lo=5, random_hi=30000)


def _within(observed: float, p: float, n: int, sigmas: float = 4.5) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_budget_and_overshoot():
    """Each example masks at least ceil(0.15 n) tokens and overshoots by less than the longest span."""
    rng = np.random.default_rng(0)
    cfg = MaskingConfig()
    for seed in range(200):
        n = int(rng.integers(5, 300))
        ex = random_example(rng, n, seed, cfg)
        masked = int((ex.labels[: ex.num_main] != IGNORE).sum())
        budget = math.ceil(0.15 * n)
        assert budget <= masked <= budget + cfg.span_max - 1, (n, masked)
        assert (ex.step < 0).sum() == masked == (ex.step > 0).sum()


def test_span_length_distribution():
    """At low density (no rejections to speak of) span lengths follow 0.6 for 1 and 0.08 for each of 2..6."""
    cfg = MaskingConfig(mask_ratio=0.02)
    lengths = []
    maskable = np.ones(2000, dtype=bool)
    for seed in range(300):
        lengths += [e - s for s, e in sample_spans(maskable, SplitMix64(seed), cfg)]
    lengths = np.array(lengths)
    n = len(lengths)
    assert n > 3000
    assert _within(float((lengths == 1).mean()), 0.6, n)
    for k in range(2, 7):
        assert _within(float((lengths == k).mean()), 0.4 / 5, n), k
    assert lengths.max() <= 6


def test_80_10_10_corruption():
    """Masked main positions become [MASK] 80%, a random token 10%, stay unchanged 10%."""
    rng = np.random.default_rng(1)
    orig, inp = [], []
    for seed in range(150):
        ex = random_example(rng, 200, seed, special=BIG)
        sel = ex.labels[: ex.num_main] != IGNORE
        orig.append(ex.labels[: ex.num_main][sel])
        inp.append(ex.input_ids[: ex.num_main][sel])
    orig, inp = np.concatenate(orig), np.concatenate(inp)
    n = len(orig)
    is_mask = inp == BIG.mask
    unchanged = inp == orig
    assert _within(float(is_mask.mean()), 0.8, n)
    # a random draw equals the original with probability 1 / 29995: negligible at this n
    assert _within(float(unchanged.mean()), 0.1, n)
    assert _within(float((~is_mask & ~unchanged).mean()), 0.1, n)


def test_specials_never_masked_and_spans_stay_in_segments():
    """[CLS]/[SEP] are never masked, spans never cross them, and appended tokens copy their sources."""
    rng = np.random.default_rng(2)
    for seed in range(100):
        ex = random_example(rng, int(rng.integers(2, 60)), seed, MaskingConfig(mask_ratio=0.5))
        m = ex.num_main
        specials = np.isin(ex.input_ids[:m], [SPECIAL.cls, SPECIAL.sep]) & (ex.labels[:m] == IGNORE)
        assert specials.sum() >= 2
        for s in np.unique(np.abs(ex.step[m:])):
            orig = (ex.step == s)
            pseudo = (ex.step == -s)
            assert np.array_equal(ex.position_ids[orig], ex.position_ids[pseudo])
            pos = ex.position_ids[orig]
            assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))  # contiguous span
            assert len(np.unique(ex.segment_ids[pos])) == 1  # inside one segment
            assert np.array_equal(ex.labels[pseudo], ex.labels[pos])
            assert (ex.input_ids[pseudo] == SPECIAL.pseudo).all()


def test_factorization_order_is_a_uniform_permutation():
    """The step that gets the leftmost of three spans is uniform over the three steps."""
    spans = [(0, 1), (5, 7), (9, 10)]
    counts = np.zeros(3)
    for seed in range(3000):
        order = shuffle_spans(spans, SplitMix64(seed))
        counts[order.index((0, 1))] += 1
    for c in counts:
        assert _within(c / 3000, 1 / 3, 3000)


@pytest.mark.parametrize("bad", [dict(mask_ratio=0), dict(span_min=3, span_max=2), dict(mask_prob=0.95, random_prob=0.1)])
def test_bad_masking_config(bad):
    """Contradictory masking settings are refused with the field's name."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        MaskingConfig(**bad)
