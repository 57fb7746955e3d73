"""The C++ example builder (``pmlm_engine._C``, ``csrc/layout.cpp``) equals the Python reference.

For the same seed, ``build_example(backend="cpp")`` and ``build_example_python`` must give
identical :class:`~pmlm_engine.layout.Example` objects: the random draws are a contract
(``pmlm_engine/masking.py`` docstring), so one draw out of place changes the spans, the
order or the corruption, and these tests fail. Skipped when the extension is not built.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from pmlm_engine import _native
from pmlm_engine.config import MaskingConfig
from pmlm_engine.layout import IGNORE, Example, SpecialIds, build_example, build_example_python
from pmlm_engine.rng import derive_seed

CLS, SEP, MASK, PAD, PSEUDO = 101, 102, 103, 0, 104
SPECIAL = SpecialIds(cls=CLS, sep=SEP, mask=MASK, pad=PAD, random_lo=1000, random_hi=30522)
FIELDS = ("input_ids", "position_ids", "segment_ids", "step", "labels")


def _C() -> Any:  # noqa: N802 - the extension's own name
    """The loaded ``pmlm_engine._C`` module."""
    return _native._C


def make_sequence(length: int, special_runs: list[tuple[int, int]], middle_sep: bool,
                  token_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]``-shaped input of ``length`` tokens: specials at both ends,
    optionally a middle ``[SEP]`` that starts segment 1, plus runs of other special tokens
    ``(start, run_length)``. Returns ``(tokens, segment_ids, maskable)``."""
    gen = np.random.default_rng(token_seed)
    tokens = gen.integers(1000, 30522, size=length, dtype=np.int64)
    maskable = np.ones(length, dtype=bool)
    for start, run in special_runs:
        start = start % length
        maskable[start:start + run] = False
        tokens[start:start + run] = PAD
    tokens[0], tokens[-1] = CLS, SEP
    maskable[0] = maskable[-1] = False
    segment_ids = np.zeros(length, dtype=np.int64)
    if middle_sep:
        mid = length // 2
        tokens[mid], maskable[mid] = SEP, False
        segment_ids[mid + 1:] = 1
    return tokens, segment_ids, maskable


@st.composite
def masking_configs(draw: st.DrawFn) -> MaskingConfig:
    """Masking configurations, including the extremes span_prob 0 and 1 (with span_prob 1 and
    span_min > 1 the budget can be unreachable: both paths must then raise the same error)."""
    span_prob = draw(st.one_of(st.sampled_from([0.0, 0.4, 1.0]), st.floats(0.0, 1.0)))
    span_min = draw(st.integers(1, 4))
    span_max = draw(st.integers(span_min, span_min + 6))
    mask_prob = draw(st.one_of(st.sampled_from([0.0, 0.8, 1.0]), st.floats(0.0, 1.0)))
    random_prob = draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0 - mask_prob]), st.floats(0.0, 1.0 - mask_prob)))
    assume(mask_prob + random_prob <= 1.0)
    return MaskingConfig(mask_ratio=draw(st.floats(0.01, 0.9)), span_prob=span_prob, span_min=span_min,
                         span_max=span_max, mask_prob=mask_prob, random_prob=random_prob)


@st.composite
def special_ids(draw: st.DrawFn) -> SpecialIds:
    """Special ids with ``[P]`` equal to ``[MASK]`` (released code) or separate, and random
    replacement ranges from one token up to the generator's limit of 2**32 - 1 tokens."""
    lo = draw(st.integers(0, 1000))
    width = draw(st.one_of(st.integers(1, 40000), st.just(2**32 - 1)))
    return SpecialIds(cls=CLS, sep=SEP, mask=MASK, pad=PAD, pseudo=draw(st.sampled_from([None, PSEUDO])),
                      random_lo=lo, random_hi=lo + width)


sequences = st.tuples(
    st.integers(3, 600),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 5)), max_size=8),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)


