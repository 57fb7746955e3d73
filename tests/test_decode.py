"""Cached decoding equals recomputation; search rules (beam 1 = greedy, n-gram blocking, min length) hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pmlm_engine.decode import (
    CachedScorer,
    CompiledStaticScorer,
    DecodeConfig,
    Hypothesis,
    StaticCachedScorer,
    beam_search,
    generate,
    greedy_search,
)
from pmlm_engine.layout import build_seq2seq_example, collate_padded

from .helpers import SPECIAL, tiny_model

SOURCES = [[7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
BANNED = {SPECIAL.pad, SPECIAL.cls, SPECIAL.mask, SPECIAL.p}


def _model(eos_boost: float = 2.0, seed: int = 0):
    """Tiny float64 model (relative bias on) with weights large enough that its outputs depend on the context,
    and a [SEP] bias that makes hypotheses end at varied lengths."""
    model = tiny_model(torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "rel_pos_bias" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model.lm_head.bias[SPECIAL.sep] += eos_boost
    return model


# --------------------------------------------------------------------------- the no-cache reference


def _ref_logprobs(model, src: list[int], prefix: list[int]) -> np.ndarray:
    """Next-token log-probabilities by recomputing the whole fine-tuning layout (no cache): the source,
    ``prefix`` as teacher-forced target, and the [P] of the next position."""
    ex = build_seq2seq_example(src, prefix + [SPECIAL.sep], SPECIAL)  # the last target token is a placeholder
    batch = collate_padded([ex], SPECIAL.pad)
    with torch.no_grad():
        h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
        col = int((batch["step"][0] == -(len(prefix) + 1)).nonzero())
        return torch.log_softmax(model.lm_head(h[0, col:col + 1]), -1)[0].numpy()


def _allowed(hist: list[int], t: int, cfg: DecodeConfig, vocab: int) -> list[int]:
    """The rules, restated naively: banned ids, [SEP] before min_len, repeated n-grams."""
    n = cfg.no_repeat_ngram_size
    seen = {tuple(hist[i:i + n]) for i in range(len(hist) - n + 1)
            if n and not set(hist[i:i + n]) & set(cfg.ngram_ignore)}
    out = []
    for w in range(vocab):
        if w in BANNED or (w == SPECIAL.sep and t - 1 < cfg.min_len):
            continue
        if n and len(hist) >= n - 1 and tuple(hist[len(hist) - n + 1:] + [w]) in seen:
            continue
        out.append(w)
    return out


def _lp(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


def ref_greedy(model, src: list[int], cfg: DecodeConfig) -> Hypothesis:
    hist: list[int] = []
    total = 0.0
    for t in range(1, cfg.max_len + 1):
        lp = _ref_logprobs(model, src, hist)
        w = max(_allowed(hist, t, cfg, len(lp)), key=lambda v: lp[v])
        total += float(lp[w])
        if w == SPECIAL.sep:
            return Hypothesis(hist, total, t, total / _lp(t, cfg.length_penalty), True)
        hist = hist + [w]
    return Hypothesis(hist, total, cfg.max_len, total / _lp(cfg.max_len, cfg.length_penalty), False)


def ref_beam(model, src: list[int], cfg: DecodeConfig) -> list[Hypothesis]:
    k = cfg.beam_size
    beams = [(0.0, [])]
    finished: list[Hypothesis] = []
    for t in range(1, cfg.max_len + 1):
        cands = []
        for score, hist in beams:
            lp = _ref_logprobs(model, src, hist)
            cands += [(score + float(lp[w]), hist, w) for w in _allowed(hist, t, cfg, len(lp))]
        cands.sort(key=lambda c: -c[0])
        nxt = []
        for rank, (score, hist, w) in enumerate(cands[:2 * k]):
            if w == SPECIAL.sep:
                if rank < k and len(finished) < k:
                    finished.append(Hypothesis(hist, score, t, score / _lp(t, cfg.length_penalty), True))
            elif len(nxt) < k:
                nxt.append((score, hist + [w]))
        if t == cfg.max_len:
            finished += [Hypothesis(h, s, t, s / _lp(t, cfg.length_penalty), False) for s, h in nxt]
            break
        if len(finished) >= k:
            break
        beams = nxt
    return sorted(finished, key=lambda h: -h.score)


def _same(got: Hypothesis, want: Hypothesis) -> None:
    assert got.tokens == want.tokens and got.length == want.length and got.ended == want.ended
    assert math.isclose(got.logprob, want.logprob, rel_tol=1e-10, abs_tol=1e-10)
    assert math.isclose(got.score, want.score, rel_tol=1e-10, abs_tol=1e-10)


# --------------------------------------------------------------------------- tests


SCORERS = {"dynamic": lambda model, cfg: CachedScorer(model, SPECIAL),
           "static": lambda model, cfg: StaticCachedScorer(model, SPECIAL, cfg.max_len)}


@pytest.mark.parametrize("cache", sorted(SCORERS))
@pytest.mark.parametrize("cfg", [DecodeConfig(max_len=9), DecodeConfig(max_len=7, min_len=3, no_repeat_ngram_size=2,
                                                                       length_penalty=1.0)])
def test_cached_greedy_equals_recomputation(cfg: DecodeConfig, cache: str):
    """Batched cached greedy decoding (padded sources of different lengths), with the growing cache and with the
    static-capacity one, gives exactly the tokens, and the scores to 1e-10 (float64), of recomputing the full
    fine-tuning layout at every step."""
    model = _model()
    got = greedy_search(SCORERS[cache](model, cfg), SOURCES, cfg, SPECIAL)
    want = [ref_greedy(model, s, cfg) for s in SOURCES]
    if cfg.min_len == 0:  # the test exercises both endings: [SEP] and max_len
        assert any(h.ended for h in want) and any(not h.ended for h in want)
    for g, w in zip(got, want):
        _same(g, w)


@pytest.mark.parametrize("cfg,eos_boost", [
    (DecodeConfig(beam_size=3, max_len=6), 3.0),  # one sentence done early (3 x [SEP]), one at max_len only
    (DecodeConfig(beam_size=4, max_len=6, min_len=2, length_penalty=0.7, no_repeat_ngram_size=2,
                  ngram_ignore=(9,)), 2.0)])
@pytest.mark.parametrize("cache", sorted(SCORERS))
def test_cached_beam_equals_recomputation(cfg: DecodeConfig, eos_boost: float, cache: str):
    """Cached batched beam search (growing and static cache: beams reordered in place, finished sentences
    dropped) returns the same finished hypotheses (tokens exactly, scores to 1e-10) as a per-sentence beam
    search that recomputes every beam's whole sequence at every step."""
    model = _model(eos_boost)
    got = beam_search(SCORERS[cache](model, cfg), SOURCES, cfg, SPECIAL)
    for src, hyps in zip(SOURCES, got):
        want = ref_beam(model, src, cfg)
        assert len(hyps) == len(want) >= 1
        for g, w in zip(hyps, want):
            _same(g, w)


