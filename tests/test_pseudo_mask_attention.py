"""Correctness of the fused pseudo-mask attention kernels (``kernels/pseudo_mask_attention.py``).

Everything runs on the CPU under Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``). The reference is float64 torch built from ``dense_pseudo_mask`` and
``RelativePositionBias.dense()``: the one statement of the rule in ``pmlm_engine.attention``.

Error rule (FlashAttention's): for every compared tensor, the kernel's max error against the
float64 reference must be at most twice the error of the *same reference computed in the
kernel's dtype*, plus a small floor (see :data:`FLOOR`).

Most tests tile with 16- and 32-wide blocks so that short sequences (37 to 97 tokens) span
several tiles and every tile class (empty, partial, full) occurs; rectangular block configs
make sure the key-major (dK/dV) and query-major (forward, dQ) tile lists are not mixed up.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlm_engine.attention import (RelativePositionBias, available_backends, dense_pseudo_mask,
                                   pseudo_mask_attention)
from pmlm_engine.config import MaskingConfig
from pmlm_engine.layout import SpecialIds, build_example_python, collate_packed, collate_padded

from pmlm_engine.kernels import pseudo_mask_attention as pma
from pmlm_engine.kernels import tile_stats as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_BUCKETS, MAX_DISTANCE = 32, 128

# Floors of the error rule, relative to max|reference| of the compared tensor. fp32: the kernel
# works in base 2 (exp2 of scores pre-multiplied by log2 e) and sums in a different order than
# torch, which costs a few ulp beyond torch's own fp32 error; 1e-5 relative is ~100 ulp, while a
# single wrongly visible or hidden key moves outputs by ~1e-2 relative (test_breakage_scale
# below checks that margin). fp16/bf16: the reference-in-dtype error dominates; the same floor.
FLOOR = 1e-5

CFG16 = pma.BlockConfig.uniform(16)
CFG_RECT = pma.BlockConfig(block_m=32, block_n=16, block_m1=16, block_n1=32, block_m2=16, block_n2=32)
CFG32 = pma.BlockConfig.uniform(32)
SPECIAL = SpecialIds(cls=1, sep=2, mask=3, pad=0, pseudo=4, random_lo=5, random_hi=60)


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass
class Layout:
    """A batch's per-token metadata, ``(B, L)`` int64 each."""

    step: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor


