"""Tile classification of the pseudo-mask (``docs/kernels.md``) and the FLOP model built on it.

The fused kernel (:mod:`pseudo_mask_attention`) never sees an ``(L, L)`` mask. Instead, once per
forward, every (query tile, key tile) is classified as

* ``EMPTY``   (0): no (query, key) pair of the tile is visible -> never visited;
* ``PARTIAL`` (1): some pairs are visible -> computed with the mask applied;
* ``FULL``    (2): every pair is visible -> computed without any mask or bounds check.

:func:`tile_classes` is exact: it reduces the rule's ``(B, Lq, Lk)`` boolean mask to any / all
per tile, a few bit operations per pair, once per batch, shared by every layer and head.
:func:`summary_tile_classes` is the earlier conservative classifier (proofs from per-tile
min/max summaries, no pair examined), kept as the benchmark's baseline and a cross-check.

The summary classifier restates the rule for tiles. Write ``c(q) = w_q`` if ``w_q >= 0`` else
``-w_q - 1`` (the largest non-negative key step query ``q`` may see). Then a key with ``w_k >= 0``
is visible iff ``w_k <= c(q)`` ("context" part), a key with ``w_k < 0`` iff ``w_k == w_q``
("same-step" part), and in both cases the documents must agree and the key must not be padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pmlm_engine.mask_rule import check_layout, dense_pseudo_mask, resolve_layout

EMPTY, PARTIAL, FULL = 0, 1, 2

# Sentinels for min/max over an empty set; any real step or doc id lies strictly between them.
_BIG = 2**40


@dataclass(frozen=True)
class _QueryTiles:
    """Per query tile summaries, each ``(B, n_tiles)``; over valid queries (doc >= 0) only."""

    all_valid: Tensor  # bool: every row of the tile is an in-range, non-padding query
    any_valid: Tensor  # bool
    doc_min: Tensor
    doc_max: Tensor
    step_min: Tensor
    step_max: Tensor
    ctx_min: Tensor  # min over queries of c(q)
    ctx_max: Tensor  # max over queries of c(q)


@dataclass(frozen=True)
class _KeyTiles:
    """Per key tile summaries, each ``(B, n_tiles)``; over valid keys (doc >= 0) only."""

    all_valid: Tensor
    any_valid: Tensor
    doc_min: Tensor
    doc_max: Tensor
    any_ctx: Tensor  # some valid key has w_k >= 0
    ctx_min: Tensor  # min / max of w_k over valid keys with w_k >= 0
    ctx_max: Tensor
    any_neg: Tensor  # some valid key has w_k < 0
    neg_min: Tensor  # min / max of w_k over valid keys with w_k < 0
    neg_max: Tensor


def _blocked(x: Tensor, block: int, fill: int) -> Tensor:
    """``(B, L)`` -> ``(B, ceil(L / block), block)``, the tail filled with ``fill``."""
    b, length = x.shape
    n = -(-length // block)
    out = x.new_full((b, n * block), fill)
    out[:, :length] = x
    return out.view(b, n, block)


def _masked_min(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, x, _BIG).amin(dim=-1)


def _masked_max(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, x, -_BIG).amax(dim=-1)


def _query_tiles(step: Tensor, doc: Tensor, block: int) -> _QueryTiles:
    s = _blocked(step.long(), block, 0)
    d = _blocked(doc.long(), block, -1)  # rows past the end behave as padding queries
    valid = d >= 0
    ctx = torch.where(s >= 0, s, -s - 1)
    return _QueryTiles(
        all_valid=valid.all(dim=-1), any_valid=valid.any(dim=-1),
        doc_min=_masked_min(d, valid), doc_max=_masked_max(d, valid),
        step_min=_masked_min(s, valid), step_max=_masked_max(s, valid),
        ctx_min=_masked_min(ctx, valid), ctx_max=_masked_max(ctx, valid),
    )


def _key_tiles(step: Tensor, doc: Tensor, block: int) -> _KeyTiles:
    s = _blocked(step.long(), block, 0)
    d = _blocked(doc.long(), block, -1)  # columns past the end behave as padding keys
    valid = d >= 0
    is_ctx = valid & (s >= 0)
    is_neg = valid & (s < 0)
    return _KeyTiles(
        all_valid=valid.all(dim=-1), any_valid=valid.any(dim=-1),
        doc_min=_masked_min(d, valid), doc_max=_masked_max(d, valid),
        any_ctx=is_ctx.any(dim=-1), ctx_min=_masked_min(s, is_ctx), ctx_max=_masked_max(s, is_ctx),
        any_neg=is_neg.any(dim=-1), neg_min=_masked_min(s, is_neg), neg_max=_masked_max(s, is_neg),
    )


def _check_tile_args(q_step: Tensor, q_doc: Tensor, k_step: Tensor, k_doc: Tensor, block_m: int,
                     block_n: int) -> None:
    """The input checks shared by the tile classifiers."""
    check_layout("q_step", q_step, q_doc)
    check_layout("k_step", k_step, k_doc)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")


def summary_tile_classes(
    q_step: Tensor,
    q_doc: Tensor,
    k_step: Tensor,
    k_doc: Tensor,
    block_m: int,
    block_n: int,
) -> Tensor:
    """Conservative class of every (query tile, key tile) from per-tile summaries.

    The classifier the kernels used before :func:`tile_classes`: ``FULL`` and ``EMPTY`` are proofs
    from min/max summaries of each tile's step and document ids, anything else is ``PARTIAL``.
    O(B * L) summaries plus O(B * nQ * nK) comparisons, no pair is examined; on packed rows it
    leaves some tiles without a visible pair ``PARTIAL``. Kept as the benchmark's baseline and
    as an independent cross-check (the exact classes must refine it).

    Args:
        q_step, q_doc: ``(B, Lq)`` step and document (-1 = padding) of every query.
        k_step, k_doc: ``(B, Lk)`` the same for every key.
        block_m, block_n: query and key tile sizes.
    Returns:
        ``(B, ceil(Lq / block_m), ceil(Lk / block_n))`` int8.
    """
    _check_tile_args(q_step, q_doc, k_step, k_doc, block_m, block_n)
    qt = _query_tiles(q_step, q_doc, block_m)
    kt = _key_tiles(k_step, k_doc, block_n)

    def Q(x: Tensor) -> Tensor:  # (B, nQ) -> (B, nQ, 1)
        return x.unsqueeze(-1)

    def K(x: Tensor) -> Tensor:  # (B, nK) -> (B, 1, nK)
        return x.unsqueeze(-2)

    # Empty: a visible pair needs a shared document and either the context or the same-step part.
    docs_meet = (Q(qt.any_valid) & K(kt.any_valid)
                 & (Q(qt.doc_min) <= K(kt.doc_max)) & (K(kt.doc_min) <= Q(qt.doc_max)))
    ctx_possible = K(kt.any_ctx) & (K(kt.ctx_min) <= Q(qt.ctx_max))
    q_neg_max = Q(qt.step_max).clamp(max=-1)  # the negative query steps lie in [step_min, q_neg_max]
    same_possible = (K(kt.any_neg) & (Q(qt.step_min) < 0)
                     & (K(kt.neg_min) <= q_neg_max) & (Q(qt.step_min) <= K(kt.neg_max)))
    nonempty = docs_meet & (ctx_possible | same_possible)

    # Full: every query and key valid, one document, every key visible to every query.
    one_doc = (Q(qt.all_valid) & K(kt.all_valid) & Q(qt.doc_min == qt.doc_max)
               & K(kt.doc_min == kt.doc_max) & (Q(qt.doc_min) == K(kt.doc_min)))
    ctx_all = ~K(kt.any_ctx) | (K(kt.ctx_max) <= Q(qt.ctx_min))
    same_all = ~K(kt.any_neg) | (Q(qt.step_min == qt.step_max) & K(kt.neg_min == kt.neg_max)
                                 & (Q(qt.step_min) == K(kt.neg_min)))
    full = one_doc & ctx_all & same_all

    classes = torch.full(nonempty.shape, EMPTY, dtype=torch.int8, device=q_step.device)
    classes[nonempty] = PARTIAL
    classes[full & nonempty] = FULL
    return classes


def tile_any_all(visible: Tensor, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Per tile, whether any and whether all of its ``block_m x block_n`` pairs are visible.

    Args:
        visible: ``(B, Lq, Lk)`` bool, the rule's mask (``dense_pseudo_mask``).
    Returns:
        ``any, all``: ``(B, ceil(Lq / block_m), ceil(Lk / block_n))`` bool. Pairs past the end of
        the sequence count as not visible (a tile that overhangs it is never all-visible, so the
        kernels' unmasked path never reads out of bounds).
    """
    B, Lq, Lk = visible.shape
    nq, nk = -(-Lq // block_m), -(-Lk // block_n)
    if nq * block_m != Lq or nk * block_n != Lk:
        visible = torch.nn.functional.pad(visible, (0, nk * block_n - Lk, 0, nq * block_m - Lq), value=False)
    tiles = visible.view(B, nq, block_m, nk, block_n)
    return tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)


