"""Structured pseudo-mask attention in plain torch: the ``backend="torch"`` of
:func:`pmlm_engine.attention.pseudo_mask_attention` (the CPU path).

The dense backends build the ``(B, Lq, Lk)`` mask of PMLM.md section 3 and attend every query
to every key. The layout (PMLM.md section 2) makes most of that mask predictable: inside one
document, the ``m`` main tokens come first and see exactly the main tokens of their document;
the ``a`` appended tokens follow and see the main tokens plus part of the appended region.
So one document of ``n = m + a`` tokens is two blocks:

* **main block**: queries ``[s, s+m)`` x keys ``[s, s+m)``, *no mask at all* (SDPA's fastest
  CPU kernel), ``m^2`` scores instead of ``m * n``;
* **appended block**: queries ``[s+m, s+n)`` x keys ``[s, s+n)``, one softmax over main and
  appended keys jointly, with the small ``(a, n)`` mask stated by
  :func:`~pmlm_engine.attention.dense_pseudo_mask` itself (so the rule has one home).

For the pre-training shape (``m = 512``, ``a = 154``) that is 0.82x the scores of the dense
``666 x 666`` problem, and the big block runs unmasked.

How a batch is handled (:func:`plan_batch`, decided per call from ``step`` and ``doc_ids``):

* every document must be one contiguous run of its ``doc_id`` whose ``step == 0`` tokens are a
  prefix of the run. Rows may hold several documents (packing) and any padding (``doc_id < 0``)
  between or after them. Documents with the same start and main length form a *group*: one
  attention call per group and block, the appended block padded to the group's longest ``a``
  (the rule masks what lies beyond a document's end);
* the *fast* case -- one group that starts at 0 and covers every row in order, the output of
  ``collate_padded`` with a fixed main length -- needs no gather: blocks are slices of q, k, v
  and the output is one ``cat``;
* otherwise (several groups) block outputs are put in place with one ``index_copy``;
* **dense fallback** (the mask over all ``L x L`` pairs, nothing of the structure assumed) when:
  ``q_step``/``q_doc_ids`` are given (incremental decoding: the queries are a few tokens, dense
  is cheap), ``dropout_p > 0`` (delegated to the ``sdpa`` backend, which implements dropout), a
  document is not laid out as above, or the cost model says the blocks are not cheaper (many
  tiny documents: each call costs about :data:`CALL_OVERHEAD_SCORES` score-heads).

The relative position bias is materialised only for the blocks computed (``main x main`` and
``appended x (main + appended)``), from bucket indices computed once per block; the
``main x main`` buckets are computed once for all rows when the rows' main position ids agree.
When the bias table needs a gradient, SDPA cannot give one without falling back to its slow
math kernel, so the block runs :class:`_BiasedAttention`: a chunked eager attention (a few heads
at a time, so the score chunks stay in cache and malloc does not page-fault fresh 100 MB tensors)
that recomputes probabilities in backward and reduces ``dS`` into the ``(H, num_buckets)`` table
gradient with ``index_add_``.

Rows with no visible key (padding queries) return zeros, as in every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
import torch.nn.functional as F

from .attention import (
    RelativePositionBias,
    _sdpa,
    dense_pseudo_mask,
    register_backend,
    relative_position_bucket,
)

__all__ = [
    "CALL_OVERHEAD_SCORES",
    "Group",
    "Plan",
    "plan_batch",
    "structured_attention",
]

CALL_OVERHEAD_SCORES: int = 50_000
"""Fixed cost of one block attention call (mask building, kernel launch, autograd nodes), in
units of one score of one head (about 6 ns forward+backward on the 2-core reference machine;
a call costs about 0.3 ms). Used only to decide between blocks and the dense fallback."""

_CHUNK_SCORES: int = 1 << 20
"""Scores per chunk of :class:`_BiasedAttention` (4 MiB in fp32): big enough for efficient GEMMs,
small enough to stay in cache and below glibc's mmap threshold (no page faults per chunk)."""


# ---------------------------------------------------------------------------------------------
# Planning: find the block structure of a batch


