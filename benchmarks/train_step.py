"""Training-step throughput: the one-pass PMLM step against an MLM-only step and naive multi-pass PAR.

Three ways to train on the same examples (same model, same optimizer, forward + backward +
AdamW step each):

* ``pmlm``: the engine's step: one pass over main + appended tokens, AE and PAR losses
  (:class:`pmlm_engine.engine.PMLMTrainStep`);
* ``mlm``: the main parts only (no appended tokens), AE loss only: a plain masked LM on the
  same masks. The cost PMLM adds over it is the price of the PAR objective;
* ``naive``: what PMLM avoids: an MLM pass for AE plus one pass per factorization step ``s``
  (main + the ORIGINAL tokens of steps < s + the ``[P]`` tokens of step s, the same attention
  rule), batched across examples by step, every pass re-encoding the main part. Its losses
  equal the one-pass ones (tests/test_single_pass.py proves the per-token equality).

Throughput is main-sequence (text) tokens per second: the same text for the three, so the
ratios of tokens/s are the inverse ratios of step times. Timings are medians (p20/p80) over
repeats after warm-up, interleaved round-robin so load drift on this shared machine hits all
variants alike. Configurations: tiny and base presets, fp32 and bf16 autocast, 1 rank and
(full mode only) 2 DeepSpeed ranks launched with ``torchrun`` (same global batch, one thread
each). Random text of ``max_len`` tokens with the paper's masking (15%, spans up to 6).

    python benchmarks/train_step.py [--quick] [--jsonl FILE]

Targets: PMLM step <= 1.4x the MLM-only step; >= 2x faster than naive multi-pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run.py imports this module from its own folder; keep `common` importable
    sys.path.insert(0, str(HERE))

from common import environment, markdown_table, measure_interleaved, peak_memory  # noqa: E402

from pmlm_engine.config import MaskingConfig, ModelConfig  # noqa: E402
from pmlm_engine.engine import PMLMTrainStep, target_counts  # noqa: E402
from pmlm_engine.layout import IGNORE, Example, SpecialIds, build_example, collate_padded  # noqa: E402
from pmlm_engine.losses import pmlm_loss  # noqa: E402
from pmlm_engine.model import LMHead, PMLMModel  # noqa: E402
from pmlm_engine.optim import OptimConfig, build_optimizer  # noqa: E402
from pmlm_engine.rng import derive_seed  # noqa: E402

SPECIAL = SpecialIds(cls=101, sep=102, mask=103, pad=0, random_lo=1000, random_hi=30522)
VARIANTS = ("pmlm", "mlm", "naive")


@dataclass(frozen=True)
class StepCase:
    """One configuration of the table."""

    preset: str
    dtype: str
    batch: int
    max_len: int
    ranks: int = 1
    attention: str = "sdpa"
    """Attention backend of every variant (``sdpa``: dense mask; ``torch``: the structured CPU path)."""


def make_examples(batch: int, max_len: int, seed: int = 0) -> list[Example]:
    """``batch`` PMLM examples over random ``[CLS] A [SEP] B [SEP]`` text of ``max_len`` tokens."""
    gen = np.random.default_rng(seed)
    out = []
    for i in range(batch):
        tokens = gen.integers(SPECIAL.random_lo, SPECIAL.random_hi, size=max_len, dtype=np.int64)
        mid = max_len // 2
        tokens[[0, mid, max_len - 1]] = SPECIAL.cls, SPECIAL.sep, SPECIAL.sep
        maskable = np.ones(max_len, dtype=bool)
        maskable[[0, mid, max_len - 1]] = False
        segments = (np.arange(max_len) > mid).astype(np.int64)
        out.append(build_example(tokens, segments, maskable, derive_seed(seed, i), MaskingConfig(), SPECIAL))
    return out


def _subset(ex: Example, keep: np.ndarray, labels: np.ndarray) -> Example:
    return Example(input_ids=ex.input_ids[keep], position_ids=ex.position_ids[keep],
                   segment_ids=ex.segment_ids[keep], step=ex.step[keep], labels=labels[keep],
                   num_main=ex.num_main)


def mlm_examples(examples: Sequence[Example]) -> list[Example]:
    """The main parts with their AE labels: a plain masked-LM batch on the same masks."""
    return [_subset(ex, ex.step == 0, ex.labels) for ex in examples]


def naive_batches(examples: Sequence[Example]) -> list[dict[str, torch.Tensor]]:
    """An MLM batch (AE) and, per factorization step s, a batch of main + ORIGINAL(< s) + PSEUDO(s) (PAR)."""
    batches = [collate_padded(mlm_examples(examples), SPECIAL.pad, pad_to_multiple=8)]
    steps = max(int(ex.step.max()) for ex in examples)
    for s in range(1, steps + 1):
        part = []
        for ex in examples:
            if ex.step.max() < s:
                continue
            keep = (ex.step == 0) | ((ex.step > 0) & (ex.step < s)) | (ex.step == -s)
            labels = np.where(ex.step == -s, ex.labels, IGNORE)
            part.append(_subset(ex, keep, labels))
        batches.append(collate_padded(part, SPECIAL.pad, pad_to_multiple=8))
    return batches


def _main_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(((batch["step"] == 0) & (batch["doc_ids"] >= 0)).sum())


def step_functions(case: StepCase, seed: int = 0) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The three training steps of ``case`` on one model and optimizer, and facts about their batches."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(case.preset, vocab_size=SPECIAL.random_hi, hidden_dropout=0.0,
                             attention_backend=case.attention)
    model = PMLMModel(cfg)
    module = PMLMTrainStep(model).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-5, warmup_steps=0))
    examples = make_examples(case.batch, case.max_len, seed)
    pmlm = collate_padded(examples, SPECIAL.pad, pad_to_multiple=8)
    mlm = collate_padded(mlm_examples(examples), SPECIAL.pad, pad_to_multiple=8)
    naive = naive_batches(examples)
    n_ae, n_par = target_counts(pmlm)
    dtype = torch.bfloat16 if case.dtype == "bf16" else None

    def run(batches: Sequence[dict[str, torch.Tensor]], with_par: bool) -> None:
        for b in batches:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                ae, par = module(b["input_ids"], b["position_ids"], b["segment_ids"], b["step"], b["doc_ids"],
                                 b["labels"])
            loss = ae / n_ae + (par / n_par if with_par else 0.0)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"pmlm": lambda: run([pmlm], True), "mlm": lambda: run([mlm], False), "naive": lambda: run(naive, True)}
    facts = {"main_tokens": _main_tokens(pmlm), "pmlm_row_len": int(pmlm["input_ids"].shape[1]),
             "naive_passes": len(naive), "ae_targets": n_ae, "par_targets": n_par}
    return fns, facts


def measure_case(case: StepCase, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Rows of one configuration (1 rank): the three variants, timed round-robin."""
    fns, facts = step_functions(case)
    timings = measure_interleaved(fns, warmup=warmup, repeats=repeats)
    rows = []
    for name in VARIANTS:
        t = timings[name]
        rows.append({"preset": case.preset, "dtype": case.dtype, "attention": case.attention, "ranks": 1,
                     "variant": name,
                     "batch": case.batch, "max_len": case.max_len, "passes": 1 if name != "naive" else
                     facts["naive_passes"], "step_median_ms": t.median * 1e3, "step_p20_ms": t.p20 * 1e3,
                     "step_p80_ms": t.p80 * 1e3, "tokens_per_s": facts["main_tokens"] / t.median,
                     "examples_per_s": case.batch / t.median,
                     "vs_mlm": t.median / timings["mlm"].median,
                     "naive_over_this": timings["naive"].median / t.median})
    return rows


