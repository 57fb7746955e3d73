"""Structured pseudo-mask attention in plain torch: the ``torch`` attention backend (the CPU path).

The dense backends build the ``(B, Lq, Lk)`` mask of docs/attention.md and attend every query
to every key. The layout (docs/layout.md) makes most of that mask predictable: inside one
document of ``n = m + a`` tokens, the ``m`` main tokens come first and see exactly the main
tokens of their document; the ``a`` appended tokens follow and see *all* those main tokens plus
part of the appended region. Only ``appended x appended`` needs the rule. Per document:

* **no bias** (CPU): :class:`_MergedFlash`. One call of SDPA's CPU flash kernel puts all ``n``
  queries against the ``m`` main keys with no mask (its fastest case); a second puts the
  appended queries against the appended keys with the rule's ``(a, a)`` mask; the appended rows
  merge the two partial softmaxes by their log-sum-exps (one softmax over main and appended
  keys, as in split-KV attention). ``n*m + a*a`` scores instead of ``n*n``: at the
  pre-training shape (``m = 512``, ``a = 154``) 0.82x the dense scores, 5% of them masked;
* **bias that needs no gradient**, or a device without that kernel: two SDPA blocks,
  ``main x main`` unmasked and ``appended x (main + appended)`` with the ``(a, n)`` rule, each
  with its block of the bias as an additive mask;
* **bias whose table needs a gradient** (training): the same two blocks through
  :class:`_BiasedAttention`, a tiled eager attention that also returns the table's gradient
  (SDPA would send a differentiable mask to its slow math kernel over all ``L x L`` pairs).

The bias is materialised only for the blocks computed, from bucket indices computed once per
block; the ``main x main`` buckets are computed once for all rows when their main position ids
agree. The rule itself is always :func:`~pmlm_engine.attention.dense_pseudo_mask` (one home).

How a batch is handled (:func:`plan_batch`, decided once per forward from ``step`` and ``doc_ids`` by
:func:`prepare`, which also builds every block's mask, bias bucket indices and the output scatter
index; each layer's :func:`attend` then only slices and calls kernels):

* every document must be one contiguous run of its ``doc_id`` whose ``step == 0`` tokens are a
  prefix of the run. Rows may hold several documents (packing) and any padding (``doc_id < 0``)
  between or after them. Documents with the same start column and main length form a *group*,
  computed by one set of calls; the group's columns reach to its longest document's end, and
  the rule's doc check masks what lies beyond a shorter document's end;
* the *fast* case -- one group that starts at column 0 and covers every row in order, i.e.
  ``collate_padded`` with one main length -- needs no gather: q, k, v go in as they are and
  the output is the group's (plus zeros for trailing padding);
* otherwise (several groups) group outputs are put in place with one ``index_copy``;
* **dense fallback** (the rule over all ``L x L`` pairs, nothing of the structure assumed) when
  ``q_step``/``q_doc_ids`` are given (incremental decoding: few queries, dense is cheap),
  ``dropout_p > 0`` (delegated to the ``sdpa`` backend, which implements dropout), a document is
  not laid out as above, or the cost model says blocks are not cheaper (many tiny documents:
  each call costs about :data:`CALL_OVERHEAD_SCORES` score-heads). With a bias that needs a
  gradient the fallback still uses :class:`_BiasedAttention` rather than SDPA's math kernel.

Rows with no visible key (padding queries) return zeros, as in every backend. Autograd works
through every path (plain torch ops and two ``autograd.Function``s with explicit backward).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
import torch.nn.functional as F

from .attention_api import AttentionLayout
from .dense_attention import sdpa_attention
from .mask_rule import dense_pseudo_mask
from .position_bias import RelativePositionBias, relative_position_bucket

__all__ = [
    "BACKEND",
    "CALL_OVERHEAD_SCORES",
    "Group",
    "Plan",
    "Prepared",
    "attend",
    "plan_batch",
    "prepare",
]

CALL_OVERHEAD_SCORES: int = 50_000
"""Fixed cost of one block attention call (mask building, kernel launches, autograd nodes), in
units of one score of one head (one score-head costs about 6 ns forward+backward on the 2-core
reference machine; a call about 0.3 ms). Used only to choose between blocks and the dense
fallback; tests set it to 0 to force blocks at tiny shapes."""

_CHUNK_SCORES: int = 3 << 19
"""Scores per tile of :class:`_BiasedAttention` (6 MiB in fp32): big enough for efficient GEMMs,
small enough to stay in cache and below glibc's mmap threshold (no page faults per tile).
Measured (pre-training shape with bias, forward+backward, 1 thread, CPU time): 504-511 ms for
0.5M-1.5M scores per tile, 540 ms at 2M, 573 ms at 2.5M, 810 ms at 16M. The largest flat
value is taken: fewer tiles mean fewer ops, and every op is a parallel region."""


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
    """How :func:`attend` will compute a batch.

    ``kind`` is ``"fast"`` (one group at column 0 over all rows: q, k, v go in as they are),
    ``"blocks"`` (several groups, outputs put in place by index) or ``"dense"`` (the rule over
    all pairs; ``reason`` says why).
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
    bias: RelativePositionBias, rows: Union[slice, Tensor, None], q_cols: slice, k_cols: slice
) -> _BiasSpec:
    """Bucket indices of a block (rows x q_cols x k_cols), shared by rows when their positions agree."""
    k_pos = _take_rows(bias.position_ids, rows)[:, k_cols]  # (G, Lk)
    q_src = bias.position_ids if bias.q_position_ids is None else bias.q_position_ids
    q_pos = _take_rows(q_src, rows)[:, q_cols]  # (G, Lq)
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


