"""Pseudo-mask attention: the rule of PMLM.md section 3 and the one function all attention goes through.

The rule, in the per-token weight ``w = step`` (0 main, ``+s`` ORIGINAL, ``-s`` PSEUDO):

* ``w_q >= 0``: the key is visible iff ``0 <= w_k <= w_q``;
* ``w_q <  0``: the key is visible iff ``0 <= w_k < -w_q`` or ``w_k == w_q``;
* and both tokens carry the same ``doc_id``; keys with ``doc_id == -1`` (padding) are never visible.

:func:`dense_pseudo_mask` is the one place that states it in torch. The fused kernel
(``kernels/``) restates it in Triton and is tested against this function.

Fully masked query rows (padding queries) return zeros in every backend.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The mask rule


def dense_pseudo_mask(
    step: Tensor,
    doc_ids: Optional[Tensor] = None,
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
) -> Tensor:
    """Boolean ``(..., Lq, Lk)`` mask, True where query ``q`` may attend key ``k``.

    Args:
        step: ``(..., Lk)`` signed step of every key (and of every query when ``q_step`` is None).
        doc_ids: ``(..., Lk)`` document of every key, -1 for padding; None means one document.
        q_step, q_doc_ids: ``(..., Lq)`` the queries' own metadata, for queries that are a
            subset of the keys (incremental decoding). Default: the keys'.
    """
    if q_step is None:
        q_step = step
    wq = q_step.unsqueeze(-1)  # (..., Lq, 1)
    wk = step.unsqueeze(-2)  # (..., 1, Lk)
    key_is_context = wk >= 0
    visible = torch.where(
        wq >= 0,
        key_is_context & (wk <= wq),
        (key_is_context & (wk < -wq)) | (wk == wq),
    )
    if doc_ids is not None:
        if q_doc_ids is None:
            q_doc_ids = doc_ids
        dk = doc_ids.unsqueeze(-2)
        visible = visible & (q_doc_ids.unsqueeze(-1) == dk) & (dk >= 0)
    return visible


# ---------------------------------------------------------------------------------------------
# Relative position bias (T5 style, bidirectional, from position ids)


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # under torch.compile: evaluated eagerly, a constant in the graph
def bucket_lut(num_buckets: int, max_distance: int) -> tuple[int, ...]:
    """Bucket of every distance ``0 .. max_distance`` for one direction (``num_buckets // 2``
    buckets). This is T5's float32 formula evaluated once per integer distance, so every
    implementation (torch, Triton) agrees exactly, including at the boundaries 16, 32, 64
    where the formula's logarithm lands on an integer."""
    half = num_buckets // 2
    max_exact = half // 2
    n = torch.arange(max_distance + 1)
    large = max_exact + (torch.log(n.clamp(min=1).float() / max_exact)
                         / math.log(max_distance / max_exact) * (half - max_exact)).long()
    return tuple(torch.where(n < max_exact, n, large.clamp(max=half - 1)).tolist())


def relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5 bidirectional bucket of ``relative_position = pos_k - pos_q`` (any integer shape)."""
    half = num_buckets // 2
    lut = torch.tensor(bucket_lut(num_buckets, max_distance), device=relative_position.device)
    n = relative_position.abs().clamp(max=max_distance)
    return lut[n] + (relative_position > 0).long() * half


@dataclass(frozen=True)
class RelativePositionBias:
    """What a backend needs to add the relative position bias itself.

    ``table`` is the ``(H, num_buckets)`` parameter shared by all layers; the bias of
    query ``q`` and key ``k`` in head ``h`` is ``table[h, bucket(pos_k - pos_q)]``.
    """

    table: Tensor  # (H, num_buckets)
    position_ids: Tensor  # (B, Lk) key positions
    q_position_ids: Optional[Tensor] = None  # (B, Lq); default: the keys'
    max_distance: int = 128

    @property
    def num_buckets(self) -> int:
        return self.table.shape[-1]

    def buckets(self) -> Tensor:
        """``(B, Lq, Lk)`` bucket indices."""
        q_pos = self.position_ids if self.q_position_ids is None else self.q_position_ids
        rel = self.position_ids.unsqueeze(-2) - q_pos.unsqueeze(-1)
        return relative_position_bucket(rel, self.num_buckets, self.max_distance)

    def dense(self) -> Tensor:
        """The materialised ``(B, H, Lq, Lk)`` bias (reference backends only)."""
        return self.table[:, self.buckets()].permute(1, 0, 2, 3)


# ---------------------------------------------------------------------------------------------
# Backends


def _reference(q, k, v, mask, bias, scale, dropout_p):
    """Plain math in the inputs' dtype: scores, masked softmax, weighted sum."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if bias is not None:
        scores = scores + bias.dense().to(scores.dtype)
    mask = mask.unsqueeze(1)  # (B, 1, Lq, Lk)
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)
    p = torch.exp(scores - row_max) * mask
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


