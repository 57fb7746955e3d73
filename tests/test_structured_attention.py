"""The structured ``torch`` attention backend against the float64 reference.

Error rule (FlashAttention's): on fresh random inputs, the backend's fp32 error against the
``reference`` backend run in float64 must be at most twice the error of that same reference run
in fp32, plus a small floor. The bound then scales with shape and values by itself: a wrong
mask, a lost document boundary or a misplaced block gives O(1) errors, far above it, while
legitimate reordering of fp32 sums (SDPA's blocked kernel, chunked GEMMs) stays within 2x.
The floor (1e-5 relative to the largest reference value, i.e. ~100 fp32 ulps of O(1) terms)
covers cases where the fp32 reference is exact by accident: a query with a single visible key
makes the reference's dS exactly 0, while the same zero computed as ``P * (dP - dO.O)`` with the
two dot products summed in different orders is a few ulps off.

Layouts come from the real layout code (``build_example_python``, ``collate_padded``,
``collate_packed``, ``build_seq2seq_example``), with odd lengths, padding and packing, plus
arbitrary metadata that no layout produces (the backend must fall back and still be right).
Block calls are forced even where the cost model would choose the dense fallback (these shapes
are tiny), so the tests exercise the structured path; each test asserts which plan ran.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmlm_engine import structured_attention as sa
from pmlm_engine.attention import (
    RelativePositionBias,
    available_backends,
    pseudo_mask_attention,
    resolve_backend,
)
from pmlm_engine.config import MaskingConfig
from pmlm_engine.layout import (
    build_example_python,
    build_seq2seq_example,
    collate_packed,
    collate_padded,
)
from pmlm_engine.layout import SpecialIds

SPECIAL = SpecialIds(cls=1, sep=2, mask=3, pad=0, random_lo=5, random_hi=60)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def blocks_always() -> Iterator[None]:
    """Make the cost model pick blocks whenever the structure allows (tiny test shapes)."""
    saved = sa.CALL_OVERHEAD_SCORES
    sa.CALL_OVERHEAD_SCORES = 0
    try:
        yield
    finally:
        sa.CALL_OVERHEAD_SCORES = saved


def example(length: int, seed: int, ratio: float = 0.15):
    """A pre-training example of ``length`` main tokens ([CLS] ... [SEP]) and its appended region."""
    tokens = np.random.RandomState(seed).randint(SPECIAL.random_lo, SPECIAL.random_hi, length)
    maskable = np.ones(length, dtype=bool)
    maskable[[0, -1]] = False
    return build_example_python(tokens, np.zeros(length, np.int64), maskable, seed, MaskingConfig(mask_ratio=ratio),
                                SPECIAL)


def run_backend(
    backend: str,
    dtype: torch.dtype,
    leaves: list[torch.Tensor],
    batch: dict[str, torch.Tensor],
    use_bias: bool,
    grad_out: torch.Tensor,
    use_doc_ids: bool = True,
    **kw,
) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """Output and gradients (q, k, v, bias table) of one backend on copies of ``leaves`` in ``dtype``."""
    q, k, v, table = (x.detach().to(dtype).requires_grad_() for x in leaves)
    bias = RelativePositionBias(table, batch["position_ids"]) if use_bias else None
    out = pseudo_mask_attention(q, k, v, batch["step"], batch["doc_ids"] if use_doc_ids else None, bias,
                                backend=backend, **kw)
    wrt = [q, k, v, table] if use_bias else [q, k, v]
    grads = list(torch.autograd.grad(out, wrt, grad_out.to(dtype)))
    if not use_bias:
        grads.append(None)
    return out.detach(), grads


def assert_flash_rule(name: str, got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor) -> None:
    """``|got - ref64| <= 2 * |ref32 - ref64| + floor`` (max norms)."""
    err = (got.double() - ref64).abs().max().item()
    ref_err = (ref32.double() - ref64).abs().max().item()
    floor = 1e-5 * max(1.0, ref64.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x reference fp32 error {ref_err:.3g} + {floor:.1g}"


def check_against_reference(
    batch: dict[str, torch.Tensor],
    seed: int,
    use_bias: bool,
    heads: int = 2,
    dim: int = 16,
    use_doc_ids: bool = True,
    backend: str = "torch",
    transposed: bool = False,
) -> None:
    """Fresh random q, k, v, table, dO; compare output and all gradients under the error rule.

    ``transposed``: q, k, v are ``(B, L, H, D)`` tensors seen as ``(B, H, L, D)`` (what the
    model passes after splitting heads), not contiguous ones."""
    B, L = batch["step"].shape
    g = torch.Generator().manual_seed(seed)
    if transposed:
        leaves = [torch.randn(B, L, heads, dim, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3)]
    else:
        leaves = [torch.randn(B, heads, L, dim, generator=g, dtype=torch.float64) for _ in range(3)]
    leaves.append(torch.randn(heads, 32, generator=g, dtype=torch.float64))
    grad_out = torch.randn(B, heads, L, dim, generator=g, dtype=torch.float64)
    args = (leaves, batch, use_bias, grad_out, use_doc_ids)
    ref64, g64 = run_backend("reference", torch.float64, *args)
    ref32, g32 = run_backend("reference", torch.float32, *args)
    got, gg = run_backend(backend, torch.float32, *args)
    assert got.dtype == torch.float32 and got.shape == ref64.shape
    assert_flash_rule("output", got, ref32, ref64)
    for name, a, r32, r64 in zip(("dq", "dk", "dv", "dtable"), gg, g32, g64):
        if r64 is not None:
            assert_flash_rule(name, a, r32, r64)


lengths = st.lists(st.integers(min_value=3, max_value=41), min_size=1, max_size=4)
ratios = st.sampled_from([0.15, 0.3, 0.5])
seeds = st.integers(min_value=0, max_value=2**31 - 1)


@SETTINGS
@given(lengths=lengths, ratio=ratios, seed=seeds, use_bias=st.booleans(), multiple=st.sampled_from([1, 8]),
       transposed=st.booleans())
def test_padded_batches_match_reference(lengths: list[int], ratio: float, seed: int, use_bias: bool,
                                        multiple: int, transposed: bool) -> None:
    """One example per row, right-padded (different main and appended lengths per row, odd
    lengths, extra padding to a multiple of 8), q, k, v contiguous or transposed views: output
    and gradients of q, k, v and the bias table match the float64 reference, and the structured
    path (not the fallback) ran."""
    batch = collate_padded([example(n, seed + i, ratio) for i, n in enumerate(lengths)], SPECIAL.pad, multiple)
    with blocks_always():
        plan = sa.plan_batch(batch["step"], batch["doc_ids"])
        assert plan.kind in ("fast", "blocks")
        check_against_reference(batch, seed, use_bias, transposed=transposed)


@SETTINGS
@given(lengths=st.lists(st.integers(min_value=3, max_value=30), min_size=2, max_size=7), ratio=ratios,
       seed=seeds, use_bias=st.booleans(), slack=st.integers(min_value=0, max_value=20), transposed=st.booleans())
def test_packed_batches_match_reference(lengths: list[int], ratio: float, seed: int, use_bias: bool,
                                        slack: int, transposed: bool) -> None:
    """Several documents per row (``collate_packed``): no query sees another document, the
    appended slice of a short document that reaches into the next one is masked and dropped,
    and padding rows are zero; checked against the float64 reference with gradients."""
    examples = [example(n, seed + i, ratio) for i, n in enumerate(lengths)]
    row_len = max(len(e) for e in examples) + slack
    batch = collate_packed(examples, SPECIAL.pad, row_len)
    with blocks_always():
        assert sa.plan_batch(batch["step"], batch["doc_ids"]).kind in ("fast", "blocks")
        check_against_reference(batch, seed, use_bias, transposed=transposed)


@SETTINGS
@given(main=st.integers(min_value=4, max_value=48), rows=st.integers(min_value=1, max_value=4), ratio=ratios,
       seed=seeds, use_bias=st.booleans(), transposed=st.booleans())
def test_fixed_main_length_takes_the_fast_path(main: int, rows: int, ratio: float, seed: int, use_bias: bool,
                                               transposed: bool) -> None:
    """Rows with the same main length but different appended lengths (pre-training with full
    blocks) use the no-gather fast path, whose padding queries inside the appended slice must
    come out zero; the result matches the float64 reference (q, k, v contiguous or transposed
    views: the bias path then tiles several rows at once)."""
    batch = collate_padded([example(main, seed + i, ratio) for i in range(rows)], SPECIAL.pad)
    with blocks_always():
        assert sa.plan_batch(batch["step"], batch["doc_ids"]).kind == "fast"
        check_against_reference(batch, seed, use_bias, transposed=transposed)


@SETTINGS
@given(main=st.integers(min_value=4, max_value=40), rows=st.integers(min_value=1, max_value=3), seed=seeds,
       use_bias=st.booleans())
def test_rows_without_doc_ids(main: int, rows: int, seed: int, use_bias: bool) -> None:
    """``doc_ids=None`` (one document per row, no padding) on rows of equal total length."""
    # Equal lengths: same main length and a ratio that fixes the appended length (all length-1 spans).
    examples = [example(main, seed + i, 0.3) for i in range(rows)]
    n = min(len(e) for e in examples)
    examples = [e for e in examples if len(e) == n]
    batch = collate_padded(examples, SPECIAL.pad)
    assert bool((batch["doc_ids"] >= 0).all())
    with blocks_always():
        assert sa.plan_batch(batch["step"], None).kind == "fast"
        check_against_reference(batch, seed, use_bias, use_doc_ids=False)


@SETTINGS
@given(source=st.integers(min_value=1, max_value=30), target=st.lists(st.integers(min_value=1, max_value=20),
       min_size=1, max_size=3), seed=seeds)
def test_seq2seq_layout(source: int, target: list[int], seed: int) -> None:
    """The fine-tuning layout (docs/finetuning.md: one-token steps, causal targets) with bias."""
    rng = np.random.RandomState(seed)
    examples = [build_seq2seq_example(rng.randint(5, 60, source).tolist(), rng.randint(5, 60, t).tolist(), SPECIAL)
                for t in target]
    batch = collate_padded(examples, SPECIAL.pad)
    with blocks_always():
        assert sa.plan_batch(batch["step"], batch["doc_ids"]).kind == "fast"
        check_against_reference(batch, seed, use_bias=True)


@SETTINGS
@given(rows=st.integers(min_value=1, max_value=3), length=st.integers(min_value=1, max_value=24),
       max_step=st.integers(min_value=0, max_value=4), docs=st.integers(min_value=1, max_value=3), seed=seeds,
       use_bias=st.booleans(), contiguous=st.booleans())
def test_arbitrary_metadata_matches_reference(rows: int, length: int, max_step: int, docs: int, seed: int,
                                              use_bias: bool, contiguous: bool) -> None:
    """Any step/doc metadata the dispatch accepts (interleaved documents, main tokens after
    appended ones, padding anywhere, arbitrary positions): whatever plan is chosen, the result
    is the reference's. Padding queries give zeros. ``contiguous`` sorts each row's doc ids
    into runs, so the planner's other checks (main tokens a prefix of the run) are what decide."""
    g = torch.Generator().manual_seed(seed)
    step = torch.randint(-max_step, max_step + 1, (rows, length), generator=g)
    doc = torch.randint(-1, docs, (rows, length), generator=g)
    if contiguous:
        doc = doc.sort(dim=1).values
    pos = torch.randint(0, 300, (rows, length), generator=g)
    batch = {"step": step, "doc_ids": doc, "position_ids": pos}
    with blocks_always():
        check_against_reference(batch, seed, use_bias)