def doc_tokens(n_main: int, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(step, position) of one document: main part, then per step its ORIGINAL then PSEUDO tokens
    (docs/layout.md); ``spans`` are ``(start, length)`` in factorization order."""
    step, pos = [0] * n_main, list(range(n_main))
    for s, (start, length) in enumerate(spans, start=1):
        for sign in (1, -1):
            step += [sign * s] * length
            pos += list(range(start, start + length))
    return step, pos


@st.composite
def random_layouts(draw: st.DrawFn, max_len: int = 72) -> Layout:
    """Rows of packed documents (0-3 per row, so fully padded rows occur), spans of length 1 to
    the whole main part, odd total lengths, padding, and sometimes a shuffled row (the rule must
    not depend on the layout's order; it also makes every tile partial-heavy)."""
    batch = draw(st.integers(1, 2))
    rows = []
    for _ in range(batch):
        step, doc, pos = [], [], []
        for d in range(draw(st.integers(0 if batch > 1 else 1, 3))):
            n_main = draw(st.integers(1, 24))
            free = list(range(n_main))
            spans = []
            for _ in range(draw(st.integers(0, 5))):
                if not free:
                    break
                start = draw(st.sampled_from(free))
                longest = 1
                while start + longest in free:
                    longest += 1
                length = draw(st.integers(1, longest))
                spans.append((start, length))
                free = [p for p in free if not start <= p < start + length]
            s, p = doc_tokens(n_main, spans)
            step, pos, doc = step + s, pos + p, doc + [d] * len(s)
        if draw(st.booleans()) and step:
            order = draw(st.permutations(range(len(step))))
            step, pos, doc = [step[i] for i in order], [pos[i] for i in order], [doc[i] for i in order]
        rows.append((step, doc, pos))
    length = max(len(r[0]) for r in rows) + draw(st.integers(0, 7))
    length = max(1, min(length, max_len))
    out = Layout(*(torch.zeros(batch, length, dtype=torch.long) for _ in range(3)))
    out.doc.fill_(-1)
    for b, (step, doc, pos) in enumerate(rows):
        n = min(len(step), length)
        out.step[b, :n] = torch.tensor(step[:n], dtype=torch.long)
        out.doc[b, :n] = torch.tensor(doc[:n], dtype=torch.long)
        out.pos[b, :n] = torch.tensor(pos[:n], dtype=torch.long)
    return out


def engine_layout(lengths: list[int], seed: int, packed_len: Optional[int] = None, ratio: float = 0.3,
                  pad_to: Optional[int] = None) -> Layout:
    """Layouts from ``pmlm_engine.layout`` (the real builder): one example of ``n + 2`` main tokens
    per row, or packed into rows of ``packed_len``; then right-padded to ``pad_to`` tokens."""
    rng = np.random.default_rng(seed)
    examples = []
    for i, n in enumerate(lengths):
        tokens = np.concatenate([[SPECIAL.cls], rng.integers(SPECIAL.random_lo, SPECIAL.random_hi, n), [SPECIAL.sep]])
        maskable = np.r_[False, np.ones(n, bool), False]
        examples.append(build_example_python(tokens, np.zeros(n + 2, np.int64), maskable, seed + i,
                                             MaskingConfig(mask_ratio=ratio), SPECIAL))
    batch = (collate_padded(examples, SPECIAL.pad) if packed_len is None
             else collate_packed(examples, SPECIAL.pad, packed_len))
    lay = Layout(batch["step"], batch["doc_ids"], batch["position_ids"])
    if pad_to is not None:
        extra = pad_to - lay.step.shape[1]
        assert extra >= 0, f"layout is {lay.step.shape[1]} tokens, longer than pad_to={pad_to}"
        pad = torch.nn.functional.pad
        lay = Layout(pad(lay.step, (0, extra)), pad(lay.doc, (0, extra), value=-1), pad(lay.pos, (0, extra)))
    return lay


# ---------------------------------------------------------------------------------------------
# Reference and comparison


def reference(q, k, v, table, lay: Layout, scale: float, q_lay: Optional[Layout] = None):
    """Plain attention in the inputs' dtype: ``(out, lse)``; lse is -inf on rows with no visible key."""
    qs, qd, qp = (None, None, None) if q_lay is None else (q_lay.step, q_lay.doc, q_lay.pos)
    mask = dense_pseudo_mask(lay.step, lay.doc, q_step=qs, q_doc_ids=qd)[:, None]  # (B, 1, Lq, Lk)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if table is not None:
        s = s + RelativePositionBias(table, lay.pos, qp, MAX_DISTANCE).dense().to(s.dtype)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None])
    return torch.matmul(p.to(v.dtype), v), lse


def inputs(B: int, H: int, Lq: int, D: int, seed: int, Lk: Optional[int] = None):
    """Fresh standard-normal q, k, v ``(B, H, L, D)``, bias table ``(H, 32)`` and output gradient (fp32)."""
    g = torch.Generator().manual_seed(seed)
    Lk = Lq if Lk is None else Lk
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    table = torch.randn(H, NUM_BUCKETS, generator=g)
    grad_out = torch.randn(B, H, Lq, D, generator=g)
    return q, k, v, table, grad_out


