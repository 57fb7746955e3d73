"""Measurement helpers shared by every benchmark suite: timing, environment header, tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds over ``repeats`` runs after ``warmup`` discarded runs."""

    median: float
    p20: float
    p80: float
    repeats: int
    cpu_median: float = 0.0
    """Median CPU seconds of this process per run (``time.process_time``): on a shared, oversubscribed
    machine it leaves out the time spent waiting for a core, which wall time counts; with one torch
    thread it is the run's time on an idle core (up to cache and memory-bandwidth contention)."""

    def ms(self) -> dict[str, float]:
        return {"median_ms": self.median * 1e3, "p20_ms": self.p20 * 1e3, "p80_ms": self.p80 * 1e3}


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``xs``, linearly interpolated."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 2, repeats: int = 7) -> dict[str, Timing]:
    """Time several implementations round-robin, so that load drifts hit them all alike:
    the ratios between them are what this machine can measure reliably."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: Timing(statistics.median(v), quantile(v, 0.2), quantile(v, 0.8), repeats, statistics.median(cpu[k]))
            for k, v in times.items()}


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensor memory allocated while ``fn()`` runs, above what was live when it started.

    On a GPU: ``torch.cuda.max_memory_allocated``. On the CPU there is no allocator statistic, so
    this replays the allocation and free events of torch's CPU allocator recorded by
    ``torch.profiler`` (``profile_memory=True``) and takes the maximum of their running sum.
    That counts exactly the tensors (the quantity that decides whether a batch fits, and the
    same one the CUDA figure counts), not the process's resident set: ``ru_maxrss`` only ever
    grows, includes the interpreter and libraries (several hundred MB shared by every variant)
    and pages malloc keeps after a free, so it would need a fresh process per variant and
    would still blur the ratios. The profiler slows ``fn``: call this outside timed runs.
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, live)
    return peak


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Machine and versions, printed above every report."""
    import torch

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0],
    }
    for mod in ("triton", "deepspeed"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a broken optional import is reported, not fatal
            env[mod] = f"unavailable ({type(exc).__name__})"
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git"] = "unknown"
    return env


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """GitHub-style table; floats get 3 significant decimals."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["Timing", "quantile", "measure_interleaved", "peak_memory", "environment", "markdown_table"]
