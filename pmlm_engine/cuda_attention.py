"""The ``cuda`` attention backend: the CUDA pseudo-mask attention of ``csrc/cuda`` as a torch op.

``csrc/cuda/pseudo_mask_attention.cu`` computes what :func:`pmlm_engine.attention.pseudo_mask_attention`
computes (mask and bias inside the kernels, tiles classified empty / partial / full, forward with
the log-sum-exp, backward with the bias-table gradient). It is a second, independently written
implementation of the Triton kernel's function; both are tested against the same float64 reference.

Where the kernels come from (:func:`unavailable` says which applies, or why none does):

* ``PMLM_CUDA_EMULATE=1``: ``pmlm_engine._cuda_emu``, the unmodified kernel source compiled by the
  host C++ compiler through the CUDA emulator (``csrc/cuda/emulate``; built by ``setup.py``).
  It runs on CPU tensors, every thread of a block as a fiber in a seeded adversarial order, for
  tests (slow). Inputs and outputs are copied into buffers fenced by poison (NaN / 0), and the
  outputs start as NaN, so out-of-bounds reads, out-of-bounds writes and unwritten elements all
  show up.
* A CUDA torch with a GPU: ``pmlm_engine._cuda_attention`` when ``setup.py`` built it (``CUDA_HOME``
  set at install), else a just-in-time build with ``torch.utils.cpp_extension.load`` (nvcc; cached
  by torch in ``~/.cache/torch_extensions``).
* Otherwise the backend is unavailable, and the reason names the fix.

The op is ``torch.library.custom_op`` (``pmlm::cuda_pseudo_mask_attention_fwd`` / ``_bwd``) with
fake kernels and autograd; the bias table's gradient comes straight from the kernel.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from .attention_api import AttentionLayout
from .mask_rule import dense_pseudo_mask, resolve_layout
from .position_bias import RelativePositionBias, bucket_lut

EMULATE_ENV = "PMLM_CUDA_EMULATE"
SUPPORTED_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # codes of the C interface
SUPPORTED_HEAD_DIMS = (64, 128)
CUDA_SOURCES = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
_GUARD = 64  # poisoned elements on each side of every buffer handed to the emulated kernels

_modules: dict[str, Any] = {}


def emulated() -> bool:
    """True when ``PMLM_CUDA_EMULATE=1``: the kernels run on the CPU through the emulator."""
    return os.environ.get(EMULATE_ENV, "") == "1"


def _load_emulated() -> Any:
    if "emu" not in _modules:
        from . import _cuda_emu

        _modules["emu"] = _cuda_emu
    return _modules["emu"]


def _load_gpu() -> Any:
    if "gpu" not in _modules:
        try:
            from . import _cuda_attention as module  # built by setup.py with CUDA_HOME set
        except ImportError:
            from torch.utils.cpp_extension import load

            module = load(name="pmlm_cuda_attention",
                          sources=[str(CUDA_SOURCES / "binding.cpp"), str(CUDA_SOURCES / "pseudo_mask_attention.cu")],
                          extra_include_paths=[str(CUDA_SOURCES)], extra_cflags=["-O3"],
                          extra_cuda_cflags=["-O3"])
        _modules["gpu"] = module
    return _modules["gpu"]


def unavailable() -> Optional[str]:
    """None when the cuda backend can run here, else why not and the fix (checked at dispatch time)."""
    if emulated():
        try:
            _load_emulated()
        except ImportError as exc:
            return (f"{EMULATE_ENV}=1 but the emulated kernels pmlm_engine._cuda_emu are not built ({exc}): "
                    "build them with `pip install --no-build-isolation -e .`")
        return None
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build: install a CUDA build of torch on a GPU machine, or set "
                f"{EMULATE_ENV}=1 to run the CUDA kernels emulated on the CPU (tests only; slow)")
    if not torch.cuda.is_available():
        return f"no CUDA device is visible: run on a GPU, or set {EMULATE_ENV}=1 to emulate the kernels on the CPU"
    if torch.cuda.get_device_capability()[0] < 8:
        return "the kernels need compute capability 8.0 or newer (bf16 tensor cores): use backend='triton' or 'sdpa'"
    if "gpu" not in _modules:
        try:
            from . import _cuda_attention  # noqa: F401
        except ImportError:
            from torch.utils.cpp_extension import CUDA_HOME

            if CUDA_HOME is None:
                return ("pmlm_engine._cuda_attention is not built and no CUDA toolkit (nvcc) was found for a "
                        "just-in-time build: set CUDA_HOME and reinstall (`pip install --no-build-isolation -e .`)")
            if not (CUDA_SOURCES / "pseudo_mask_attention.cu").exists():
                return (f"the CUDA sources are not at {CUDA_SOURCES}: install from the repository with CUDA_HOME set "
                        "so setup.py builds pmlm_engine._cuda_attention")
    return None


def _module() -> Any:
    why = unavailable()
    if why is not None:
        raise RuntimeError(f"attention backend 'cuda' is unavailable: {why}")
    return _load_emulated() if emulated() else _load_gpu()


# ---------------------------------------------------------------------------------------------
# Buffers: plain tensors on a GPU; poison-fenced copies under emulation


def _poison(dtype: torch.dtype) -> float:
    # NaN floats make any stray read visible; 0 ints make a stray metadata read look like a
    # visible main-part token of document 0 (so it cannot hide as padding).
    return float("nan") if dtype.is_floating_point else 0


class _Buffers:
    """Allocates what the kernels read and write; under emulation, inside poisoned fences."""

    def __init__(self, emulate: bool) -> None:
        self.emulate = emulate
        self.fenced: list[tuple[str, Tensor]] = []
        self.keep: list[Tensor] = []  # every buffer whose pointer was handed out stays alive until the call ends

    def _fenced(self, shape: tuple[int, ...], dtype: torch.dtype, fill: float) -> tuple[Tensor, Tensor]:
        n = math.prod(shape)
        flat = torch.full((n + 2 * _GUARD,), _poison(dtype), dtype=dtype)
        view = flat[_GUARD:_GUARD + n].view(shape)
        view.fill_(fill)
        return flat, view

    def input(self, t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or not self.emulate:
            return t
        flat, view = self._fenced(tuple(t.shape), t.dtype, 0)
        view.copy_(t)
        self.keep.append(flat)
        return view

    def output(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               zero: bool = False) -> Tensor:
        if not self.emulate:
            return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
        # NaN where the kernel must write: an element it never writes stays NaN.
        flat, view = self._fenced(shape, dtype, 0 if zero else _poison(dtype))
        self.fenced.append((name, flat))
        return view

    def check(self) -> None:
        """Raise if a kernel wrote outside an output (the fences must still hold their poison)."""
        for name, flat in self.fenced:
            fence = torch.cat([flat[:_GUARD], flat[-_GUARD:]])
            if not torch.isnan(fence.float()).all():
                raise RuntimeError(f"CUDA emulator: a kernel wrote outside the bounds of {name}")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return 0 if device.type != "cuda" else torch.cuda.current_stream(device).cuda_stream


_luts: dict[tuple[int, int, str], Tensor] = {}


def _bucket_lut(num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    key = (num_buckets, max_distance, str(device))
    if key not in _luts:
        _luts[key] = torch.tensor(bucket_lut(num_buckets, max_distance), dtype=torch.int32, device=device)
    return _luts[key]


def _common(bufs: _Buffers, q: Tensor, k: Tensor, q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor,
            q_pos: Optional[Tensor], k_pos: Optional[Tensor], table: Optional[Tensor], scale: float,
            max_distance: int) -> dict[str, Any]:
    B, H, Lq, D = q.shape
    has_bias = table is not None
    return {
        "q_step": _ptr(bufs.input(q_step)), "q_doc": _ptr(bufs.input(q_doc)),
        "k_step": _ptr(bufs.input(k_step)), "k_doc": _ptr(bufs.input(k_doc)),
        "q_pos": _ptr(bufs.input(q_pos)) if has_bias else None,
        "k_pos": _ptr(bufs.input(k_pos)) if has_bias else None,
        "table": _ptr(bufs.input(table)) if has_bias else None,
        "bucket_lut": (_ptr(bufs.input(_bucket_lut(table.shape[1], max_distance, q.device))) if has_bias else None),
        "batch": B, "heads": H, "lq": Lq, "lk": k.shape[2], "head_dim": D,
        "num_buckets": table.shape[1] if has_bias else 0, "max_distance": max_distance, "scale": scale,
    }


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor,
              q_pos: Optional[Tensor], k_pos: Optional[Tensor], table: Optional[Tensor], scale: float,
              max_distance: int) -> tuple[Tensor, Tensor]:
    B, H, Lq, D = q.shape
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to attend: zeros, lse -inf
        return torch.zeros_like(q), torch.full((B, H, Lq), float("-inf"), device=q.device)
    module = _module()
    bufs = _Buffers(emulated())
    args = _common(bufs, q, k, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table, scale, max_distance)
    out = bufs.output("out", (B, H, Lq, D), q.dtype, q.device)
    lse = bufs.output("lse", (B, H, Lq), torch.float32, q.device)
    args.update(q=_ptr(bufs.input(q)), k=_ptr(bufs.input(k)), v=_ptr(bufs.input(v)), out=_ptr(out), lse=_ptr(lse))
    module.forward(args, SUPPORTED_DTYPES[q.dtype], _stream(q.device))
    bufs.check()
    return (out.clone(), lse.clone()) if bufs.emulate else (out, lse)


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
              q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor, q_pos: Optional[Tensor],
              k_pos: Optional[Tensor], table: Optional[Tensor], scale: float,
              max_distance: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dtable_shape = tuple(table.shape) if table is not None else (0,)
    if q.numel() == 0 or Lk == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros(dtable_shape, device=q.device))
    module = _module()
    bufs = _Buffers(emulated())
    args = _common(bufs, q, k, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table, scale, max_distance)
    dq = bufs.output("dq", tuple(q.shape), q.dtype, q.device)
    dk = bufs.output("dk", tuple(k.shape), k.dtype, k.device)
    dv = bufs.output("dv", tuple(v.shape), v.dtype, v.device)
    delta = bufs.output("delta", (B, H, Lq), torch.float32, q.device)
    dtable = bufs.output("dtable", dtable_shape, torch.float32, q.device, zero=True)
    args.update(q=_ptr(bufs.input(q)), k=_ptr(bufs.input(k)), v=_ptr(bufs.input(v)), out=_ptr(bufs.input(out)),
                lse=_ptr(bufs.input(lse)), dout=_ptr(bufs.input(do)), dlse=_ptr(bufs.input(dlse)), delta=_ptr(delta),
                dq=_ptr(dq), dk=_ptr(dk), dv=_ptr(dv), dtable=_ptr(dtable) if table is not None else None)
    module.backward(args, SUPPORTED_DTYPES[q.dtype], _stream(q.device))
    bufs.check()
    grads = (dq, dk, dv, dtable)
    return tuple(g.clone() for g in grads) if bufs.emulate else grads  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd


@torch.library.custom_op("pmlm::cuda_pseudo_mask_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor,
            q_pos: Optional[Tensor], k_pos: Optional[Tensor], table: Optional[Tensor], scale: float,
            max_distance: int) -> tuple[Tensor, Tensor]:
    """Forward of the CUDA kernels: ``(out (B, H, Lq, D), lse (B, H, Lq) fp32)``."""
    return _fwd_impl(q, k, v, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table, scale, max_distance)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table, scale, max_distance):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("pmlm::cuda_pseudo_mask_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
            q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor, q_pos: Optional[Tensor],
            k_pos: Optional[Tensor], table: Optional[Tensor], scale: float,
            max_distance: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of the CUDA kernels: ``(dq, dk, dv, dtable)``; dtable is ``(0,)`` without a bias."""
    return _bwd_impl(do, q, k, v, out, lse, dlse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table, scale,
                     max_distance)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, out, lse, dlse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table, scale, max_distance):
    dtable = q.new_empty(tuple(table.shape) if table is not None else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table, scale, max_distance = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table)
    ctx.scale, ctx.max_distance = scale, max_distance
    ctx.set_materialize_grads(False)  # an unused lse gets None: the backward then skips dlse