@dataclass(frozen=True)
class _Mask:
    """A block's visibility, prepared once per forward.

    ``visible`` ``(G, Lq, Lk)`` bool with the rows that see no key opened (softmax over no key is
    NaN), or None when everything is visible; ``has_key`` ``(G, Lq, 1)`` marks the rows that keep
    their output, None when all do.
    """

    visible: Optional[Tensor]
    has_key: Optional[Tensor]


_ALL_VISIBLE = _Mask(None, None)


def _prepare_mask(visible: Tensor) -> _Mask:
    has_key = visible.any(-1, keepdim=True)  # (G, Lq, 1)
    if bool(has_key.all()):
        return _Mask(visible, None)
    return _Mask(visible | ~has_key, has_key)


def _block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: _Mask,
    bias: Optional[_BiasSpec],
    scale: float,
) -> Tensor:
    """Attention of one block.

    Args:
        q: ``(G, H, Lq, D)``; k, v: ``(G, H, Lk, D)`` (views into the batch are fine).
        mask: the block's prepared visibility.
        bias: the block's relative bias, or None.
    Returns:
        ``(G, H, Lq, D)``; query rows with no visible key are zeros.
    """
    visible = mask.visible
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
    if mask.has_key is not None:
        out = out * mask.has_key.unsqueeze(1).to(out.dtype)
    return out


def _autocast_off(backward: Callable) -> Callable:
    """Run a custom backward with autocast disabled: it manages its own dtypes (see forward)."""

    @functools.wraps(backward)
    def run(ctx, d_out: Tensor):
        with torch.autocast(d_out.device.type, enabled=False):
            return backward(ctx, d_out)

    return run