def run_all(fn, q, k, v, table, grad_out, dtype):
    """``fn(q, k, v, table) -> (out, lse)`` at ``dtype``; returns out, lse and grads of q, k, v, table (float64)."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    tab = None if table is None else table.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if tab is not None:
        tab = tab.detach().requires_grad_()
    out, lse = fn(*leaves, tab)
    wrt = leaves + ([tab] if tab is not None else [])
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    res = {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if tab is not None:
        res["dtable"] = grads[3]
    return {name: t.detach().double() for name, t in res.items()}


def check_rule(kernel: dict, ref64: dict, ref_low: dict, where: str = "") -> None:
    """FlashAttention's rule on every tensor; lse's -inf entries must coincide exactly."""
    for name, exact in ref64.items():
        got, low = kernel[name], ref_low[name]
        assert torch.isfinite(got).all() or name == "lse", f"{name}{where}: non-finite values"
        if name == "lse":
            inf = torch.isinf(exact)
            assert torch.equal(torch.isinf(got), inf) and (got[inf] < 0).all(), f"lse{where}: -inf rows differ"
            got, low, exact = got[~inf], low[~inf], exact[~inf]
            if exact.numel() == 0:
                continue
        err = (got - exact).abs().max().item()
        base = (low - exact).abs().max().item()
        floor = FLOOR * max(1.0, exact.abs().max().item())
        assert err <= 2 * base + floor, (f"{name}{where}: kernel error {err:.3g} > 2 x reference-in-dtype "
                                         f"error {base:.3g} + floor {floor:.3g}")


def compare(lay: Layout, dtype: torch.dtype, cfg: pma.BlockConfig, H: int = 2, D: int = 32, seed: int = 0,
            bias: bool = True, q_rows: Optional[slice] = None) -> dict:
    """Kernel vs float64 reference vs same-dtype reference on one layout; returns the kernel's results."""
    B, L = lay.step.shape
    q_lay = None
    if q_rows is not None:
        q_lay = Layout(lay.step[:, q_rows], lay.doc[:, q_rows], lay.pos[:, q_rows])
    Lq = L if q_lay is None else q_lay.step.shape[1]
    q, k, v, table, grad_out = inputs(B, H, Lq, D, seed, Lk=L)
    table = table if bias else None
    scale = 1 / math.sqrt(D)

    def kernel(q, k, v, tab):
        pb = None if tab is None else RelativePositionBias(tab, lay.pos, None if q_lay is None else q_lay.pos,
                                                           MAX_DISTANCE)
        return pma.fused_pseudo_mask_attention(
            q, k, v, lay.step, lay.doc, pb, q_step=None if q_lay is None else q_lay.step,
            q_doc_ids=None if q_lay is None else q_lay.doc, return_lse=True, config=cfg)

    def ref(q, k, v, tab):
        return reference(q, k, v, tab, lay, scale, q_lay)

    got = run_all(kernel, q, k, v, table, grad_out, dtype)
    exact = run_all(ref, q, k, v, table, grad_out, torch.float64)
    low = run_all(ref, q, k, v, table, grad_out, dtype)
    check_rule(got, exact, low, f" ({dtype}, D={D}, L={L})")
    return got