def test_plan_detects_structure() -> None:
    """The planner accepts the layouts it can block and refuses, with a reason, those it cannot:
    main tokens after appended ones, a document split into two runs, decoding, dropout."""
    padded = collate_padded([example(20, 1), example(33, 2)], SPECIAL.pad)
    packed = collate_packed([example(20, 1), example(9, 2), example(7, 3)], SPECIAL.pad, 40)
    with blocks_always():
        assert sa.plan_batch(padded["step"], padded["doc_ids"]).kind == "blocks"  # two main lengths
        plan = sa.plan_batch(packed["step"], packed["doc_ids"])
        assert plan.kind == "blocks"
        assert sorted(a + g.num_main for g in plan.groups for a in g.num_appended) == sorted(
            int((packed["doc_ids"][r] == d).sum()) for r in range(packed["doc_ids"].shape[0])
            for d in packed["doc_ids"][r].unique().tolist() if d >= 0)

        step = torch.tensor([[0, 0, 1, 0, -1]])  # a main token after an appended one
        assert sa.plan_batch(step).kind == "dense"
        doc = torch.tensor([[0, 0, 1, 1, 0]])  # document 0 in two runs
        assert sa.plan_batch(torch.tensor([[0, 1, 0, 1, -1]]), doc).kind == "dense"
        assert sa.plan_batch(padded["step"], padded["doc_ids"], q_step=padded["step"]).kind == "dense"
        assert sa.plan_batch(padded["step"], padded["doc_ids"], dropout_p=0.1).kind == "dense"
    # With the default cost model, tiny documents are not worth a call each.
    assert sa.plan_batch(packed["step"], packed["doc_ids"], num_heads=2).kind == "dense"


