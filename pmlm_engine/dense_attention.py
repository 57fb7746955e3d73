"""The dense attention backends ``reference`` and ``sdpa``: the whole ``(Lq, Lk)`` rule mask.

Both build the mask (``mask_rule.dense_pseudo_mask``) and the bias's bucket indices once per
forward (:meth:`DenseBackend.prepare`); each layer gathers its bias from the shared table and
attends every query to every key. ``reference`` is plain math in the inputs' dtype (the
ground truth of the tests); ``sdpa`` is torch's ``scaled_dot_product_attention`` and the only
backend with attention dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_api import AttentionLayout
from .mask_rule import dense_pseudo_mask

__all__ = ["DenseBackend", "REFERENCE", "SDPA", "reference_attention", "sdpa_attention"]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Optional[Tensor], scale: float,
                        dropout_p: float) -> Tensor:
    """Plain math in the inputs' dtype: scores, masked softmax, weighted sum.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``; mask: ``(B, Lq, Lk)`` bool, True = visible.
        bias: ``(B or 1, H, Lq, Lk)`` added to the scores, or None.
    Returns:
        ``(B, H, Lq, D)``; rows with no visible key are zeros.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    mask = mask.unsqueeze(1)  # (B, 1, Lq, Lk)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)
    p = torch.exp(scores - row_max) * mask
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Optional[Tensor], scale: float,
                   dropout_p: float) -> Tensor:
    """torch's ``scaled_dot_product_attention`` with a dense mask (the bias as an additive mask).
    Arguments as :func:`reference_attention`."""
    has_key = mask.any(dim=-1, keepdim=True)  # (B, Lq, 1)
    # SDPA returns NaN on rows with no visible key: open them, then zero their output.
    mask = mask | ~has_key
    mask = mask.unsqueeze(1)
    if bias is not None:
        attn_mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    else:
        attn_mask = mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out * has_key.unsqueeze(1).to(out.dtype)


@dataclass(frozen=True)
class DensePrepared:
    """The per-forward state of a dense backend."""

    mask: Tensor  # (B, Lq, Lk) bool
    buckets: Optional[Tensor]  # (B, Lq, Lk) bias bucket indices, or None without bias


Impl = Callable[[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], float, float], Tensor]


class DenseBackend:
    """A backend that attends through the dense mask with ``impl`` (:func:`reference_attention`'s
    signature). Tests build their own with another mask by subclassing :meth:`prepare`."""

    def __init__(self, name: str, impl: Impl, supports_dropout: bool) -> None:
        self.name = name
        self.impl = impl
        self.supports_dropout = supports_dropout

    def unavailable(self) -> Optional[str]:
        return None

    def prepare(self, layout: AttentionLayout) -> DensePrepared:
        qs, qd, ks, kd = layout.resolved
        mask = dense_pseudo_mask(ks, kd, q_step=qs, q_doc_ids=qd)
        return DensePrepared(mask, None if layout.bias is None else layout.bias.buckets())

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, scale: float) -> Tensor:
        prepared: DensePrepared = layout.prepared  # type: ignore[assignment]
        if layout.dropout_p > 0 and not self.supports_dropout:
            raise ValueError(f"dropout_p={layout.dropout_p}: the {self.name} backend has no attention dropout; "
                             "use backend='sdpa' (or 'auto') or set attention_dropout=0")
        bias = None if layout.bias is None else layout.bias.dense(prepared.buckets)
        return self.impl(q, k, v, prepared.mask, bias, scale, layout.dropout_p)


REFERENCE = DenseBackend("reference", reference_attention, supports_dropout=True)
SDPA = DenseBackend("sdpa", sdpa_attention, supports_dropout=True)
