"""The contract between the attention dispatcher (:mod:`pmlm_engine.attention`) and its backends.

A forward pass builds one :class:`AttentionLayout` (``attention.build_layout``): the validated
per-token metadata, the relative position bias, the resolved backend, and whatever that
backend derives from the metadata once for all layers (its :meth:`AttentionBackend.prepare`:
a dense mask, the block plan of the structured CPU path, the Triton kernel's tile lists).
Every layer then calls :meth:`AttentionBackend.attend` with its own q, k, v and that layout:
no layer validates metadata, resolves the backend or classifies tiles again.

A backend is any object with the members of :class:`AttentionBackend`; register it with
``pmlm_engine.attention.register_backend`` (see that module's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from .position_bias import RelativePositionBias

__all__ = ["AttentionBackend", "AttentionLayout"]


@dataclass(eq=False)
class AttentionLayout:
    """Everything the attention of one forward pass shares across layers.

    Built by ``pmlm_engine.attention.build_layout`` (which validates it); backends read it.
    The raw arguments are kept (``doc_ids``/``q_step``/``q_doc_ids`` may be None, which some
    backends use to pick a faster path) next to their resolved form (:attr:`resolved`).
    """

    step: Tensor
    """``(B, Lk)`` signed step of every key (and query, when ``q_step`` is None)."""
    doc_ids: Optional[Tensor]
    """``(B, Lk)`` document of every key, -1 for padding; None: one document per row, no padding."""
    q_step: Optional[Tensor]
    """``(B, Lq)`` the queries' step when they are not the keys (cached decoding), else None."""
    q_doc_ids: Optional[Tensor]
    """``(B, Lq)`` the queries' documents, with ``q_step``."""
    resolved: tuple[Tensor, Tensor, Tensor, Tensor]
    """``(q_step, q_doc, k_step, k_doc)`` with the defaults filled in (``mask_rule.resolve_layout``)."""
    bias: Optional[RelativePositionBias]
    """The relative position bias (its table is shared by all layers), or None."""
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    """The dtype q, k, v will have in the layers (the autocast dtype under autocast)."""
    dropout_p: float
    """Attention dropout of this forward (0 in eval mode)."""
    backend_name: str
    """The resolved backend (never ``auto``)."""
    backend: "AttentionBackend"
    prepared: object = None
    """What ``backend.prepare(self)`` returned; only that backend reads it."""

    @property
    def batch_size(self) -> int:
        return self.step.shape[0]

    @property
    def num_queries(self) -> int:
        return self.resolved[0].shape[1]

    @property
    def num_keys(self) -> int:
        return self.step.shape[1]


@runtime_checkable
class AttentionBackend(Protocol):
    """One implementation of pseudo-mask attention (``docs/attention.md``).

    Contract: ``attend`` returns ``(B, H, Lq, D)`` equal (up to rounding in the inputs' dtype) to
    the dense reference of the rule (``mask_rule.dense_pseudo_mask``) with the bias added and
    dropout ``layout.dropout_p`` on the probabilities; rows with no visible key are zeros;
    autograd flows to q, k, v and the bias table. A backend that cannot honour a request
    (e.g. dropout) raises ``ValueError`` naming the fix.
    """

    name: str
    """The name users select it by (``model.attention_backend``)."""

    def unavailable(self) -> Optional[str]:
        """None when the backend can run here, else why not and the fix. Called at dispatch time,
        never at import (CPU-only processes must import every backend)."""
        ...

    def prepare(self, layout: AttentionLayout) -> object:
        """Work shared by all layers of one forward, done once (stored in ``layout.prepared``).
        May run data-dependent Python (it is outside the layers)."""
        ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, scale: float) -> Tensor:
        """One layer's attention: q ``(B, H, Lq, D)``, k and v ``(B, H, Lk, D)`` (shapes already
        checked against the layout). Should avoid data-dependent Python (``torch.compile``)."""
        ...