@dataclass(frozen=True)
class Group:
    """Documents that start at the same column and have the same number of main tokens.

    ``rows[i]`` holds one such document: main tokens ``[start, start + num_main)``, appended
    tokens ``[start + num_main, start + num_main + num_appended[i])``.
    """

    start: int
    num_main: int
    rows: tuple[int, ...]
    num_appended: tuple[int, ...]

    @property
    def max_appended(self) -> int:
        return max(self.num_appended)


@dataclass(frozen=True)
class Plan:
    """How :func:`structured_attention` will compute a batch.

    ``kind`` is ``"fast"`` (one group at column 0 over all rows: slices and one cat),
    ``"blocks"`` (several groups, outputs put in place by index) or ``"dense"`` (the dense mask;
    ``reason`` says why).
    """

    kind: str
    groups: tuple[Group, ...] = ()
    reason: str = ""


def _dense(reason: str) -> Plan:
    return Plan("dense", (), reason)


def plan_batch(
    step: Tensor,
    doc_ids: Optional[Tensor] = None,
    *,
    q_step: Optional[Tensor] = None,
    q_doc_ids: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    num_heads: int = 1,
    call_overhead: Optional[int] = None,
) -> Plan:
    """Detect the layout's block structure.

    Args:
        step: ``(B, L)`` signed step of every token.
        doc_ids: ``(B, L)`` document of every token, negative for padding; None: one document
            per row, no padding.
        q_step, q_doc_ids: the dispatch's decoding arguments; any of them forces ``"dense"``.
        dropout_p: forces ``"dense"`` when positive (the ``sdpa`` backend implements dropout).
        num_heads: heads, to weigh the per-call overhead against the scores saved.
        call_overhead: override of :data:`CALL_OVERHEAD_SCORES` (None: use the module's).
    Returns:
        A :class:`Plan`. Every check is on small ``(B, L)`` integer tensors plus a Python loop
        over documents.
    """
    if q_step is not None or q_doc_ids is not None:
        return _dense("q_step/q_doc_ids given (decoding): queries are not the keys")
    if dropout_p > 0:
        return _dense("dropout_p > 0: delegated to the sdpa backend")
    B, L = step.shape
    if B == 0 or L == 0:
        return _dense("empty batch")
    device = step.device
    doc = torch.zeros_like(step) if doc_ids is None else doc_ids
    # Runs of equal doc id per row: a run starts at column 0 or where the doc id changes.
    new_run = torch.ones(B, L, dtype=torch.bool, device=device)
    new_run[:, 1:] = doc[:, 1:] != doc[:, :-1]
    starts = new_run.flatten().nonzero().squeeze(1)  # flat start index of every run, row-major
    # A run ends where the next one starts; a row's last run ends at the next row's column 0,
    # which is also the next run's flat start, so one shift gives every end.
    ends = torch.cat([starts[1:], starts.new_tensor([B * L])])
    run_doc = doc.flatten()[starts]
    # Main tokens of a run must be its prefix: count them with a cumulative sum, then check
    # that the first `count` tokens of the run hold all of them.
    is_main = (step == 0).flatten().long()
    csum = torch.cat([is_main.new_zeros(1), is_main.cumsum(0)])
    n_main = csum[ends] - csum[starts]
    prefix_ok = (csum[starts + n_main] - csum[starts]) == n_main
    real = run_doc >= 0
    if not bool(prefix_ok[real].all()):
        return _dense("a document's main tokens (step == 0) are not a prefix of its run")
    rows = torch.div(starts, L, rounding_mode="floor")
    # A document must be one run: (row, doc) pairs of real runs must be distinct.
    pairs = torch.stack([rows[real], run_doc[real]], 1)
    if pairs.shape[0] != torch.unique(pairs, dim=0).shape[0]:
        return _dense("a document is split into several runs")
    table = torch.stack([rows, starts - rows * L, n_main, ends - starts], 1)[real].tolist()
    if not table:
        # All padding: the dense path returns zeros that are still connected to q, k, v.
        return _dense("no document in the batch")

    by_key: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for row, start, m, n in table:
        by_key.setdefault((start, m), []).append((row, n - m))
    groups = tuple(
        Group(start, m, tuple(r for r, _ in members), tuple(a for _, a in members))
        for (start, m), members in sorted(by_key.items())
    )
    scores = sum(len(g.rows) * (g.num_main ** 2 + g.max_appended * (g.num_main + g.max_appended))
                 for g in groups)
    calls = sum((g.num_main > 0) + (g.max_appended > 0) for g in groups)
    overhead = CALL_OVERHEAD_SCORES if call_overhead is None else call_overhead
    if num_heads * scores + overhead * calls >= num_heads * B * L * L:
        return _dense(f"blocks not cheaper: {calls} calls, {scores} scores/head vs {B * L * L} dense")
    if len(groups) == 1 and groups[0].start == 0 and groups[0].rows == tuple(range(B)):
        return Plan("fast", groups)
    return Plan("blocks", groups)


