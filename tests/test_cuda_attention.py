"""Correctness of the CUDA pseudo-mask attention (``csrc/cuda``), run on the CPU by the CUDA emulator.

``tests/conftest.py`` sets ``PMLM_CUDA_EMULATE=1``, so ``backend="cuda"`` runs the unmodified
kernel source compiled by the host compiler (``pmlm_engine._cuda_emu``): every thread of a block
is a fiber, segments between barriers run in a seeded shuffled order, shared memory starts as
NaN, and every tensor the kernels touch is fenced by poison (see ``pmlm_engine.cuda_attention``).

The reference, the layouts and FlashAttention's error rule are those of the Triton suite
(``tests/test_pseudo_mask_attention.py``): output, lse and the gradients of q, k, v and the
bias table against float64, within twice the error of the same reference in the kernel's dtype
plus :data:`FLOOR`. fp32 runs the kernels' FMA path (32 x 32 tiles); fp16 / bf16 run the WMMA
path (64-query tiles), where the emulator rounds the operands and accumulates in fp32 like the
tensor cores. Shapes stay small: emulation is slow.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pmlm_engine import cuda_attention as ca
from pmlm_engine.attention import RelativePositionBias, available_backends, pseudo_mask_attention
from tests.test_pseudo_mask_attention import (MAX_DISTANCE, REPO, SLOW, Layout, check_rule, engine_layout, inputs,
                                              pma, random_layouts, reference, run_all)

pytestmark = pytest.mark.skipif(not ca.emulated() and ca.unavailable() is not None,
                                reason="the cuda backend is neither emulated nor on a GPU here")


def compare(lay: Layout, dtype: torch.dtype, H: int = 2, D: int = 64, seed: int = 0, bias: bool = True,
            q_rows: Optional[slice] = None) -> dict:
    """CUDA kernels vs float64 reference vs same-dtype reference on one layout; returns the kernels' results."""
    B, L = lay.step.shape
    q_lay = None if q_rows is None else Layout(lay.step[:, q_rows], lay.doc[:, q_rows], lay.pos[:, q_rows])
    Lq = L if q_lay is None else q_lay.step.shape[1]
    q, k, v, table, grad_out = inputs(B, H, Lq, D, seed, Lk=L)
    table = table if bias else None

    def kernel(q, k, v, tab):
        pb = None if tab is None else RelativePositionBias(tab, lay.pos, None if q_lay is None else q_lay.pos,
                                                           MAX_DISTANCE)
        return ca.cuda_pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb,
                                             q_step=None if q_lay is None else q_lay.step,
                                             q_doc_ids=None if q_lay is None else q_lay.doc, return_lse=True)

    def ref(q, k, v, tab):
        return reference(q, k, v, tab, lay, 1 / math.sqrt(D), q_lay)

    got = run_all(kernel, q, k, v, table, grad_out, dtype)
    exact = run_all(ref, q, k, v, table, grad_out, torch.float64)
    low = run_all(ref, q, k, v, table, grad_out, dtype)
    check_rule(got, exact, low, f" (cuda, {dtype}, D={D}, L={L})")
    return got


@SLOW
@given(lay=random_layouts(max_len=72), seed=st.integers(0, 2**16), decode_from=st.one_of(st.none(), st.floats(0.0, 0.9)))
def test_random_layouts_match_reference(lay: Layout, seed: int, decode_from: Optional[float]):
    """fp32: output, lse and the gradients of q, k, v and the table match the float64 reference on
    random layouts (packing, padding, fully padded rows, shuffled rows, odd lengths; up to three
    32-token tiles per row) and sometimes on a suffix of the tokens as queries (Lq < Lk)."""
    length = lay.step.shape[1]
    q_rows = None if decode_from is None else slice(min(length - 1, int(decode_from * length)), None)
    compare(lay, torch.float32, seed=seed, q_rows=q_rows)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_engine_layouts_fp32(packed: bool):
    """fp32 on layouts from ``pmlm_engine.layout`` at odd lengths, all tile classes present."""
    lay = (engine_layout([40, 15, 20], seed=11, packed_len=97, pad_to=97) if packed
           else engine_layout([18, 9], seed=7, pad_to=37))
    compare(lay, torch.float32, seed=1)


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 64)])
def test_tensor_core_path(dtype: torch.dtype, head_dim: int):
    """fp16 / bf16 through WMMA (64-query tiles) on a packed 131-token layout with a decoding-like
    second row: within twice the error of the same reference computed in that dtype. Unlike the
    Triton interpreter, the emulator runs the bf16 MMA itself (rounded operands, fp32 sums)."""
    lay = engine_layout([60, 45, 20], seed=5, packed_len=131, pad_to=131)
    compare(lay, dtype, H=1, D=head_dim, seed=head_dim)