SLOW = settings(max_examples=10, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Tile classification


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lay=random_layouts(max_len=90), blocks=st.sampled_from([(16, 16), (16, 32), (32, 16), (8, 8), (64, 64)]))
def test_tile_classes_are_exact(lay: Layout, blocks: tuple[int, int]):
    """A tile is EMPTY exactly when it has no visible pair and FULL exactly when it lies inside the
    sequence with every pair visible (per ``dense_pseudo_mask``), checked tile by tile; the earlier
    summary-based classifier is sound and the exact classes refine it (its EMPTY and FULL tiles
    keep their class); the compact tile lists hold exactly the FULL and the PARTIAL tiles of each row."""
    bm, bn = blocks
    classes = ts.tile_classes(lay.step, lay.doc, lay.step, lay.doc, bm, bn)
    summary = ts.summary_tile_classes(lay.step, lay.doc, lay.step, lay.doc, bm, bn)
    mask = dense_pseudo_mask(lay.step, lay.doc)
    B, L = lay.step.shape
    for b in range(B):
        for i in range(classes.shape[1]):
            for j in range(classes.shape[2]):
                tile = mask[b, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
                want = ts.EMPTY if not tile.any() else ts.FULL if tile.shape == (bm, bn) and tile.all() else ts.PARTIAL
                assert int(classes[b, i, j]) == want, f"row {b} tile ({i}, {j}): {int(classes[b, i, j])} != {want}"
    assert ((summary == ts.PARTIAL) | (summary == classes)).all()
    full_idx, full_cnt, part_idx, part_cnt = ts.tile_lists(classes)
    for b in range(B):
        for i in range(classes.shape[1]):
            want_full = torch.nonzero(classes[b, i] == ts.FULL).flatten().tolist()
            want_part = torch.nonzero(classes[b, i] == ts.PARTIAL).flatten().tolist()
            assert full_idx[b, i, :full_cnt[b, i]].tolist() == want_full
            assert part_idx[b, i, :part_cnt[b, i]].tolist() == want_part


def test_tile_classes_find_the_structure():
    """On a real PMLM layout the classifier is not trivially conservative: main x main tiles are
    FULL, main queries x tiles of only appended keys are EMPTY, and the FLOP model's counts add
    up. (A classifier answering PARTIAL everywhere would be correct but lose the sparsity.)"""
    lay = engine_layout([90], seed=3)
    n_main = int((lay.step[0] == 0).sum())
    classes = ts.tile_classes(lay.step, lay.doc, lay.step, lay.doc, 16, 16)[0]
    main_tiles = n_main // 16
    assert main_tiles >= 4
    assert (classes[:main_tiles, :main_tiles] == ts.FULL).all()
    first_appended = -(-n_main // 16)
    assert (classes[:main_tiles, first_appended:] == ts.EMPTY).all()
    stats = ts.tile_stats(lay.step, lay.doc, 16, 16)
    assert stats.empty > 0 and stats.full > 0 and stats.partial > 0
    assert stats.total == classes.numel() == stats.empty + stats.partial + stats.full
    assert stats.computed_fraction == pytest.approx((stats.partial + stats.full) / stats.total)
    assert 0 < stats.visible_fraction < stats.computed_fraction < 1
    assert stats.flops(num_heads=2, head_dim=64) == (stats.partial + stats.full) * 2 * (2 * 16 * 16 * 64 * 2)
    passes = pma.flop_model(lay.step, lay.doc, head_dim=64, config=CFG_RECT)
    assert sorted(passes) == ["bwd_dkdv", "bwd_dq", "fwd"]
    assert (passes["fwd"].block_m, passes["fwd"].block_n) == (32, 16)
    assert passes["bwd_dkdv"].as_row()["total"] == passes["bwd_dkdv"].total


# ---------------------------------------------------------------------------------------------
# Kernels against the reference


@SLOW
@given(lay=random_layouts(), cfg=st.sampled_from([CFG16, CFG_RECT]), seed=st.integers(0, 2**16),
       decode_from=st.one_of(st.none(), st.floats(0.0, 0.9)))
def test_random_layouts_match_reference(lay: Layout, cfg: pma.BlockConfig, seed: int,
                                        decode_from: Optional[float]):
    """fp32: output, lse and the gradients of q, k, v and the bias table match the float64
    reference on random layouts (packing, padding, fully padded rows, one-token and whole-text
    spans, shuffled rows, odd lengths) with several tiles per row, square and rectangular tiles,
    and sometimes only a suffix of the tokens as queries (Lq < Lk, as in decoding). A wrong tile
    class or mask condition on any pair that matters fails here."""
    length = lay.step.shape[1]
    q_rows = None if decode_from is None else slice(min(length - 1, int(decode_from * length)), None)
    compare(lay, torch.float32, cfg, seed=seed, q_rows=q_rows)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_engine_layouts_fp32(packed: bool):
    """fp32 on layouts from ``pmlm_engine.layout`` at odd lengths (37 and 97 tokens per row)."""
    lay = (engine_layout([40, 15, 20], seed=11, packed_len=97, pad_to=97) if packed
           else engine_layout([18, 9], seed=7, pad_to=37))
    compare(lay, torch.float32, CFG_RECT if packed else CFG16, H=2, D=32, seed=1)


@pytest.mark.parametrize("dtype,head_dim", [
    (torch.float16, 32), (torch.float16, 64), (torch.float16, 128),
    (torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
])
def test_low_precision_and_head_dims(dtype: torch.dtype, head_dim: int):
    """fp16 and bf16 at head dims 32, 64, 128, on a packed 97-token layout, within twice the
    error of the same reference computed in that dtype.

    What this proves for bf16: under the interpreter, bf16 ``tl.dot`` is broken (it multiplies
    the raw bits), so the kernels cast bf16 operands to fp32 right before each dot (``DOT_FP32``,
    set only when interpreting). Every value is still rounded to bf16 exactly where the GPU path
    rounds it (inputs, P before P V, dS before dS K / dS^T Q), and a product of two bf16 values is
    exact in fp32, so this checks the kernels' bf16 rounding points and fp32 accumulation. It does
    not prove the GPU's native bf16 MMA code generation (``tests/test_aot.py`` only compiles it)."""
    lay = engine_layout([40, 25], seed=5, packed_len=97, pad_to=97)
    assert pma._kernel_flags(torch.bfloat16)[0] is pma.INTERPRETED
    compare(lay, dtype, CFG32, H=1, D=head_dim, seed=head_dim)


def test_default_config_and_no_bias():
    """The default block configurations (what production uses: the fp16/bf16 one with fp32 data,
    whose error budget is tight, and the fp32 one) on a padded batch, and the path without a
    relative position bias (HAS_BIAS=False)."""
    lay = engine_layout([100, 60], seed=2)
    compare(lay, torch.float32, pma.default_config(64, torch.float16), H=1, D=64, seed=4)
    small = engine_layout([45, 20], seed=3)
    compare(small, torch.float32, pma.default_config(64, torch.float32), H=1, D=64, seed=3)
    compare(small, torch.float32, CFG16, H=2, D=32, seed=5, bias=False)


def test_fully_masked_rows_are_zero():
    """Padding queries and a fully padded row: output exactly 0, lse exactly -inf, zero gradients
    for those queries and for padding keys, and no NaN anywhere (the documented contract)."""
    lay = engine_layout([30, 12, 20], seed=9)  # rows 1 and 2 end in padding
    lay.doc[1, :] = -1  # row 1 entirely padding
    got = compare(lay, torch.float32, CFG16, seed=2)
    pad = lay.doc < 0  # (B, L)
    for name in ("out", "dq"):
        assert (got[name].permute(0, 2, 1, 3)[pad] == 0).all(), name
    for name in ("dk", "dv"):
        assert (got[name].permute(0, 2, 1, 3)[pad] == 0).all(), name
    assert torch.isneginf(got["lse"].permute(0, 2, 1)[pad]).all()
    assert torch.isfinite(got["lse"].permute(0, 2, 1)[~pad]).all()


def test_single_key_rows_copy_their_value():
    """Every token its own document: each query sees exactly itself, so the output is exactly its
    value row and lse is its own score (a sharp check of the doc-id rule and of the diagonal)."""
    L, D = 37, 32
    step = torch.zeros(1, L, dtype=torch.long)
    doc = torch.arange(L).unsqueeze(0)
    q, k, v, _, _ = inputs(1, 2, L, D, seed=3)
    out, lse = pma.fused_pseudo_mask_attention(q, k, v, step, doc, return_lse=True, config=CFG16)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, (q * k).sum(-1) / math.sqrt(D), rtol=1e-6, atol=1e-6)


def test_decoding_queries_differ_from_keys():
    """Lq != Lk (incremental decoding): the queries are the last tokens of a seq2seq-like layout
    with their own q_step, q_doc_ids and q_position_ids; forward and gradients match the reference."""
    lay = engine_layout([40, 21], seed=4)
    compare(lay, torch.float32, CFG16, seed=6, q_rows=slice(lay.step.shape[1] - 19, None))


def test_lse_is_differentiable():
    """A loss that also uses lse (e.g. a z-loss) gets the right gradients: dlse enters the
    backward as ``delta - dlse``."""
    lay = engine_layout([33], seed=8)
    q, k, v, table, _ = inputs(1, 2, lay.step.shape[1], 32, seed=8)

    def loss(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, table)]
        out, lse = fn(*leaves)
        value = out.sum() + torch.where(torch.isinf(lse), 0, lse).square().sum()
        return torch.autograd.grad(value, leaves)

    def kernel(q, k, v, tab):
        return pma.fused_pseudo_mask_attention(q, k, v, lay.step, lay.doc,
                                               RelativePositionBias(tab, lay.pos, None, MAX_DISTANCE),
                                               return_lse=True, config=CFG16)

    got = loss(kernel, torch.float32)
    want = loss(lambda q, k, v, t: reference(q, k, v, t, lay, 1 / math.sqrt(32)), torch.float64)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dtable")):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


def test_breakage_scale():
    """Justifies :data:`FLOOR`: hiding one visible key changes the output by far more than the floor."""
    lay = engine_layout([40], seed=1)
    q, k, v, table, _ = inputs(1, 2, lay.step.shape[1], 32, seed=1)
    args = (q.double(), k.double(), v.double(), table.double())
    out, _ = reference(*args, lay, 1 / math.sqrt(32))
    broken = Layout(lay.step.clone(), lay.doc.clone(), lay.pos)
    broken.doc[0, 5] = 7  # one main key moves to another document
    out2, _ = reference(*args, broken, 1 / math.sqrt(32))
    assert (out - out2).abs().max() > 100 * FLOOR * out.abs().max()


# ---------------------------------------------------------------------------------------------
# Registration, dispatch, validation


def test_backend_dispatch_and_custom_op():
    """The "triton" backend is registered on import and available under the interpreter; the
    dispatch gives the same result as the direct call; dropout is refused, not ignored; the custom
    op passes torch.library.opcheck (schema, fake tensor, autograd registration)."""
    assert pma.unavailable() is None and "triton" in available_backends()
    lay = engine_layout([20], seed=1)
    q, k, v, table, _ = inputs(1, 2, lay.step.shape[1], 32, seed=12)
    pb = RelativePositionBias(table, lay.pos, None, MAX_DISTANCE)
    via_dispatch = pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb, backend="triton")
    direct = pma.fused_pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb)
    torch.testing.assert_close(via_dispatch, direct, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout"):
        pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb, backend="triton", dropout_p=0.1)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    args = (q.requires_grad_(), k, v, i32(lay.step), i32(lay.doc), i32(lay.step), i32(lay.doc), i32(lay.pos),
            i32(lay.pos), pma.bias_lut(table, MAX_DISTANCE), 0.125, MAX_DISTANCE,
            [getattr(CFG32, f) for f in pma._CFG_FIELDS], pma.plan_tiles(i32(lay.step), i32(lay.doc), i32(lay.step),
                                                                         i32(lay.doc), CFG32))
    torch.library.opcheck(pma._fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                         "test_autograd_registration"))