def test_beam_size_one_equals_greedy():
    """Beam search with one beam returns greedy's hypotheses (tokens, log-probabilities and lengths)."""
    model = _model(seed=1)
    for cfg in (DecodeConfig(max_len=10), DecodeConfig(max_len=8, min_len=2, no_repeat_ngram_size=1)):
        greedy = greedy_search(CachedScorer(model, SPECIAL), SOURCES, cfg, SPECIAL)
        beam = beam_search(CachedScorer(model, SPECIAL), SOURCES, cfg, SPECIAL)
        for g, b in zip(greedy, beam):
            assert g.tokens == b[0].tokens and g.length == b[0].length and g.ended == b[0].ended
            assert g.logprob == b[0].logprob


def test_ngram_blocking_and_min_length_are_honoured():
    """With a model that wants to repeat one token and to stop at once, outputs hold no repeated n-gram (except
    through ignored tokens), never stop before min_len, and never emit a banned id."""
    model = _model(eos_boost=8.0)
    with torch.no_grad():
        model.lm_head.bias[17] += 6.0  # a token the model would repeat forever
    for beam in (1, 3):
        cfg = DecodeConfig(beam_size=beam, max_len=8, min_len=4, no_repeat_ngram_size=2)
        for h in generate(model, SOURCES, SPECIAL, cfg):
            grams = [tuple(h.tokens[i:i + 2]) for i in range(len(h.tokens) - 1)]
            assert len(grams) == len(set(grams)), h.tokens
            assert h.length >= 5 and h.ended  # 4 tokens, then [SEP] as soon as allowed
            assert not BANNED & set(h.tokens)
        free = generate(model, SOURCES, SPECIAL, DecodeConfig(beam_size=beam, max_len=8, min_len=4))
        assert any(h.tokens.count(17) > 2 for h in free)  # without blocking, the model repeats itself
        ignored = generate(model, SOURCES, SPECIAL, DecodeConfig(beam_size=beam, max_len=8, min_len=4,
                                                                 no_repeat_ngram_size=2, ngram_ignore=(17,)))
        assert [h.tokens for h in ignored] == [h.tokens for h in free]  # n-grams through 17 are exempt


def test_keys_and_values_are_projected_once_per_token():
    """Incremental decoding projects every token once: the key layers see (source + [P]_1) rows in the first
    call and two rows ([y_{t-1}, [P]_t]) per later step, never the cached ones again."""
    model = _model(eos_boost=-50.0)  # never stops: exactly max_len steps
    rows = []
    hooks = [layer.attention["self"].key.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:2]))
             for layer in model.encoder["layer"]]
    src = SOURCES[0]
    hyp = generate(model, [src], SPECIAL, DecodeConfig(max_len=6))[0]
    for h in hooks:
        h.remove()
    assert hyp.length == 6 and not hyp.ended
    per_layer = rows[::len(model.encoder["layer"])]
    assert per_layer == [torch.Size([1, len(src) + 3])] + [torch.Size([1, 2])] * 5