def assert_same(native: Example, reference: Example) -> None:
    for f in FIELDS:
        got, want = getattr(native, f), getattr(reference, f)
        assert got.dtype == np.int64, (f, got.dtype)
        np.testing.assert_array_equal(got, want, err_msg=f)
    assert native.num_main == reference.num_main
    assert native == reference


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=sequences, cfg=masking_configs(), special=special_ids(), seed=st.integers(0, 2**64 - 1))
def test_cpp_equals_python(seq: tuple, cfg: MaskingConfig, special: SpecialIds, seed: int) -> None:
    """For any length 3..600, any maskable pattern ([CLS]/[SEP] and runs of specials), any valid
    masking configuration, [P] equal to or separate from [MASK], and any 64-bit seed, the C++
    builder returns exactly the Python reference's example, or both raise the same ValueError
    (unreachable budget) after the same draws."""
    tokens, segment_ids, maskable = make_sequence(*seq)
    try:
        reference = build_example_python(tokens, segment_ids, maskable, seed, cfg, special)
    except ValueError as exc:
        event("unreachable budget: both raise")
        assert "no span can be accepted" in str(exc)
        with pytest.raises(ValueError, match="no span can be accepted"):
            build_example(tokens, segment_ids, maskable, seed, cfg, special, backend="cpp")
        return
    native = build_example(tokens, segment_ids, maskable, seed, cfg, special, backend="cpp")
    assert_same(native, reference)


def test_cpp_equals_python_defaults_many_seeds() -> None:
    """The paper's defaults over many derived seeds and both common lengths: identical examples,
    and the layout is sane (masked share reached, PAR labels on every [P])."""
    cfg = MaskingConfig()
    for i in range(200):
        length = 128 if i % 2 else 512
        tokens, segment_ids, maskable = make_sequence(length, [(i, 2)], True, i)
        seed = derive_seed(1234, 0, i)
        reference = build_example_python(tokens, segment_ids, maskable, seed, cfg, SPECIAL)
        native = build_example(tokens, segment_ids, maskable, seed, cfg, SPECIAL, backend="cpp")
        assert_same(native, reference)
        n = int(maskable.sum())
        assert (native.step[:length] == 0).all()
        assert int((native.step > 0).sum()) >= math.ceil(cfg.mask_ratio * n)
        assert (native.labels[native.step < 0] != IGNORE).all()


def test_seed_changes_result() -> None:
    """Sanity of the comparison itself: different seeds give different examples, so equality
    above is not trivially true (e.g. both sides ignoring the seed)."""
    tokens, segment_ids, maskable = make_sequence(256, [], True, 0)
    a = build_example(tokens, segment_ids, maskable, 1, MaskingConfig(), SPECIAL, backend="cpp")
    b = build_example(tokens, segment_ids, maskable, 2, MaskingConfig(), SPECIAL, backend="cpp")
    assert a != b


def test_no_maskable_and_empty() -> None:
    """Edge cases: a sequence of specials only draws nothing and returns the main part; an empty
    sequence returns empty int64 arrays. Both equal the reference."""
    cfg = MaskingConfig()
    tokens = np.array([CLS, SEP, SEP], dtype=np.int64)
    segs = np.zeros(3, np.int64)
    none = np.zeros(3, bool)
    assert_same(build_example(tokens, segs, none, 5, cfg, SPECIAL, backend="cpp"),
                build_example_python(tokens, segs, none, 5, cfg, SPECIAL))
    empty = np.zeros(0, np.int64)
    native = build_example(empty, empty, np.zeros(0, bool), 5, cfg, SPECIAL, backend="cpp")
    assert len(native) == 0 and native.num_main == 0
    assert_same(native, build_example_python(empty, empty, np.zeros(0, bool), 5, cfg, SPECIAL))


@settings(max_examples=25, deadline=None)
@given(batch=st.lists(st.tuples(sequences, st.integers(0, 2**64 - 1)), min_size=0, max_size=6),
       cfg=masking_configs(), special=special_ids())