def test_no_bias_and_decoding_suffix():
    """The path without a relative position bias, and queries that are the last tokens of a
    seq2seq-like layout with their own step, doc and position ids (Lq != Lk)."""
    lay = engine_layout([40, 21], seed=4)
    compare(lay, torch.float32, seed=5, bias=False)
    compare(lay, torch.float32, seed=6, q_rows=slice(lay.step.shape[1] - 19, None))


def test_fully_masked_rows_are_zero():
    """Padding queries and a fully padded row: output exactly 0, lse exactly -inf, zero gradients
    for them and for padding keys, no NaN anywhere."""
    lay = engine_layout([30, 12, 20], seed=9)
    lay.doc[1, :] = -1
    got = compare(lay, torch.float32, seed=2)
    pad = lay.doc < 0
    for name in ("out", "dq", "dk", "dv"):
        assert (got[name].permute(0, 2, 1, 3)[pad] == 0).all(), name
    assert torch.isneginf(got["lse"].permute(0, 2, 1)[pad]).all()
    assert torch.isfinite(got["lse"].permute(0, 2, 1)[~pad]).all()


def test_lse_is_differentiable():
    """A loss that also uses lse gets the right gradients (dlse enters as ``delta - dlse``)."""
    lay = engine_layout([33], seed=8)
    q, k, v, table, _ = inputs(1, 2, lay.step.shape[1], 64, seed=8)

    def loss(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, table)]
        out, lse = fn(*leaves)
        value = out.sum() + torch.where(torch.isinf(lse), 0, lse).square().sum()
        return torch.autograd.grad(value, leaves)

    def kernel(q, k, v, tab):
        return ca.cuda_pseudo_mask_attention(q, k, v, lay.step, lay.doc,
                                             RelativePositionBias(tab, lay.pos, None, MAX_DISTANCE), return_lse=True)

    got = loss(kernel, torch.float32)
    want = loss(lambda q, k, v, t: reference(q, k, v, t, lay, 1 / math.sqrt(64)), torch.float64)
    for g, w, name in zip(got, want, ("dq", "dk", "dv", "dtable")):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


def test_triton_and_cuda_agree():
    """The two independent kernels (Triton interpreted, CUDA emulated) give the same output, lse
    and gradients on the same fp32 inputs, to within fp32 rounding of each other."""
    lay = engine_layout([50, 20], seed=13, pad_to=85)
    B, L = lay.step.shape
    q, k, v, table, grad_out = inputs(B, 2, L, 64, seed=13)
    pb = lambda tab: RelativePositionBias(tab, lay.pos, None, MAX_DISTANCE)  # noqa: E731
    got_cuda = run_all(lambda q, k, v, t: ca.cuda_pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb(t),
                                                                        return_lse=True),
                       q, k, v, table, grad_out, torch.float32)
    got_triton = run_all(lambda q, k, v, t: pma.fused_pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb(t),
                                                                            return_lse=True,
                                                                            config=pma.BlockConfig.uniform(16)),
                         q, k, v, table, grad_out, torch.float32)
    for name, want in got_triton.items():
        torch.testing.assert_close(got_cuda[name], want, rtol=2e-5, atol=2e-5, msg=name)


def test_schedule_does_not_change_results(monkeypatch: pytest.MonkeyPatch):
    """Another seed of the emulator's adversarial thread order gives bit-identical outputs and
    q/k/v gradients (a shared-memory race would make them depend on the order); only the table
    gradient, summed with atomics in schedule order, may differ by rounding."""
    lay = engine_layout([30, 25], seed=3, pad_to=61)
    q, k, v, table, grad_out = inputs(2, 2, lay.step.shape[1], 64, seed=3)

    def run():
        fn = lambda q, k, v, t: ca.cuda_pseudo_mask_attention(  # noqa: E731
            q, k, v, lay.step, lay.doc, RelativePositionBias(t, lay.pos, None, MAX_DISTANCE), return_lse=True)
        return run_all(fn, q, k, v, table, grad_out, torch.bfloat16)

    first = run()
    monkeypatch.setenv("PMLM_CUDA_EMULATE_SEED", "12345")
    second = run()
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(first[name], second[name]), name
    torch.testing.assert_close(first["dtable"], second["dtable"], rtol=1e-5, atol=1e-5)