def test_too_long_for_the_position_table_is_an_error():
    """A source plus max_len beyond the position table is a ValueError naming the fix."""
    model = _model()
    with pytest.raises(ValueError, match="positions"):
        generate(model, [list(range(5, 60)) * 2], SPECIAL, DecodeConfig(max_len=20))


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_static_step_reads_nothing_back_to_the_host(backend: str, monkeypatch):
    """A StaticCachedScorer step (after the first call) runs with every Tensor -> host conversion patched to
    raise (item, bool, int, float, tolist, nonzero): the property CUDA-graph capture needs, checked on the CPU.
    (The structured CPU backend `torch` reads a flag back in its per-forward preparation.)"""
    model = _model()
    model.set_attention_backend(backend)
    scorer = StaticCachedScorer(model, SPECIAL, max_len=6)
    with torch.no_grad():
        scorer.start(SOURCES)

        def host_read(*args, **kwargs):
            raise AssertionError("a host read in the static decoding step")

        for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, host_read)
        out = scorer.step(torch.tensor([12, 13, 14]), 2)
        out = scorer.step(torch.tensor([15, 16, 17]), 3)
        monkeypatch.undo()
    assert out.shape == (3, model.config.vocab_size) and torch.isfinite(out).any()


@pytest.mark.parametrize("beam", [1, 3])
def test_a_batch_decodes_as_its_sentences_do_alone(beam: int):
    """Batched search (rules, penalties, finished sentences dropped at different steps) gives every sentence the
    hypotheses it gets when decoded alone: no rule or bookkeeping leaks across rows."""
    from .test_s2sft_beam import SPECIAL as TABLE_SPECIAL
    from .test_s2sft_beam import TableScorer, _table

    table = _table(seed=3, sep_boost=1.0)
    sources = [[4, 5, 5, 6], [7], [8, 9, 10, 11, 4, 4], [5, 6], [11, 10, 9], [6, 6, 6], [4, 7, 8]]
    cfg = DecodeConfig(beam_size=beam, max_len=7, min_len=2, no_repeat_ngram_size=2, ngram_ignore=(5,),
                       repetition_penalty=1.3, coverage_penalty=0.4, length_penalty=0.8)

    def scorer(ids: list[int]) -> TableScorer:
        return TableScorer(lambda i, prefix: table(ids[i], prefix))

    def search(srcs: list[list[int]], ids: list[int]) -> list[list[Hypothesis]]:
        if beam == 1:
            return [[h] for h in greedy_search(scorer(ids), srcs, cfg, TABLE_SPECIAL)]
        return beam_search(scorer(ids), srcs, cfg, TABLE_SPECIAL)

    batched = search(sources, list(range(len(sources))))
    lengths = {h.length for hyps in batched for h in hyps}
    assert len(lengths) > 2  # sentences finish at different steps
    for i, src in enumerate(sources):
        alone = search([src], [i])[0]
        assert [(h.tokens, h.length, h.ended) for h in batched[i]] == [(h.tokens, h.length, h.ended) for h in alone]
        assert [h.logprob for h in batched[i]] == [h.logprob for h in alone]


def test_compiled_decoding_step_equals_the_eager_one():
    """decode's model.compile=true (the static step through torch.compile) gives the eager search's hypotheses:
    tokens exactly, scores to 1e-10 (float64), through beam reordering and sentences finishing at different
    steps (new batch shapes: the recompile with dynamic dimensions), as one graph (no graph break). The config
    accepts the switch."""
    from pmlm_engine.train_config import DecodeJobConfig, ModelOptions

    assert DecodeJobConfig(init="x", model=ModelOptions(compile=True)).model.compile
    model = _model(eos_boost=3.0)
    model.set_attention_backend("sdpa")
    cfg = DecodeConfig(beam_size=3, max_len=6)
    eager = beam_search(StaticCachedScorer(model, SPECIAL, cfg.max_len), SOURCES, cfg, SPECIAL)
    torch._dynamo.utils.counters.clear()
    compiled = beam_search(CompiledStaticScorer(model, SPECIAL, cfg.max_len), SOURCES, cfg, SPECIAL)
    assert not torch._dynamo.utils.counters["graph_break"]  # the step is one graph
    assert len({h.length for hyps in eager for h in hyps}) > 1
    for got, want in zip(compiled, eager):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)


def test_the_bucket_table_is_a_constant_to_compiled_code():
    """Compiled code that builds relative-position buckets first (empty table cache) needs no graph break: the
    table is computed eagerly and taken as a constant; the buckets equal eager ones."""
    from pmlm_engine import position_bias

    position_bias._LUTS.clear()
    torch._dynamo.utils.counters.clear()
    rel = torch.arange(-200, 200).reshape(8, 50)
    got = torch.compile(position_bias.relative_position_bucket)(rel)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch.equal(got, position_bias.relative_position_bucket(rel))
