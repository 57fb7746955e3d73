"""The fused output projection + cross-entropy equals the unfused head: loss and gradients.

Every case compares against a float64 reference (``F.cross_entropy`` of ``h @ W.T + b``,
torch's label smoothing, ``ignore_index`` rows) on fresh random inputs of odd sizes, with two
row groups receiving different loss gradients (the AE / PAR split), and several row chunks
and vocabulary blocks (chunk sizes shrunk so a small case crosses every boundary).
Tolerance (FlashAttention's rule): the fused error against float64 is at most twice the
unfused torch head's error in the same dtype, plus a floor of a few ulps of the dtype for
quantities whose unfused error happens to be ~0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pmlm_engine import fused_ce
from pmlm_engine.fused_ce import linear_cross_entropy

IGNORE = -100
GROUP_GRADS = (0.37, 1.9)  # d loss / d group sum: 1/n_ae and 1/n_par in a real step


def _case(n: int = 45, c: int = 24, v: int = 103, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=gen, dtype=torch.float64)
    w = torch.randn(v, c, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.1
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[3, 17, n - 1]] = IGNORE  # ignored rows in both groups
    groups = (torch.rand(n, generator=gen) < 0.45).long()  # interleaved AE (0) / PAR (1) rows
    return h, w, b, labels, groups


def _unfused(h, w, b, labels, groups, eps, dtype, autocast):
    """Loss per group and grads of the unfused head in ``dtype`` (bf16: under autocast, as training runs)."""
    h, w, b = (t.detach().to(torch.float32 if autocast else dtype).requires_grad_() for t in (h, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = F.linear(h, w, b)
    tok = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none",
                          label_smoothing=eps, ignore_index=IGNORE)
    sums = torch.zeros(2, dtype=tok.dtype).index_add(0, groups, tok)
    (sums * torch.tensor(GROUP_GRADS, dtype=sums.dtype)).sum().backward()
    return sums.detach().double(), tok.detach().double(), [t.grad.double() for t in (h, w, b)]


def _fused(h, w, b, labels, groups, eps, dtype, autocast, impl):
    h, w, b = (t.detach().to(torch.float32 if autocast else dtype).requires_grad_() for t in (h, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        sums, tok = linear_cross_entropy(h, w, b, labels, groups, 2, label_smoothing=eps, ignore_index=IGNORE,
                                         impl=impl)
    assert not tok.requires_grad
    (sums * torch.tensor(GROUP_GRADS, dtype=sums.dtype)).sum().backward()
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
    return sums.detach().double(), tok.detach().double(), [t.grad.double() for t in (h, w, b)]


def _check(impl, dtype, autocast, eps, floor):
    h, w, b, labels, groups = _case()
    ref = _unfused(h, w, b, labels, groups, eps, torch.float64, False)
    low = _unfused(h, w, b, labels, groups, eps, dtype, autocast)
    got = _fused(h, w, b, labels, groups, eps, dtype, autocast, impl)
    names = ["group sums", "token losses", "d h", "d W", "d b"]
    for name, r, lo, g in zip(names, [ref[0], ref[1], *ref[2]], [low[0], low[1], *low[2]], [got[0], got[1], *got[2]]):
        err, base = (g - r).abs().max().item(), (lo - r).abs().max().item()
        assert err <= 2 * base + floor * max(1.0, r.abs().max().item()), (name, err, base)
    assert torch.equal(got[1][labels == IGNORE], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(got[2][0][labels == IGNORE], torch.zeros(3, 24, dtype=torch.float64))


@pytest.fixture
def small_chunks(monkeypatch):
    """16-row chunks (45 rows in 2 groups: 4+ chunks, partial ones), 40-row blocks of the bf16 d W product."""
    monkeypatch.setattr(fused_ce, "CHUNK_BYTES", 16 * 4 * 103)
    monkeypatch.setattr(fused_ce, "VOCAB_BLOCK", 40)  # the bf16 d W product in 3 vocabulary blocks
    assert fused_ce.chunk_rows(45, 103) == 16


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype,autocast,floor", [(torch.float64, False, 1e-13), (torch.float32, False, 1e-6),
                                                  (torch.bfloat16, True, 1e-2)])
def test_torch_impl_matches_float64_reference(small_chunks, dtype, autocast, floor, eps):
    """The CPU path: loss, per-row losses and the gradients of h, W and b, in fp64, fp32 and bf16 autocast."""
    _check("torch", dtype, autocast, eps, floor)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype,floor", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_triton_kernel_matches_float64_reference(small_chunks, monkeypatch, dtype, floor, eps):
    """The Triton chunk kernel (interpreted): 4 vocabulary blocks of 32 with a partial last one
    (online log-sum-exp across blocks), ignored rows, label smoothing."""
    from pmlm_engine.kernels import fused_linear_ce

    monkeypatch.setattr(fused_linear_ce, "BLOCK_V", 32)
    _check("triton", dtype, False, eps, floor)


def test_triton_bf16_autocast_runs_the_kernel_on_fp32_chunks(small_chunks):
    """Under bf16 autocast the GEMMs run in bf16 and the kernel sees fp32 logits: same tolerance as torch."""
    _check("triton", torch.bfloat16, True, 0.1, 1e-2)


def test_large_logits_do_not_overflow():
    """Logits around 1e4 (an online max that moves across blocks) give finite, exact losses."""
    h, w, b, labels, groups = _case(n=21, c=8, v=50, seed=1)
    w = w * 2000.0
    ref = F.cross_entropy(F.linear(h, w, b), labels, reduction="none", ignore_index=IGNORE)
    for impl in ("torch", "triton"):
        _, tok = linear_cross_entropy(h, w, b, labels, groups, 2, ignore_index=IGNORE, impl=impl)
        assert torch.isfinite(tok).all()
        torch.testing.assert_close(tok, ref, rtol=1e-12, atol=1e-9)


def test_bad_labels_are_refused():
    h, w, b, labels, groups = _case(n=20, c=4, v=10)
    labels[0] = 10
    with pytest.raises(ValueError, match="labels outside"):
        linear_cross_entropy(h, w, b, labels, groups, 2)
    with pytest.raises(ValueError, match="groups"):
        linear_cross_entropy(h, w, b, labels.clamp(max=9), groups, 1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_pmlm_loss_fused_equals_unfused_on_a_model(smoothing):
    """``pmlm_loss`` through the model's head, fused and unfused, in float64: AE/PAR losses, per-token
    losses and every parameter's gradient (the tied embedding gets both its input and output parts)."""
    import numpy as np

    from pmlm_engine.layout import collate_padded
    from pmlm_engine.losses import pmlm_loss
    from tests.helpers import SPECIAL, random_example, tiny_model

    rng = np.random.default_rng(3)
    batch = collate_padded([random_example(rng, n, seed=i) for i, n in enumerate((29, 17, 40))], SPECIAL.pad)
    results = []
    for fused in (False, True):
        model = tiny_model(torch.float64)
        h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
        out = pmlm_loss(h, batch["labels"], batch["step"], model.lm_head, ae_weight=0.7, par_weight=1.3,
                        label_smoothing=smoothing, fused=fused)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert a.ae_tokens == b.ae_tokens > 0 and a.par_tokens == b.par_tokens > 0
    for name in ("loss", "ae_loss", "par_loss", "ae_sum", "par_sum", "token_loss"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-12, atol=1e-12, msg=name)
    for name, g in ga.items():
        torch.testing.assert_close(gb[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_pmlm_loss_fused_needs_the_model_head():
    from pmlm_engine.losses import pmlm_loss

    labels = torch.tensor([[5, -100]])
    with pytest.raises(ValueError, match="LMHead"):
        pmlm_loss(torch.randn(1, 2, 4), labels, torch.zeros(1, 2, dtype=torch.long), torch.nn.Linear(4, 9), fused=True)


def test_second_backward_is_refused():
    """The backward combines the stored group gradients in place: a second one must fail loudly, not
    silently return rescaled gradients."""
    h, w, b, labels, groups = _case(n=20, c=4, v=10)
    h.requires_grad_()
    sums, _ = linear_cross_entropy(h, w, b, labels.clamp(max=9), groups, 2)
    sums.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        sums.sum().backward()


def test_a_group_without_rows_gets_no_accumulator_and_zero_loss(small_chunks):
    """Fine-tuning has PAR rows only: group 0 is empty. Its sum is 0 and the gradients equal float64's."""
    h, w, b, labels, _ = _case()
    groups = torch.ones_like(labels)
    ref = _unfused(h, w, b, labels, groups, 0.1, torch.float64, False)
    got = _fused(h, w, b, labels, groups, 0.1, torch.float64, False, "torch")
    assert got[0][0] == 0
    for r, g in zip([ref[0], ref[1], *ref[2]], [got[0], got[1], *got[2]]):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
