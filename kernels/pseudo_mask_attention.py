"""Fused, tile-sparse pseudo-mask attention in Triton (FlashAttention-2 style).

What it computes is ``pmlm_engine.attention.pseudo_mask_attention`` (docs/attention.md):

    S = scale * Q K^T + bias,   P = softmax(S masked by the pseudo-mask),   O = P V

with the mask and the T5 relative position bias built *inside* the kernels from per-token
integers: no ``(L, L)`` mask and no ``(B, H, L, L)`` bias tensor exists anywhere.

* Mask: from ``step`` (0 main, +s ORIGINAL, -s PSEUDO) and ``doc_ids`` (-1 = padding) of
  queries and keys (:func:`_visible`).
* Bias: the ``(H, num_buckets)`` table is folded on the host into a per-head LUT over the
  clamped relative distance ``pos_k - pos_q`` in ``[-max_distance, max_distance]``
  (``(H, 2 * max_distance + 1)``, built with ``bucket_lut`` so it agrees exactly with the torch
  reference) and gathered in-kernel. The backward accumulates d(LUT) with atomics; autograd of
  the host-side gather ``table[:, index]`` scatter-adds it back onto the table's gradient.
* Sparsity: a torch pre-pass (:mod:`tile_stats`) classifies every (query tile, key tile) as
  empty / partial / full. Programs walk compact lists of full tiles (``MASK=False``: no mask,
  no bounds checks) and partial tiles (``MASK=True``); empty tiles are never visited, in the
  forward and in both backward passes.
* Rows with no visible key (padding queries): output 0 and ``lse = -inf``; their gradients are 0.
* Forward keeps the log-sum-exp (natural log, ``(B, H, Lq)`` fp32). Backward: a preprocess
  computes ``delta = rowsum(dO * O) - dlse``, then a key-major pass computes dK, dV and d(LUT),
  and a query-major pass computes dQ (no atomics on dQ).
* Dtypes: fp32 (dots in IEEE fp32, not TF32), fp16, bf16; accumulation always fp32.
* Interpreter (``TRITON_INTERPRET=1``): its bf16 ``tl.dot`` multiplies raw bits, so when
  interpreting, bf16 operands are cast to fp32 right before each dot (``DOT_FP32``). Operands
  are rounded to bf16 exactly where the GPU path rounds them, and an fp32 product of bf16
  values is exact, so this reproduces a bf16 MMA with fp32 accumulation up to summation order.
  On a GPU the dots run natively in bf16.

Layout follows Triton's fused-attention tutorial vocabulary: ``Q, K, V, Out, LSE``, strides
``stride_qz, stride_qh, stride_qm, stride_qk``, ``BLOCK_M, BLOCK_N, HEAD_DIM``,
``_attn_fwd_inner``, ``_attn_bwd_preprocess``, ``_attn_bwd_dkdv``, ``_attn_bwd_dq``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pmlm_engine.attention_api import AttentionLayout
from pmlm_engine.mask_rule import dense_pseudo_mask, resolve_layout
from pmlm_engine.position_bias import RelativePositionBias, relative_position_bucket

from .tile_stats import TileStats, tile_classes, tile_lists, tile_stats

if __name__ != "pmlm_engine.kernels.pseudo_mask_attention":
    # A second execution under another name would redefine the custom ops below; torch then frees
    # the first definition, which the engine still calls (use after free: segfaults, garbage).
    raise ImportError(f"import it as pmlm_engine.kernels.pseudo_mask_attention, not as {__name__!r} (its custom "
                      "ops must be defined once per process)")

# The kernels work in base 2: exp(x) = exp2(x * log2(e)). Kernel globals must be tl.constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _visible(q_step, q_doc, k_step, k_doc):
    """docs/attention.md for broadcastable query / key tensors (e.g. ``(M, 1)`` and ``(1, N)``).

    ``ctx_limit`` is the largest non-negative key step a query may see: ``w_q`` for main and
    ORIGINAL queries, ``-w_q - 1`` for PSEUDO queries (earlier steps only). A PSEUDO query also
    sees the PSEUDO keys of its own step. Padding keys (doc -1) are never visible; padding
    queries therefore see nothing.
    """
    ctx_limit = tl.where(q_step >= 0, q_step, -q_step - 1)
    context = (k_step >= 0) & (k_step <= ctx_limit)
    same_step = (q_step < 0) & (k_step == q_step)
    return (context | same_step) & (q_doc == k_doc) & (k_doc >= 0)


@triton.jit
def _rel_index(q_pos, k_pos, MAX_DISTANCE: tl.constexpr):
    """Index into one head's LUT row: ``clamp(pos_k - pos_q, -D, D) + D`` (broadcastable inputs)."""
    rel = k_pos - q_pos
    rel = tl.minimum(tl.maximum(rel, -MAX_DISTANCE), MAX_DISTANCE)
    return rel + MAX_DISTANCE


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``DOT_FP32`` upcasts operands (interpreter bf16 only)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i,  # running output (BLOCK_M, HEAD_DIM), row sum and row max (BLOCK_M,), fp32
    q,  # query tile, (BLOCK_M, HEAD_DIM)
    q_step, q_doc, q_pos,  # query metadata, (BLOCK_M,) int32
    K_ptr,  # this (batch, head)'s keys, (Lk, HEAD_DIM)
    V_ptr,  # this (batch, head)'s values, (Lk, HEAD_DIM)
    K_STEP_ptr, K_DOC_ptr, K_POS_ptr,  # this row's key metadata, (Lk,) int32
    LUT_ptr,  # this head's bias LUT, (2 * MAX_DISTANCE + 1,) fp32
    TILES_ptr,  # key-tile indices to visit, (n_tiles,) int32
    n_tiles,
    stride_kn, stride_kk, stride_vn, stride_vk,
    Lk, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_DISTANCE: tl.constexpr,
    MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_k = tl.arange(0, HEAD_DIM)
    for t in range(0, n_tiles):
        start_n = tl.load(TILES_ptr + t) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K_ptr + offs_n[None, :] * stride_kn + offs_k[:, None] * stride_kk
        v_ptrs = V_ptr + offs_n[:, None] * stride_vn + offs_k[None, :] * stride_vk
        if MASK:
            in_k = offs_n < Lk
            kT = tl.load(kT_ptrs, mask=in_k[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_k[:, None], other=0.0)
        else:
            # A full tile is in range by construction (past-the-end keys count as padding).
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        qk = _dot(q, kT, DOT_FP32, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 units
        if HAS_BIAS:
            if MASK:
                k_pos = tl.load(K_POS_ptr + offs_n, mask=in_k, other=0)
            else:
                k_pos = tl.load(K_POS_ptr + offs_n)
            qk += tl.load(LUT_ptr + _rel_index(q_pos[:, None], k_pos[None, :], MAX_DISTANCE)) * LOG2E
        if MASK:
            k_step = tl.load(K_STEP_ptr + offs_n, mask=in_k, other=0)
            k_doc = tl.load(K_DOC_ptr + offs_n, mask=in_k, other=-1)
            qk = tl.where(_visible(q_step[:, None], q_doc[:, None], k_step[None, :], k_doc[None, :]),
                          qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK:
            # A row with nothing visible so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q,  # (B, H, Lq, HEAD_DIM)
    K,  # (B, H, Lk, HEAD_DIM)
    V,  # (B, H, Lk, HEAD_DIM)
    Out,  # (B, H, Lq, HEAD_DIM), same dtype as Q
    LSE,  # (B, H, Lq) fp32, natural-log log-sum-exp of the scores; -inf for rows with no visible key
    Q_STEP, Q_DOC, Q_POS,  # (B, Lq) int32 query step / document / position
    K_STEP, K_DOC, K_POS,  # (B, Lk) int32 key step / document / position
    LUT,  # (H, 2 * MAX_DISTANCE + 1) fp32 bias by clamped relative distance (unused without bias)
    FULL_IDX,  # (B, n_q_tiles, n_k_tiles) int32 full key tiles of each query tile, first FULL_CNT valid
    FULL_CNT,  # (B, n_q_tiles) int32
    PART_IDX,  # (B, n_q_tiles, n_k_tiles) int32 partial key tiles of each query tile
    PART_CNT,  # (B, n_q_tiles) int32
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_oz, stride_oh, stride_om, stride_ok,
    H, Lq, Lk, n_q_tiles, n_k_tiles, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_DISTANCE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    # int64 bases: B * H * L * D can pass 2**31 elements at long context.
    Q += off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    K += off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    V += off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
    Out += off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Lq
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, mask=in_q[:, None], other=0.0)
    q_step = tl.load(Q_STEP + off_z * Lq + offs_m, mask=in_q, other=0)
    q_doc = tl.load(Q_DOC + off_z * Lq + offs_m, mask=in_q, other=-1)
    if HAS_BIAS:
        q_pos = tl.load(Q_POS + off_z * Lq + offs_m, mask=in_q, other=0)
    else:
        q_pos = tl.zeros([BLOCK_M], dtype=tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row = off_z * n_q_tiles + start_m
    lut = LUT + off_h * (2 * MAX_DISTANCE + 1)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_step, q_doc, q_pos, K, V,
        K_STEP + off_z * Lk, K_DOC + off_z * Lk, K_POS + off_z * Lk, lut,
        FULL_IDX + row * n_k_tiles, tl.load(FULL_CNT + row),
        stride_kn, stride_kk, stride_vn, stride_vk, Lk, qk_scale,
        BLOCK_N, HEAD_DIM, MAX_DISTANCE, False, HAS_BIAS, DOT_FP32, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_step, q_doc, q_pos, K, V,
        K_STEP + off_z * Lk, K_DOC + off_z * Lk, K_POS + off_z * Lk, lut,
        PART_IDX + row * n_k_tiles, tl.load(PART_CNT + row),
        stride_kn, stride_kk, stride_vn, stride_vk, Lk, qk_scale,
        BLOCK_N, HEAD_DIM, MAX_DISTANCE, True, HAS_BIAS, DOT_FP32, PRECISION)

    # Rows with no visible key: l = 0 and acc = 0 -> output 0 and lse = -inf (documented contract).
    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i))) * LN2)
    tl.store(Out + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, out.to(Out.dtype.element_ty),
             mask=in_q[:, None])
    tl.store(LSE + off_hz.to(tl.int64) * Lq + offs_m, lse, mask=in_q)