def _backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
    q, k, v, out, lse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, table = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    dq, dk, dv, dtable = _bwd_op(grad_out, q, k, v, out, lse, grad_lse, q_step, q_doc, k_step, k_doc, q_pos, k_pos,
                                 table, ctx.scale, ctx.max_distance)
    return dq, dk, dv, None, None, None, None, None, None, (dtable if table is not None else None), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point and the backend


def _meta(name: str, t: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    return t.to(device=device, dtype=torch.int32).contiguous()


@dataclass(frozen=True)
class Metadata:
    """The kernels' view of one layout: int32 ``(B, L)`` metadata on the device, made once per
    forward (:meth:`CudaBackend.prepare`) and shared by every layer."""

    q_step: Tensor
    q_doc: Tensor
    k_step: Tensor
    k_doc: Tensor
    q_pos: Optional[Tensor]  # None without a bias
    k_pos: Optional[Tensor]
    max_distance: int


def prepare_metadata(step: Tensor, doc_ids: Optional[Tensor], position_bias: Optional[RelativePositionBias],
                     q_step: Optional[Tensor], q_doc_ids: Optional[Tensor], num_heads: int, num_queries: int,
                     device: torch.device) -> Metadata:
    """Validate a layout for the kernels and convert it once (shapes as in :func:`cuda_pseudo_mask_attention`)."""
    B, Lk = step.shape if step.dim() == 2 else (None, None)
    if B is None:
        raise ValueError(f"step must have shape (B, Lk); got {tuple(step.shape)}")
    if q_step is None and num_queries != Lk:
        raise ValueError(f"queries ({num_queries}) and keys ({Lk}) differ in length: pass q_step (and q_doc_ids)")
    qs, qd, ks, kd = resolve_layout(step, doc_ids, q_step, q_doc_ids)
    ks, kd = _meta("step", ks, (B, Lk), device), _meta("doc_ids", kd, (B, Lk), device)
    qs, qd = _meta("q_step", qs, (B, num_queries), device), _meta("q_doc_ids", qd, (B, num_queries), device)
    if position_bias is None:
        return Metadata(qs, qd, ks, kd, None, None, 1)
    table = position_bias.table
    if table.dim() != 2 or table.shape[0] != num_heads:
        raise ValueError(f"bias table has shape {tuple(table.shape)}; expected (H={num_heads}, num_buckets)")
    if not 2 <= table.shape[1] <= 1024 or table.shape[1] % 2:
        raise ValueError(f"bias table has {table.shape[1]} buckets; expected an even number in [2, 1024]")
    max_distance = int(position_bias.max_distance)
    if max_distance < 1:
        raise ValueError(f"position_bias.max_distance={max_distance}: expected >= 1")
    k_pos = _meta("position_ids", position_bias.position_ids, (B, Lk), device)
    if position_bias.q_position_ids is None:
        if num_queries != Lk:
            raise ValueError("position_bias.q_position_ids is required when queries and keys differ in length")
        q_pos = k_pos
    else:
        q_pos = _meta("q_position_ids", position_bias.q_position_ids, (B, num_queries), device)
    return Metadata(qs, qd, ks, kd, q_pos, k_pos, max_distance)


def _run(q: Tensor, k: Tensor, v: Tensor, meta: Metadata, table: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Check q, k, v against the kernels' limits and call the op; returns ``(out, lse)``."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, H, Lq, D) and k, v (B, H, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one dtype among "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v are on {q.device}, {k.device}, {v.device}: put them on one device")
    want = "cpu" if emulated() else "cuda"
    if q.device.type != want:
        raise ValueError(f"the cuda backend {'emulated on the CPU' if emulated() else 'on a GPU'} needs {want} "
                         f"tensors, got {q.device}" + ("" if emulated() else f" (or set {EMULATE_ENV}=1)"))
    B, H, Lq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={D} is not supported by the cuda backend: use one of {SUPPORTED_HEAD_DIMS} "
                         "or the 'triton'/'sdpa' backends")
    if B * H > 65535:
        raise ValueError(f"batch * heads = {B * H} exceeds the kernels' grid limit of 65535")
    if table is not None:
        table = table.to(device=q.device, dtype=torch.float32).contiguous()
    return _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), meta.q_step, meta.q_doc, meta.k_step, meta.k_doc,
                   meta.q_pos, meta.k_pos, table, scale, meta.max_distance)