def tile_classes(
    q_step: Tensor,
    q_doc: Tensor,
    k_step: Tensor,
    k_doc: Tensor,
    block_m: int,
    block_n: int,
    *,
    visible: Optional[Tensor] = None,
) -> Tensor:
    """Exact class of every (query tile, key tile): ``EMPTY`` (no visible pair), ``FULL`` (every
    pair visible, tile inside the sequence) or ``PARTIAL`` (the rest).

    The kernels compute only tiles with a visible pair and apply the mask only on ``PARTIAL``
    ones. One pass over the ``(B, Lq, Lk)`` mask (a few bit operations per pair), done once per
    forward and shared by every layer and head (``docs/kernels.md``).

    Args:
        q_step, q_doc: ``(B, Lq)`` step and document (-1 = padding) of every query.
        k_step, k_doc: ``(B, Lk)`` the same for every key.
        block_m, block_n: query and key tile sizes.
        visible: the rule's ``(B, Lq, Lk)`` mask when the caller has it (several tile sizes of
            one layout share it); computed here otherwise.
    Returns:
        ``(B, ceil(Lq / block_m), ceil(Lk / block_n))`` int8.
    """
    _check_tile_args(q_step, q_doc, k_step, k_doc, block_m, block_n)
    if visible is None:
        visible = dense_pseudo_mask(k_step, k_doc, q_step=q_step, q_doc_ids=q_doc)
    any_, all_ = tile_any_all(visible, block_m, block_n)
    return any_.to(torch.int8) + all_.to(torch.int8)  # EMPTY 0, PARTIAL 1, FULL 2 (all implies any)