@triton.jit
def _attn_bwd_preprocess(
    Out,  # (B, H, Lq, HEAD_DIM)
    DO,  # (B, H, Lq, HEAD_DIM) gradient of Out
    DLSE,  # (B, H, Lq) fp32 gradient of LSE (unused unless HAS_DLSE)
    Delta,  # (B, H, Lq) fp32 output: rowsum(dO * O) - dLSE
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_doz, stride_doh, stride_dom, stride_dok,
    H, Lq,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Lq
    o = tl.load(Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, mask=in_q[:, None], other=0.0)
    do = tl.load(DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_k[None, :] * stride_dok, mask=in_q[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        # d lse / d S = P, so a gradient on lse enters dS = P * (dP - delta) as -dlse in delta.
        delta -= tl.load(DLSE + off_hz.to(tl.int64) * Lq + offs_m, mask=in_q, other=0.0)
    tl.store(Delta + off_hz.to(tl.int64) * Lq + offs_m, delta, mask=in_q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv,  # running gradients of this key tile, (BLOCK_N, HEAD_DIM) fp32
    k, v,  # key and value tile, (BLOCK_N, HEAD_DIM)
    k_step, k_doc, k_pos,  # key metadata, (BLOCK_N,) int32
    Q_ptr,  # this (batch, head)'s queries, (Lq, HEAD_DIM)
    DO_ptr,  # this (batch, head)'s output gradient, (Lq, HEAD_DIM)
    LSE_ptr, Delta_ptr,  # this (batch, head)'s lse and delta, (Lq,) fp32
    Q_STEP_ptr, Q_DOC_ptr, Q_POS_ptr,  # this row's query metadata, (Lq,) int32
    LUT_ptr,  # this head's bias LUT, (2 * MAX_DISTANCE + 1,) fp32
    DLUT_ptr,  # this (batch, head)'s LUT gradient accumulator, (2 * MAX_DISTANCE + 1,) fp32
    TILES_ptr,  # query-tile indices to visit, (n_tiles,) int32
    n_tiles,
    stride_qm, stride_qk, stride_dom, stride_dok,
    Lq, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_DISTANCE: tl.constexpr,
    MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_k = tl.arange(0, HEAD_DIM)
    for t in range(0, n_tiles):
        start_m = tl.load(TILES_ptr + t) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = Q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk
        do_ptrs = DO_ptr + offs_m[:, None] * stride_dom + offs_k[None, :] * stride_dok
        if MASK:
            in_q = offs_m < Lq
            q = tl.load(q_ptrs, mask=in_q[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=in_q[:, None], other=0.0)
            # Rows with lse = -inf see no key: +inf makes their p exactly 0 instead of inf / NaN.
            lse = tl.load(LSE_ptr + offs_m, mask=in_q, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(Delta_ptr + offs_m, mask=in_q, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE_ptr + offs_m)  # finite: every row of a full tile sees a key
            delta = tl.load(Delta_ptr + offs_m)
        qkT = _dot(k, tl.trans(q), DOT_FP32, PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), base 2
        if HAS_BIAS:
            if MASK:
                q_pos = tl.load(Q_POS_ptr + offs_m, mask=in_q, other=0)
            else:
                q_pos = tl.load(Q_POS_ptr + offs_m)
            rel = _rel_index(q_pos[None, :], k_pos[:, None], MAX_DISTANCE)
            qkT += tl.load(LUT_ptr + rel) * LOG2E
        pT = tl.math.exp2(qkT - (lse * LOG2E)[None, :])
        if MASK:
            q_step = tl.load(Q_STEP_ptr + offs_m, mask=in_q, other=0)
            q_doc = tl.load(Q_DOC_ptr + offs_m, mask=in_q, other=-1)
            vis = _visible(q_step[None, :], q_doc[None, :], k_step[:, None], k_doc[:, None])
            pT = tl.where(vis, pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, DOT_FP32, PRECISION)
        dpT = _dot(v, tl.trans(do), DOT_FP32, PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])  # gradient of the (natural-log) scores, incl. the bias
        dk += _dot(dsT.to(q.dtype), q, DOT_FP32, PRECISION)
        if HAS_BIAS:
            # Many pairs share a distance: hardware atomics serialise the duplicates correctly.
            if MASK:
                tl.atomic_add(DLUT_ptr + rel, dsT, mask=vis, sem="relaxed")
            else:
                tl.atomic_add(DLUT_ptr + rel, dsT, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,  # (B, H, Lq, HEAD_DIM)
    K,  # (B, H, Lk, HEAD_DIM)
    V,  # (B, H, Lk, HEAD_DIM)
    DO,  # (B, H, Lq, HEAD_DIM) gradient of the output
    LSE,  # (B, H, Lq) fp32 from the forward
    Delta,  # (B, H, Lq) fp32 from _attn_bwd_preprocess
    DK,  # (B, H, Lk, HEAD_DIM) output, same dtype as K, contiguous
    DV,  # (B, H, Lk, HEAD_DIM) output, same dtype as V, contiguous
    DLUT,  # (B, H, 2 * MAX_DISTANCE + 1) fp32 zero-initialised LUT-gradient accumulator
    Q_STEP, Q_DOC, Q_POS,  # (B, Lq) int32
    K_STEP, K_DOC, K_POS,  # (B, Lk) int32
    LUT,  # (H, 2 * MAX_DISTANCE + 1) fp32
    FULL_IDX,  # (B, n_k_tiles, n_q_tiles) int32 full query tiles of each key tile
    FULL_CNT,  # (B, n_k_tiles) int32
    PART_IDX,  # (B, n_k_tiles, n_q_tiles) int32 partial query tiles of each key tile
    PART_CNT,  # (B, n_k_tiles) int32
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_doz, stride_doh, stride_dom, stride_dok,
    H, Lq, Lk, n_q_tiles, n_k_tiles, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_DISTANCE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    Q += off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    K += off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    V += off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
    DO += off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
    W: tl.constexpr = 2 * MAX_DISTANCE + 1

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, HEAD_DIM)
    in_k = offs_n < Lk
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_k[None, :] * stride_kk, mask=in_k[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_k[None, :] * stride_vk, mask=in_k[:, None], other=0.0)
    k_step = tl.load(K_STEP + off_z * Lk + offs_n, mask=in_k, other=0)
    k_doc = tl.load(K_DOC + off_z * Lk + offs_n, mask=in_k, other=-1)
    if HAS_BIAS:
        k_pos = tl.load(K_POS + off_z * Lk + offs_n, mask=in_k, other=0)
    else:
        k_pos = tl.zeros([BLOCK_N], dtype=tl.int32)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    row = off_z * n_k_tiles + start_n
    lse_row = LSE + off_hz.to(tl.int64) * Lq
    delta_row = Delta + off_hz.to(tl.int64) * Lq
    lut = LUT + off_h * W
    dlut = DLUT + off_hz.to(tl.int64) * W
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, k_step, k_doc, k_pos, Q, DO, lse_row, delta_row,
        Q_STEP + off_z * Lq, Q_DOC + off_z * Lq, Q_POS + off_z * Lq, lut, dlut,
        FULL_IDX + row * n_q_tiles, tl.load(FULL_CNT + row),
        stride_qm, stride_qk, stride_dom, stride_dok, Lq, qk_scale,
        BLOCK_M, HEAD_DIM, MAX_DISTANCE, False, HAS_BIAS, DOT_FP32, PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, k_step, k_doc, k_pos, Q, DO, lse_row, delta_row,
        Q_STEP + off_z * Lq, Q_DOC + off_z * Lq, Q_POS + off_z * Lq, lut, dlut,
        PART_IDX + row * n_q_tiles, tl.load(PART_CNT + row),
        stride_qm, stride_qk, stride_dom, stride_dok, Lq, qk_scale,
        BLOCK_M, HEAD_DIM, MAX_DISTANCE, True, HAS_BIAS, DOT_FP32, PRECISION)

    # dK = scale * dS^T Q: the softmax scale was folded into qk_scale for the scores only.
    dk *= sm_scale
    out_offs = off_hz.to(tl.int64) * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_k[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # running gradient of this query tile, (BLOCK_M, HEAD_DIM) fp32
    q, do,  # query and output-gradient tile, (BLOCK_M, HEAD_DIM)
    lse, delta,  # (BLOCK_M,) fp32; lse already +inf on rows with no visible key
    q_step, q_doc, q_pos,  # (BLOCK_M,) int32
    K_ptr,  # this (batch, head)'s keys, (Lk, HEAD_DIM)
    V_ptr,  # this (batch, head)'s values, (Lk, HEAD_DIM)
    K_STEP_ptr, K_DOC_ptr, K_POS_ptr,  # this row's key metadata, (Lk,) int32
    LUT_ptr,  # this head's bias LUT, (2 * MAX_DISTANCE + 1,) fp32
    TILES_ptr,  # key-tile indices to visit, (n_tiles,) int32
    n_tiles,
    stride_kn, stride_kk, stride_vn, stride_vk,
    Lk, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_DISTANCE: tl.constexpr,
    MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_k = tl.arange(0, HEAD_DIM)
    for t in range(0, n_tiles):
        start_n = tl.load(TILES_ptr + t) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K_ptr + offs_n[None, :] * stride_kn + offs_k[:, None] * stride_kk
        vT_ptrs = V_ptr + offs_n[None, :] * stride_vn + offs_k[:, None] * stride_vk
        if MASK:
            in_k = offs_n < Lk
            kT = tl.load(kT_ptrs, mask=in_k[None, :], other=0.0)
            vT = tl.load(vT_ptrs, mask=in_k[None, :], other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        qk = _dot(q, kT, DOT_FP32, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if HAS_BIAS:
            if MASK:
                k_pos = tl.load(K_POS_ptr + offs_n, mask=in_k, other=0)
            else:
                k_pos = tl.load(K_POS_ptr + offs_n)
            qk += tl.load(LUT_ptr + _rel_index(q_pos[:, None], k_pos[None, :], MAX_DISTANCE)) * LOG2E
        p = tl.math.exp2(qk - (lse * LOG2E)[:, None])
        if MASK:
            k_step = tl.load(K_STEP_ptr + offs_n, mask=in_k, other=0)
            k_doc = tl.load(K_DOC_ptr + offs_n, mask=in_k, other=-1)
            p = tl.where(_visible(q_step[:, None], q_doc[:, None], k_step[None, :], k_doc[None, :]), p, 0.0)
        dp = _dot(do, vT, DOT_FP32, PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_FP32, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,  # (B, H, Lq, HEAD_DIM)
    K,  # (B, H, Lk, HEAD_DIM)
    V,  # (B, H, Lk, HEAD_DIM)
    DO,  # (B, H, Lq, HEAD_DIM) gradient of the output
    LSE,  # (B, H, Lq) fp32 from the forward
    Delta,  # (B, H, Lq) fp32 from _attn_bwd_preprocess
    DQ,  # (B, H, Lq, HEAD_DIM) output, same dtype as Q, contiguous
    Q_STEP, Q_DOC, Q_POS,  # (B, Lq) int32
    K_STEP, K_DOC, K_POS,  # (B, Lk) int32
    LUT,  # (H, 2 * MAX_DISTANCE + 1) fp32
    FULL_IDX,  # (B, n_q_tiles, n_k_tiles) int32 full key tiles of each query tile
    FULL_CNT,  # (B, n_q_tiles) int32
    PART_IDX,  # (B, n_q_tiles, n_k_tiles) int32 partial key tiles of each query tile
    PART_CNT,  # (B, n_q_tiles) int32
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_doz, stride_doh, stride_dom, stride_dok,
    H, Lq, Lk, n_q_tiles, n_k_tiles, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_DISTANCE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    Q += off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    K += off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    V += off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
    DO += off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Lq
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, mask=in_q[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_k[None, :] * stride_dok, mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + off_hz.to(tl.int64) * Lq + offs_m, mask=in_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # no visible key: p must be 0, not inf
    delta = tl.load(Delta + off_hz.to(tl.int64) * Lq + offs_m, mask=in_q, other=0.0)
    q_step = tl.load(Q_STEP + off_z * Lq + offs_m, mask=in_q, other=0)
    q_doc = tl.load(Q_DOC + off_z * Lq + offs_m, mask=in_q, other=-1)
    if HAS_BIAS:
        q_pos = tl.load(Q_POS + off_z * Lq + offs_m, mask=in_q, other=0)
    else:
        q_pos = tl.zeros([BLOCK_M], dtype=tl.int32)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row = off_z * n_q_tiles + start_m
    lut = LUT + off_h * (2 * MAX_DISTANCE + 1)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, q_step, q_doc, q_pos, K, V,
        K_STEP + off_z * Lk, K_DOC + off_z * Lk, K_POS + off_z * Lk, lut,
        FULL_IDX + row * n_k_tiles, tl.load(FULL_CNT + row),
        stride_kn, stride_kk, stride_vn, stride_vk, Lk, qk_scale,
        BLOCK_N, HEAD_DIM, MAX_DISTANCE, False, HAS_BIAS, DOT_FP32, PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, q_step, q_doc, q_pos, K, V,
        K_STEP + off_z * Lk, K_DOC + off_z * Lk, K_POS + off_z * Lk, lut,
        PART_IDX + row * n_k_tiles, tl.load(PART_CNT + row),
        stride_kn, stride_kk, stride_vn, stride_vk, Lk, qk_scale,
        BLOCK_N, HEAD_DIM, MAX_DISTANCE, True, HAS_BIAS, DOT_FP32, PRECISION)
    dq *= sm_scale
    tl.store(DQ + off_hz.to(tl.int64) * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_k[None, :],
             dq.to(DQ.dtype.element_ty), mask=in_q[:, None])


# ---------------------------------------------------------------------------------------------
# Host launchers

# True when ``triton.jit`` produced interpreted functions, i.e. TRITON_INTERPRET=1 was set before
# triton was imported. Decided once, by what the decorator did, not by today's environment.
INTERPRETED: bool = type(_attn_fwd).__name__ == "InterpretedFunction"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of the three passes.

    ``block_m`` x ``block_n``: forward (queries x keys). ``block_m1`` x ``block_n1``: the dK/dV pass
    (a program owns ``block_n1`` keys and walks query tiles of ``block_m1``). ``block_m2`` x
    ``block_n2``: the dQ pass. Blocks must be powers of two >= 16 (``tl.dot``'s minimum). Each
    pass has its own ``num_warps`` / ``num_stages``. Smaller tiles skip more of a pseudo-mask
    (finer classification) but do less work per loaded tile.
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    block_m1: int = 16
    block_n1: int = 128
    num_warps1: int = 8
    num_stages1: int = 2
    block_m2: int = 32
    block_n2: int = 64
    num_warps2: int = 4
    num_stages2: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_m1", "block_n1", "block_m2", "block_n2"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"BlockConfig.{name}={value!r}: expected a power of two >= 16")
        for name in ("num_warps", "num_warps1", "num_warps2"):
            value = getattr(self, name)
            if value not in (1, 2, 4, 8, 16):
                raise ValueError(f"BlockConfig.{name}={value!r}: expected 1, 2, 4, 8 or 16")
        for name in ("num_stages", "num_stages1", "num_stages2"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockConfig.{name}={value!r}: expected an int >= 1")

    @classmethod
    def uniform(cls, block: int) -> "BlockConfig":
        """Every pass tiled ``block`` x ``block`` (tests use small blocks to exercise tile classes)."""
        return cls(block_m=block, block_n=block, block_m1=block, block_n1=block, block_m2=block, block_n2=block)


# Defaults per head dim, chosen with ``aot_report`` (compiled for sm_80 and sm_90, fp16 and bf16,
# bias on) so that no pass spills and every pass stays below the 255-register ceiling with
# headroom (registers sm_80 / sm_90): D = 64: fwd 184/139, dK/dV 226/200, dQ 159/168;
# D = 128: fwd 177/169, dK/dV 234/179, dQ 177/157. ptxas spills a few bytes erratically on
# small dQ variants (D = 32 at 32x64 on sm_80), hence the per-head-dim dQ tiles. Not yet timed
# on a GPU: these are "fits without spilling" choices, not measured optima.
DEFAULT_CONFIGS: dict[int, BlockConfig] = {
    16: BlockConfig(),
    32: BlockConfig(block_m2=64, block_n2=32),
    64: BlockConfig(),
    128: BlockConfig(block_m=64, block_n=64, num_warps=8, block_m1=16, block_n1=64, num_warps1=8,
                     block_m2=64, block_n2=32, num_warps2=8),
}


# fp32 inputs use IEEE fp32 dots, which Triton lowers to FMA loops, not tensor cores: they need
# much smaller tiles to fit (64 x 64 spills tens of KB). Chosen the same way; fp32 on a GPU is a
# correctness path, not the training path (use bf16 / fp16 autocast there).
_FP32_SMALL_HEAD = BlockConfig(block_m=32, block_n=32, num_warps=4, num_stages=1, block_m1=16, block_n1=32,
                               num_warps1=4, num_stages1=1, block_m2=32, block_n2=32, num_warps2=4, num_stages2=2)
# D <= 32: forward with 8 warps (with 4, ptxas keeps 8 bytes in local memory on sm_90).
_FP32_TINY_HEAD = dataclasses.replace(_FP32_SMALL_HEAD, num_warps=8)
FP32_CONFIGS: dict[int, BlockConfig] = {
    16: _FP32_TINY_HEAD,
    32: _FP32_TINY_HEAD,
    64: _FP32_SMALL_HEAD,
    128: BlockConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, block_m1=16, block_n1=32, num_warps1=8,
                     num_stages1=2, block_m2=32, block_n2=32, num_warps2=4, num_stages2=2),
}


def default_config(head_dim: int, dtype: torch.dtype = torch.float16) -> BlockConfig:
    """The block configuration used for ``head_dim`` and input ``dtype`` when none is given."""
    if head_dim not in DEFAULT_CONFIGS:
        raise ValueError(f"head_dim={head_dim} is not supported by the triton backend: use one of "
                         f"{SUPPORTED_HEAD_DIMS} or the 'sdpa'/'reference' backends")
    return (FP32_CONFIGS if dtype == torch.float32 else DEFAULT_CONFIGS)[head_dim]


def _kernel_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """``(DOT_FP32, PRECISION)`` for a dtype: see the module docstring."""
    dot_fp32 = INTERPRETED and dtype == torch.bfloat16
    # fp32 inputs get IEEE dots: TF32 would cost ~1e-3 relative error, far above fp32's.
    precision = "ieee" if dtype == torch.float32 or dot_fp32 else "tf32"
    return dot_fp32, precision


@dataclass(frozen=True)
class TilePlan:
    """What the kernels derive from a layout once per forward, shared by every layer and head.

    ``tiles`` holds the compact tile lists of the three passes, four tensors each
    (``full_idx, full_cnt, part_idx, part_cnt`` of :func:`tile_stats.tile_lists`): the forward
    (query-major, ``block_m x block_n``), dK/dV (key-major, ``block_m1 x block_n1``) and dQ
    (query-major, ``block_m2 x block_n2``), all from one exact classification of the rule's mask.
    """

    config: BlockConfig
    q_step: Tensor  # (B, Lq) int32
    q_doc: Tensor
    k_step: Tensor  # (B, Lk) int32
    k_doc: Tensor
    q_pos: Optional[Tensor]  # (B, Lq) int32, with a bias only
    k_pos: Optional[Tensor]
    lut_index: Optional[Tensor]  # (2 * max_distance + 1,) bucket of every clamped distance, with a bias only
    max_distance: int
    tiles: list[Tensor]


def plan_tiles(q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor, cfg: BlockConfig) -> list[Tensor]:
    """The twelve tile-list tensors of :class:`TilePlan` (exact classification, one mask for all passes)."""
    visible = dense_pseudo_mask(k_step, k_doc, q_step=q_step, q_doc_ids=q_doc)  # (B, Lq, Lk)
    out: list[Tensor] = []
    for bq, bk, key_major in ((cfg.block_m, cfg.block_n, False), (cfg.block_m1, cfg.block_n1, True),
                              (cfg.block_m2, cfg.block_n2, False)):
        classes = tile_classes(q_step, q_doc, k_step, k_doc, bq, bk, visible=visible)  # (B, nQ, nK)
        if key_major:
            classes = classes.transpose(1, 2)  # (B, nK, nQ): each key tile lists its query tiles
        out += tile_lists(classes)
    return out


def _placeholder(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 1-element tensor passed for pointers a constexpr switch leaves unused."""
    return torch.zeros(1, device=device, dtype=dtype)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, q_step: Tensor, q_doc: Tensor, k_step: Tensor,
              k_doc: Tensor, q_pos: Optional[Tensor], k_pos: Optional[Tensor], lut: Optional[Tensor],
              scale: float, max_distance: int, cfg: BlockConfig, tiles: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Launch the forward. Shapes as in :func:`fused_pseudo_mask_attention`; returns ``(out, lse)``."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:  # B, H or Lq is 0: nothing to launch
        return out, lse
    if Lk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    has_bias = lut is not None
    if not has_bias:
        q_pos = k_pos = _placeholder(q.device, torch.int32)
        lut = _placeholder(q.device, torch.float32)
    full_idx, full_cnt, part_idx, part_cnt = tiles[0:4]
    n_q_tiles, n_k_tiles = full_idx.shape[1], full_idx.shape[2]
    dot_fp32, precision = _kernel_flags(q.dtype)
    _attn_fwd[(n_q_tiles, B * H)](
        q, k, v, out, lse, q_step, q_doc, q_pos, k_step, k_doc, k_pos, lut,
        full_idx, full_cnt, part_idx, part_cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, n_q_tiles, n_k_tiles, scale * LOG2E.value,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, MAX_DISTANCE=max_distance,
        HAS_BIAS=has_bias, DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
              q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor, q_pos: Optional[Tensor],
              k_pos: Optional[Tensor], lut: Optional[Tensor], scale: float, max_distance: int,
              cfg: BlockConfig, tiles: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward; returns ``(dq, dk, dv, dlut)``, ``dlut`` ``(H, 2*max_distance+1)`` fp32
    (a 0-element tensor without bias)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    # Every program stores its whole tile (zeros where nothing was visible), so no memset.
    dq = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Lk, D), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, H, Lk, D), device=v.device, dtype=v.dtype)
    has_bias = lut is not None
    width = 2 * max_distance + 1
    # One accumulator per (batch, head): atomics of different rows never contend; summed below.
    dlut = torch.zeros((B, H, width) if has_bias else (0,), device=q.device, dtype=torch.float32)
    if dq.numel() == 0 or Lk == 0:  # nothing attended: all gradients are 0
        return dq.zero_(), dk.zero_(), dv.zero_(), dlut.sum(0) if has_bias else dlut
    if not has_bias:
        q_pos = k_pos = _placeholder(q.device, torch.int32)
        lut = _placeholder(q.device, torch.float32)
        dlut_arg = _placeholder(q.device, torch.float32)
    else:
        dlut_arg = dlut
    dot_fp32, precision = _kernel_flags(q.dtype)
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    pre_block = 64
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_block), B * H)](
        out, do, dlse if dlse is not None else _placeholder(q.device, torch.float32), delta,
        *out.stride(), *do.stride(), H, Lq,
        BLOCK_M=pre_block, HEAD_DIM=D, HAS_DLSE=dlse is not None, num_warps=4, num_stages=1,
    )
    common = dict(HEAD_DIM=D, MAX_DISTANCE=max_distance, HAS_BIAS=has_bias, DOT_FP32=dot_fp32,
                  PRECISION=precision)

    full_idx, full_cnt, part_idx, part_cnt = tiles[4:8]
    n_k_tiles, n_q_tiles = full_idx.shape[1], full_idx.shape[2]
    _attn_bwd_dkdv[(n_k_tiles, B * H)](
        q, k, v, do, lse, delta, dk, dv, dlut_arg, q_step, q_doc, q_pos, k_step, k_doc, k_pos, lut,
        full_idx, full_cnt, part_idx, part_cnt,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        H, Lq, Lk, n_q_tiles, n_k_tiles, scale * LOG2E.value, scale,
        BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, num_warps=cfg.num_warps1, num_stages=cfg.num_stages1,
        **common,
    )
    full_idx, full_cnt, part_idx, part_cnt = tiles[8:12]
    n_q_tiles, n_k_tiles = full_idx.shape[1], full_idx.shape[2]
    _attn_bwd_dq[(n_q_tiles, B * H)](
        q, k, v, do, lse, delta, dq, q_step, q_doc, q_pos, k_step, k_doc, k_pos, lut,
        full_idx, full_cnt, part_idx, part_cnt,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        H, Lq, Lk, n_q_tiles, n_k_tiles, scale * LOG2E.value, scale,
        BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, num_warps=cfg.num_warps2, num_stages=cfg.num_stages2,
        **common,
    )
    return dq, dk, dv, dlut.sum(0) if has_bias else dlut


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd

_CFG_FIELDS = tuple(BlockConfig.__dataclass_fields__)


def _cfg(values: list[int]) -> BlockConfig:
    return BlockConfig(**dict(zip(_CFG_FIELDS, values)))


@torch.library.custom_op("pmlm::pseudo_mask_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor,
            q_pos: Optional[Tensor], k_pos: Optional[Tensor], lut: Optional[Tensor], scale: float,
            max_distance: int, config: list[int], tiles: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Forward of the fused kernel: ``(out (B, H, Lq, D), lse (B, H, Lq) fp32)``; ``tiles`` from
    :func:`plan_tiles`."""
    return _fwd_impl(q, k, v, q_step, q_doc, k_step, k_doc, q_pos, k_pos, lut, scale, max_distance, _cfg(config),
                     tiles)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, q_step, q_doc, k_step, k_doc, q_pos, k_pos, lut, scale, max_distance, config, tiles):
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("pmlm::pseudo_mask_attention_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
            q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor, q_pos: Optional[Tensor],
            k_pos: Optional[Tensor], lut: Optional[Tensor], scale: float, max_distance: int,
            config: list[int], tiles: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of the fused kernel: ``(dq, dk, dv, dlut)``."""
    return _bwd_impl(do, q, k, v, out, lse, dlse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, lut, scale,
                     max_distance, _cfg(config), tiles)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, out, lse, dlse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, lut, scale,
              max_distance, config, tiles):
    dlut = (q.new_empty((q.shape[1], 2 * max_distance + 1), dtype=torch.float32) if lut is not None
            else q.new_empty((0,), dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dlut


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_step, q_doc, k_step, k_doc, q_pos, k_pos, lut, scale, max_distance, config, tiles = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, lut, *tiles)
    ctx.scale, ctx.max_distance, ctx.config = scale, max_distance, config
    # An unused lse gets None instead of a materialised zero tensor: the backward then skips it.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
    q, k, v, out, lse, q_step, q_doc, k_step, k_doc, q_pos, k_pos, lut, *tiles = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()  # read with lse's (B, H, Lq) contiguous offsets
    dq, dk, dv, dlut = _bwd_op(grad_out, q, k, v, out, lse, grad_lse, q_step, q_doc, k_step, k_doc, q_pos,
                               k_pos, lut, ctx.scale, ctx.max_distance, ctx.config, tiles)
    return (dq, dk, dv, None, None, None, None, None, None, (dlut if lut is not None else None), None, None, None,
            [None] * len(tiles))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry points


def _check_meta(name: str, t: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: move the layout tensors with q")
    return t.to(torch.int32).contiguous()


def bias_lut(table: Tensor, max_distance: int) -> Tensor:
    """Fold the ``(H, num_buckets)`` table into ``(H, 2 * max_distance + 1)`` fp32 by relative distance.

    Entry ``d + max_distance`` holds ``table[:, bucket(d)]`` for ``d`` in ``[-max_distance,
    max_distance]``; the kernel clamps distances into that range, where buckets no longer change.
    Differentiable: autograd scatter-adds the LUT's gradient back onto ``table``.
    """
    return table.float()[:, _lut_index(table.shape[-1], max_distance, table.device)].contiguous()


def _lut_index(num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """``(2 * max_distance + 1,)`` bucket of every clamped relative distance ``-max_distance .. max_distance``."""
    rel = torch.arange(-max_distance, max_distance + 1, device=device)
    return relative_position_bucket(rel, num_buckets, max_distance)


def make_plan(
    step: Tensor,
    doc_ids: Optional[Tensor],
    position_bias: Optional[RelativePositionBias],
    config: BlockConfig,
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
    num_heads: Optional[int] = None,
) -> TilePlan:
    """Validate a layout for the kernels and build its :class:`TilePlan` (once per forward).

    Shapes as in :func:`fused_pseudo_mask_attention`; ``num_heads`` (when given) is checked
    against the bias table.
    """
    qs, qd, ks, kd = resolve_layout(step, doc_ids, q_step, q_doc_ids)
    B, Lk = ks.shape
    Lq = qs.shape[1]
    device = ks.device
    ks = _check_meta("step", ks, (B, Lk), device)
    kd = _check_meta("doc_ids", kd, (B, Lk), device)
    qs = _check_meta("q_step", qs, (B, Lq), device)
    qd = _check_meta("q_doc_ids", qd, (B, Lq), device)
    q_pos = k_pos = lut_index = None
    max_distance = 1
    if position_bias is not None:
        if not isinstance(position_bias, RelativePositionBias):
            raise TypeError(f"position_bias must be a RelativePositionBias, got {type(position_bias).__name__}")
        table = position_bias.table
        if table.dim() != 2 or (num_heads is not None and table.shape[0] != num_heads):
            raise ValueError(f"bias table has shape {tuple(table.shape)}; expected (H={num_heads}, num_buckets)")
        if table.shape[1] < 2 or table.shape[1] % 2:
            raise ValueError(f"bias table has {table.shape[1]} buckets; expected an even number >= 2")
        max_distance = int(position_bias.max_distance)
        if max_distance < 1:
            raise ValueError(f"position_bias.max_distance={max_distance}: expected >= 1")
        k_pos = _check_meta("position_ids", position_bias.position_ids, (B, Lk), device)
        if position_bias.q_position_ids is None:
            if Lq != Lk:
                raise ValueError("position_bias.q_position_ids is required when queries and keys differ in length")
            q_pos = k_pos
        else:
            q_pos = _check_meta("q_position_ids", position_bias.q_position_ids, (B, Lq), device)
        lut_index = _lut_index(table.shape[-1], max_distance, device)
    return TilePlan(config=config, q_step=qs, q_doc=qd, k_step=ks, k_doc=kd, q_pos=q_pos, k_pos=k_pos,
                    lut_index=lut_index, max_distance=max_distance, tiles=plan_tiles(qs, qd, ks, kd, config))


def fused_pseudo_mask_attention(
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
    config: Optional[BlockConfig] = None,
    plan: Optional[TilePlan] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pseudo-mask attention with the fused Triton kernels (differentiable in q, k, v and the bias table).

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``; fp32, fp16 or bf16, D in 16/32/64/128.
        step: ``(B, Lk)`` signed step per key (per query too when ``q_step`` is None).
        doc_ids: ``(B, Lk)`` document per key, -1 for padding; None for one document per row.
        position_bias: T5 bias (table ``(H, num_buckets)``, position ids ``(B, Lk)``, and
            ``q_position_ids`` ``(B, Lq)`` when queries differ from keys).
        q_step, q_doc_ids: ``(B, Lq)`` for queries that are not the keys (incremental decoding).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the ``(B, H, Lq)`` fp32 natural-log log-sum-exp of the scores
            (``-inf`` on rows with no visible key); it is differentiable too.
        config: block sizes; default :func:`default_config` of ``D`` and the dtype.
        plan: the layout's :class:`TilePlan` from :func:`make_plan` (the backend builds it once
            per forward); built here when None or made for other block sizes.
    Returns:
        ``out (B, H, Lq, D)`` in q's dtype (rows with no visible key are 0), and ``lse`` if asked.
    """
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or not isinstance(v, Tensor):
        raise TypeError("q, k and v must be tensors")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, H, Lq, D) and k, v (B, H, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one dtype among "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v are on {q.device}, {k.device}, {v.device}: put them on one device")
    if not INTERPRETED and q.device.type != "cuda":
        raise ValueError(f"the triton backend needs CUDA tensors, got {q.device}: move the inputs to a GPU, "
                         "or set TRITON_INTERPRET=1 before triton is imported to run it interpreted (slow)")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={D} is not supported by the triton backend: use one of "
                         f"{SUPPORTED_HEAD_DIMS} or the 'sdpa'/'reference' backends")
    if config is not None and not isinstance(config, BlockConfig):
        raise TypeError(f"config must be a BlockConfig, got {type(config).__name__}")
    cfg = default_config(D, q.dtype) if config is None else config
    if q_step is None and Lq != Lk:
        raise ValueError(f"queries ({Lq}) and keys ({Lk}) differ in length: pass q_step (and q_doc_ids)")
    if plan is None or plan.config != cfg:
        plan = make_plan(step, doc_ids, position_bias, cfg, q_step=q_step, q_doc_ids=q_doc_ids, num_heads=H)
    if plan.k_step.shape != (B, Lk) or plan.q_step.shape != (B, Lq) or plan.k_step.device != q.device:
        raise ValueError(f"the layout's shape (B, Lq, Lk) = {(B, *plan.q_step.shape[1:], *plan.k_step.shape[1:])} "
                         f"on {plan.k_step.device} does not match q {tuple(q.shape)} and k {tuple(k.shape)} on "
                         f"{q.device}: step is (B, Lk), q_step (B, Lq), all on q's device")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lut = None
    if position_bias is not None:
        # Differentiable gather: autograd scatter-adds the LUT's gradient back onto the table.
        lut = position_bias.table.float()[:, plan.lut_index].contiguous()  # (H, 2 * max_distance + 1)
    config_values = [getattr(cfg, f) for f in _CFG_FIELDS]
    out, lse = _fwd_op(q, k, v, plan.q_step, plan.q_doc, plan.k_step, plan.k_doc, plan.q_pos, plan.k_pos, lut, scale,
                       plan.max_distance, config_values, plan.tiles)
    return (out, lse) if return_lse else out


def flop_model(
    step: Tensor,
    doc_ids: Optional[Tensor] = None,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    config: Optional[BlockConfig] = None,
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
) -> dict[str, TileStats]:
    """Tile counts of each pass for a layout, at the block sizes the kernels would use.

    Returns ``{"fwd": ..., "bwd_dkdv": ..., "bwd_dq": ...}``; each :class:`TileStats` gives the
    empty / partial / full counts and ``computed_fraction`` (tiles computed over dense tiles).
    Shapes as in :func:`fused_pseudo_mask_attention`.
    """
    cfg = default_config(head_dim, dtype) if config is None else config
    blocks = {"fwd": (cfg.block_m, cfg.block_n), "bwd_dkdv": (cfg.block_m1, cfg.block_n1),
              "bwd_dq": (cfg.block_m2, cfg.block_n2)}
    return {name: tile_stats(step, doc_ids, bm, bn, q_step=q_step, q_doc_ids=q_doc_ids)
            for name, (bm, bn) in blocks.items()}


# ---------------------------------------------------------------------------------------------
# Backend registration


def unavailable() -> Optional[str]:
    """None when the triton backend can run here, else why not and the fix.

    Called at dispatch time (never at import), so CPU-only test collection never touches CUDA.
    """
    if INTERPRETED:
        return None
    if torch.cuda.is_available():
        return None
    return ("no CUDA device, and triton was imported without TRITON_INTERPRET=1: run on a GPU, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels interpreted on the CPU (slow)")


class TritonBackend:
    """The ``triton`` attention backend (``pmlm_engine.attention`` registers :data:`BACKEND`)."""

    name = "triton"

    def unavailable(self) -> Optional[str]:
        return unavailable()

    def prepare(self, layout: AttentionLayout) -> TilePlan:
        """Validated int32 metadata, the bias LUT index and the exact tile lists of all three passes,
        for the block sizes of the layout's head dim and dtype."""
        return make_plan(layout.step, layout.doc_ids, layout.bias, default_config(layout.head_dim, layout.dtype),
                         q_step=layout.q_step, q_doc_ids=layout.q_doc_ids, num_heads=layout.num_heads)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, scale: float) -> Tensor:
        if layout.dropout_p > 0:
            raise ValueError(f"dropout_p={layout.dropout_p}: the triton backend does not implement attention "
                             "dropout; use backend='sdpa' (or 'auto', which picks it) or set attention_dropout=0")
        return fused_pseudo_mask_attention(q, k, v, layout.step, layout.doc_ids, layout.bias, q_step=layout.q_step,
                                           q_doc_ids=layout.q_doc_ids, scale=scale, plan=layout.prepared)


BACKEND = TritonBackend()

__all__ = ["BACKEND", "BlockConfig", "TilePlan", "make_plan", "plan_tiles", "DEFAULT_CONFIGS", "FP32_CONFIGS", "INTERPRETED", "bias_lut", "default_config",
           "flop_model", "fused_pseudo_mask_attention", "unavailable"]
