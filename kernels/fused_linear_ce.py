"""Fused linear cross-entropy on a GPU: the chunk cross-entropy of ``pmlm_engine.fused_ce`` in Triton.

``pmlm_engine.fused_ce`` holds the chunk loop (row chunks, the three GEMMs on the tensor cores
through torch, ``d W`` accumulated in fp32). This file replaces the per-chunk cross-entropy
with one Triton kernel, in the layout of Liger-Kernel's ops: kernels, launchers, then the
``autograd.Function``.

The kernel gives each program one row of the ``(R, V)`` chunk logits. It walks the
vocabulary in ``BLOCK_V`` blocks twice: first an online log-sum-exp (running max, rescaled
sum; plus the row's logit sum for label smoothing), then it overwrites each block with the
gradient ``softmax - (1 - eps) * onehot(y) - eps / V``. The logits are read in their dtype and
the arithmetic runs in fp32 (fp64 for fp64 logits); no ``tl.dot``, so the interpreter's bf16
dot bug does not apply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pmlm_engine.fused_ce import FusedLinearCrossEntropy, chunked_forward

# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _ce_fwd_bwd_kernel(
    Logits,  # (n_rows, V) in: logits; out: d loss / d logits (same dtype)
    stride_row,  # elements between rows of Logits
    Labels,  # (n_rows,) int64 target ids, IGNORE_INDEX on ignored rows
    Loss,  # (n_rows,) per-row loss (fp32, fp64 for fp64 logits)
    V,  # vocabulary size
    Smoothing,  # (1,) label smoothing eps in [0, 1), in Loss's dtype (a float argument would be fp32)
    IGNORE_INDEX: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row overflows int32 at 70k rows of 30k
    row_ptr = Logits + row * stride_row
    y = tl.load(Labels + row)
    cols = tl.arange(0, BLOCK_V)
    acc_ty = Loss.dtype.element_ty
    if y == IGNORE_INDEX:
        for start in range(0, V, BLOCK_V):
            tl.store(row_ptr + start + cols, tl.zeros([BLOCK_V], dtype=Logits.dtype.element_ty), mask=start + cols < V)
        tl.store(Loss + row, 0.0)
    else:
        # pass 1: online log-sum-exp over the vocabulary blocks
        m = tl.full([], float("-inf"), dtype=acc_ty)
        d = tl.zeros([], dtype=acc_ty)
        z_sum = tl.zeros([], dtype=acc_ty)
        for start in range(0, V, BLOCK_V):
            in_row = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=in_row, other=float("-inf")).to(acc_ty)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(in_row, x, 0.0), axis=0)
        lse = m + tl.log(d)
        z_y = tl.load(row_ptr + y).to(acc_ty)
        label_smoothing = tl.load(Smoothing)
        if HAS_SMOOTHING:
            loss = lse - (1.0 - label_smoothing) * z_y - label_smoothing / V * z_sum
        else:
            loss = lse - z_y
        tl.store(Loss + row, loss)
        # pass 2: the gradient, written over the logits
        for start in range(0, V, BLOCK_V):
            in_row = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=in_row, other=float("-inf")).to(acc_ty)
            grad = tl.exp(x - lse)
            if HAS_SMOOTHING:
                grad -= label_smoothing / V
            grad = tl.where(start + cols == y, grad - (1.0 - label_smoothing), grad)
            tl.store(row_ptr + start + cols, grad.to(Logits.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------------
# Launchers

BLOCK_V = 2048
"""Vocabulary block per iteration: 16 fp32 values per thread at 4 warps (no spills, see aot_report)."""
NUM_WARPS = 4


def ce_chunk_triton(logits: Tensor, labels: Tensor, label_smoothing: float, ignore_index: int) -> Tensor:
    """Per-row cross-entropy of ``logits`` ``(R, V)``; overwrites ``logits`` with its gradient.

    Same contract as ``pmlm_engine.fused_ce.ce_chunk_torch``.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be (R, V) with unit column stride; got shape {tuple(logits.shape)}, "
                         f"strides {logits.stride()}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({logits.shape[0]},)")
    n_rows, vocab = logits.shape
    loss = torch.empty(n_rows, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    if n_rows == 0:
        return loss
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    eps = torch.full((1,), label_smoothing, dtype=loss.dtype, device=logits.device)
    _ce_fwd_bwd_kernel[(n_rows,)](
        logits, logits.stride(0), labels.contiguous(), loss, vocab, eps,
        IGNORE_INDEX=ignore_index, HAS_SMOOTHING=label_smoothing > 0, BLOCK_V=block, num_warps=NUM_WARPS,
    )
    return loss


# ---------------------------------------------------------------------------------------------
# autograd.Function


class TritonFusedLinearCrossEntropy(FusedLinearCrossEntropy):
    """:class:`pmlm_engine.fused_ce.FusedLinearCrossEntropy` with the Triton chunk cross-entropy."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, groups, num_groups, label_smoothing, ignore_index,  # type: ignore[override]
                compute_dtype):
        return chunked_forward(ctx, ce_chunk_triton, h, weight, bias, labels, groups, num_groups, label_smoothing,
                        ignore_index, compute_dtype)


__all__ = ["BLOCK_V", "TritonFusedLinearCrossEntropy", "ce_chunk_triton"]