def test_batched_equals_single(batch: list, cfg: MaskingConfig, special: SpecialIds) -> None:
    """``build_examples`` (one C++ call for a batch) returns, per sequence, the example that
    ``build_example_python`` builds for it; where the reference raises (unreachable budget),
    the batch raises a ValueError naming the first failing sequence."""
    seqs = [make_sequence(*s) for s, _ in batch]
    seeds = [seed for _, seed in batch]
    references: list[Example] = []
    for i, ((tokens, segs, mask), seed) in enumerate(zip(seqs, seeds)):
        try:
            references.append(build_example_python(tokens, segs, mask, seed, cfg, special))
        except ValueError:
            with pytest.raises(ValueError, match=f"^sequence {i}: span sampling"):
                _native.build_examples([s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs],
                                       seeds, cfg, special)
            return
    native = _native.build_examples([s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs],
                                    seeds, cfg, special)
    assert len(native) == len(batch)
    for got, want in zip(native, references):
        assert_same(got, want)


@given(seed=st.integers(0, 2**64 - 1), keys=st.lists(st.integers(0, 2**64 - 1), max_size=4))
def test_derive_seed_matches(seed: int, keys: list[int]) -> None:
    """``_C.derive_seed`` is ``rng.derive_seed`` for any base seed and keys (the C++ twin of the
    per-(epoch, example) seed derivation, used by batched C++ data paths)."""
    assert _C().derive_seed(seed, keys) == derive_seed(seed, *keys)


# ---------------------------------------------------------------------------------------------
# Bad input


GOOD = make_sequence(32, [], False, 0)


def _raw_args(**over: object) -> dict[str, object]:
    """Valid keyword arguments of ``_C.build_example`` for :data:`GOOD`, with ``over`` applied."""
    args: dict[str, object] = dict(
        tokens=GOOD[0], segment_ids=GOOD[1], maskable=GOOD[2], seed=0, mask_ratio=0.15, span_prob=0.4,
        span_min=2, span_max=6, mask_prob=0.8, random_prob=0.1, mask_id=MASK, pseudo_id=MASK,
        random_lo=1000, random_hi=30522)
    args.update(over)
    return args




@pytest.mark.parametrize(
    ("override", "match"),
    [
        (dict(mask_ratio=0.0), "mask_ratio=0"),
        (dict(mask_ratio=1.0), "mask_ratio=1"),
        (dict(mask_ratio=float("nan")), "mask_ratio=nan"),
        (dict(span_prob=1.5), "span_prob=1.5"),
        (dict(span_min=0), "span_min/span_max"),
        (dict(span_min=5, span_max=3), "span_min/span_max"),
        (dict(span_max=2**40), "span_max"),
        (dict(mask_prob=0.9, random_prob=0.2), "mask_prob/random_prob"),
        (dict(random_prob=-0.1), "mask_prob/random_prob"),
        (dict(random_lo=5, random_hi=5), "random_lo/random_hi"),
        (dict(random_lo=0, random_hi=2**32), "random_lo/random_hi"),
        (dict(tokens=GOOD[0].astype(np.float64)), "tokens has dtype float64"),
        (dict(tokens=GOOD[0].astype(np.int32)), "tokens has dtype int32"),
        (dict(segment_ids=GOOD[1][:-1]), "same length"),
        (dict(maskable=GOOD[2].astype(np.int64)), "maskable has dtype int64"),
        (dict(tokens=GOOD[0].reshape(4, 8)), "tokens must be 1-D"),
        (dict(tokens=GOOD[0][::-1]), "tokens is not C-contiguous"),
    ],
)
def test_raw_extension_rejects_bad_input(override: dict, match: str) -> None:
    """The extension itself validates every argument and raises ValueError naming it."""
    with pytest.raises(ValueError, match=match):
        _C().build_example(**_raw_args(**override))


