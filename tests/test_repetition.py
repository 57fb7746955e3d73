"""Decoding that does not repeat itself: the repetition / coverage penalties and the repetition measure."""

from __future__ import annotations

import math

import pytest
import torch

from pmlm_engine.decode import DecodeConfig, beam_search, greedy_search
from pmlm_engine.evaluate import repetition_rates

from .test_s2sft_beam import SPECIAL, TableScorer, V

SRC = [[7, 7, 8, 9]]


def _repeater(seed: int = 0):
    """Fixed log-probabilities that favour token 7 (twice in the source) and 10 (absent) at every step."""
    def logp(src: int, prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, src) + prefix) % (2 ** 31))
        x = torch.randn(V, generator=g, dtype=torch.float64)
        x[7] += 3.0
        x[10] += 2.5
        x[SPECIAL.sep] -= 4.0
        return torch.log_softmax(x, -1)
    return logp


def _restated_greedy(fn, cfg: DecodeConfig, src: list[int]) -> tuple[list[int], float]:
    """Greedy with the penalties restated: repeated tokens' log-probabilities times theta, minus beta per use
    beyond max(1, count in the source); banned ids and [SEP] before min_len excluded."""
    hist: list[int] = []
    total = 0.0
    for t in range(1, cfg.max_len + 1):
        lp = fn(0, tuple(hist)).clone()
        for w in set(hist):
            lp[w] = lp[w] * cfg.repetition_penalty - cfg.coverage_penalty * max(
                0, hist.count(w) + 1 - max(1, src.count(w)))
        for w in (SPECIAL.pad, SPECIAL.cls, SPECIAL.mask):
            lp[w] = -math.inf
        w = int(lp.argmax())
        total += float(lp[w])
        if w == SPECIAL.sep:
            return hist, total
        hist.append(w)
    return hist, total


@pytest.mark.parametrize("theta,beta", [(1.0, 0.0), (8.0, 0.0), (1.0, 1.5), (1.5, 0.7)])
def test_penalties_equal_restatement(theta: float, beta: float):
    """Greedy with the repetition and coverage penalties equals the restated rule (tokens, summed score); with
    penalties on, fewer tokens repeat than without."""
    fn = _repeater()
    cfg = DecodeConfig(max_len=8, repetition_penalty=theta, coverage_penalty=beta)
    (hyp,) = greedy_search(TableScorer(fn), SRC, cfg, SPECIAL)
    want, total = _restated_greedy(fn, cfg, SRC[0])
    assert hyp.tokens == want and math.isclose(hyp.logprob, total, rel_tol=1e-12)
    repeats = len(want) - len(set(want))
    free, _ = _restated_greedy(fn, DecodeConfig(max_len=8), SRC[0])
    assert len(free) - len(set(free)) >= 4  # without penalties the table repeats 7 / 10 freely
    if theta != 1.0 or beta != 0.0:
        assert repeats < len(free) - len(set(free))


def test_beam_with_penalties_equals_greedy_at_one_beam():
    """The penalties act the same in beam search (one beam = greedy) and reduce repeats at five beams."""
    fn = _repeater(1)
    cfg = DecodeConfig(max_len=8, repetition_penalty=1.6, coverage_penalty=0.5)
    (g,) = greedy_search(TableScorer(fn), SRC, cfg, SPECIAL)
    (b,) = beam_search(TableScorer(fn), SRC, cfg, SPECIAL)
    assert g.tokens == b[0].tokens and math.isclose(g.logprob, b[0].logprob, rel_tol=1e-12)
    plain = beam_search(TableScorer(fn), SRC, DecodeConfig(beam_size=5, max_len=8), SPECIAL)[0][0]
    pen = beam_search(TableScorer(fn), SRC, DecodeConfig(beam_size=5, max_len=8, repetition_penalty=1.6,
                                                          coverage_penalty=0.5), SPECIAL)[0][0]
    assert len(pen.tokens) - len(set(pen.tokens)) < len(plain.tokens) - len(set(plain.tokens))
    with pytest.raises(ValueError, match="repetition_penalty"):
        DecodeConfig(repetition_penalty=0.5)


def test_repetition_rates():
    """A repeated content word / bigram is counted once per text; stopwords and case do not count."""
    rates = repetition_rates(["perl module for Perl", "the cat and the dog", "new york new york", "fine"])
    assert rates == {"repeated_word_pct": 50.0, "repeated_bigram_pct": 25.0}
