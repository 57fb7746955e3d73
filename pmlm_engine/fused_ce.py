"""Fused output projection + cross-entropy for the target rows (the LM head's last matmul and its loss).

The unfused head computes ``logits = h @ W.T + b`` for all ``N`` target rows (``(N, V)``,
upcast to fp32, ``V`` = 30522 for BERT's vocabulary), then a cross-entropy that keeps its
own ``(N, V)`` log-probabilities for the backward: at 16 x 512 tokens that is ~2,500 rows
and several ``(N, V)`` fp32 buffers alive at once, by far the step's largest tensors.

Here the rows are processed in chunks of ``R`` rows (``R x V`` logits at a time, a few MB).
Each chunk's logits are turned, in place, into ``d loss / d logits`` in the same pass that
computes the loss (the log-sum-exp runs over the vocabulary; in the Triton kernel in vocabulary
blocks with an online max), then immediately folded into ``d loss / d h`` (``R x C``) and
accumulated into ``d loss / d W`` (``V x C``, fp32). The backward only scales what the forward
stored, as Liger-Kernel's fused linear cross-entropy does, so the head costs the same three
GEMMs as the unfused one and never holds more than one chunk of logits.

Because the backward only rescales, the gradient arriving for each output must be one scalar
per accumulator. The function therefore returns the summed loss per *group* of rows (AE and
PAR: ``(G,)``), each with its own ``d W`` accumulator, and the per-row losses as a tensor
without gradient (for logging and per-example losses).

Label smoothing is torch's: ``loss = (1 - eps) * CE(y) + eps * mean_j(-log p_j)``, i.e.
``lse - (1 - eps) * z_y - eps / V * sum_j z_j``; its logit gradient is
``softmax - (1 - eps) * onehot(y) - eps / V``. Rows labelled ``ignore_index`` add 0 to the
loss and nothing to any gradient.

Numerics: the same products as the unfused head in the same compute dtype (the autocast
dtype under autocast), the softmax in fp32 (fp64 for fp64 inputs); only the order of the
``d W`` summation differs (per chunk, accumulated in fp32), so results agree to rounding.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

IGNORE_INDEX = -100
VOCAB_BLOCK = 4096
"""Vocabulary rows per low-precision ``d W`` product (its temporary is ``VOCAB_BLOCK x C``, not ``V x C``)."""
CHUNK_BYTES = 16 * 2**20
"""Budget of one chunk's fp32 logits: 128 rows at BERT's vocabulary. Measured (``base``, bf16, 16 x 512):
half of 32 MB lowers the head's peak from 332 to 302 MB for 1-9% more CPU time (twice the ``d W`` passes)."""

ChunkCE = Callable[[Tensor, Tensor, float, int], Tensor]
"""``(logits (R, V) fp32/fp64, in place -> d loss / d logits, labels (R,), label_smoothing, ignore_index)
-> per-row loss (R,)``."""


def ce_chunk_torch(logits: Tensor, labels: Tensor, label_smoothing: float, ignore_index: int) -> Tensor:
    """Per-row cross-entropy of ``logits`` ``(R, V)``; overwrites ``logits`` with its gradient.

    The torch implementation of one chunk (the CPU path; the Triton kernel in
    ``kernels/fused_linear_ce.py`` does the same on a GPU).
    """
    vocab = logits.shape[1]
    valid = labels != ignore_index  # (R,)
    y = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)  # (R, 1)
    z_y = logits.gather(1, y).squeeze(1)
    z_sum = logits.sum(dim=1) if label_smoothing > 0 else None
    m = logits.amax(dim=1, keepdim=True)  # (R, 1)
    # exp(z - m) in place. The argument is clamped one above log(smallest normal): on the CPU,
    # exp is ~20x slower where its result is subnormal or 0, and real logits span more than 87
    # (fp32's range). A clamped term adds at most V * 3.2e-38 to a sum >= 1: nothing at fp32 resolution.
    grad = logits.sub_(m).clamp_(min=math.log(torch.finfo(logits.dtype).tiny) + 1.0).exp_()
    total = grad.sum(dim=1, keepdim=True)  # (R, 1) >= 1
    lse = (m + total.log()).squeeze(1)
    loss = lse - z_y if z_sum is None else lse - (1.0 - label_smoothing) * z_y - (label_smoothing / vocab) * z_sum
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    grad.div_(total)  # softmax
    if label_smoothing > 0:
        grad.sub_(label_smoothing / vocab)
    grad.scatter_add_(1, y, torch.full_like(z_y, label_smoothing - 1.0).unsqueeze(1))
    grad.mul_(valid.unsqueeze(1).to(grad.dtype))
    return loss