def cuda_pseudo_mask_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    step: Tensor,
    doc_ids: Optional[Tensor] = None,
    position_bias: Optional[RelativePositionBias] = None,
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pseudo-mask attention with the CUDA kernels (differentiable in q, k, v and the bias table).

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``; fp32, fp16 or bf16; D 64 or 128. CUDA
            tensors, or CPU tensors under ``PMLM_CUDA_EMULATE=1``.
        step, doc_ids, position_bias, q_step, q_doc_ids, scale: as in
            :func:`pmlm_engine.attention.pseudo_mask_attention`.
        return_lse: also return the ``(B, H, Lq)`` fp32 natural-log log-sum-exp (``-inf`` on rows
            with no visible key); it is differentiable too.
    Returns:
        ``out (B, H, Lq, D)`` in q's dtype (rows with no visible key are 0), and ``lse`` if asked.
    """
    if q.dim() != 4:
        raise ValueError(f"expected q (B, H, Lq, D); got {tuple(q.shape)}")
    meta = prepare_metadata(step, doc_ids, position_bias, q_step, q_doc_ids, q.shape[1], q.shape[2], q.device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    out, lse = _run(q, k, v, meta, None if position_bias is None else position_bias.table, scale)
    return (out, lse) if return_lse else out


class CudaBackend:
    """The ``cuda`` attention backend (``pmlm_engine.attention`` registers :data:`BACKEND`)."""

    name = "cuda"

    def unavailable(self) -> Optional[str]:
        return unavailable()

    def prepare(self, layout: AttentionLayout) -> Metadata:
        """The int32 metadata of the layout on its device, once per forward."""
        return prepare_metadata(layout.step, layout.doc_ids, layout.bias, layout.q_step, layout.q_doc_ids,
                                layout.num_heads, layout.num_queries, layout.step.device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, scale: float) -> Tensor:
        if layout.dropout_p > 0:
            raise ValueError(f"dropout_p={layout.dropout_p}: the cuda backend does not implement attention dropout; "
                             "use backend='sdpa' (or 'auto', which picks it) or set attention_dropout=0")
        out, _ = _run(q, k, v, layout.prepared, None if layout.bias is None else layout.bias.table, scale)
        return out


BACKEND = CudaBackend()


def tile_sizes(head_dim: int, dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """``{"fwd": (BM, BN), "bwd_dkdv": (BM, BN), "bwd_dq": (BM, BN)}`` (queries, keys) per pass,
    read from the compiled kernels (``Tiles`` in csrc/cuda/pseudo_mask_attention.cu; the emulated
    build carries the same source, so it answers on any machine where the package is built)."""
    try:
        module = _load_emulated()
    except ImportError:
        module = _module()
    code = SUPPORTED_DTYPES[dtype]
    return {name: tuple(module.pass_info(code, head_dim, 32, i)[1:])
            for i, name in enumerate(("fwd", "bwd_dkdv", "bwd_dq"))}


def flop_model(step: Tensor, doc_ids: Optional[Tensor] = None, head_dim: int = 64,
               dtype: torch.dtype = torch.bfloat16, *, q_step: Optional[Tensor] = None,
               q_doc_ids: Optional[Tensor] = None) -> dict[str, dict[str, float]]:
    """Work and traffic model of the CUDA kernels on a layout, per pass.

    For each pass: tile counts (exact classes, as ``classify_tile`` finds them, at the kernels' tile sizes), ``computed_fraction``
    (partial + full tiles over dense tiles), matmul FLOPs of the computed tiles (forward: QK^T and
    PV; dK/dV: S^T, dP^T, dV, dK; dQ: S, dP, dQ; ``2 * BM * BN * D`` each) and the global-memory
    bytes they stream (per computed tile, the moving operands: K, V for the forward and dQ; Q,
    dO, lse, delta for dK/dV; plus every tile's metadata for the classification; per block, the
    stationary operands read once and the results written once), and ``intensity`` (FLOP per
    byte of one computed tile's streamed operands) and ``overall_intensity`` (all FLOPs over all
    bytes). Per head; multiply FLOPs and bytes by the number of heads.
    """
    from pmlm_engine.kernels.tile_stats import EMPTY, FULL, PARTIAL, tile_classes

    qs, qd, ks, kd = resolve_layout(step, doc_ids, q_step, q_doc_ids)
    mask = dense_pseudo_mask(ks, kd, q_step=qs, q_doc_ids=qd)
    B, Lq, Lk = mask.shape
    size, d = torch.empty((), dtype=dtype).element_size(), head_dim
    matmuls = {"fwd": 2, "bwd_dkdv": 4, "bwd_dq": 3}
    out: dict[str, dict[str, float]] = {}
    for name, (bm, bn) in tile_sizes(head_dim, dtype).items():
        key_major = name == "bwd_dkdv"
        classes = tile_classes(qs, qd, ks, kd, bm, bn, visible=mask)  # exact, as the kernels classify
        counts = torch.bincount(classes.flatten().long(), minlength=3).tolist()
        computed = counts[PARTIAL] + counts[FULL]
        nq, nk = classes.shape[1], classes.shape[2]
        flops = computed * matmuls[name] * 2 * bm * bn * d
        if name == "fwd":  # stream K, V (+ key metadata); stationary Q in, O and lse out
            per_tile, meta, blocks = 2 * bn * d * size, 3 * bn * 4, nq
            stationary = 2 * bm * d * size + bm * 4 + 3 * bm * 4
        elif key_major:  # stream Q, dO, lse, delta (+ query metadata); stationary K, V in, dK, dV out
            per_tile, meta, blocks = 2 * bm * d * size + 2 * bm * 4, 3 * bm * 4, nk
            stationary = 4 * bn * d * size + 3 * bn * 4
        else:  # stream K, V (+ key metadata); stationary Q, dO, lse, delta in, dQ out
            per_tile, meta, blocks = 2 * bn * d * size, 3 * bn * 4, nq
            stationary = 3 * bm * d * size + 5 * bm * 4
        total_bytes = B * blocks * stationary + computed * per_tile + classes.numel() * meta
        out[name] = {"block_m": bm, "block_n": bn, "empty": counts[EMPTY], "partial": counts[PARTIAL],
                     "full": counts[FULL], "computed_fraction": computed / max(1, classes.numel()),
                     "visible_fraction": float(mask.float().mean()), "flops": flops, "bytes": total_bytes,
                     "intensity": matmuls[name] * 2 * bm * bn * d / per_tile,
                     "overall_intensity": flops / max(1, total_bytes)}
    return out


__all__ = ["BACKEND", "EMULATE_ENV", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "CudaBackend", "Metadata",
           "cuda_pseudo_mask_attention", "emulated", "flop_model", "prepare_metadata", "tile_sizes", "unavailable"]