class _BiasedAttention(torch.autograd.Function):
    """Attention with a bucketed relative bias whose table gets a gradient.

    Eager math in tiles of about :data:`_CHUNK_SCORES` scores: a few heads of one row when a
    row is big, several whole rows when rows are small (fewer ops: each op is a parallel
    region). A few-MiB score tile stays in cache and malloc reuses it (a fresh 100 MB score
    tensor costs more in page faults than its GEMM). Backward recomputes the probabilities tile
    by tile (no ``(G, H, Lq, Lk)`` tensor is saved) and reduces ``dS`` into the table.

    Why not SDPA's flash kernel with the bias as a float mask, plus a table gradient computed
    on the side from its log-sum-exp? Measured on the 512 x 512 main block (1 thread, CPU time,
    all four gradients): 394 ms that way, 334 ms here; SDPA without any bias takes 275 ms.
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
        G, H, Lq, D = q.shape
        Lk = k.shape[2]
        out = torch.empty(q.shape, dtype=cdt, device=q.device)
        qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
        addends = _Addends(table, buckets, visible, cdt)
        for g0, g1, h0, h1 in _tiles(G, H, Lq, Lk):
            qt, kt, vt = (x[g0:g1, h0:h1].reshape(-1, x.shape[2], D) for x in (qc, kc, vc))  # (tile, L, D)
            s = torch.baddbmm(addends.tile(g0, g1, h0, h1), qt, kt.transpose(1, 2), alpha=scale)
            torch.bmm(torch.softmax(s, -1), vt, out=out[g0:g1, h0:h1].view(-1, Lq, D))
        result = out.to(q.dtype)
        # The returned tensor itself is saved (not an fp32 copy for half inputs): saving an
        # output costs no memory, delta = dO . O only needs it rounded.
        ctx.save_for_backward(q, k, v, table, buckets, visible, result)
        ctx.scale = scale
        return result

    @staticmethod
    @_autocast_off
    def backward(ctx, d_out: Tensor):  # type: ignore[override]
        q, k, v, table, buckets, visible, out = ctx.saved_tensors
        scale: float = ctx.scale
        need_q, need_k, need_v, need_table = ctx.needs_input_grad[:4]
        cdt = _compute_dtype(q.dtype)
        G, H, Lq, D = q.shape
        Lk = k.shape[2]
        qc, kc, vc, do, out = q.to(cdt), k.to(cdt), v.to(cdt), d_out.to(cdt), out.to(cdt)
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax backward's row term, negated so
        # that one baddbmm gives dP - delta.
        neg_delta = -(do * out).sum(-1, keepdim=True)  # (G, H, Lq, 1)
        # Contiguous whatever the inputs' strides (the model passes transposed (B, L, H, D)
        # views): every tile of a contiguous (G, H, L, D) tensor is a view, written in place.
        dq = torch.empty(q.shape, dtype=cdt, device=q.device) if need_q else None
        dk = torch.empty(k.shape, dtype=cdt, device=k.device) if need_k else None
        dv = torch.empty(v.shape, dtype=cdt, device=v.device) if need_v else None
        nb = table.shape[1]
        # Table gradient accumulated in _SPREAD sub-bins per bucket, selected by column: the
        # buckets come in long runs of one value (every distance >= 128 is one bucket), and
        # index_add_ into one accumulator is a serial chain of dependent adds; spread over 8
        # accumulators it runs about 4x faster. The sub-bins are summed at the end.
        dtable = torch.zeros(H, nb * _SPREAD, dtype=cdt, device=table.device) if need_table else None
        flat = buckets.reshape(buckets.shape[0], -1)
        lane = torch.arange(flat.shape[1], device=flat.device) % _SPREAD
        flat_buckets = flat * _SPREAD + lane  # (1 or G, Lq*Lk)
        shared_buckets = flat_buckets.shape[0] == 1
        addends = _Addends(table, buckets, visible, cdt)
        for g0, g1, h0, h1 in _tiles(G, H, Lq, Lk):
            r, c = g1 - g0, h1 - h0
            qt, kt, vt, dot = (x[g0:g1, h0:h1].reshape(-1, x.shape[2], D) for x in (qc, kc, vc, do))
            p = torch.softmax(torch.baddbmm(addends.tile(g0, g1, h0, h1), qt, kt.transpose(1, 2), alpha=scale), -1)
            if dv is not None:
                torch.bmm(p.transpose(1, 2), dot, out=dv[g0:g1, h0:h1].view(-1, Lk, D))
            nd = neg_delta[g0:g1, h0:h1].reshape(-1, Lq, 1).expand(-1, Lq, Lk)
            ds = torch.baddbmm(nd, dot, vt.transpose(1, 2)).mul_(p)  # dS = P * (dP - delta); 0 where masked
            if dtable is not None:
                per_head = ds.view(r, c, Lq * Lk)
                if r == 1:
                    dtable[h0:h1].index_add_(1, flat_buckets[0 if shared_buckets else g0], per_head[0])
                elif shared_buckets:
                    dtable.index_add_(1, flat_buckets[0], per_head.sum(0))
                else:
                    dtable.index_add_(1, flat_buckets[g0:g1].reshape(-1), per_head.transpose(0, 1).reshape(c, -1))
            if dq is not None:
                torch.bmm(ds, kt, out=dq[g0:g1, h0:h1].view(-1, Lq, D))
            if dk is not None:
                torch.bmm(ds.transpose(1, 2), qt, out=dk[g0:g1, h0:h1].view(-1, Lk, D))
        if dq is not None:
            dq = dq.mul_(scale).to(q.dtype)
        if dk is not None:
            dk = dk.mul_(scale).to(k.dtype)
        if dv is not None:
            dv = dv.to(v.dtype)
        if dtable is not None:
            dtable = dtable.view(H, nb, _SPREAD).sum(-1).to(table.dtype)
        return dq, dk, dv, dtable, None, None, None


_SPREAD = 8
"""Sub-bins per bucket for the table-gradient scatter (see :class:`_BiasedAttention`)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (softmax and its backward in half lose too much), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tiles(G: int, H: int, Lq: int, Lk: int) -> Iterator[tuple[int, int, int, int]]:
    """``(g0, g1, h0, h1)`` tiles of about :data:`_CHUNK_SCORES` scores: whole rows, several at a
    time, when a row is small; else heads ``[h0, h1)`` of one row. Either way the tile of a
    contiguous ``(G, H, L, D)`` tensor is contiguous."""
    row = H * Lq * Lk
    if row <= _CHUNK_SCORES:
        rows = max(1, _CHUNK_SCORES // max(1, row))
        for g0 in range(0, G, rows):
            yield g0, min(G, g0 + rows), 0, H
        return
    heads = max(1, _CHUNK_SCORES // max(1, Lq * Lk))
    for g in range(G):
        for h0 in range(0, H, heads):
            yield g, g + 1, h0, min(H, h0 + heads)


class _Addends:
    """``(tile, Lq, Lk)`` bias with ``-inf`` where not visible, for the tiles of :func:`_tiles`.

    Built once when every row shares it (shared buckets, no mask), else per row (a gather of
    ``H * Lq * Lk``), keeping the last row for the next head tile of the same row."""

    def __init__(self, table: Tensor, buckets: Tensor, visible: Optional[Tensor], dtype: torch.dtype):
        self.table = table.detach().to(dtype)
        self.buckets = buckets
        self.visible = visible
        self.shared: Optional[Tensor] = None
        if buckets.shape[0] == 1 and visible is None:
            self.shared = self._build(0)
        self._last: tuple[int, Optional[Tensor]] = (-1, None)

    def _build(self, g: int) -> Tensor:
        b = self.buckets[g if self.buckets.shape[0] > 1 else 0]  # (Lq, Lk)
        a = self.table.index_select(1, b.reshape(-1)).view(self.table.shape[0], *b.shape)
        if self.visible is not None:
            a.masked_fill_(~self.visible[g], float("-inf"))
        return a

    def row(self, g: int) -> Tensor:
        """``(H, Lq, Lk)`` of row ``g``."""
        if self.shared is not None:
            return self.shared
        if self._last[0] != g:
            self._last = (g, self._build(g))
        return self._last[1]  # type: ignore[return-value]

    def tile(self, g0: int, g1: int, h0: int, h1: int) -> Tensor:
        if g1 - g0 == 1:
            return self.row(g0)[h0:h1]
        if self.shared is not None:
            return self.shared[h0:h1].repeat(g1 - g0, 1, 1)
        return torch.cat([self.row(g)[h0:h1] for g in range(g0, g1)])


# ---------------------------------------------------------------------------------------------
# The backend


def _take_rows(x: Tensor, rows: Union[slice, Tensor, None]) -> Tensor:
    """Rows of a batch tensor: ``x`` itself for None (all rows), a view for a slice, else a copy."""
    if rows is None:
        return x
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _row_selector(rows: Sequence[int], num_rows: int, device: torch.device) -> Union[slice, Tensor, None]:
    """None for all rows in order (no view, no copy: a view would still cost a zero-filled copy
    in backward), a slice when the rows are consecutive, else an index tensor."""
    if list(rows) == list(range(num_rows)):
        return None
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_cpu_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _merge_supported(device: torch.device) -> bool:
    """The merge needs SDPA's CPU flash kernel with its log-sum-exp (an aten op, not public API)."""
    return _flash_cpu is not None and _flash_cpu_backward is not None and device.type == "cpu"


class _MergedFlash(torch.autograd.Function):
    """Main x main and appended x (main + appended) attention as two flash calls and a merge.

    Call 1: all ``n`` queries x the ``m`` main keys, no mask (the kernel's fastest case).
    Call 2: the ``a`` appended queries x the ``a`` appended keys, with the rule's mask.
    The appended rows combine the two partial softmaxes by their log-sum-exps, so the result is
    one softmax over main and appended keys; the work is ``n*m + a*a`` scores instead of the
    ``m*m + a*n`` of two separate blocks (same count) but with only ``a*a`` of them masked, and
    one call less of mask conversion (SDPA turns a bool mask into a float copy per call).

    Backward: a flash backward only needs each query's final output ``O`` and log-sum-exp; fed
    the merged ones, each call's backward yields exactly its keys' share of the gradient (the
    split-KV rule), and the query gradients add.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: Tensor,  # (G, H, n, D)
        k: Tensor,  # (G, H, n, D)
        v: Tensor,  # (G, H, n, D)
        num_main: int,
        app_mask: Tensor,  # (G, 1, a, a) additive, 0 / -inf, at least one 0 per row
        valid: Optional[Tensor],  # (G, 1, a, 1) bool: appended queries that keep their output
        scale: float,
    ) -> Tensor:
        m = num_main
        out, lse = _flash_cpu(q, k[:, :, :m], v[:, :, :m], 0.0, False, scale=scale)  # (G,H,n,D), (G,H,n)
        o_app, lse_app = _flash_cpu(q[:, :, m:], k[:, :, m:], v[:, :, m:], 0.0, False, attn_mask=app_mask, scale=scale)
        # Merge the appended rows: o = w_main * o_main + w_app * o_app with w_app =
        # exp(lse_app - logaddexp(lse_main, lse_app)) = sigmoid(lse_app - lse_main), which is
        # one in-place lerp on the output (lse is fp32 for every input dtype).
        lse_main = lse[:, :, m:]  # (G, H, a) view
        gap = lse_app - lse_main
        o_main = out[:, :, m:]  # (G, H, a, D) view
        o_main.lerp_(o_app, torch.sigmoid(gap).unsqueeze(-1).to(out.dtype))
        if valid is not None:
            o_main.masked_fill_(~valid, 0.0)
        lse_main.add_(F.softplus(gap))  # logaddexp(lse_main, lse_app)
        ctx.save_for_backward(q, k, v, app_mask, valid, out, lse)
        ctx.num_main, ctx.scale = m, scale
        return out

    @staticmethod
    @_autocast_off
    def backward(ctx, d_out: Tensor):  # type: ignore[override]
        q, k, v, app_mask, valid, out, lse = ctx.saved_tensors
        m, scale = ctx.num_main, ctx.scale
        d_out = d_out.contiguous()
        if valid is not None:
            # Zeroed (padding) rows are constants: no gradient flows from them.
            d_out = d_out.clone()
            d_out[:, :, m:].masked_fill_(~valid, 0.0)
        dq, dk_main, dv_main = _flash_cpu_backward(
            d_out, q, k[:, :, :m], v[:, :, :m], out, lse, 0.0, False, scale=scale)
        dq_app, dk_app, dv_app = _flash_cpu_backward(
            d_out[:, :, m:], q[:, :, m:], k[:, :, m:], v[:, :, m:], out[:, :, m:],
            lse[:, :, m:].contiguous(), 0.0, False, attn_mask=app_mask, scale=scale)
        dq[:, :, m:] += dq_app
        return dq, torch.cat([dk_main, dk_app], 2), torch.cat([dv_main, dv_app], 2), None, None, None, None


def _cols(x: Tensor, start: int, stop: int) -> Tensor:
    """Columns ``[start, stop)`` of ``(G, H, L, D)``; the tensor itself when that is all of it
    (a full-range slice would still cost a zero-filled copy in backward)."""
    return x if start == 0 and stop == x.shape[2] else x[:, :, start:stop]


@dataclass(frozen=True)
class _GroupPrep:
    """One group's share of the per-forward preparation (see :class:`Prepared`)."""

    group: Group
    rows: Union[slice, Tensor, None]  # the group's rows of the batch
    merged: bool  # main x main + appended x appended through _MergedFlash (no bias, CPU)
    app_mask: Optional[Tensor]  # merged: (G, 1, a, a) additive 0 / -inf, rows without a key opened
    valid: Optional[Tensor]  # merged: (G, 1, a, 1) appended queries that keep their output; None: all
    app_visible: _Mask  # not merged: appended queries x all the group's keys (all x all when m == 0)
    bias_main: Optional[_BiasSpec]
    bias_app: Optional[_BiasSpec]
    keep: Optional[Tensor]  # "blocks": positions of the valid query rows in the (G * n) flattening


@dataclass(frozen=True)
class Prepared:
    """What :data:`BACKEND` derives from a layout once per forward and every layer reuses: the
    block plan, each block's mask and bias bucket indices, and the scatter index of the output."""

    plan: Plan
    groups: tuple[_GroupPrep, ...] = ()
    scatter_index: Optional[Tensor] = None  # "blocks": flat (B * L) destination of every kept row
    dense_visible: Optional[Tensor] = None  # "dense": the rule over all pairs, (B, Lq, Lk)
    dense_mask: _Mask = _ALL_VISIBLE
    dense_bias: Optional[_BiasSpec] = None


def _prepare_dense(layout: AttentionLayout, plan: Plan) -> Prepared:
    qs, qd, ks, kd = layout.resolved
    visible = dense_pseudo_mask(ks, kd, q_step=qs, q_doc_ids=qd)  # (B, Lq, Lk)
    spec = None
    if layout.bias is not None:
        buckets = layout.bias.buckets()  # (B, Lq, Lk)
        if buckets.shape[0] > 1 and bool((buckets == buckets[:1]).all()):
            buckets = buckets[:1]
        spec = _BiasSpec(layout.bias.table, buckets)
    return Prepared(plan, dense_visible=visible, dense_mask=_prepare_mask(visible), dense_bias=spec)


def _prepare_group(layout: AttentionLayout, grp: Group, merge_ok: bool) -> _GroupPrep:
    B, L = layout.step.shape
    rows = _row_selector(grp.rows, B, layout.step.device)
    s, m, a = grp.start, grp.num_main, grp.max_appended
    e = s + m + a
    # The columns may reach past a shorter document's end (into padding or the next document):
    # the rule's doc check masks those keys and the assembly drops those queries.
    step = _take_rows(layout.step, rows)[:, s:e]  # (G, m + a)
    doc = None if layout.doc_ids is None else _take_rows(layout.doc_ids, rows)[:, s:e]
    bias = layout.bias
    bias_main = bias_app = None
    if bias is not None:
        bias_main = _bias_spec(bias, rows, slice(s, s + m), slice(s, s + m)) if m > 0 else None
        bias_app = _bias_spec(bias, rows, slice(s + m, e), slice(s, e)) if a > 0 else None

    def app_rule(key_start: int) -> Tensor:
        """The rule for the appended queries x keys ``[key_start, n)``: ``(G, a, n - key_start)``."""
        return dense_pseudo_mask(step[:, key_start:], None if doc is None else doc[:, key_start:],
                                 q_step=step[:, m:], q_doc_ids=None if doc is None else doc[:, m:])

    merged = m > 0 and a > 0 and bias is None and merge_ok
    app_mask = valid = None
    app_visible = _ALL_VISIBLE
    if merged:
        app_vis = app_rule(m)  # (G, a, a)
        has_key = app_vis.any(-1, keepdim=True)  # (G, a, 1); False only for padding queries
        zero = torch.zeros((), dtype=layout.dtype, device=step.device)
        # Rows without a visible key are opened (all 0): the flash kernel then stays finite, and
        # those rows are zeroed after the merge.
        app_mask = torch.where(app_vis | ~has_key, zero, float("-inf")).unsqueeze(1)  # (G, 1, a, a)
        valid = None if bool(has_key.all()) else has_key.unsqueeze(1)  # (G, 1, a, 1)
    elif a > 0:
        app_visible = _prepare_mask(app_rule(0))  # (G, a, n), or (G, n, n) when m == 0
    return _GroupPrep(grp, rows, merged, app_mask, valid, app_visible, bias_main, bias_app, keep=None)


def prepare(layout: AttentionLayout) -> Prepared:
    """The per-forward work of the ``torch`` backend (see :class:`Prepared`)."""
    plan = plan_batch(layout.step, layout.doc_ids, q_step=layout.q_step, q_doc_ids=layout.q_doc_ids,
                      dropout_p=layout.dropout_p, num_heads=layout.num_heads)
    if plan.kind == "dense":
        return _prepare_dense(layout, plan)
    merge_ok = _merge_supported(layout.step.device)
    groups = tuple(_prepare_group(layout, grp, merge_ok) for grp in plan.groups)
    if plan.kind == "fast":
        return Prepared(plan, groups)
    # Several groups: the valid query rows of every group go to their (row, column) of the output.
    B, L = layout.step.shape
    dev = layout.step.device
    kept, dest = [], []
    for gp in groups:
        grp = gp.group
        rows_t = torch.tensor(grp.rows, device=dev)
        n = grp.num_main + grp.max_appended
        j = torch.arange(n, device=dev)
        keep = j < grp.num_main + torch.tensor(grp.num_appended, device=dev)[:, None]  # (G, n)
        sel = keep.flatten().nonzero().squeeze(1)  # positions in the (G * n) flattening
        dest.append((rows_t[:, None] * L + grp.start + j).flatten()[sel])
        kept.append(dataclasses.replace(gp, keep=sel))
    return Prepared(plan, tuple(kept), scatter_index=torch.cat(dest))


def _group_attention(q: Tensor, k: Tensor, v: Tensor, gp: _GroupPrep, scale: float) -> Tensor:
    """Attention of one group's documents: q, k, v ``(G, H, n, D)``, the group's columns
    (``n = num_main + max_appended``). Returns ``(G, H, n, D)``; padding query rows are zeros."""
    m = gp.group.num_main
    n = q.shape[2]
    if m == n:  # only main tokens: no mask
        return _block_attention(q, k, v, _ALL_VISIBLE, gp.bias_main, scale)
    if m == 0:  # only appended tokens
        return _block_attention(q, k, v, gp.app_visible, gp.bias_app, scale)
    if gp.merged:
        # Appended queries see every main key of their document: all n queries go through one
        # unmasked call against the main keys, and only appended x appended needs the rule.
        app_mask = gp.app_mask if gp.app_mask.dtype == q.dtype else gp.app_mask.to(q.dtype)
        return _MergedFlash.apply(q, k, v, m, app_mask, gp.valid, scale)
    main = _block_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], _ALL_VISIBLE, gp.bias_main, scale)
    app = _block_attention(q[:, :, m:], k, v, gp.app_visible, gp.bias_app, scale)
    return torch.cat([main, app], dim=2)