def chunk_rows(num_rows: int, vocab: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` of fp32 logits (a power of two, >= 16)."""
    r = max(16, CHUNK_BYTES // (4 * max(vocab, 1)))
    return max(1, min(num_rows, 1 << (r.bit_length() - 1)))


def chunked_forward(
    ctx,
    chunk_ce: ChunkCE,
    h: Tensor,  # (N, C) compute dtype
    weight: Tensor,  # (V, C) the parameter (any float dtype)
    bias: Tensor | None,  # (V,) or None
    labels: Tensor,  # (N,) int64
    groups: Tensor,  # (N,) int64 in [0, G)
    num_groups: int,
    label_smoothing: float,
    ignore_index: int,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The forward of :class:`FusedLinearCrossEntropy` with ``chunk_ce`` as the chunk's cross-entropy."""
    n, c = h.shape
    vocab = weight.shape[0]
    acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and accumulators
    w = weight.to(compute_dtype)  # (V, C)
    b = None if bias is None else bias.to(compute_dtype)
    order = torch.argsort(groups, stable=True)  # rows grouped: every chunk lies in one group
    counts = torch.bincount(groups, minlength=num_groups).tolist()
    hs, ys = h.index_select(0, order), labels.index_select(0, order)
    d_h = torch.empty_like(hs)  # (N, C) gradient rows for a unit loss gradient
    present = [g for g, count in enumerate(counts) if count]  # groups with rows: only they get accumulators
    slot = {g: i for i, g in enumerate(present)}
    # (G', V, C), G' = groups with rows (one in fine-tuning, where AE has none): set by a group's first chunk
    d_w = torch.zeros(1, vocab, c, dtype=acc, device=h.device) if not present else \
        torch.empty(len(present), vocab, c, dtype=acc, device=h.device)
    d_b = torch.zeros(max(len(present), 1), vocab, dtype=acc, device=h.device) if bias is not None else None
    loss = torch.empty(n, dtype=acc, device=h.device)
    step = chunk_rows(max(n, 1), vocab)
    start = 0
    for g, count in enumerate(counts):
        k = slot.get(g, 0)
        for s in range(start, start + count, step):
            e = min(s + step, start + count)
            hc = hs[s:e]  # (R, C)
            logits = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())  # (R, V) compute dtype
            lf = logits.to(acc)  # no copy when the compute dtype is already fp32/fp64
            loss[s:e] = chunk_ce(lf, ys[s:e], label_smoothing, ignore_index)  # lf: now d loss / d logits
            if d_b is not None:
                d_b[k] += lf.sum(0)
            dl = lf.to(compute_dtype)  # (R, V) as autograd would pass it back to a compute-dtype matmul
            torch.mm(dl, w, out=d_h[s:e])
            if acc == compute_dtype:
                if s == start:  # the group's first chunk writes its accumulator
                    torch.mm(dl.t(), hc, out=d_w[k])
                else:
                    d_w[k].addmm_(dl.t(), hc)
            else:  # low-precision GEMM into the fp32 accumulator, in vocabulary blocks: a small temporary
                for v0 in range(0, vocab, VOCAB_BLOCK):
                    part = dl[:, v0:v0 + VOCAB_BLOCK].t() @ hc  # (block, C) compute dtype
                    if s == start:
                        d_w[k, v0:v0 + VOCAB_BLOCK].copy_(part)
                    else:
                        d_w[k, v0:v0 + VOCAB_BLOCK] += part
            del logits, lf, dl  # not alive next to the next chunk's (the peak would hold two chunks)
        start += count
    ctx.save_for_backward(d_h, d_w, d_b, order, groups,
                          torch.tensor(present or [0], dtype=torch.long, device=h.device))
    ctx.consumed = False
    ctx.has_bias = bias is not None
    ctx.weight_dtype = weight.dtype
    sums = torch.zeros(num_groups, dtype=acc, device=h.device).index_add_(0, groups.index_select(0, order), loss)
    token_loss = torch.empty_like(loss).index_copy_(0, order, loss)
    ctx.mark_non_differentiable(token_loss)
    return sums, token_loss


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Grouped sums of ``cross_entropy(h @ W.T + b, labels)``, gradients computed in the forward.

    Inputs are already in the compute dtype except ``weight``/``bias`` (cast per call, as
    autocast's ``linear`` does) and autocast is off (:func:`linear_cross_entropy` arranges both).
    The Triton subclass (``kernels/fused_linear_ce.py``) replaces only the chunk cross-entropy.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, groups, num_groups, label_smoothing, ignore_index,  # type: ignore[override]
                compute_dtype):
        return chunked_forward(ctx, ce_chunk_torch, h, weight, bias, labels, groups, num_groups, label_smoothing,
                        ignore_index, compute_dtype)

    @staticmethod
    def backward(ctx, d_sums: Tensor, _d_token: Tensor | None):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("the fused linear cross-entropy's backward combines its stored gradients in "
                               "place, so it runs once per forward: recompute the loss instead of retain_graph=True")
        ctx.consumed = True
        d_h, d_w, d_b, order, groups, present = ctx.saved_tensors
        scale = d_sums.to(d_w.dtype)  # (G,)
        row_scale = scale.index_select(0, groups.index_select(0, order)).to(d_h.dtype)  # (N,)
        grad_h = torch.empty_like(d_h).index_copy_(0, order, d_h * row_scale.unsqueeze(1))
        slot_scale = scale.index_select(0, present)  # (G',) the accumulators' groups
        return (grad_h, _combine(d_w, slot_scale).to(ctx.weight_dtype),
                _combine(d_b, slot_scale).to(ctx.weight_dtype) if ctx.has_bias else None,
                None, None, None, None, None, None)


def _combine(per_group: Tensor, scale: Tensor) -> Tensor:
    """``sum_g scale[g] * per_group[g]``, written over ``per_group[0]`` (no second ``(V, C)`` buffer)."""
    out = per_group[0].mul_(scale[0])
    for g in range(1, per_group.shape[0]):
        out.add_(per_group[g], alpha=float(scale[g]))
    return out


TRITON_MODULE = "pmlm_engine.kernels.fused_linear_ce"
"""Where the Triton subclass lives. It subclasses :class:`FusedLinearCrossEntropy`, so it is named
here and imported on first use, like the optional attention backends
(:data:`pmlm_engine.attention.OPTIONAL_BACKENDS`): the kernel depends on this module, not the
other way round, and ``triton`` stays optional on the CPU."""


def _triton_function() -> type[FusedLinearCrossEntropy]:
    """The Triton subclass, imported on first use."""
    try:
        module = importlib.import_module(TRITON_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != "triton":
            raise  # a broken import is a bug, not a missing optional package
        raise ImportError("the Triton fused cross-entropy needs triton: install it with "
                          "`pip install triton==3.7.1`, or pass impl='torch'") from exc
    return module.TritonFusedLinearCrossEntropy


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    groups: Tensor | None = None,
    num_groups: int = 1,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fused ``cross_entropy(h @ weight.T + bias, labels)`` summed per group of rows.

    Args:
        h: ``(N, C)`` hidden states of the target rows (after the head's transform).
        weight: ``(V, C)`` output projection (the tied embedding); bias: ``(V,)`` or None.
        labels: ``(N,)`` target ids in ``[0, V)`` or ``ignore_index``.
        groups: ``(N,)`` group of each row in ``[0, num_groups)`` (default: one group).
        label_smoothing: torch's, in ``[0, 1)``.
        impl: ``torch`` (chunk cross-entropy in torch ops), ``triton`` (Triton kernel; on a
            GPU, or under ``TRITON_INTERPRET=1``), ``auto`` (``triton`` on CUDA, else ``torch``).
    Returns:
        ``(num_groups,)`` summed loss per group (differentiable; fp32, fp64 for fp64 inputs) and
        ``(N,)`` per-row losses (no gradient).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected h (N, C) and weight (V, C); got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != (h.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({h.shape[0]},)")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r}: expected a value in [0, 1)")
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= weight.shape[0])) [valid].any()):
        raise ValueError(f"labels outside [0, {weight.shape[0]}) that are not ignore_index={ignore_index}")
    if groups is None:
        groups = torch.zeros_like(labels)
    elif groups.shape != labels.shape or (
            groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups)):
        raise ValueError(f"groups must be ({h.shape[0]},) ids in [0, {num_groups})")
    if impl == "auto":
        impl = "triton" if h.is_cuda else "torch"
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl={impl!r}: choose 'auto', 'torch' or 'triton'")
    fn = _triton_function() if impl == "triton" else FusedLinearCrossEntropy
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return fn.apply(h.to(dtype), weight, bias, labels.long(), groups.long(), num_groups, label_smoothing,
                        ignore_index, dtype)


__all__ = ["IGNORE_INDEX", "FusedLinearCrossEntropy", "ce_chunk_torch", "chunk_rows", "chunked_forward",
           "linear_cross_entropy"]