def _sdpa(q, k, v, mask, bias, scale, dropout_p):
    """torch's scaled_dot_product_attention with a dense mask (and the bias as an additive mask)."""
    has_key = mask.any(dim=-1, keepdim=True)  # (B, Lq, 1)
    # SDPA returns NaN on rows with no visible key: open them, then zero their output.
    mask = mask | ~has_key
    mask = mask.unsqueeze(1)
    if bias is not None:
        attn_mask = bias.dense().to(q.dtype).masked_fill(~mask, float("-inf"))
    else:
        attn_mask = mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out * has_key.unsqueeze(1).to(out.dtype)


Backend = Callable[..., Tensor]
# name -> implementation taking (q, k, v, step, doc_ids, bias, scale, dropout_p, q_step, q_doc_ids)
_BACKENDS: dict[str, Backend] = {}
_UNAVAILABLE: dict[str, Callable[[], Optional[str]]] = {}


def register_backend(name: str, fn: Backend, unavailable: Callable[[], Optional[str]] = lambda: None) -> None:
    """Add a backend. ``unavailable()`` returns None when usable, else why not and the fix."""
    _BACKENDS[name] = fn
    _UNAVAILABLE[name] = unavailable


def _dense_backend(impl):
    def run(q, k, v, step, doc_ids, bias, scale, dropout_p, q_step, q_doc_ids):
        mask = dense_pseudo_mask(step, doc_ids, q_step=q_step, q_doc_ids=q_doc_ids)
        return impl(q, k, v, mask, bias, scale, dropout_p)
    return run


register_backend("reference", _dense_backend(_reference))
register_backend("sdpa", _dense_backend(_sdpa))

_auto_logged: set[str] = set()


def available_backends() -> list[str]:
    _load_optional_backends()
    return [name for name in _BACKENDS if _UNAVAILABLE[name]() is None]


_optional_loaded = False


def _load_optional_backends() -> None:
    """Optional backends register themselves on import; import failures leave them out.

    Once per process: afterwards this is a flag test, which torch.compile folds away (an
    ``import`` inside a compiled layer is a graph break)."""
    global _optional_loaded
    if _optional_loaded:
        return
    for module in ("pmlm_engine.structured_attention", "pmlm_engine.kernels"):
        try:
            __import__(module)
        except ImportError:
            pass
    _optional_loaded = True


def resolve_backend(backend: str, device: torch.device, dropout_p: float = 0.0) -> str:
    """The backend ``pseudo_mask_attention`` will run for this request (``auto`` resolved)."""
    _load_optional_backends()
    if backend == "auto":
        preferred = ["triton", "torch", "sdpa"] if device.type == "cuda" else ["torch", "sdpa"]
        if dropout_p > 0:
            preferred = ["sdpa"]
        for name in preferred:
            if name in _BACKENDS and _UNAVAILABLE[name]() is None:
                if name != preferred[0] and device.type not in _auto_logged:
                    why = _UNAVAILABLE.get(preferred[0], lambda: "not installed")() or "not installed"
                    log.info("attention backend auto on %s: %s unavailable (%s); using %s",
                             device.type, preferred[0], why, name)
                    _auto_logged.add(device.type)
                return name
        return "sdpa"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: choose 'auto' or one of {sorted(_BACKENDS)}")
    why = _UNAVAILABLE[backend]()
    if why is not None:
        raise RuntimeError(f"attention backend {backend!r} is unavailable: {why}")
    return backend


def pseudo_mask_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    step: Tensor,
    doc_ids: Optional[Tensor] = None,
    position_bias: Optional[RelativePositionBias] = None,
    backend: str = "auto",
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention under the pseudo-mask rule.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``.
        step: ``(B, Lk)`` signed step per key (per query too when ``q_step`` is None).
        doc_ids: ``(B, Lk)`` document per key, -1 for padding; None for one document per row.
        position_bias: the relative position bias, added inside the backend.
        backend: ``auto`` | ``reference`` | ``sdpa`` | ``torch`` (structured CPU path) | ``triton``.
        q_step, q_doc_ids: ``(B, Lq)`` for queries that are not the keys (decoding).
        scale: softmax scale, default ``1 / sqrt(D)``.
    Returns:
        ``(B, H, Lq, D)``; rows with no visible key are zeros.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B, H, Lq, D) and k, v (B, H, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if step.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"step has shape {tuple(step.shape)}; expected (B, Lk) = {(k.shape[0], k.shape[2])}")
    if q_step is None and q.shape[2] != k.shape[2]:
        raise ValueError("q_step is required when queries and keys differ in length")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    name = resolve_backend(backend, q.device, dropout_p)
    return _BACKENDS[name](q, k, v, step, doc_ids, position_bias, scale, dropout_p, q_step, q_doc_ids)
