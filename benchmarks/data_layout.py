"""Throughput of the PMLM example builder: C++ (``pmlm_engine._C``) against the Python reference.

Measures examples/s of masking + layout (``build_example``) at main lengths 128 and 512 with
the paper's masking defaults, for three builders:

* ``python``: :func:`pmlm_engine.layout.build_example_python` (the reference);
* ``cpp``: ``build_example(backend="cpp")``, one C++ call per example;
* ``cpp_batched``: :func:`pmlm_engine._native.build_examples`, one C++ call per batch.

Each repeat times a fixed set of examples (distinct seeds) after a warm-up; the table gives
the median and the 20th/80th percentiles of examples/s over the repeats, and the median of
the per-repeat speedups over Python (builders run round-robin within a repeat, so that load
from other processes on a shared machine hits all of them alike). Run ``python benchmarks/data_layout.py [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch  # noqa: F401  (loads libc10 before the extension)

from common import quantile
from pmlm_engine import _native
from pmlm_engine.config import MaskingConfig
from pmlm_engine.layout import Example, SpecialIds, build_example, build_example_python
from pmlm_engine.rng import derive_seed

SPECIAL = SpecialIds(cls=101, sep=102, mask=103, pad=0, random_lo=1000, random_hi=30522)
LENGTHS = (128, 512)


@dataclass(frozen=True)
class DataLayoutResult:
    """One row of the table: a builder at one main length."""

    builder: str
    main_len: int
    examples_per_repeat: int
    repeats: int
    median_examples_per_s: float
    p20_examples_per_s: float
    p80_examples_per_s: float
    median_tokens_per_s: float
    """Main-sequence tokens per second (``main_len * examples/s``)."""
    speedup_vs_python: float
    """Median over repeats of (this builder's examples/s) / (Python's, same repeat)."""


Inputs = list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]


def make_inputs(main_len: int, count: int) -> Inputs:
    """``count`` sequences ``[CLS] A [SEP] B [SEP]`` of ``main_len`` tokens with distinct seeds."""
    gen = np.random.default_rng(main_len)
    out: Inputs = []
    for i in range(count):
        tokens = gen.integers(1000, 30522, size=main_len, dtype=np.int64)
        mid = main_len // 2
        tokens[0], tokens[mid], tokens[-1] = SPECIAL.cls, SPECIAL.sep, SPECIAL.sep
        maskable = np.ones(main_len, dtype=bool)
        maskable[[0, mid, main_len - 1]] = False
        segment_ids = np.zeros(main_len, dtype=np.int64)
        segment_ids[mid + 1:] = 1
        out.append((tokens, segment_ids, maskable, derive_seed(0, 0, i)))
    return out


def _builders(cfg: MaskingConfig) -> dict[str, Callable[[Inputs], list[Example]]]:
    def python(inputs: Inputs) -> list[Example]:
        return [build_example_python(t, s, m, seed, cfg, SPECIAL) for t, s, m, seed in inputs]

    def cpp(inputs: Inputs) -> list[Example]:
        return [build_example(t, s, m, seed, cfg, SPECIAL, backend="cpp") for t, s, m, seed in inputs]

    def cpp_batched(inputs: Inputs) -> list[Example]:
        return _native.build_examples([x[0] for x in inputs], [x[1] for x in inputs], [x[2] for x in inputs],
                                      [x[3] for x in inputs], cfg, SPECIAL)

    return {"python": python, "cpp": cpp, "cpp_batched": cpp_batched}


def _time_once(fn: Callable[[Inputs], list[Example]], inputs: Inputs) -> float:
    """Examples/s of one call of ``fn`` over ``inputs`` (results kept alive, as a loader would)."""
    start = time.perf_counter()
    fn(inputs)
    return len(inputs) / (time.perf_counter() - start)


def run_data_suite(quick: bool, smoke: bool = False) -> list[dict]:
    """Benchmark the builders at main lengths 128 and 512; one dict per (builder, length).

    The builders are timed round-robin within each repeat, so that load from other processes
    on a shared machine hits them alike; ``speedup_vs_python`` is the median over repeats of
    the per-repeat ratio to the Python builder.

    Args:
        quick: fewer examples and repeats (about a second in all), for smoke runs and CI.
    Returns:
        Rows of :class:`DataLayoutResult` as dicts, Python first at each length.
    Raises:
        RuntimeError: the C++ extension is not built (the message says how to build it).
    """
    if not _native.available():
        raise RuntimeError(_native.why_unavailable())
    builders = _builders(MaskingConfig())
    repeats, warmup = (1, 0) if smoke else (5, 1) if quick else (15, 2)
    # Python is ~20-30x slower: give it fewer examples so that repeats last similar times.
    counts = {"python": 32 if quick else 128, "cpp": 256 if quick else 2048, "cpp_batched": 256 if quick else 2048}
    rows: list[dict] = []
    for main_len in LENGTHS:
        inputs = {name: make_inputs(main_len, counts[name]) for name in builders}
        rates: dict[str, list[float]] = {name: [] for name in builders}
        for r in range(warmup + repeats):
            for name, fn in builders.items():
                rate = _time_once(fn, inputs[name])
                if r >= warmup:
                    rates[name].append(rate)
        for name in builders:
            ratios = [a / b for a, b in zip(rates[name], rates["python"])]
            median = statistics.median(rates[name])
            rows.append(dataclasses.asdict(DataLayoutResult(
                builder=name, main_len=main_len, examples_per_repeat=counts[name], repeats=repeats,
                median_examples_per_s=median, p20_examples_per_s=quantile(rates[name], 0.2),
                p80_examples_per_s=quantile(rates[name], 0.8), median_tokens_per_s=median * main_len,
                speedup_vs_python=statistics.median(ratios))))
    return rows


def format_table(rows: list[dict]) -> str:
    """GitHub-style Markdown table of :func:`run_data_suite` rows."""
    lines = ["| builder | main len | examples/s (median) | p20 | p80 | main tokens/s | speedup vs python |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['builder']} | {r['main_len']} | {r['median_examples_per_s']:,.0f} | "
                     f"{r['p20_examples_per_s']:,.0f} | {r['p80_examples_per_s']:,.0f} | "
                     f"{r['median_tokens_per_s']:,.0f} | {r['speedup_vs_python']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples and repeats")
    args = parser.parse_args()
    rows = run_data_suite(args.quick)
    print(f"pmlm-engine data layout | {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} | "
          f"MaskingConfig() defaults, single thread\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