def test_wrapper_rejects_mismatched_lengths_and_bad_range() -> None:
    """Through the public ``build_example``: ValueError for mismatched lengths and for an empty
    random-replacement range (the Python reference would draw ``randbelow(0)`` there)."""
    tokens, segs, mask = GOOD
    with pytest.raises(ValueError, match="same length"):
        build_example(tokens, segs[:5], mask, 0, MaskingConfig(), SPECIAL, backend="cpp")
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        build_example(tokens.reshape(2, 16), segs, mask, 0, MaskingConfig(), SPECIAL, backend="cpp")
    empty_range = SpecialIds(cls=CLS, sep=SEP, mask=MASK, pad=PAD, random_lo=7, random_hi=7)
    with pytest.raises(ValueError, match="random_lo/random_hi"):
        build_example(tokens, segs, mask, 0, MaskingConfig(), empty_range, backend="cpp")


def test_impossible_budget_raises_instead_of_hanging() -> None:
    """With span_prob=1 and span_min=3 but maskable runs of 2 tokens, no span can ever be
    accepted: both paths raise ValueError saying why (the Python reference used to loop forever)."""
    tokens = np.arange(1000, 1012, dtype=np.int64)
    maskable = np.array([0, 1, 1, 0] * 3, dtype=bool)
    cfg = MaskingConfig(span_prob=1.0, span_min=3, span_max=4)
    for backend in ("cpp", "python"):
        with pytest.raises(ValueError, match="no span can be accepted"):
            build_example(tokens, np.zeros(12, np.int64), maskable, 0, cfg, SPECIAL, backend=backend)


def test_stuck_midway_same_state_both_paths() -> None:
    """Short maskable runs with span_prob=1, span_min=2: some seeds fill the budget, others get
    stuck after accepting a few spans. Both paths agree on which, and when stuck they report the
    same masked count (the same spans were accepted from the same draws)."""
    maskable = np.array([0] + [1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0] * 6 + [0], dtype=bool)
    tokens = np.arange(1000, 1000 + len(maskable), dtype=np.int64)
    segs = np.zeros(len(maskable), np.int64)
    cfg = MaskingConfig(mask_ratio=0.6, span_prob=1.0, span_min=2, span_max=3)
    outcomes = set()
    for seed in range(12):
        try:
            reference = build_example_python(tokens, segs, maskable, seed, cfg, SPECIAL)
        except ValueError as exc:
            with pytest.raises(ValueError) as native_exc:
                build_example(tokens, segs, maskable, seed, cfg, SPECIAL, backend="cpp")
            count = str(exc).split(":")[1].split("tokens masked")[0]
            assert count in str(native_exc.value), (str(exc), str(native_exc.value))
            outcomes.add("stuck")
            continue
        assert_same(build_example(tokens, segs, maskable, seed, cfg, SPECIAL, backend="cpp"), reference)
        outcomes.add("filled")
    assert outcomes == {"stuck", "filled"}, outcomes


def test_batched_rejects_bad_input() -> None:
    """``build_examples`` names the sequence at fault and checks list lengths and seeds."""
    tokens, segs, mask = GOOD
    with pytest.raises(ValueError, match="sequence 1: tokens, segment_ids and maskable"):
        _C().build_examples([tokens, tokens], [segs, segs[:3]], [mask, mask], [0, 1],
                            0.15, 0.4, 2, 6, 0.8, 0.1, MASK, MASK, 1000, 30522)
    with pytest.raises(ValueError, match="same number of sequences"):
        _C().build_examples([tokens], [segs], [mask], [0, 1], 0.15, 0.4, 2, 6, 0.8, 0.1, MASK, MASK, 1000, 30522)
    with pytest.raises(ValueError, match="sequence 0: seed=-1"):
        _C().build_examples([tokens], [segs], [mask], [-1], 0.15, 0.4, 2, 6, 0.8, 0.1, MASK, MASK, 1000, 30522)
    with pytest.raises(ValueError, match="sequence 0: maskable must be 1-D"):
        _C().build_examples([tokens], [segs], [object()], [0], 0.15, 0.4, 2, 6, 0.8, 0.1, MASK, MASK, 1000, 30522)