def attend(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, scale: float) -> Tensor:
    """Pseudo-mask attention that computes only the layout's non-empty blocks (backend ``torch``).

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)`` (checked by the dispatcher).
        layout: prepared by :func:`prepare`.
    Returns:
        ``(B, H, Lq, D)`` contiguous, equal (up to rounding) to the dense reference.
    """
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast, run in the autocast dtype as SDPA would, with autocast off inside:
        # the custom autograd functions below pick their own compute dtype and write into
        # preallocated outputs, which autocast's per-op casts would contradict.
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return attend(q.to(dt), k.to(dt), v.to(dt), layout, scale)
    prepared: Prepared = layout.prepared  # type: ignore[assignment]
    plan = prepared.plan
    if plan.kind == "dense":
        if layout.dropout_p > 0:
            bias = None
            if prepared.dense_bias is not None:
                bias = prepared.dense_bias.table[:, prepared.dense_bias.buckets].permute(1, 0, 2, 3)
            return sdpa_attention(q, k, v, prepared.dense_visible, bias, scale, layout.dropout_p)
        return _block_attention(q, k, v, prepared.dense_mask, prepared.dense_bias, scale)

    B, H, L, D = q.shape
    outs: list[Tensor] = []
    for gp in prepared.groups:
        grp = gp.group
        s, e = grp.start, grp.start + grp.num_main + grp.max_appended
        qd, kd, vd = (_cols(_take_rows(x, gp.rows), s, e) for x in (q, k, v))  # (G, H, m + a, D)
        outs.append(_group_attention(qd, kd, vd, gp, scale))

    if plan.kind == "fast":
        # One document per row starting at column 0: whatever follows a row's document in the
        # appended slice is padding, whose query rows _group_attention zeroed.
        grp, out = plan.groups[0], outs[0]
        tail = L - grp.num_main - grp.max_appended
        return torch.cat([out, out.new_zeros(B, H, tail, D)], dim=2) if tail > 0 else out.contiguous()

    # Several groups: scatter the valid query rows of every group into a zero (B*L, H, D) output.
    values = [out.transpose(1, 2).reshape(-1, H, D).index_select(0, gp.keep) for gp, out in zip(prepared.groups, outs)]
    flat = q.new_zeros(B * L, H, D).index_copy(0, prepared.scatter_index, torch.cat(values))
    return flat.view(B, L, H, D).transpose(1, 2).contiguous()


class StructuredBackend:
    """The ``torch`` backend: :func:`prepare` once per forward, :func:`attend` per layer."""

    name = "torch"

    def unavailable(self) -> Optional[str]:
        return None

    def prepare(self, layout: AttentionLayout) -> Prepared:
        return prepare(layout)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, scale: float) -> Tensor:
        return attend(q, k, v, layout, scale)


BACKEND = StructuredBackend()