# --------------------------------------------------------------------------- the head alone


def head_functions(preset: str, dtype: str, batch: int, max_len: int, seed: int = 0
                   ) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """Forward + backward of the LM head and the AE + PAR loss on the target rows of a real PMLM batch,
    unfused (``(N, V)`` logits) and fused (:mod:`pmlm_engine.fused_ce`), from the same hidden states."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, vocab_size=SPECIAL.random_hi)
    head = LMHead(cfg, torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size))
    batch_t = collate_padded(make_examples(batch, max_len, seed), SPECIAL.pad, pad_to_multiple=8)
    hidden = torch.randn(*batch_t["input_ids"].shape, cfg.hidden_size, requires_grad=True)  # (B, L, C)
    ac = torch.bfloat16 if dtype == "bf16" else None

    def run(fused: bool) -> None:
        with torch.autocast("cpu", dtype=ac or torch.float32, enabled=ac is not None):
            out = pmlm_loss(hidden, batch_t["labels"], batch_t["step"], head, fused=fused)
        out.loss.backward()
        hidden.grad = None
        head.zero_grad(set_to_none=True)

    n_ae, n_par = target_counts(batch_t)
    return ({"unfused": lambda: run(False), "fused": lambda: run(True)},
            {"targets": n_ae + n_par, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size})


def run_head_suite(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    """The head alone, unfused vs fused: time (interleaved medians) and peak tensor memory.
    The target of issue 14 is at 16 x 512 (>= 3x lower peak memory fused)."""
    shapes = [("tiny", 2, 64)] if smoke else [("small", 16, 512)] if quick else [("small", 16, 512), ("base", 16, 512)]
    warmup, repeats = (0, 1) if smoke else (1, 3) if quick else (1, 5)
    rows = []
    for preset, batch, max_len in shapes:
        for dtype in ("bf16",) if smoke else ("fp32", "bf16"):
            fns, facts = head_functions(preset, dtype, batch, max_len)
            t = measure_interleaved(fns, warmup=warmup, repeats=repeats)
            mem = {k: peak_memory(fn) for k, fn in fns.items()}
            for name in fns:
                rows.append({"preset": preset, "dtype": dtype, "batch": batch, "max_len": max_len, "variant": name,
                             **facts, "head_median_ms": t[name].median * 1e3, "head_p20_ms": t[name].p20 * 1e3,
                             "head_p80_ms": t[name].p80 * 1e3, "peak_mem_mb": mem[name] / 2**20,
                             "time_vs_unfused": t[name].median / t["unfused"].median,
                             "unfused_mem_over_this": mem["unfused"] / max(mem[name], 1)})
    return rows


# --------------------------------------------------------------------------- 2 ranks


def _worker(spec: dict[str, Any]) -> None:
    """One rank of the 2-rank measurement (run under torchrun): DeepSpeed, ZeRO-2, half the global batch."""
    from pmlm_engine.engine import DeepSpeedEngine, dist_env, init_distributed
    from pmlm_engine.train_config import load_config

    torch.set_num_threads(1)
    env = init_distributed("deepspeed")
    case = StepCase(**spec["case"])
    per_rank = case.batch // env.world_size
    cfg = load_config(None, [f"data.batch_size={per_rank}", "engine=deepspeed", "deepspeed.zero_stage=2",
                             f"precision={case.dtype}", "optim.warmup_steps=0", "steps=1000"])
    from pmlm_engine.engine import deepspeed_config

    torch.manual_seed(0)
    model = PMLMModel(ModelConfig.preset(case.preset, vocab_size=SPECIAL.random_hi, hidden_dropout=0.0,
                                         attention_backend=case.attention))
    engine = DeepSpeedEngine(model, cfg, env, deepspeed_config(cfg, env.world_size))
    examples = make_examples(case.batch, case.max_len)
    mine = examples[env.rank * per_rank:(env.rank + 1) * per_rank]
    batch = collate_padded(mine, SPECIAL.pad, pad_to_multiple=8)
    counts = torch.tensor(target_counts(collate_padded(examples, SPECIAL.pad)), dtype=torch.float64)

    def step() -> None:
        ae, par = engine.forward(batch)
        engine.backward(ae / counts[0] + par / counts[1])
        engine.step()

    times = []
    for i in range(spec["warmup"] + spec["repeats"]):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        step()
        torch.distributed.barrier()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    if env.is_main:
        main_tokens = _main_tokens(collate_padded(examples, SPECIAL.pad))
        Path(spec["out"]).write_text(json.dumps({"times": times, "main_tokens": main_tokens}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    del dist_env


def measure_two_ranks(case: StepCase, warmup: int, repeats: int) -> dict[str, Any]:
    """The PMLM step on 2 DeepSpeed ranks (ZeRO-2, torchrun), same global batch as the 1-rank rows."""
    from common import quantile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {"case": case.__dict__ | {"ranks": 2}, "warmup": warmup, "repeats": repeats, "out": str(out)}
        env = dict(os.environ, OMP_NUM_THREADS="1")
        torchrun = Path(sys.executable).parent / "torchrun"
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, "--worker",
                               json.dumps(spec)], env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"2-rank benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
    times = sorted(res["times"])
    median = float(np.median(times))
    return {"preset": case.preset, "dtype": case.dtype, "attention": case.attention, "ranks": 2,
            "variant": "pmlm (DeepSpeed ZeRO-2)",
            "batch": case.batch, "max_len": case.max_len, "passes": 1, "step_median_ms": median * 1e3,
            "step_p20_ms": quantile(times, 0.2) * 1e3, "step_p80_ms": quantile(times, 0.8) * 1e3,
            "tokens_per_s": res["main_tokens"] / median, "examples_per_s": case.batch / median,
            "vs_mlm": None, "naive_over_this": None}


# --------------------------------------------------------------------------- suite


def cases(quick: bool, smoke: bool = False) -> list[StepCase]:
    """The structured CPU attention (``auto``'s choice on the CPU) and SDPA, in fp32 and bf16 autocast."""
    if smoke:  # that the suite runs and reports (CI), not how fast
        return [StepCase("tiny", "bf16", 2, 32, attention="torch")]
    if quick:
        return [StepCase("tiny", "fp32", 8, 128, attention="torch"), StepCase("tiny", "fp32", 8, 128),
                StepCase("tiny", "bf16", 8, 128, attention="torch"), StepCase("tiny", "bf16", 8, 128),
                StepCase("base", "bf16", 1, 64, attention="torch")]
    return [StepCase("tiny", "fp32", 16, 128, attention="torch"), StepCase("tiny", "fp32", 16, 128),
            StepCase("tiny", "bf16", 16, 128, attention="torch"), StepCase("tiny", "bf16", 16, 128),
            StepCase("base", "fp32", 2, 128, attention="torch"), StepCase("base", "bf16", 2, 128, attention="torch"),
            StepCase("base", "bf16", 2, 128)]


def run_step_suite(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    """Rows of the step table (see the module docstring). Quick: tiny, plus base with a batch of one; 1 rank.
    Smoke: one tiny configuration, one repeat (CI)."""
    warmup, repeats = (0, 1) if smoke else (1, 3) if quick else (2, 5)
    rows: list[dict[str, Any]] = []
    for case in cases(quick, smoke):
        try:
            rows.extend(measure_case(case, warmup, repeats))
        except Exception as exc:  # noqa: BLE001 - one broken configuration is reported, the others still run
            rows.append({"preset": case.preset, "dtype": case.dtype, "attention": case.attention, "ranks": 1,
                         "variant": f"FAILED: {type(exc).__name__}: {str(exc)[:120]}", "batch": case.batch,
                         "max_len": case.max_len})
    if not quick:
        for dtype in ("fp32", "bf16"):
            rows.append(measure_two_ranks(StepCase("tiny", dtype, 16, 128), warmup, repeats))
    return rows


COLUMNS = ["preset", "dtype", "attention", "ranks", "variant", "batch", "max_len", "passes", "step_median_ms",
           "step_p20_ms", "step_p80_ms", "tokens_per_s", "vs_mlm", "naive_over_this"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset (and base with batch 1), 1 rank, 3 repeats")
    p.add_argument("--jsonl", help="also write the rows to this JSONL file")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print(markdown_table([environment()]))
    print()
    rows = run_step_suite(args.quick)
    print(markdown_table(rows, COLUMNS))
    one = [r for r in rows if r["ranks"] == 1 and r["variant"] == "pmlm"]
    for r in rows:
        if str(r["variant"]).startswith("FAILED"):
            print(f"- {r['preset']} {r['dtype']} {r['attention']}: {r['variant']}")
    for r in one:
        print(f"- {r['preset']} {r['dtype']} {r['attention']}: PMLM step = {r['vs_mlm']:.2f}x the MLM-only step (target <= 1.4); "
              f"naive multi-pass is {r['naive_over_this']:.2f}x slower (target >= 2)")
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