# ---------------------------------------------------------------------------------------------
# One block: attention with an optional small mask and an optional relative bias


@dataclass(frozen=True)
class _BiasSpec:
    """The bias of one block: ``table[h, buckets[g, i, j]]``; ``buckets`` is ``(1 or G, Lq, Lk)``."""

    table: Tensor  # (H, num_buckets)
    buckets: Tensor  # (1 or G, Lq, Lk) int64


def _bias_spec(
    bias: RelativePositionBias, rows: Union[slice, Tensor], q_cols: slice, k_cols: slice
) -> _BiasSpec:
    """Bucket indices of a block (rows x q_cols x k_cols), shared by rows when their positions agree."""
    k_pos = bias.position_ids[rows, k_cols]  # (G, Lk)
    q_src = bias.position_ids if bias.q_position_ids is None else bias.q_position_ids
    q_pos = q_src[rows, q_cols]  # (G, Lq)
    if k_pos.shape[0] > 1 and bool((k_pos == k_pos[:1]).all()) and bool((q_pos == q_pos[:1]).all()):
        # Same positions in every row (e.g. main tokens at 0..m-1): one set of buckets.
        k_pos, q_pos = k_pos[:1], q_pos[:1]
    rel = k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)  # (1 or G, Lq, Lk)
    return _BiasSpec(bias.table, relative_position_bucket(rel, bias.num_buckets, bias.max_distance))


def _gather_bias(table: Tensor, buckets: Tensor, dtype: torch.dtype) -> Tensor:
    """``(Gb, H, Lq, Lk)`` contiguous bias from ``(H, NB)`` table and ``(Gb, Lq, Lk)`` buckets."""
    gb, lq, lk = buckets.shape
    h = table.shape[0]
    flat = table.to(dtype).index_select(1, buckets.reshape(-1))  # (H, Gb*Lq*Lk)
    return flat.view(h, gb, lq, lk).transpose(0, 1).contiguous()


