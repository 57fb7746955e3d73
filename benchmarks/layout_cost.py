"""What building the attention layout once per forward saves, per layer.

Before, every layer of every forward validated the metadata, resolved the backend and redid the
backend's layout work; now :func:`pmlm_engine.attention.build_layout` does it once per forward
and each layer only attends. So the saving per layer is the layout's preparation cost (for all
layers but the first), measured here next to the cost of one layer's attention (forward and
backward through q, k, v and the bias table):

* ``torch``, ``sdpa`` (the CPU paths): wall-clock medians of ``build_layout`` and of one layer's
  attention, round-robin over repeats, 1-minute load average recorded;
* ``triton``: a GPU path, so no time is claimed. Instead the pre-pass is counted as torch ops
  (kernel launches on a GPU) and bytes read + written by them (captured with a dispatch mode on
  the CPU, the same ops a GPU would run): before, 3 summary classifications (forward, dK/dV,
  dQ) plus the metadata conversions per layer; now one exact classification per forward.

    python benchmarks/layout_cost.py            # pre-training shape and packed rows
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attention_cpu import engine_layouts, synthetic_layout
from pmlm_engine.attention import RelativePositionBias, attend, build_layout
from pmlm_engine.mask_rule import resolve_layout

H, D, NUM_LAYERS, NUM_BUCKETS = 12, 64, 12, 32


class _OpCounter(TorchDispatchMode):
    """Counts aten ops and the bytes of their tensor inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def _count(fn: Callable[[], Any]) -> tuple[int, int]:
    with _OpCounter() as c:
        fn()
    return c.ops, c.bytes


def _load1() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _time(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median ms of each function, run round-robin so that load falls on all alike."""
    series: dict[str, list[float]] = {k: [] for k in fns}
    for name, fn in fns.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            series[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in series.items()}


def _cases(smoke: bool) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
    """name -> (step, doc_ids, position_ids)."""
    if smoke:
        step, pos = synthetic_layout(24, 0.15, rows=2)
        packed = engine_layouts(num_examples=4, lengths=(16, 32), row_len=128)["packed"]
    else:
        step, pos = synthetic_layout(512, 0.15, rows=8)
        packed = engine_layouts()["packed"]
    pstep, pdoc = packed
    ppos = torch.zeros_like(pstep)
    for r in range(pstep.shape[0]):  # positions restart in every document of a packed row
        for d in pdoc[r].unique().tolist():
            cols = (pdoc[r] == d).nonzero().squeeze(1)
            ppos[r, cols] = torch.arange(len(cols)) if d >= 0 else 0
    return {f"padded B={step.shape[0]} L={step.shape[1]}": (step, None, pos),
            f"packed B={pstep.shape[0]} L={pstep.shape[1]}": (pstep, pdoc, ppos)}


def _triton_prepass_model(step: torch.Tensor, doc: Optional[torch.Tensor]) -> dict[str, Any]:
    """Ops and bytes of the Triton kernel's pre-pass per training step: before (per layer, summary
    classifier, 3 passes) and now (once per forward, exact classifier)."""
    from pmlm_engine.kernels import pseudo_mask_attention as pma
    from pmlm_engine.kernels.tile_stats import summary_tile_classes, tile_lists

    cfg = pma.default_config(D, torch.bfloat16)
    table = torch.randn(H, NUM_BUCKETS)
    pos = torch.zeros_like(step)
    bias = RelativePositionBias(table, pos)

    def before_one_layer() -> None:
        qs, qd, ks, kd = resolve_layout(step, doc, None, None)
        metas = [t.to(torch.int32).contiguous() for t in (ks, kd, qs, qd, pos)]
        for bq, bk, key_major in ((cfg.block_m, cfg.block_n, False), (cfg.block_m1, cfg.block_n1, True),
                                  (cfg.block_m2, cfg.block_n2, False)):
            classes = summary_tile_classes(metas[2], metas[3], metas[0], metas[1], bq, bk)
            tile_lists(classes.transpose(1, 2) if key_major else classes)

    def now_once() -> None:
        pma.make_plan(step, doc, bias, cfg, num_heads=H)

    ops_b, bytes_b = _count(before_one_layer)
    ops_n, bytes_n = _count(now_once)
    return {"prepass_ops_per_step_before": ops_b * NUM_LAYERS, "prepass_ops_per_step_now": ops_n,
            "prepass_mb_per_step_before": bytes_b * NUM_LAYERS / 2**20, "prepass_mb_per_step_now": bytes_n / 2**20}


def run_layout_suite(quick: bool = True, *, smoke: bool = False) -> list[dict]:
    """One row per (layout, backend): the per-forward layout cost (the saving per layer) against one
    layer's attention, and for ``triton`` the pre-pass op/byte model per training step."""
    repeats = 1 if smoke else 5 if quick else 10
    heads, dim = (2, 16) if smoke else (H, D)
    rows = []
    for name, (step, doc, pos) in _cases(smoke).items():
        B, L = step.shape
        table = torch.randn(heads, NUM_BUCKETS, requires_grad=True)
        bias = RelativePositionBias(table, pos)
        q, k, v = (torch.randn(B, heads, L, dim, requires_grad=True) for _ in range(3))
        for backend in ("torch", "sdpa"):
            layout = build_layout(step, doc, bias, backend, num_heads=heads, head_dim=dim, dtype=torch.float32)

            def prepare(backend: str = backend) -> None:
                build_layout(step, doc, bias, backend, num_heads=heads, head_dim=dim, dtype=torch.float32)

            def layer(layout=layout) -> None:  # noqa: ANN001
                attend(q, k, v, layout).sum().backward()

            load = _load1()
            ms = _time({"prepare": prepare, "layer": layer}, repeats)
            rows.append({"layout": name, "backend": backend, "heads": heads, "head_dim": dim,
                         "threads": torch.get_num_threads(), "load1": load,
                         "layout_ms": ms["prepare"], "attention_layer_fwdbwd_ms": ms["layer"],
                         "saved_per_layer_ms": ms["prepare"],
                         "saved_share_of_layer": ms["prepare"] / (ms["prepare"] + ms["layer"])})
        rows.append({"layout": name, "backend": "triton (model)", "heads": H, "head_dim": D,
                     **_triton_prepass_model(step, doc)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as set)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    for row in run_layout_suite(smoke=args.smoke):
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})


if __name__ == "__main__":
    main()