def test_decoding_queries_subset() -> None:
    """Incremental decoding (``q_step``/``q_doc_ids`` for the last tokens only, with the bias's
    ``q_position_ids``) goes through the dense fallback and matches the reference."""
    batch = collate_padded([build_seq2seq_example([7, 8, 9, 10], [11, 12, 13], SPECIAL)] * 2, SPECIAL.pad)
    L = batch["step"].shape[1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 2, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, L, 8, generator=g, dtype=torch.float64) for _ in range(2))
    table = torch.randn(2, 32, generator=g, dtype=torch.float64)
    kw = dict(q_step=batch["step"][:, -2:], q_doc_ids=batch["doc_ids"][:, -2:])
    bias = RelativePositionBias(table, batch["position_ids"], batch["position_ids"][:, -2:])
    ref = pseudo_mask_attention(q, k, v, batch["step"], batch["doc_ids"], bias, "reference", **kw)
    got = pseudo_mask_attention(q.float(), k.float(), v.float(), batch["step"], batch["doc_ids"],
                                RelativePositionBias(table.float(), bias.position_ids, bias.q_position_ids),
                                "torch", **kw)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_zero_with_finite_gradients() -> None:
    """Padding query rows (inside the appended slice, in the tail, and a row that is all
    padding) return exact zeros, and no NaN reaches any gradient."""
    batch = collate_padded([example(12, 1), example(12, 2, 0.5)], SPECIAL.pad, 8)
    empty = {k: v[:1].clone() for k, v in batch.items()}
    empty["doc_ids"].fill_(-1)
    batch = {k: torch.cat([v, empty[k]]) for k, v in batch.items()}
    B, L = batch["step"].shape
    q, k, v = (torch.randn(B, 2, L, 8, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 32, requires_grad=True)
    with blocks_always():
        assert sa.plan_batch(batch["step"], batch["doc_ids"]).kind == "blocks"
        out = pseudo_mask_attention(q, k, v, batch["step"], batch["doc_ids"],
                                    RelativePositionBias(table, batch["position_ids"]), "torch")
    pad = batch["doc_ids"] < 0  # (B, L)
    assert pad[-1].all() and pad[:-1].any()
    assert (out.permute(0, 2, 1, 3)[pad] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v, table):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("grad_mode", ["no_grad", "table_frozen"])
def test_bias_without_table_gradient(grad_mode: str) -> None:
    """When the table needs no gradient the bias goes into SDPA as an additive mask (not the
    chunked eager path); the output (and q, k, v gradients) still match the reference."""
    batch = collate_padded([example(30, 4), example(30, 5)], SPECIAL.pad)
    B, L = batch["step"].shape
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, 2, L, 16, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(2, 32, generator=g, dtype=torch.float64)
    ref = pseudo_mask_attention(q, k, v, batch["step"], batch["doc_ids"],
                                RelativePositionBias(table, batch["position_ids"]), "reference")
    qf = q.float().requires_grad_(grad_mode == "table_frozen")
    bias = RelativePositionBias(table.float(), batch["position_ids"])
    with blocks_always(), (torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()):
        got = pseudo_mask_attention(qf, k.float(), v.float(), batch["step"], batch["doc_ids"], bias, "torch")
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)
    if grad_mode == "table_frozen":
        got.sum().backward()
        assert qf.grad is not None and torch.isfinite(qf.grad).all()


