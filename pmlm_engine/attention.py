"""Pseudo-mask attention: the dispatcher every attention call goes through.

The rule itself lives in :mod:`pmlm_engine.mask_rule` (``docs/attention.md`` explains it);
the relative position bias in :mod:`pmlm_engine.position_bias`; the backend contract
(:class:`~pmlm_engine.attention_api.AttentionBackend`, :class:`~pmlm_engine.attention_api.AttentionLayout`)
in :mod:`pmlm_engine.attention_api`.

Two entry points:

* per forward pass: :func:`build_layout` validates the metadata once, resolves the backend
  once and lets it prepare what all layers share; each layer then calls :func:`attend`;
* one-off: :func:`pseudo_mask_attention` does both for a single call (tests, benchmarks).

Backends. The dispatcher imports and registers its backends itself, by name:

* ``reference``, ``sdpa`` (:mod:`pmlm_engine.dense_attention`), ``torch``
  (:mod:`pmlm_engine.structured_attention`): torch only, always available;
* optional backends, listed in :data:`OPTIONAL_BACKENDS` as ``name: (package, module, fix)``:
  imported on first dispatch; only a missing ``package`` (``ModuleNotFoundError`` naming it)
  makes the backend unavailable, with the reason shown by ``available_backends(reasons=True)``;
  any other import error is raised. ``module`` defines ``BACKEND``, an object satisfying
  ``AttentionBackend`` (``name``, ``unavailable()``, ``prepare(layout)``,
  ``attend(q, k, v, layout, scale)``). To add a backend, add one line to :data:`OPTIONAL_BACKENDS`.

:func:`register_backend` / :func:`unregister_backend` add and remove other backends at run
time (tests register mask-checking backends this way and remove them afterwards).

``auto`` picks ``triton`` on CUDA, else ``torch``; ``sdpa`` when attention dropout is on (the
only backend with dropout). When its first choice is unavailable it logs one line saying why.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Optional

import torch
from torch import Tensor

from . import dense_attention, structured_attention
from .attention_api import AttentionBackend, AttentionLayout
from .mask_rule import dense_pseudo_mask, resolve_layout
from .position_bias import RelativePositionBias, bucket_lut, relative_position_bucket

__all__ = [
    "OPTIONAL_BACKENDS",
    "AttentionBackend",
    "AttentionLayout",
    "RelativePositionBias",
    "attend",
    "available_backends",
    "bucket_lut",
    "build_layout",
    "dense_pseudo_mask",
    "pseudo_mask_attention",
    "register_backend",
    "relative_position_bucket",
    "resolve_backend",
    "unregister_backend",
]

log = logging.getLogger(__name__)

OPTIONAL_BACKENDS: dict[str, tuple[str, str, str]] = {
    "triton": ("triton", "pmlm_engine.kernels.pseudo_mask_attention",
               "install it with `pip install triton==3.7.1` (the version torch 2.13 pairs with)"),
    # Needs only torch; its kernels come from pmlm_engine._cuda_emu / _cuda_attention or a JIT build,
    # and CudaBackend.unavailable() says which is missing.
    "cuda": ("torch", "pmlm_engine.cuda_attention", "reinstall torch"),
}
"""Backends that need a package torch does not bring: ``name: (package, module, fix)``."""

_BACKENDS: dict[str, AttentionBackend] = {}
_MISSING: dict[str, str] = {}  # optional backend -> why its package is missing
_optional_loaded = False
_auto_logged: set[str] = set()


def register_backend(backend: AttentionBackend) -> None:
    """Make ``backend`` selectable by ``backend.name`` (replacing one of that name)."""
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"{backend!r} does not implement AttentionBackend (name, unavailable, prepare, attend)")
    if backend.name == "auto":
        raise ValueError("'auto' is reserved for the dispatcher's choice")
    _BACKENDS[backend.name] = backend


def unregister_backend(name: str) -> None:
    """Remove the backend ``name`` (no error if absent)."""
    _BACKENDS.pop(name, None)


for _builtin in (dense_attention.REFERENCE, dense_attention.SDPA, structured_attention.BACKEND):
    register_backend(_builtin)


def _load_optional_backends() -> None:
    """Import the optional backends once; only their missing package makes them unavailable."""
    global _optional_loaded
    if _optional_loaded:
        return
    for name, (package, module, fix) in OPTIONAL_BACKENDS.items():
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name is None or (exc.name != package and not package.startswith(exc.name + ".")):
                raise  # the package is there but something it needs is not: a broken install
            _MISSING[name] = f"the {package!r} package is not installed: {fix}"
            continue
        register_backend(importlib.import_module(module).BACKEND)
    _optional_loaded = True


def _why_unavailable(name: str) -> Optional[str]:
    if name in _MISSING:
        return _MISSING[name]
    if name not in _BACKENDS:
        return "not registered"
    return _BACKENDS[name].unavailable()


def available_backends(reasons: bool = False) -> list[str] | dict[str, Optional[str]]:
    """The backends that can run here; with ``reasons=True``, every known backend mapped to None
    (available) or why it is not and the fix."""
    _load_optional_backends()
    status = {name: _why_unavailable(name) for name in [*_BACKENDS, *_MISSING]}
    if reasons:
        return status
    return [name for name, why in status.items() if why is None]


def resolve_backend(backend: str, device: torch.device, dropout_p: float = 0.0) -> str:
    """The backend a request runs on (``auto`` resolved).

    Raises:
        ValueError: unknown name. RuntimeError: the named backend cannot run here (says why).
    """
    _load_optional_backends()
    if backend == "auto":
        preferred = ["triton", "torch", "sdpa"] if device.type == "cuda" else ["torch", "sdpa"]
        if dropout_p > 0:
            preferred = ["sdpa"]
        for name in preferred:
            if _why_unavailable(name) is None:
                if name != preferred[0] and device.type not in _auto_logged:
                    log.info("attention backend auto on %s: %s unavailable (%s); using %s",
                             device.type, preferred[0], _why_unavailable(preferred[0]), name)
                    _auto_logged.add(device.type)
                return name
        raise RuntimeError(f"no attention backend can run on {device.type}: "
                           f"{available_backends(reasons=True)}")
    if backend not in _BACKENDS and backend not in _MISSING:
        raise ValueError(f"unknown attention backend {backend!r}: choose 'auto' or one of "
                         f"{sorted([*_BACKENDS, *_MISSING])}")
    why = _why_unavailable(backend)
    if why is not None:
        from .errors import EnvironmentUnavailableError  # a RuntimeError: the CLIs report it as exit code 7

        raise EnvironmentUnavailableError(f"attention backend {backend!r} is unavailable: {why}")
    return backend


def build_layout(
    step: Tensor,
    doc_ids: Optional[Tensor] = None,
    position_bias: Optional[RelativePositionBias] = None,
    backend: str = "auto",
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    dropout_p: float = 0.0,
) -> AttentionLayout:
    """The attention layout of one forward pass, shared by all its layers.

    Validates the metadata, resolves ``backend`` and runs its ``prepare`` once.

    Args:
        step: ``(B, Lk)`` signed step per key (per query too when ``q_step`` is None).
        doc_ids: ``(B, Lk)`` document per key, -1 for padding; None for one document per row.
        position_bias: the relative position bias, added inside the backend.
        backend: ``auto`` or a registered name (``reference``, ``sdpa``, ``torch``, ``triton``, ...).
        q_step, q_doc_ids: ``(B, Lq)`` for queries that are not the keys (decoding).
        num_heads, head_dim, dtype: of the q, k, v the layers will pass (dtype under autocast:
            the autocast dtype); backends size their tiles by them.
        dropout_p: attention dropout of this forward.
    """
    resolved = resolve_layout(step, doc_ids, q_step, q_doc_ids)
    if position_bias is not None:
        table = position_bias.table
        if table.dim() != 2 or table.shape[0] != num_heads:
            raise ValueError(f"position_bias.table has shape {tuple(table.shape)}; expected "
                             f"(num_heads={num_heads}, num_buckets)")
        if position_bias.position_ids.shape != step.shape:
            raise ValueError(f"position_bias.position_ids has shape {tuple(position_bias.position_ids.shape)}; "
                             f"expected (B, Lk) = {tuple(step.shape)}")
        q_pos = position_bias.q_position_ids
        if q_pos is None and q_step is not None and q_step.shape != step.shape:
            raise ValueError("position_bias.q_position_ids is required when queries and keys differ in length")
        if q_pos is not None and q_pos.shape != resolved[0].shape:
            raise ValueError(f"position_bias.q_position_ids has shape {tuple(q_pos.shape)}; expected (B, Lq) = "
                             f"{tuple(resolved[0].shape)}")
    name = resolve_backend(backend, step.device, dropout_p)
    impl = _BACKENDS[name]
    layout = AttentionLayout(step=step, doc_ids=doc_ids, q_step=q_step, q_doc_ids=q_doc_ids, resolved=resolved,
                             bias=position_bias, num_heads=num_heads, head_dim=head_dim, dtype=dtype,
                             dropout_p=dropout_p, backend_name=name, backend=impl)
    layout.prepared = impl.prepare(layout)
    return layout


def attend(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, scale: Optional[float] = None) -> Tensor:
    """One layer's pseudo-mask attention under a prepared layout.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``, matching the layout.
        scale: softmax scale, default ``1 / sqrt(D)``.
    Returns:
        ``(B, H, Lq, D)``; rows with no visible key are zeros.
    """
    B, Lq, Lk = layout.batch_size, layout.num_queries, layout.num_keys
    if (q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != B or k.shape[0] != B
            or q.shape[1] != k.shape[1] or q.shape[2] != Lq or k.shape[2] != Lk or q.shape[3] != k.shape[3]):
        raise ValueError(f"expected q (B, H, Lq, D) and k, v (B, H, Lk, D) with (B, Lq, Lk) = {(B, Lq, Lk)} from "
                         f"the layout; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return layout.backend.attend(q, k, v, layout, scale)


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
    """Attention under the pseudo-mask rule, one call (a layout built for it alone).

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``.
        step, doc_ids, position_bias, backend, q_step, q_doc_ids, dropout_p: as :func:`build_layout`.
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
    dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
    layout = build_layout(step, doc_ids, position_bias, backend, q_step=q_step, q_doc_ids=q_doc_ids,
                          num_heads=q.shape[1], head_dim=q.shape[3], dtype=dtype, dropout_p=dropout_p)
    return attend(q, k, v, layout, scale)
