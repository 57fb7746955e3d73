"""The pseudo-mask attention rule: the one module that states who may attend whom.

Every token carries a signed factorization step ``w`` (0 main, ``+s`` ORIGINAL copy of
step ``s``, ``-s`` PSEUDO ``[P]`` of step ``s``) and a document id (-1 for padding). Then

* ``w_q >= 0``: the key is visible iff ``0 <= w_k <= w_q``;
* ``w_q <  0``: the key is visible iff ``0 <= w_k < -w_q`` or ``w_k == w_q``;
* and both tokens carry the same document id; keys with ``doc_id == -1`` are never visible.

``docs/attention.md`` explains the rule with a worked example. :func:`dense_pseudo_mask` is its
torch statement; the backends (``pmlm_engine.structured_attention``, the Triton kernel in
``pmlm_engine.kernels``) restate it for their own data layout and are tested against it.
:func:`resolve_layout` is the one place that validates the per-token metadata and fills in
its defaults.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_layout", "dense_pseudo_mask", "resolve_layout"]


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


def check_layout(name: str, step: Tensor, doc: Optional[Tensor]) -> None:
    """Raise TypeError / ValueError unless ``step`` is an integer ``(B, L)`` tensor and ``doc`` None or alike."""
    for what, t in ((name, step), ("doc ids", doc)):
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise TypeError(f"{what} must be an integer tensor; got {t.dtype}: pass the layout's int64 ids")
    if step.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L); got {tuple(step.shape)}")
    if doc is not None and doc.shape != step.shape:
        raise ValueError(f"doc ids of shape {tuple(doc.shape)} do not match {name} of shape {tuple(step.shape)}")


def resolve_layout(
    step: Tensor,
    doc_ids: Optional[Tensor],
    q_step: Optional[Tensor],
    q_doc_ids: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate the attention metadata and fill in its defaults.

    Returns ``(q_step, q_doc, k_step, k_doc)``: ``(B, Lq)`` and ``(B, Lk)`` integer tensors, with
    one document (all zeros) when ``doc_ids`` is None and the keys' metadata for the queries when
    ``q_step`` is None.

    Raises:
        TypeError, ValueError: naming the argument and the fix.
    """
    check_layout("step", step, doc_ids)
    k_doc = torch.zeros_like(step) if doc_ids is None else doc_ids
    if q_step is None:
        if q_doc_ids is not None:
            raise ValueError("q_doc_ids was given without q_step: pass both (decoding) or neither")
        return step, k_doc, step, k_doc
    check_layout("q_step", q_step, q_doc_ids)
    if q_step.shape[0] != step.shape[0]:
        raise ValueError(f"q_step has batch {q_step.shape[0]} but step has batch {step.shape[0]}")
    if q_doc_ids is None:
        if doc_ids is None:
            return q_step, torch.zeros_like(q_step), step, k_doc
        if q_step.shape != step.shape:
            raise ValueError(f"q_doc_ids is required when doc_ids is given and queries ({q_step.shape[1]}) "
                             f"and keys ({step.shape[1]}) differ in length")
        return q_step, k_doc, step, k_doc
    if doc_ids is None:
        raise ValueError("q_doc_ids was given without doc_ids: pass the keys' doc_ids too")
    return q_step, q_doc_ids, step, k_doc
