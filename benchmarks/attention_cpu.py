"""Pseudo-mask attention on the CPU: structured ``torch`` backend against dense baselines.

Implementations timed (forward, and forward+backward through q, k, v and the bias table):

* ``torch``: :mod:`pmlm_engine.structured_attention` (main block unmasked, appended block small);
* ``sdpa``: the ``sdpa`` backend, SDPA with a dense ``(B, L, L)`` bool mask (with the bias: a
  dense ``(B, H, L, L)`` float mask, which sends SDPA to its math kernel when the table needs a
  gradient);
* ``eager``: the s2s-ft way: a materialised ``(B, L, L)`` additive float mask (-10000) and
  ``(B, H, L, L)`` bias, then matmul, softmax, matmul;
* ``flex``: compiled FlexAttention with a ``mask_mod`` stating the pseudo-mask rule (and a
  ``score_mod`` adding the bias). Forward only: torch has no FlexAttention backward on the
  CPU; the attempt is made and its error recorded in ``note``. Compiling takes seconds, so
  quick mode runs it at one shape only.

Layouts are synthetic: every row has ``main`` main tokens and exactly ``2 * ceil(ratio * main)``
appended tokens (spans of the paper's length distribution, cut to the budget, random order),
so all rows share one shape as in pre-training with a fixed main length.

Timing: the implementations of one shape are run round-robin within every repeat, so load from
other processes on a shared machine falls on all of them alike; the median and the 20th/80th
percentiles are reported with the 1-minute load average read before the run.

    python benchmarks/attention_cpu.py           # quick: the pre-training shape, and M=128
    python benchmarks/attention_cpu.py --full    # all shapes
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from common import quantile
from pmlm_engine.attention import RelativePositionBias, bucket_lut, dense_pseudo_mask, pseudo_mask_attention

B, H, D = 8, 12, 64
NUM_BUCKETS, MAX_DISTANCE = 32, 128


@dataclass(frozen=True)
class Shape:
    main: int
    ratio: float
    bias: bool

    @property
    def appended(self) -> int:
        return 2 * math.ceil(self.ratio * self.main)

    @property
    def length(self) -> int:
        return self.main + self.appended

    def label(self) -> str:
        return f"M={self.main} A={self.appended} L={self.length} r={self.ratio} bias={'on' if self.bias else 'off'}"


def synthetic_layout(main: int, ratio: float, rows: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(step, position_ids)``, each ``(rows, main + 2 * ceil(ratio * main))``.

    Spans: length 1, or 2..6 with probability 0.4 (docs/layout.md), non-overlapping, inside
    ``[1, main - 1)`` (``[CLS]``/``[SEP]`` excluded), the last one cut so exactly
    ``ceil(ratio * main)`` tokens are masked; steps in a random order.
    """
    g = torch.Generator().manual_seed(seed)
    budget = math.ceil(ratio * main)
    steps, positions = [], []
    for _ in range(rows):
        taken = torch.zeros(main, dtype=torch.bool)
        spans: list[tuple[int, int]] = []
        count = 0
        while count < budget:
            length = 1
            if torch.rand(1, generator=g).item() < 0.4:
                length = int(torch.randint(2, 7, (1,), generator=g))
            length = min(length, budget - count)
            start = int(torch.randint(1, main - 1, (1,), generator=g))
            end = start + length
            if end > main - 1 or taken[start:end].any():
                continue
            taken[start:end] = True
            spans.append((start, end))
            count += length
        order = torch.randperm(len(spans), generator=g).tolist()
        st, pos = [torch.zeros(main, dtype=torch.long)], [torch.arange(main)]
        for s, idx in enumerate(order, start=1):
            a, b = spans[idx]
            st += [torch.full((b - a,), s), torch.full((b - a,), -s)]
            pos += [torch.arange(a, b), torch.arange(a, b)]
        steps.append(torch.cat(st))
        positions.append(torch.cat(pos))
    return torch.stack(steps), torch.stack(positions)


# ---------------------------------------------------------------------------------------------
# Implementations: each takes (q, k, v, table) and returns the (B, H, L, D) output