def _block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    visible: Optional[Tensor],
    bias: Optional[_BiasSpec],
    scale: float,
) -> Tensor:
    """Attention of one block.

    Args:
        q: ``(G, H, Lq, D)``; k, v: ``(G, H, Lk, D)`` (views into the batch are fine).
        visible: ``(G, Lq, Lk)`` bool, True where a query may attend a key; None: all visible.
        bias: the block's relative bias, or None.
    Returns:
        ``(G, H, Lq, D)``; query rows with no visible key are zeros.
    """
    has_key: Optional[Tensor] = None
    if visible is not None:
        has_key = visible.any(-1, keepdim=True)  # (G, Lq, 1)
        if bool(has_key.all()):
            has_key = None
        else:
            # Softmax over no key is NaN: open those rows, then zero their output below.
            visible = visible | ~has_key
    if bias is not None and torch.is_grad_enabled() and bias.table.requires_grad:
        # SDPA gives no gradient to an additive mask except through its slow math kernel.
        out = _BiasedAttention.apply(q, k, v, bias.table, bias.buckets, visible, scale)
    else:
        if bias is None:
            attn_mask = None if visible is None else visible.unsqueeze(1)  # (G, 1, Lq, Lk)
        else:
            attn_mask = _gather_bias(bias.table.detach(), bias.buckets, q.dtype)  # (1 or G, H, Lq, Lk)
            if visible is not None:
                # Out of place: shared (1, H, Lq, Lk) buckets broadcast against a per-row mask.
                attn_mask = attn_mask.masked_fill(~visible.unsqueeze(1), float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if has_key is not None:
        out = out * has_key.unsqueeze(1).to(out.dtype)
    return out


class _BiasedAttention(torch.autograd.Function):
    """Attention with a bucketed relative bias whose table gets a gradient.

    Eager math, but chunked over (row, a few heads) so that each ``(c, Lq, Lk)`` score chunk is
    about 4 MiB: it stays in cache and malloc reuses it (a fresh 100 MB score tensor costs more
    in page faults than its GEMM). Backward recomputes the probabilities chunk by chunk (no
    ``(G, H, Lq, Lk)`` tensor is saved) and reduces ``dS`` into the table with ``index_add_``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: Tensor,  # (G, H, Lq, D)
        k: Tensor,  # (G, H, Lk, D)
        v: Tensor,  # (G, H, Lk, D)
        table: Tensor,  # (H, NB)
        buckets: Tensor,  # (1 or G, Lq, Lk) int64
        visible: Optional[Tensor],  # (G, Lq, Lk) bool, every row with a True; None: all visible
        scale: float,
    ) -> Tensor:
        cdt = _compute_dtype(q.dtype)
        G, H, Lq, _ = q.shape
        out = torch.empty(q.shape, dtype=cdt, device=q.device)
        qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
        chunk = _head_chunk(H, Lq, k.shape[2])
        addends = _Addends(table, buckets, visible, cdt)
        for g in range(G):
            addend = addends[g]  # (H, Lq, Lk): bias, -inf where not visible
            for h0 in range(0, H, chunk):
                hs = slice(h0, h0 + chunk)
                s = torch.baddbmm(addend[hs], qc[g, hs], kc[g, hs].transpose(1, 2), alpha=scale)
                torch.bmm(torch.softmax(s, -1), vc[g, hs], out=out[g, hs])
        result = out.to(q.dtype)
        # The returned tensor itself is saved (not an fp32 copy for half inputs): saving an
        # output costs no memory, delta = dO . O only needs it rounded.
        ctx.save_for_backward(q, k, v, table, buckets, visible, result)
        ctx.scale = scale
        return result

    @staticmethod
    def backward(ctx, d_out: Tensor):  # type: ignore[override]
        q, k, v, table, buckets, visible, out = ctx.saved_tensors
        scale: float = ctx.scale
        need_q, need_k, need_v, need_table = ctx.needs_input_grad[:4]
        cdt = _compute_dtype(q.dtype)
        G, H, Lq, _ = q.shape
        qc, kc, vc, do, out = q.to(cdt), k.to(cdt), v.to(cdt), d_out.to(cdt), out.to(cdt)
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax backward's row term.
        delta = (do * out).sum(-1, keepdim=True)  # (G, H, Lq, 1)
        dq = torch.empty_like(qc) if need_q else None
        dk = torch.empty_like(kc) if need_k else None
        dv = torch.empty_like(vc) if need_v else None
        dtable = torch.zeros(table.shape, dtype=cdt, device=table.device) if need_table else None
        flat_buckets = buckets.reshape(buckets.shape[0], -1)
        chunk = _head_chunk(H, Lq, k.shape[2])
        addends = _Addends(table, buckets, visible, cdt)
        for g in range(G):
            addend = addends[g]
            bucket_row = flat_buckets[g if flat_buckets.shape[0] > 1 else 0]
            for h0 in range(0, H, chunk):
                hs = slice(h0, h0 + chunk)
                p = torch.softmax(torch.baddbmm(addend[hs], qc[g, hs], kc[g, hs].transpose(1, 2), alpha=scale), -1)
                if dv is not None:
                    torch.bmm(p.transpose(1, 2), do[g, hs], out=dv[g, hs])
                ds = torch.bmm(do[g, hs], vc[g, hs].transpose(1, 2))  # dP, then in place dS
                ds.sub_(delta[g, hs]).mul_(p)  # dS = P * (dP - delta); 0 where masked (P = 0)
                if dtable is not None:
                    dtable[hs].index_add_(1, bucket_row, ds.view(ds.shape[0], -1))
                if dq is not None:
                    torch.bmm(ds, kc[g, hs], out=dq[g, hs])
                if dk is not None:
                    torch.bmm(ds.transpose(1, 2), qc[g, hs], out=dk[g, hs])
        if dq is not None:
            dq = dq.mul_(scale).to(q.dtype)
        if dk is not None:
            dk = dk.mul_(scale).to(k.dtype)
        if dv is not None:
            dv = dv.to(v.dtype)
        if dtable is not None:
            dtable = dtable.to(table.dtype)
        return dq, dk, dv, dtable, None, None, None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (softmax and its backward in half lose too much), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _head_chunk(num_heads: int, lq: int, lk: int) -> int:
    return max(1, min(num_heads, _CHUNK_SCORES // max(1, lq * lk)))


class _Addends:
    """Per row, ``(H, Lq, Lk)`` bias with ``-inf`` where not visible; built once when every row
    shares it (shared buckets, no mask), else per row (a gather of ``H * Lq * Lk``)."""

    def __init__(self, table: Tensor, buckets: Tensor, visible: Optional[Tensor], dtype: torch.dtype):
        self.table = table.detach().to(dtype)
        self.buckets = buckets
        self.visible = visible
        self.shared: Optional[Tensor] = None
        if buckets.shape[0] == 1 and visible is None:
            self.shared = self._build(0)

    def _build(self, g: int) -> Tensor:
        b = self.buckets[g if self.buckets.shape[0] > 1 else 0]  # (Lq, Lk)
        a = self.table.index_select(1, b.reshape(-1)).view(self.table.shape[0], *b.shape)
        if self.visible is not None:
            a.masked_fill_(~self.visible[g], float("-inf"))
        return a

    def __getitem__(self, g: int) -> Tensor:
        return self.shared if self.shared is not None else self._build(g)


# ---------------------------------------------------------------------------------------------
# The backend


def _take_rows(x: Tensor, rows: Union[slice, Tensor]) -> Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _row_selector(rows: Sequence[int], device: torch.device) -> Union[slice, Tensor]:
    """A slice (a view, no copy) when the rows are consecutive, else an index tensor."""
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def _dense_fallback(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    step: Tensor,
    doc_ids: Optional[Tensor],
    bias: Optional[RelativePositionBias],
    scale: float,
    dropout_p: float,
    q_step: Optional[Tensor],
    q_doc_ids: Optional[Tensor],
) -> Tensor:
    """The full mask, nothing of the structure assumed; the bias still avoids SDPA's math kernel."""
    visible = dense_pseudo_mask(step, doc_ids, q_step=q_step, q_doc_ids=q_doc_ids)  # (B, Lq, Lk)
    if dropout_p > 0:
        return _sdpa(q, k, v, visible, bias, scale, dropout_p)
    spec = None
    if bias is not None:
        buckets = bias.buckets()  # (B, Lq, Lk)
        if buckets.shape[0] > 1 and bool((buckets == buckets[:1]).all()):
            buckets = buckets[:1]
        spec = _BiasSpec(bias.table, buckets)
    return _block_attention(q, k, v, visible, spec, scale)


def structured_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    step: Tensor,
    doc_ids: Optional[Tensor],
    bias: Optional[RelativePositionBias],
    scale: float,
    dropout_p: float,
    q_step: Optional[Tensor],
    q_doc_ids: Optional[Tensor],
) -> Tensor:
    """Pseudo-mask attention that computes only the layout's non-empty blocks (backend ``torch``).

    Args (as :func:`pmlm_engine.attention.pseudo_mask_attention`, already validated there):
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``.
        step: ``(B, Lk)``; doc_ids: ``(B, Lk)`` or None.
        bias: relative position bias or None; scale: softmax scale; dropout_p: attention dropout.
        q_step, q_doc_ids: ``(B, Lq)`` decoding metadata or None.
    Returns:
        ``(B, H, Lq, D)`` contiguous, equal (up to rounding) to the dense reference.
    """
    B, H, L, D = q.shape
    plan = plan_batch(step, doc_ids, q_step=q_step, q_doc_ids=q_doc_ids, dropout_p=dropout_p, num_heads=H)
    if plan.kind == "dense":
        return _dense_fallback(q, k, v, step, doc_ids, bias, scale, dropout_p, q_step, q_doc_ids)

    mains: list[tuple[Group, Tensor]] = []
    apps: list[tuple[Group, Tensor]] = []
    for grp in plan.groups:
        rows = _row_selector(grp.rows, q.device)
        qg, kg, vg = _take_rows(q, rows), _take_rows(k, rows), _take_rows(v, rows)  # (G, H, L, D)
        s, m, a = grp.start, grp.num_main, grp.max_appended
        if m > 0:
            main = slice(s, s + m)
            spec = None if bias is None else _bias_spec(bias, rows, main, main)
            # Main queries see exactly the main tokens of their document: no mask.
            mains.append((grp, _block_attention(qg[:, :, main], kg[:, :, main], vg[:, :, main], None, spec, scale)))
        if a > 0:
            # Appended queries against main + appended keys in one softmax. The slice may reach
            # past a shorter document's end (into padding or the next document): the rule's doc
            # check masks those keys and the assembly below drops those queries.
            qs, ks = slice(s + m, s + m + a), slice(s, s + m + a)
            st = _take_rows(step, rows)
            dc = None if doc_ids is None else _take_rows(doc_ids, rows)
            visible = dense_pseudo_mask(
                st[:, ks], None if dc is None else dc[:, ks],
                q_step=st[:, qs], q_doc_ids=None if dc is None else dc[:, qs])  # (G, a, m + a)
            spec = None if bias is None else _bias_spec(bias, rows, qs, ks)
            apps.append((grp, _block_attention(qg[:, :, qs], kg[:, :, ks], vg[:, :, ks], visible, spec, scale)))

    if plan.kind == "fast":
        # One document per row starting at column 0: whatever follows a row's document in the
        # appended slice is padding, whose query rows _block_attention already zeroed.
        grp = plan.groups[0]
        parts = [out for _, out in mains] + [out for _, out in apps]
        tail = L - grp.num_main - grp.max_appended
        if tail > 0:
            parts.append(q.new_zeros(B, H, tail, D))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].contiguous()

    # Several groups: scatter the valid query rows of every block into a zero (B*L, H, D) output.
    values: list[Tensor] = []
    index: list[Tensor] = []
    dev = q.device
    for grp, out in mains:
        rows_t = torch.tensor(grp.rows, device=dev)
        cols = torch.arange(grp.start, grp.start + grp.num_main, device=dev)
        index.append((rows_t[:, None] * L + cols).flatten())
        values.append(out.transpose(1, 2).reshape(-1, H, D))
    for grp, out in apps:
        rows_t = torch.tensor(grp.rows, device=dev)
        a_max = grp.max_appended
        j = torch.arange(a_max, device=dev)
        keep = j < torch.tensor(grp.num_appended, device=dev)[:, None]  # (G, a_max)
        sel = keep.flatten().nonzero().squeeze(1)  # positions in the (G * a_max) flattening
        cols = grp.start + grp.num_main + j
        index.append((rows_t[:, None] * L + cols).flatten()[sel])
        values.append(out.transpose(1, 2).reshape(-1, H, D).index_select(0, sel))
    flat = q.new_zeros(B * L, H, D).index_copy(0, torch.cat(index), torch.cat(values))
    return flat.view(B, L, H, D).transpose(1, 2).contiguous()


register_backend("torch", structured_attention)