def test_invalid_inputs_raise_clear_errors():
    """User errors raise ValueError/TypeError naming the problem, never an assert or a crash."""
    lay = engine_layout([10], seed=1)
    L = lay.step.shape[1]
    q, k, v, table, _ = inputs(1, 2, L, 32, seed=0)
    f = pma.fused_pseudo_mask_attention
    with pytest.raises(ValueError, match="head_dim=48"):
        f(q[..., :24].repeat(1, 1, 1, 2), k[..., :24].repeat(1, 1, 1, 2), v[..., :24].repeat(1, 1, 1, 2), lay.step)
    with pytest.raises(TypeError, match="float64"):
        f(q.double(), k.double(), v.double(), lay.step)
    with pytest.raises(TypeError, match="integer"):
        f(q, k, v, lay.step.float())
    with pytest.raises(ValueError, match="shape"):
        f(q, k, v, lay.step[:, :-1])
    with pytest.raises(ValueError, match="q_step"):
        f(q[:, :, :3], k, v, lay.step)
    with pytest.raises(ValueError, match="q_doc_ids"):
        f(q[:, :, :3], k, v, lay.step, lay.doc, q_step=lay.step[:, :3])
    with pytest.raises(ValueError, match="bias table"):
        f(q, k, v, lay.step, lay.doc, RelativePositionBias(table[:1], lay.pos, None, MAX_DISTANCE))
    with pytest.raises(ValueError, match="power of two"):
        pma.BlockConfig(block_m=24)


