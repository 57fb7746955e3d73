"""Training-step throughput: the one-pass PMLM step against MLM-only steps (ours and transformers') and
naive multi-pass PAR, with model FLOPs, utilisation and peak memory.

Ways to train on the same examples (forward + backward + AdamW step each, same model sizes):

* ``pmlm``: the engine's step: one pass over main + appended tokens, AE and PAR losses
  (:class:`pmlm_engine.engine.PMLMTrainStep`, fused projection + cross-entropy head);
* ``mlm``: the main parts only (no appended tokens), AE loss only: a plain masked LM on the
  same masks. The cost PMLM adds over it is the price of the PAR objective;
* ``naive``: what PMLM avoids: an MLM pass for AE plus one pass per factorization step ``s``
  (main + the ORIGINAL tokens of steps < s + the ``[P]`` tokens of step s, the same attention
  rule), batched across examples by step, every pass re-encoding the main part. Its losses
  equal the one-pass ones (tests/test_single_pass.py proves the per-token equality);
* ``hf_mlm``: transformers' ``BertForMaskedLM`` on the ``mlm`` batch (same main tokens and
  masks): the step a user would otherwise run to pre-train a BERT;
* ``pmlm+compile`` / ``mlm+compile``: ``pmlm`` / ``mlm`` with ``model.compile=true`` (the best rows).

Throughput is main-sequence (text) tokens per second: the same text for all, so the ratios of
tokens/s are the inverse ratios of step times. Timings are medians (p20/p80) over repeats after
warm-up, interleaved round-robin so load drift on this shared machine hits all variants alike.
With one torch thread the ratios, throughput and ``mfu`` use the process's CPU time per step
(``step_cpu_ms``; ``timed_by``): wall time on an oversubscribed machine counts waiting for a core.
Each row also reports the step's model FLOPs (:func:`step_flops`), the achieved FLOP/s and its
fraction of this machine's GEMM rate for the dtype, timed round-robin with the steps (``mfu``), and the
peak tensor memory of one step (``common.peak_memory``). Configurations: ``small`` and ``base``
presets, fp32 and bf16 autocast, 1 rank and (full mode only) 2 DeepSpeed ranks launched with
``torchrun`` (same global batch, one thread each). Random text of ``max_len`` tokens with the
paper's masking (15%, spans up to 6). ``--head`` adds the head alone, unfused vs fused.

    python benchmarks/train_step.py [--quick] [--head] [--threads 1] [--jsonl FILE]

Targets (issue 14): PMLM step <= 1.25x our MLM-only step at ``small``, <= 1.10x at ``base``;
>= 1.5x faster than transformers' MLM-only step at ``small`` in bf16; head peak memory >= 3x lower fused.
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
VARIANTS = ("pmlm", "mlm", "naive", "hf_mlm", "pmlm+compile", "mlm+compile")
"""Every step the suite knows; a case runs a subset (``StepCase.variants``)."""


@dataclass(frozen=True)
class StepCase:
    """One configuration of the table."""

    preset: str
    dtype: str
    batch: int
    max_len: int
    ranks: int = 1
    attention: str = "torch"
    """Attention backend of every variant (``torch``: the structured CPU path, ``auto``'s CPU choice;
    ``sdpa``: dense mask)."""
    variants: tuple[str, ...] = ("pmlm", "mlm", "naive", "hf_mlm")
    """Steps to time side by side: ``pmlm``, ``mlm``, ``naive`` (module docstring), ``hf_mlm``
    (transformers' ``BertForMaskedLM``), ``pmlm+compile`` / ``mlm+compile`` (``model.compile=true``)."""


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


def _hf_mlm_step(cfg: ModelConfig, batch: dict[str, torch.Tensor], dtype: torch.dtype | None, seed: int
                 ) -> Callable[[], None]:
    """transformers' ``BertForMaskedLM`` MLM step on ``batch`` (the main tokens and their AE labels): the
    same sizes as ``cfg``, absolute positions only (BERT has no relative bias), no dropout, same AdamW."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    hf = BertForMaskedLM(BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=cfg.layer_norm_eps)).train()
    opt = build_optimizer(hf, OptimConfig(lr=1e-5, warmup_steps=0))
    mask = (batch["doc_ids"] >= 0).long()
    labels = batch["labels"].masked_fill(batch["labels"] == IGNORE, -100)

    def run() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = hf(input_ids=batch["input_ids"], attention_mask=mask, token_type_ids=batch["segment_ids"],
                     labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def step_flops(cfg: ModelConfig, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) over ``batches``.

    * encoder: ``6 * N * tokens``, ``N`` the layers' matrix parameters, tokens the non-padding ones;
    * attention: ``12 * C * layers`` per *visible* (query, key) pair (QK^T and PV, 2C each forward);
    * head: ``6 * (C^2 + C * V)`` per target row (transform and output projection).
    The same definition for every variant (``hf_mlm`` included), so the figure is the work the
    objective needs: a backend that computes masked pairs, or logits for unlabelled tokens
    (``BertForMaskedLM``), spends more than it is credited with.
    """
    from pmlm_engine.attention import dense_pseudo_mask

    c, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    n = layers * (4 * c * c + 2 * c * cfg.intermediate_size)
    total = 0.0
    for b in batches:
        tokens = int((b["doc_ids"] >= 0).sum())
        pairs = int(dense_pseudo_mask(b["step"], b["doc_ids"]).sum())
        rows = int((b["labels"] != IGNORE).sum())
        total += 6.0 * n * tokens + 12.0 * c * layers * pairs + 6.0 * rows * (c * c + c * v)
    return total


GEMM_SIZE = 2048


def gemm_function(dtype: str, size: int = GEMM_SIZE) -> tuple[Callable[[], None], float]:
    """A ``size``-cubed ``torch.mm`` in ``dtype`` (what the model's linear layers run) and its FLOPs: timed
    round-robin with the steps, it gives this machine's GEMM rate under the same load as they ran."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt)
    return (lambda: torch.mm(a, b)), 2.0 * size ** 3


def step_functions(case: StepCase, seed: int = 0) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """The training steps of ``case`` (each on its own copy of one model, with its own optimizer), and facts
    about their batches (``flops``: model FLOPs per step of each variant)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.preset(case.preset, vocab_size=SPECIAL.random_hi, hidden_dropout=0.0,
                             attention_backend=case.attention)
    examples = make_examples(case.batch, case.max_len, seed)
    pmlm = collate_padded(examples, SPECIAL.pad, pad_to_multiple=8)
    mlm = collate_padded(mlm_examples(examples), SPECIAL.pad, pad_to_multiple=8)
    naive = naive_batches(examples)
    n_ae, n_par = target_counts(pmlm)
    dtype = torch.bfloat16 if case.dtype == "bf16" else None
    state = PMLMModel(cfg).state_dict()

    def engine_step(batches: Sequence[dict[str, torch.Tensor]], with_par: bool, compile: bool) -> Callable[[], None]:
        model = PMLMModel(cfg)
        model.load_state_dict(state)
        if compile:
            model.compile_encoder()
        module = PMLMTrainStep(model).train()
        opt = build_optimizer(model, OptimConfig(lr=1e-5, warmup_steps=0))

        def run() -> None:
            for b in batches:
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    ae, par = module(b["input_ids"], b["position_ids"], b["segment_ids"], b["step"], b["doc_ids"],
                                     b["labels"])
                loss = ae / n_ae + (par / n_par if with_par else 0.0)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    builders: dict[str, Callable[[], Callable[[], None]]] = {
        "pmlm": lambda: engine_step([pmlm], True, False), "mlm": lambda: engine_step([mlm], False, False),
        "naive": lambda: engine_step(naive, True, False), "hf_mlm": lambda: _hf_mlm_step(cfg, mlm, dtype, seed),
        "pmlm+compile": lambda: engine_step([pmlm], True, True), "mlm+compile": lambda: engine_step([mlm], False, True),
    }
    unknown = sorted(set(case.variants) - set(builders))
    if unknown:
        raise ValueError(f"unknown step variant(s) {unknown}: choose from {list(builders)}")
    fns = {name: builders[name]() for name in case.variants}
    runs = {"pmlm": [pmlm], "mlm": [mlm], "naive": naive, "hf_mlm": [mlm], "pmlm+compile": [pmlm],
            "mlm+compile": [mlm]}
    facts = {"main_tokens": _main_tokens(pmlm), "pmlm_row_len": int(pmlm["input_ids"].shape[1]),
             "naive_passes": len(naive), "ae_targets": n_ae, "par_targets": n_par,
             "flops": {name: step_flops(cfg, runs[name]) for name in case.variants}}
    return fns, facts


def measure_case(case: StepCase, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Rows of one configuration (1 rank): its variants timed round-robin together with a GEMM of the dtype
    (the rate ``mfu`` is measured against, under the same load), then the peak memory of one more step each."""
    fns, facts = step_functions(case)
    gemm, gemm_flops = gemm_function(case.dtype)
    timings = measure_interleaved({**fns, "gemm": gemm}, warmup=warmup, repeats=repeats)
    # One torch thread: CPU time is the step's time on an idle core, robust to the machine's other load;
    # with more threads it sums them, so wall time is the measure.
    on_cpu = torch.get_num_threads() == 1
    secs = {k: (t.cpu_median if on_cpu else t.median) for k, t in timings.items()}
    peak = gemm_flops / secs["gemm"]
    memory = {name: peak_memory(fn) for name, fn in fns.items()}
    rows = []
    for name in case.variants:
        t, sec = timings[name], secs[name]
        same_mode_mlm = secs.get("mlm+compile" if name.endswith("+compile") else "mlm")
        flops = facts["flops"][name]
        rows.append({"preset": case.preset, "dtype": case.dtype, "attention": case.attention, "ranks": 1,
                     "variant": name, "batch": case.batch, "max_len": case.max_len,
                     "passes": facts["naive_passes"] if name == "naive" else 1,
                     "step_median_ms": t.median * 1e3, "step_p20_ms": t.p20 * 1e3, "step_p80_ms": t.p80 * 1e3,
                     "step_cpu_ms": t.cpu_median * 1e3, "timed_by": "cpu" if on_cpu else "wall",
                     "tokens_per_s": facts["main_tokens"] / sec, "examples_per_s": case.batch / sec,
                     "vs_mlm": sec / same_mode_mlm if same_mode_mlm else None,
                     "vs_hf_mlm": sec / secs["hf_mlm"] if "hf_mlm" in secs else None,
                     "naive_over_this": secs["naive"] / sec if "naive" in secs else None,
                     "gflop_per_step": flops / 1e9, "flops_vs_mlm": flops / facts["flops"]["mlm"]
                     if "mlm" in facts["flops"] else None, "gflop_per_s": flops / sec / 1e9,
                     "gemm_peak_gflop_per_s": peak / 1e9, "mfu": flops / sec / peak,
                     "peak_mem_mb": memory[name] / 2**20})
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
    one_thread = torch.get_num_threads() == 1  # time_vs_unfused from CPU time then (see measure_case)
    for preset, batch, max_len in shapes:
        for dtype in ("bf16",) if smoke else ("fp32", "bf16"):
            fns, facts = head_functions(preset, dtype, batch, max_len)
            t = measure_interleaved(fns, warmup=warmup, repeats=repeats)
            mem = {k: peak_memory(fn) for k, fn in fns.items()}
            for name in fns:
                rows.append({"preset": preset, "dtype": dtype, "batch": batch, "max_len": max_len, "variant": name,
                             **facts, "head_median_ms": t[name].median * 1e3, "head_p20_ms": t[name].p20 * 1e3,
                             "head_p80_ms": t[name].p80 * 1e3, "head_cpu_ms": t[name].cpu_median * 1e3,
                             "peak_mem_mb": mem[name] / 2**20,
                             "time_vs_unfused": t[name].cpu_median / t["unfused"].cpu_median if one_thread
                             else t[name].median / t["unfused"].median,
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


EAGER = ("pmlm", "mlm", "naive", "hf_mlm")
BEST = ("pmlm", "mlm", "hf_mlm", "pmlm+compile", "mlm+compile")


def cases(quick: bool, smoke: bool = False) -> list[StepCase]:
    """``small`` (MiniLM shape) at 8 x 128 and ``base`` at 2 x 128, fp32 and bf16 autocast, the structured CPU
    attention (``auto``'s choice on the CPU); the compiled steps (the best rows) next to the eager ones."""
    if smoke:  # that the suite runs and reports (CI), not how fast
        return [StepCase("tiny", "bf16", 2, 32, variants=EAGER)]
    if quick:
        return [StepCase("small", "fp32", 8, 128, variants=EAGER + ("pmlm+compile",)),
                StepCase("small", "bf16", 8, 128, variants=VARIANTS),
                StepCase("base", "bf16", 2, 128, variants=BEST)]
    return [StepCase("small", "fp32", 8, 128, variants=VARIANTS), StepCase("small", "bf16", 8, 128, variants=VARIANTS),
            StepCase("small", "bf16", 8, 128, attention="sdpa", variants=BEST),
            StepCase("base", "fp32", 2, 128, variants=BEST), StepCase("base", "bf16", 2, 128, variants=BEST)]


def run_step_suite(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    """Rows of the step table (see the module docstring). Quick: ``small`` fp32 and bf16, ``base`` bf16, 1 rank,
    3 repeats.
    Smoke: one tiny configuration, one repeat, no compilation (CI)."""
    warmup, repeats = (0, 1) if smoke else (1, 3) if quick else (2, 5)
    rows: list[dict[str, Any]] = []
    for case in cases(quick, smoke):
        try:
            rows.extend(measure_case(case, warmup, repeats))
        except Exception as exc:  # noqa: BLE001 - one broken configuration is reported, the others still run
            rows.append({"preset": case.preset, "dtype": case.dtype, "attention": case.attention, "ranks": 1,
                         "variant": f"FAILED: {type(exc).__name__}: {str(exc)[:120]}", "batch": case.batch,
                         "max_len": case.max_len})
    if not quick and not smoke:
        for dtype in ("fp32", "bf16"):
            rows.append(measure_two_ranks(StepCase("tiny", dtype, 16, 128), warmup, repeats))
    return rows


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Issue 14's step targets, met or not, from rows of one run (ratios of interleaved medians)."""
    lines = []
    for r in rows:
        if r.get("ranks") != 1 or r["variant"] not in ("pmlm", "pmlm+compile") or r.get("vs_mlm") is None:
            continue
        limit = {"small": 1.25, "base": 1.10}.get(r["preset"])
        where = f"{r['preset']} {r['dtype']} {r['attention']} {r['variant']}"
        if limit is not None:
            bound = f"; it has {r['flops_vs_mlm']:.2f}x the model FLOPs" if r.get("flops_vs_mlm") else ""
            lines.append(f"- {where}: {r['vs_mlm']:.2f}x our MLM-only step in the same mode (target <= {limit}: "
                         f"{'met' if r['vs_mlm'] <= limit else 'NOT met'}{bound})")
        if r.get("vs_hf_mlm"):
            speedup = 1.0 / r["vs_hf_mlm"]
            goal = " (target >= 1.5 at small bf16: " + ("met)" if speedup >= 1.5 else "NOT met)") \
                if (r["preset"], r["dtype"]) == ("small", "bf16") else ""
            lines.append(f"- {where}: {speedup:.2f}x faster than transformers' BertForMaskedLM MLM-only step{goal}")
    return lines


COLUMNS = ["preset", "dtype", "attention", "ranks", "variant", "batch", "max_len", "passes", "step_median_ms",
           "step_p20_ms", "step_p80_ms", "step_cpu_ms", "timed_by", "tokens_per_s", "vs_mlm", "vs_hf_mlm",
           "naive_over_this", "gflop_per_step",           "flops_vs_mlm", "gflop_per_s", "mfu", "peak_mem_mb"]
HEAD_COLUMNS = ["preset", "dtype", "batch", "max_len", "variant", "targets", "head_median_ms", "head_p20_ms",
                "head_p80_ms", "head_cpu_ms", "time_vs_unfused", "peak_mem_mb", "unfused_mem_over_this"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small fp32 and bf16, base bf16; 1 rank, 3 repeats")
    p.add_argument("--head", action="store_true", help="also the head alone, unfused vs fused, at 16 x 512")
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
    for r in rows:
        if str(r["variant"]).startswith("FAILED"):
            print(f"- {r['preset']} {r['dtype']} {r['attention']}: {r['variant']}")
    print("\n".join(target_lines(rows)))
    if args.head:
        head = run_head_suite(args.quick)
        print(markdown_table(head, HEAD_COLUMNS))
        rows += head
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