def test_matches_sdpa_backend_with_bias() -> None:
    """At a model-like shape (12 heads of 64) with the bias on, ``torch`` and ``sdpa`` agree
    within the error rule of each against the float64 reference, output and gradients."""
    batch = collate_padded([example(60, 10), example(60, 11), example(47, 12)], SPECIAL.pad)
    with blocks_always():
        check_against_reference(batch, 7, True, heads=12, dim=64, backend="torch", transposed=True)
    check_against_reference(batch, 7, True, heads=12, dim=64, backend="sdpa", transposed=True)


@pytest.mark.parametrize("chunk", [1, 300, 5000])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_bias_tiles_of_every_kind(monkeypatch: pytest.MonkeyPatch, chunk: int, layout: str) -> None:
    """The chunked bias path splits work into tiles of one row and a few heads (big rows) or of
    several whole rows (small rows); at test sizes only the second happens by default. A tiny
    tile budget forces one-head tiles (1), head groups within a row (300) and row blocks
    (5000); with shared buckets (main block) and per-row buckets and masks (appended block),
    all must give the reference's output and gradients."""
    monkeypatch.setattr(sa, "_CHUNK_SCORES", chunk)
    examples = [example(n, 40 + n) for n in (14, 21, 9, 17)]
    batch = (collate_padded(examples, SPECIAL.pad) if layout == "padded"
             else collate_packed(examples, SPECIAL.pad, 40))
    with blocks_always():
        check_against_reference(batch, chunk, True, heads=3, dim=8)
        check_against_reference(batch, chunk + 1, True, heads=3, dim=8, transposed=True)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_two_block_path_without_the_merge(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Where SDPA's CPU flash op with log-sum-exp is missing (other devices, other torch
    versions), the no-bias path runs two SDPA blocks instead of the merge; same results."""
    monkeypatch.setattr(sa, "_merge_supported", lambda q: False)
    examples = [example(n, 60 + n, 0.3) for n in (14, 21, 9, 17)]
    batch = (collate_padded(examples, SPECIAL.pad) if layout == "padded"
             else collate_packed(examples, SPECIAL.pad, 40))
    with blocks_always():
        check_against_reference(batch, 11, False)
        check_against_reference(batch, 12, False, transposed=True)


def test_float64_inputs_are_exact_to_rounding() -> None:
    """In float64 the structured path equals the reference to ~1e-12: any difference beyond
    rounding would be a logic error, not precision."""
    batch = collate_packed([example(n, 20 + n) for n in (15, 22, 9, 31)], SPECIAL.pad, 50)
    B, L = batch["step"].shape
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, 3, L, 8, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(3, 32, generator=g, dtype=torch.float64, requires_grad=True)
    bias = RelativePositionBias(table, batch["position_ids"])
    ref = pseudo_mask_attention(q, k, v, batch["step"], batch["doc_ids"], bias, "reference")
    with blocks_always():
        got = pseudo_mask_attention(q, k, v, batch["step"], batch["doc_ids"], bias, "torch")
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    (gr,) = torch.autograd.grad(ref.sum(), table)
    (gg,) = torch.autograd.grad(got.sum(), table)
    torch.testing.assert_close(gg, gr, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("use_bias", [False, True])
def test_bfloat16_runs_within_the_rule(use_bias: bool) -> None:
    """bf16 inputs stay within the error rule of a bf16 reference: the chunked bias path computes
    in fp32 internally, the merged flash path merges in bf16 with fp32 log-sum-exps."""
    batch = collate_padded([example(40, 30), example(40, 31)], SPECIAL.pad)
    B, L = batch["step"].shape
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, 2, L, 16, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(2, 32, generator=g, dtype=torch.float64)
    outs = {}
    for name, dt in (("ref64", torch.float64), ("ref16", torch.bfloat16), ("torch", torch.bfloat16)):
        tb = table.to(dt).requires_grad_()
        with blocks_always():
            outs[name] = pseudo_mask_attention(q.to(dt), k.to(dt), v.to(dt), batch["step"], batch["doc_ids"],
                                               RelativePositionBias(tb, batch["position_ids"]) if use_bias else None,
                                               "reference" if name.startswith("ref") else "torch")
    assert_flash_rule("bf16 output", outs["torch"], outs["ref16"], outs["ref64"])


def test_backend_is_registered_and_auto_picks_it_on_cpu() -> None:
    """The dispatcher registers ``torch``; ``auto`` resolves to it on the CPU (no dropout), to
    ``sdpa`` with attention dropout (the only backend implementing it)."""
    assert "torch" in available_backends()
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), dropout_p=0.1) == "sdpa"


def test_bias_with_wrong_head_count_is_a_value_error() -> None:
    """A bias table whose head count differs from q's is refused with a ValueError naming both."""
    batch = collate_padded([example(10, 1)], SPECIAL.pad)
    L = batch["step"].shape[1]
    q = torch.randn(1, 2, L, 8)
    with pytest.raises(ValueError, match=r"table has shape \(3, 32\); expected \(num_heads=2"):
        pseudo_mask_attention(q, q, q, batch["step"], batch["doc_ids"],
                              RelativePositionBias(torch.randn(3, 32), batch["position_ids"]), "torch")