def test_unavailable_without_interpreter_or_gpu():
    """In a process without TRITON_INTERPRET on this GPU-less machine, importing the kernels works
    (no CUDA query at import) and the backend reports itself unavailable with the fix."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the backend is available without the interpreter")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from pmlm_engine.kernels import pseudo_mask_attention as m\nprint(m.unavailable())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stdout and "GPU" in proc.stdout


def test_a_second_import_under_another_name_cannot_replace_the_custom_ops():
    """Regression test of the crash that once made CI run this suite in its own process.

    From the repository root the ``kernels/`` folder is also importable as a top-level ``kernels``
    package, and libraries probe for a package of that name (transformers imports ``kernels``
    to look for Hugging Face's kernel hub). Executing ``pseudo_mask_attention`` a second time
    under that name redefined ``pmlm::pseudo_mask_attention_fwd``; torch then destroys the first
    definition, and the op object the engine holds pointed to freed memory: the next call
    segfaulted or raised ``ValueError: vector::reserve``. Now the top-level ``kernels`` is an empty
    shell, importing the module under another name is refused, and the op stays the one defined
    first (a use after free does not crash reliably: the freed definition's memory is often
    reused by the new, identical one, so the test checks the definition itself)."""
    code = (
        "import importlib, torch\n"
        "from pmlm_engine.kernels import pseudo_mask_attention as pma\n"
        "q = torch.randn(1, 1, 3, 16, requires_grad=True); step = torch.zeros(1, 3, dtype=torch.long)\n"
        "def call():\n"
        "    out = pma.fused_pseudo_mask_attention(q, q, q, step, step, config=pma.BlockConfig.uniform(16))\n"
        "    out.sum().backward()\n"
        "call()\n"
        "probe = importlib.import_module('kernels')  # what transformers' is_kernels_available() does\n"
        "try:\n"
        "    importlib.import_module('kernels.pseudo_mask_attention')\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
        "from torch._library.custom_ops import OPDEFS\n"
        "print('same op:', OPDEFS['pmlm::pseudo_mask_attention_fwd'] is pma._fwd_op)\n"
        "call()\n"
        "print('shell:', probe.__file__.startswith(%r), hasattr(probe, 'pseudo_mask_attention'))\n"
        "print('ok')\n" % REPO)
    env = {**os.environ, "TRITON_INTERPRET": "1", "MALLOC_PERTURB_": "165", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: import it as pmlm_engine.kernels.pseudo_mask_attention" in proc.stdout
    assert "same op: True" in proc.stdout  # torch did not replace (and free) the engine's definition
    assert "shell: True False" in proc.stdout and proc.stdout.rstrip().endswith("ok")