def test_backend_dispatch_and_custom_op():
    """``backend="cuda"`` is registered and available under emulation; dispatch equals the direct
    call; dropout is refused; the custom op passes torch.library.opcheck."""
    assert ca.unavailable() is None and "cuda" in available_backends()
    lay = engine_layout([20], seed=1)
    q, k, v, table, _ = inputs(1, 2, lay.step.shape[1], 64, seed=12)
    pb = RelativePositionBias(table, lay.pos, None, MAX_DISTANCE)
    via_dispatch = pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb, backend="cuda")
    direct = ca.cuda_pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb)
    torch.testing.assert_close(via_dispatch, direct, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout"):
        pseudo_mask_attention(q, k, v, lay.step, lay.doc, pb, backend="cuda", dropout_p=0.1)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    args = (q.requires_grad_(), k, v, i32(lay.step), i32(lay.doc), i32(lay.step), i32(lay.doc), i32(lay.pos),
            i32(lay.pos), table, 0.125, MAX_DISTANCE)
    torch.library.opcheck(ca._fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                        "test_autograd_registration"))


def test_invalid_inputs_raise_clear_errors():
    """Unsupported head dims, dtypes and layouts raise ValueError / TypeError naming the problem."""
    lay = engine_layout([10], seed=1)
    q, k, v, table, _ = inputs(1, 2, lay.step.shape[1], 64, seed=0)
    f = ca.cuda_pseudo_mask_attention
    with pytest.raises(ValueError, match="head_dim=32"):
        f(q[..., :32], k[..., :32], v[..., :32], lay.step)
    with pytest.raises(TypeError, match="float64"):
        f(q.double(), k.double(), v.double(), lay.step)
    with pytest.raises(ValueError, match="q_step"):
        f(q[:, :, :3], k, v, lay.step)
    with pytest.raises(ValueError, match="bias table"):
        f(q, k, v, lay.step, lay.doc, RelativePositionBias(table[:1], lay.pos, None, MAX_DISTANCE))


def test_unavailable_without_emulation():
    """Without PMLM_CUDA_EMULATE on this GPU-less machine the backend is unavailable, the reason
    names the fix, and asking for it explicitly raises that reason."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != ca.EMULATE_ENV}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import torch\nfrom pmlm_engine import cuda_attention as ca\nfrom pmlm_engine.attention import "
            "resolve_backend\nprint(ca.unavailable())\ntry:\n resolve_backend('cuda', torch.device('cpu'))\n"
            "except RuntimeError as e:\n print('RAISED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PMLM_CUDA_EMULATE=1" in proc.stdout and "RAISED attention backend 'cuda' is unavailable" in proc.stdout


def test_model_through_the_cuda_backend():
    """A 2-layer model (head dim 64) on a packed PMLM batch: loss and the gradients of every
    parameter, the bias table included, match the dense reference backend in fp32 (the layout
    is prepared once per forward and shared by both layers)."""
    import numpy as np

    from pmlm_engine.config import MaskingConfig
    from pmlm_engine.layout import collate_packed
    from pmlm_engine.losses import pmlm_loss
    from tests.helpers import SPECIAL, random_example, tiny_model

    rng = np.random.default_rng(1)
    examples = [random_example(rng, n, 70 + i, MaskingConfig(mask_ratio=0.3)) for i, n in enumerate([31, 17, 26])]
    batch = collate_packed(examples, SPECIAL.pad, row_len=70)

    def run(backend: str):
        model = tiny_model(torch.float32, seed=0, backend=backend, hidden_size=128, num_heads=2, intermediate_size=128)
        h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
        loss = pmlm_loss(h, batch["labels"], batch["step"], model.lm_head).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run("reference")
    loss, grads = run("cuda")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys() and "rel_pos_bias.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
