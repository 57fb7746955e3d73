"""pmlm-engine throughput report: every implementation side by side, in one run.

    python benchmarks/run.py --quick                 # all CPU-side suites, < 10 minutes here
    python benchmarks/run.py --suites attention step # chosen suites, full size

Suites (each a ``run_*_suite(quick) -> list[dict]`` in this folder, or in ``kernels/``):

* ``attention``: structured CPU path vs SDPA with a dense mask vs an eager s2s-ft-style
  implementation vs compiled FlexAttention (forward only on CPU), and the Triton kernel
  where a GPU exists; with the fraction of tiles the kernel computes;
* ``tiles``: share of tiles the Triton kernel computes on real packed / padded layouts: the
  earlier summary classifier, the exact one it uses, and FlexAttention's ``create_block_mask``;
* ``layout``: what building the attention layout once per forward saves per layer (measured on
  the CPU paths; an op / byte model of the Triton pre-pass);
* ``step``: one-pass PMLM training step vs an MLM-only step vs naive multi-pass PAR;
* ``decode``: KV-cached decoding vs s2s-ft-style re-projection, greedy and beam 5;
* ``data``: C++ vs Python layout builder, examples/s, against what the trainer consumes;
* ``aot``: registers, spills and shared memory of the Triton kernels for sm_80 / sm_90
  (ahead-of-time compile in a subprocess: it cannot run under the Triton interpreter).

Outputs in ``--out`` (default ``runs/bench/<UTC timestamp>``): ``report.md`` (the tables
printed on stdout, under a header with machine, versions, git revision and date),
``results.jsonl`` (every figure, one row a line, with its suite) and PNG plots.
Timings are medians with p20/p80 over repeats after warm-up; ratios are measured side by
side in the same run, since absolute times on a shared machine drift.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import environment, markdown_table

HERE = Path(__file__).resolve().parent

# suite -> (module, function); modules live beside this file
SUITES: dict[str, tuple[str, str]] = {
    "attention": ("attention_cpu", "run_attention_suite"),
    "tiles": ("attention_cpu", "run_tile_suite"),
    "layout": ("layout_cost", "run_layout_suite"),
    "step": ("train_step", "run_step_suite"),
    "decode": ("decode", "run_decode_suite"),
    "data": ("data_layout", "run_data_suite"),
    "aot": ("aot", "run_aot_suite"),
}


# Columns printed per suite (results.jsonl keeps every key).
COLUMNS: dict[str, list[str]] = {
    "attention": ["impl", "main", "appended", "ratio", "bias", "fwd_ms", "fwd_p20", "fwd_p80", "fwdbwd_ms",
                  "fwdbwd_p20", "fwdbwd_p80", "speedup_fwdbwd_vs_sdpa", "gflops_dense_equiv",
                  "kernel_tile_fraction", "visible_fraction", "note"],
    "tiles": ["layout", "rows", "L", "block", "summary_fraction", "exact_fraction", "flex_fraction",
              "summary_full_share", "exact_full_share", "visible_fraction"],
    "layout": ["layout", "backend", "threads", "load1", "layout_ms", "attention_layer_fwdbwd_ms",
               "saved_share_of_layer", "prepass_ops_per_step_before", "prepass_ops_per_step_now",
               "prepass_mb_per_step_before", "prepass_mb_per_step_now"],
    "step": ["preset", "dtype", "attention", "ranks", "variant", "batch", "max_len", "passes", "step_median_ms",
             "step_p20_ms", "step_p80_ms", "tokens_per_s", "vs_mlm", "naive_over_this"],
    "decode": ["size", "search", "batch", "scheme", "total_s", "encode_s", "decode_s", "tokens_per_s", "e2e_tokens_per_s",
               "decode_speedup", "e2e_speedup", "same_tokens"],
    "data": ["builder", "main_len", "median_examples_per_s", "p20_examples_per_s", "p80_examples_per_s",
             "median_tokens_per_s", "speedup_vs_python"],
    "aot": ["kernel", "target", "dtype", "head_dim", "block_m", "block_n", "num_warps", "num_stages", "registers",
            "spill_stores", "spill_loads", "stack", "shared"],
}


def load_suite(name: str) -> Callable[..., list[dict]]:
    module, fn = SUITES[name]
    return getattr(importlib.import_module(module), fn)


def _columns(suite: str, rows: list[dict[str, Any]]) -> list[str]:
    present = {k for r in rows for k in r}
    return [c for c in COLUMNS.get(suite, []) if c in present] or list(dict.fromkeys(k for r in rows for k in r))


def plot(suite: str, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Time vs sequence length per implementation (attention); throughput per configuration (others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if suite == "attention":
        for metric in ("fwd_ms", "fwdbwd_ms"):
            series: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                if r.get(metric) is None:
                    continue
                key = f"{r['impl']}, ratio {r['ratio']}, {'bias' if r['bias'] else 'no bias'}"
                series.setdefault(key, []).append((r["L"], r[metric]))
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for key, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            ax.set_xlabel("tokens per row (main + appended)")
            ax.set_ylabel(f"{'forward' if metric == 'fwd_ms' else 'forward + backward'} time, median (ms)")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.set_title("pseudo-mask attention on the CPU")
            fig.tight_layout()
            path = out / f"attention_{metric.removesuffix('_ms')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    else:
        key = next((k for k in ("tokens_per_s", "median_tokens_per_s", "median_examples_per_s") if rows and k in rows[0]), None)
        if key is None:
            return written
        labels = [" ".join(str(v) for k, v in r.items() if isinstance(v, str) and k != "suite") for r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
        ax.barh(range(len(rows)), [r.get(key) or 0 for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel(key.replace("_", " "))
        ax.set_title(suite)
        fig.tight_layout()
        path = out / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES), help="suites to run (default all)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (all suites < 10 min on 2 cores)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and one repeat: checks that every suite runs and writes its outputs (CI)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/<timestamp>)")
    args = p.parse_args(argv)

    out = Path(args.out or f"runs/bench/{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    header = ["# pmlm-engine benchmark report", "", markdown_table([env]), "",
              f"mode: {'smoke' if args.smoke else 'quick' if args.quick else 'full'}; suites: {', '.join(args.suites)}", ""]
    print("\n".join(header), flush=True)
    report, failed = list(header), []
    with open(out / "results.jsonl", "w") as jsonl:
        jsonl.write(json.dumps({"suite": "environment", **env}) + "\n")
        trainer_rate = None
        for name in args.suites:
            t0 = time.perf_counter()
            try:
                rows = load_suite(name)(args.quick, smoke=args.smoke)
            except Exception as exc:  # noqa: BLE001 - one broken suite must not hide the others' figures
                failed.append(name)
                msg = f"## {name}\n\nFAILED: {type(exc).__name__}: {exc}\n"
                print(msg, flush=True)
                report.append(msg)
                continue
            for r in rows:
                jsonl.write(json.dumps({"suite": name, **r}) + "\n")
            section = [f"## {name} ({time.perf_counter() - t0:.0f} s)", "", markdown_table(rows, _columns(name, rows)), ""]
            if name == "step":
                trainer_rate = max((r.get("examples_per_s") or 0 for r in rows), default=None)
            if name == "data" and trainer_rate:
                best = max(r.get("median_examples_per_s", 0) for r in rows)
                section.append(f"Fastest builder: {best:,.0f} examples/s; the fastest trainer configuration above "
                               f"consumes {trainer_rate:,.1f} examples/s ({best / trainer_rate:,.0f}x headroom).\n")
            for png in plot(name, rows, out):
                section.append(f"plot: {png}")
            print("\n".join(section), flush=True)
            report.extend(section)
    (out / "report.md").write_text("\n".join(report) + "\n")
    print(f"\nwrote {out / 'report.md'}, {out / 'results.jsonl'} and plots")
    if failed:
        print(f"suites failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