def tile_classes_multi(
    q_step: Tensor,
    q_doc: Tensor,
    k_step: Tensor,
    k_doc: Tensor,
    blocks: list[tuple[int, int]],
) -> list[Tensor]:
    """:func:`tile_classes` at several tile sizes from one pass over the mask (the kernel's passes).

    The metadata is padded (as padding) to a multiple of the largest tiles, the mask reduced to
    any / all over the smallest tiles once, and each size's classes reduced from that grid:
    tiles of every size are unions of the smallest ones (sizes must be multiples of the smallest,
    as powers of two are). Returns one ``(B, ceil(Lq / bq), ceil(Lk / bk))`` int8 tensor per
    ``(bq, bk)`` in ``blocks``, equal to ``tile_classes`` at that size.
    """
    check_layout("q_step", q_step, q_doc)
    check_layout("k_step", k_step, k_doc)
    bq0, bk0 = min(b[0] for b in blocks), min(b[1] for b in blocks)
    bqm, bkm = max(b[0] for b in blocks), max(b[1] for b in blocks)
    if any(bq % bq0 or bk % bk0 for bq, bk in blocks) or bq0 < 1 or bk0 < 1:
        raise ValueError(f"tile sizes {blocks}: each must be a positive multiple of the smallest")
    B, Lq = q_step.shape
    Lk = k_step.shape[1]
    pad_q, pad_k = -(-Lq // bqm) * bqm - Lq, -(-Lk // bkm) * bkm - Lk
    pad = torch.nn.functional.pad
    visible = dense_pseudo_mask(pad(k_step, (0, pad_k)), pad(k_doc, (0, pad_k), value=-1),
                                q_step=pad(q_step, (0, pad_q)), q_doc_ids=pad(q_doc, (0, pad_q), value=-1))
    any0, all0 = tile_any_all(visible, bq0, bk0)  # (B, Pq / bq0, Pk / bk0); padding pairs are not visible
    nq0, nk0 = any0.shape[1:]
    out = []
    for bq, bk in blocks:
        fq, fk = bq // bq0, bk // bk0
        any_ = any0.view(B, nq0 // fq, fq, nk0 // fk, fk).any(dim=4).any(dim=2)
        all_ = all0.view(B, nq0 // fq, fq, nk0 // fk, fk).all(dim=4).all(dim=2)
        classes = any_.to(torch.int8) + all_.to(torch.int8)
        out.append(classes[:, :-(-Lq // bq), :-(-Lk // bk)])
    return out


def tile_lists(classes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compact per-row lists of the tiles a kernel program visits (like a block-sparse index).

    Args:
        classes: ``(B, R, C)`` from :func:`tile_classes` (or its transpose for key-major passes).
    Returns:
        ``full_idx (B, R, C)``, ``full_cnt (B, R)``, ``part_idx (B, R, C)``, ``part_cnt (B, R)``,
        all int32 and contiguous: the first ``cnt[b, r]`` entries of ``idx[b, r]`` are the
        column indices of that class, ascending.
    """
    out: list[Tensor] = []
    for cls in (FULL, PARTIAL):
        hit = classes == cls
        # A stable sort on "not a hit" puts the hits first, in ascending column order.
        idx = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
        out += [idx, hit.sum(dim=-1, dtype=torch.int32).contiguous()]
    return out[0], out[1], out[2], out[3]


@dataclass(frozen=True)
class TileStats:
    """How much of the dense ``(Lq, Lk)`` score matrix the kernel computes, per batch."""

    block_m: int
    block_n: int
    empty: int
    partial: int
    full: int
    visible_pairs: int  # (query, key) pairs the mask allows, summed over the batch
    dense_pairs: int  # B * Lq * Lk

    @property
    def total(self) -> int:
        return self.empty + self.partial + self.full

    @property
    def computed_fraction(self) -> float:
        """Tiles computed (partial + full) over all tiles: the kernel's FLOPs relative to dense."""
        return (self.partial + self.full) / max(1, self.total)

    @property
    def visible_fraction(self) -> float:
        """Visible pairs over dense pairs: the FLOPs an ideal element-sparse kernel would do."""
        return self.visible_pairs / max(1, self.dense_pairs)

    def as_row(self) -> dict[str, float | int]:
        """Fields and derived fractions as one flat dict (for benchmark tables / JSONL)."""
        return {"block_m": self.block_m, "block_n": self.block_n, "empty": self.empty, "partial": self.partial,
                "full": self.full, "total": self.total, "computed_fraction": self.computed_fraction,
                "visible_fraction": self.visible_fraction}

    def flops(self, num_heads: int, head_dim: int, backward: bool = False) -> int:
        """Matmul FLOPs of the computed tiles: 2 matmuls forward (QK^T, PV), 5 backward
        (QK^T again, dV, dP, dQ, dK), 2 * block_m * block_n * head_dim each."""
        per_tile = 2 * self.block_m * self.block_n * head_dim * (5 if backward else 2)
        return (self.partial + self.full) * num_heads * per_tile


def tile_stats(
    step: Tensor,
    doc_ids: Optional[Tensor] = None,
    block_m: int = 128,
    block_n: int = 64,
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
    method: str = "exact",
) -> TileStats:
    """The FLOP model: tile counts of a layout at the given block sizes.

    Args:
        step: ``(B, Lk)`` per-key step (per query too when ``q_step`` is None).
        doc_ids: ``(B, Lk)`` document per key, -1 for padding; None for one document per row.
        block_m, block_n: query and key tile sizes of the kernel pass to model.
        q_step, q_doc_ids: ``(B, Lq)`` the queries' own metadata when they differ from the keys.
        method: ``"exact"`` (:func:`tile_classes`, what the kernels use) or ``"summary"``
            (:func:`summary_tile_classes`, the earlier conservative classifier).
    """
    qs, qd, ks, kd = resolve_layout(step, doc_ids, q_step, q_doc_ids)
    if method not in ("exact", "summary"):
        raise ValueError(f"method={method!r}: choose 'exact' or 'summary'")
    mask = dense_pseudo_mask(ks, kd, q_step=qs, q_doc_ids=qd)
    if method == "exact":
        classes = tile_classes(qs, qd, ks, kd, block_m, block_n, visible=mask)
    else:
        classes = summary_tile_classes(qs, qd, ks, kd, block_m, block_n)
    counts = torch.bincount(classes.flatten().long(), minlength=3).tolist()
    visible = int(mask.sum())
    return TileStats(block_m=block_m, block_n=block_n, empty=counts[EMPTY], partial=counts[PARTIAL],
                     full=counts[FULL], visible_pairs=visible, dense_pairs=qs.numel() * step.shape[-1])