def _eager_s2sft(step: Tensor, pos: Tensor, with_bias: bool) -> Callable[..., Tensor]:
    """s2s-ft style: additive (B, 1, L, L) mask of -10000 and a (B, H, L, L) bias, all materialised."""
    def run(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> Tensor:
        visible = dense_pseudo_mask(step)  # (B, L, L)
        add_mask = (1.0 - visible.to(q.dtype)).unsqueeze(1) * -10000.0  # (B, 1, L, L)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        if with_bias:
            scores = scores + RelativePositionBias(table, pos).dense()  # (B, H, L, L)
        probs = torch.softmax(scores + add_mask, dim=-1)
        return torch.matmul(probs, v)
    return run


def _backend(name: str, step: Tensor, pos: Tensor, with_bias: bool) -> Callable[..., Tensor]:
    def run(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> Tensor:
        bias = RelativePositionBias(table, pos) if with_bias else None
        return pseudo_mask_attention(q, k, v, step, None, bias, backend=name)
    return run


def _flex(step: Tensor, pos: Tensor, with_bias: bool, table: Tensor) -> Callable[..., Tensor]:
    """Compiled FlexAttention; the block mask and the score_mod are built once per shape (a new
    score_mod object per call would make dynamo recompile). Forward only: on the CPU
    FlexAttention raises for inputs that require grad, which is what the backward attempt
    records; forward timings use detached inputs."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lut = torch.tensor(bucket_lut(NUM_BUCKETS, MAX_DISTANCE))
    bias_table = table.detach()  # shares storage with the benchmark's table

    def pseudo_mask(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's mask_mod signature
        wq, wk = step[b, q_idx], step[b, kv_idx]
        ctx = wk >= 0
        return torch.where(wq >= 0, ctx & (wk <= wq), (ctx & (wk < -wq)) | (wk == wq))

    def relative_bias(score, b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's score_mod signature
        rel = pos[b, kv_idx] - pos[b, q_idx]
        bucket = lut[rel.abs().clamp(max=MAX_DISTANCE)] + (rel > 0).to(torch.int64) * (NUM_BUCKETS // 2)
        return score + bias_table[h, bucket]

    L = step.shape[1]
    block_mask = create_block_mask(pseudo_mask, B=step.shape[0], H=None, Q_LEN=L, KV_LEN=L, device="cpu")
    compiled = torch.compile(flex_attention)
    score_mod = relative_bias if with_bias else None

    def run(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            q, k, v = q.detach(), k.detach(), v.detach()
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return run


# ---------------------------------------------------------------------------------------------
# Timing


def _first_line(e: BaseException, limit: int = 70) -> str:
    return (str(e).splitlines() or [""])[0][:limit].replace("|", "/")


def _load1() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _time_shape(shape: Shape, impls: list[str], warmup: int, repeats: int, seed: int = 0) -> list[dict]:
    step, pos = synthetic_layout(shape.main, shape.ratio, B, seed)
    L = shape.length
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    table = (torch.randn(H, NUM_BUCKETS, generator=g) * 0.5)
    leaves = [x.requires_grad_() for x in (q, k, v, table)]
    wrt = leaves if shape.bias else leaves[:3]
    builders = {
        "torch": lambda: _backend("torch", step, pos, shape.bias),
        "sdpa": lambda: _backend("sdpa", step, pos, shape.bias),
        "eager": lambda: _eager_s2sft(step, pos, shape.bias),
        "flex": lambda: _flex(step, pos, shape.bias, table),
    }
    fns: dict[str, Callable[..., Tensor]] = {}
    notes: dict[str, str] = {}
    can_bwd: dict[str, bool] = {}
    for name in impls:
        try:
            fns[name] = builders[name]()
            with torch.no_grad():
                fns[name](*leaves)  # compiles where needed
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            notes[name] = f"failed: {type(e).__name__}: {_first_line(e)}"
            fns.pop(name, None)
            continue
        try:
            torch.autograd.grad(fns[name](*leaves), wrt, grad)
            can_bwd[name] = True
        except (NotImplementedError, RuntimeError) as e:  # FlexAttention: no backward on the CPU
            can_bwd[name] = False
            notes[name] = f"forward only, backward raises {type(e).__name__}: {_first_line(e)}"

    series: dict[str, dict[str, list[float]]] = {
        key: {n: [] for n in fns} for key in ("fwd", "fwdbwd", "fwd_cpu", "fwdbwd_cpu")}
    load = _load1()
    for r in range(warmup + repeats):
        for name, fn in fns.items():  # round-robin: shared-machine load hits every impl alike
            with torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                fn(*leaves)
                t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                series["fwd"][name].append((t1 - t0) * 1e3)
                series["fwd_cpu"][name].append((c1 - c0) * 1e3)
            if can_bwd[name]:
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn(*leaves)
                torch.autograd.grad(out, wrt, grad)
                t1, c1 = time.perf_counter(), time.process_time()
                if r >= warmup:
                    series["fwdbwd"][name].append((t1 - t0) * 1e3)
                    series["fwdbwd_cpu"][name].append((c1 - c0) * 1e3)

    rows = []
    for name in impls:
        row = {
            "impl": name, "shape": shape.label(), "B": B, "H": H, "D": D,
            "main": shape.main, "appended": shape.appended, "L": L, "ratio": shape.ratio,
            "bias": shape.bias, "threads": torch.get_num_threads(), "load1": load,
            "fwd_ms": None, "fwd_p20": None, "fwd_p80": None,
            "fwdbwd_ms": None, "fwdbwd_p20": None, "fwdbwd_p80": None,
            "fwd_cpu_ms": None, "fwdbwd_cpu_ms": None,
            "speedup_fwd_vs_sdpa": None, "speedup_fwdbwd_vs_sdpa": None,
            "speedup_fwdbwd_cpu_vs_sdpa": None,
            "note": notes.get(name, ""),
        }
        for key in ("fwd", "fwdbwd"):
            xs = series[key].get(name) or []
            if xs:
                row[f"{key}_ms"] = statistics.median(xs)
                row[f"{key}_p20"] = quantile(xs, 0.2)
                row[f"{key}_p80"] = quantile(xs, 0.8)
            cpu = series[f"{key}_cpu"].get(name) or []
            if cpu:
                row[f"{key}_cpu_ms"] = statistics.median(cpu)
        rows.append(row)
    # FLOP model: matmul FLOPs of the dense computation, the share of 64 x 64 tiles the Triton
    # kernel computes on this layout, and the share of pairs the mask lets through.
    from pmlm_engine.kernels.tile_stats import tile_stats

    tiles = tile_stats(step, None, 64, 64)
    dense_fwd = 4.0 * B * H * L * L * D  # QK^T and PV, 2 FLOPs per multiply-add
    dense_fwdbwd = 3.5 * dense_fwd  # backward: 5 matmuls of the same size (recomputed QK^T, dV, dP, dQ, dK)
    for row in rows:
        row["dense_gflop_fwdbwd"] = dense_fwdbwd / 1e9
        row["kernel_tile_fraction"] = tiles.computed_fraction
        row["visible_fraction"] = tiles.visible_fraction
        row["gflops_dense_equiv"] = dense_fwdbwd / row["fwdbwd_ms"] / 1e6 if row["fwdbwd_ms"] else None
    base = next((r for r in rows if r["impl"] == "sdpa"), None)
    for row in rows:
        for key in ("fwd", "fwdbwd", "fwdbwd_cpu"):
            if base and base[f"{key}_ms"] and row[f"{key}_ms"]:
                row[f"speedup_{key}_vs_sdpa"] = base[f"{key}_ms"] / row[f"{key}_ms"]
    return rows


def run_attention_suite(quick: bool, *, threads: Optional[int] = None, smoke: bool = False) -> list[dict]:
    """Time every implementation on every shape; one dict per (implementation, shape).

    Quick: the pre-training shape (M=512, ratio 0.15, A=154) with and without bias, plus M=128
    without bias; FlexAttention only at the first shape. Full: M in 128/256/512, ratio in
    0.15/0.3, bias off/on, FlexAttention everywhere.

    ``threads``: torch's intra-op threads for the run (None: leave as is), restored afterwards.

    Keys: impl, shape (label), B, H, D, main, appended, L, ratio, bias, threads, load1 (1-minute
    load average before the shape ran), fwd_ms / fwd_p20 / fwd_p80, fwdbwd_ms / fwdbwd_p20 /
    fwdbwd_p80 (wall clock; None where not measured), fwd_cpu_ms / fwdbwd_cpu_ms (median process
    CPU time, all threads: with one thread it is the work done, nearly independent of other
    processes' load, which wall time is not on a shared machine), speedup_fwd_vs_sdpa,
    speedup_fwdbwd_vs_sdpa, speedup_fwdbwd_cpu_vs_sdpa (sdpa's median divided by this row's:
    above 1 is faster), note.
    """
    if smoke:  # tiny shapes, one repeat: that the suite runs and reports, not how fast (CI)
        shapes = [Shape(24, 0.15, True), Shape(40, 0.3, False)]
        warmup, repeats = 0, 1
    elif quick:
        shapes = [Shape(512, 0.15, False), Shape(512, 0.15, True), Shape(128, 0.15, False)]
        warmup, repeats = 2, 5
    else:
        shapes = [Shape(m, r, b) for b in (False, True) for r in (0.15, 0.3) for m in (128, 256, 512)]
        warmup, repeats = 1, 5
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[dict] = []
    try:
        for i, shape in enumerate(shapes):
            impls = ["torch", "sdpa", "eager"]
            if not smoke and (not quick or i == 0):
                impls.append("flex")
            rows += _time_shape(shape, impls, warmup, repeats)
    finally:
        torch.set_num_threads(saved_threads)
    return rows


def engine_layouts(num_examples: int = 24, lengths: tuple[int, int] = (64, 256), row_len: int = 1024,
                   seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"packed": (step, doc_ids), "padded": (step, doc_ids)}`` of real pre-training layouts:
    ``num_examples`` main sequences of ``lengths`` tokens (uniform) masked by the engine's own
    builder (default :class:`MaskingConfig`), packed first-fit into rows of ``row_len`` tokens,
    and the same examples one per row, padded."""
    import numpy as np

    from pmlm_engine.config import MaskingConfig
    from pmlm_engine.data import chunk_document
    from pmlm_engine.layout import SpecialIds, build_example_python, collate_packed, collate_padded

    special = SpecialIds(cls=1, sep=2, mask=3, pad=0, random_lo=5, random_hi=1000)
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(num_examples):
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        (seq,) = list(chunk_document(rng.integers(5, 1000, n - 3), n, special, seed + i))
        examples.append(build_example_python(seq.tokens, seq.segment_ids, seq.maskable, seed + i, MaskingConfig(),
                                             special))
    packed = collate_packed(examples, special.pad, row_len)
    padded = collate_padded(examples, special.pad, pad_to_multiple=128)
    return {"packed": (packed["step"], packed["doc_ids"]), "padded": (padded["step"], padded["doc_ids"])}


def _flex_fraction(step: Tensor, doc: Tensor, block_m: int, block_n: int) -> float:
    """Share of tiles FlexAttention's ``create_block_mask`` keeps (partial + full) for the rule."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's mask_mod signature
        wq, wk = step[b, q_idx], step[b, kv_idx]
        ctx = wk >= 0
        visible = torch.where(wq >= 0, ctx & (wk <= wq), (ctx & (wk < -wq)) | (wk == wq))
        return visible & (doc[b, q_idx] == doc[b, kv_idx]) & (doc[b, kv_idx] >= 0)

    B, L = step.shape
    bm = create_block_mask(rule, B=B, H=None, Q_LEN=L, KV_LEN=L, device="cpu", BLOCK_SIZE=(block_m, block_n))
    kept = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0)
    return kept / (B * -(-L // block_m) * -(-L // block_n))


def run_tile_suite(quick: bool = True, *, smoke: bool = False) -> list[dict]:
    """Share of (query tile, key tile) pairs the Triton kernel computes on real layouts, per tile size:
    ``summary`` (the earlier conservative classifier), ``exact`` (what the kernel uses now: a tile is
    computed iff it has a visible pair), ``flex`` (FlexAttention's ``create_block_mask`` on the same
    rule), and the visible share of pairs (an element-sparse ideal). Counts, not timings."""
    from pmlm_engine.kernels.tile_stats import tile_stats

    layouts = engine_layouts(num_examples=6 if smoke else 24)
    rows = []
    for name, (step, doc) in layouts.items():
        for bm, bn in ((64, 64), (128, 64), (128, 128)):
            summary = tile_stats(step, doc, bm, bn, method="summary")
            exact = tile_stats(step, doc, bm, bn)
            rows.append({"layout": name, "rows": step.shape[0], "L": step.shape[1], "block": f"{bm}x{bn}",
                         "summary_fraction": summary.computed_fraction, "exact_fraction": exact.computed_fraction,
                         "flex_fraction": _flex_fraction(step, doc, bm, bn),
                         "exact_full_share": exact.full / max(1, exact.partial + exact.full),
                         "summary_full_share": summary.full / max(1, summary.partial + summary.full),
                         "visible_fraction": exact.visible_fraction})
    return rows


def format_table(rows: list[dict]) -> str:
    """GitHub-style table of :func:`run_attention_suite` rows."""
    def ms(row: dict, key: str) -> str:
        if row[f"{key}_ms"] is None:
            return "-"
        return f"{row[f'{key}_ms']:.1f} ({row[f'{key}_p20']:.1f}-{row[f'{key}_p80']:.1f})"

    def x(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = ["| shape | impl | threads | fwd ms (p20-p80) | fwd+bwd ms (p20-p80) | fwd vs sdpa | fwd+bwd vs sdpa "
             "| fwd+bwd CPU ms | CPU vs sdpa | load | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        load = "-" if r["load1"] is None else f"{r['load1']:.2f}"
        cpu = "-" if r["fwdbwd_cpu_ms"] is None else f"{r['fwdbwd_cpu_ms']:.1f}"
        lines.append(f"| {r['shape']} | {r['impl']} | {r['threads']} | {ms(r, 'fwd')} | {ms(r, 'fwdbwd')} | "
                     f"{x(r['speedup_fwd_vs_sdpa'])} | {x(r['speedup_fwdbwd_vs_sdpa'])} | {cpu} | "
                     f"{x(r['speedup_fwdbwd_cpu_vs_sdpa'])} | {load} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="all shapes (minutes) instead of the quick set")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as set)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, B={B} H={H} D={D} fp32; "
          f"load average before: {_load1()}")
    print(format_table(run_attention_suite(quick=not args.full, threads=args.threads)))
    print(f"load average after: {_load1()}")


if __name__ == "__main__":
    main()
