"""Sequence-to-sequence fine-tuning with pseudo masks (PMLM.md section 6): the pre-training model, mask and loss.

    python -m pmlm_engine.finetune --init minilm --data news --out runs/news-ft --steps 300

Each example is laid out by :func:`pmlm_engine.layout.build_seq2seq_example`: the source
``[CLS] src [SEP]`` is the main part (bidirectional, segment 0); target token ``t_i`` is a
factorization step of length one, an ORIGINAL copy (``step +i``) and a ``[P]`` (``step -i``) at
the same position ``|main| + i - 1`` in segment 1. The pseudo-mask rule then makes the target
causal and lets every ``[P]_i`` predict ``t_i`` from the source and ``t_<i`` -- all target
positions in one forward pass of the same :class:`pmlm_engine.model.PMLMModel` and the same
attention function as pre-training. The loss is the cross-entropy on the ``[P]`` outputs
(:func:`pmlm_engine.losses.pmlm_loss`; torch's label smoothing, default 0.1), averaged over
the target tokens of the batch. ``--target-mask-prob`` replaces each ORIGINAL copy by
``[MASK]`` with that probability (s2s-ft's corruption: 0.7 for CNN/DailyMail, 0.4 for XSum).

Inputs: see :mod:`pmlm_engine.s2s_data` (JSONL pairs with file:line errors, built-in corpora
with fixed held-out splits; ``--data news`` means the news *train* split). Truncation: the
source keeps its first ``--max-src-len`` tokens, the target its first ``--max-tgt-len - 1``
plus ``[SEP]``; both are counted and logged. When ``max_src_len + 2 + max_tgt_len`` exceeds the
model's position table, the table is extended (:func:`pmlm_engine.model.extend_positions`,
rows copied cyclically) and a warning says so.

Initialization (``--init``): a model folder written by pmlm_engine (pre-training or an earlier
fine-tuning), a Hugging Face BERT or UniLMv2 checkpoint (:mod:`pmlm_engine.convert`), or
``minilm`` (the real MiniLM-L6 checkpoint; its missing MLM head is initialized fresh, logged).

Outputs under ``--out``: ``metrics.jsonl`` (one line per ``--log-every`` steps),
``finetune_config.json``, and the model folder ``final/`` (safetensors + config.json, written
atomically) that :mod:`pmlm_engine.decode` loads; its config records the tokenizer and the
fine-tuning settings (decode's length defaults come from them).

Engines: the training step is :mod:`pmlm_engine.engine`'s (``--engine torch``, the default in one
process; ``--engine deepspeed --zero-stage N``, also the default under a distributed launcher:
``deepspeed pmlm_engine/finetune.py ...`` or ``torchrun --nproc_per_node K pmlm_engine/finetune.py ...``,
hence this file's absolute imports). Every rank draws the same global batch of ``--batch-size``
examples and trains on its own contiguous share of it (``batch_size / world size`` examples); the
loss is the summed target cross-entropy divided by the *global* count of target tokens, so the
split over ranks does not change it. Rank 0 alone writes metrics, progress and the model folder
(under ZeRO-3 the parameters are gathered first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from pmlm_engine.checkpoint import save_state
from pmlm_engine.config import to_dict
from pmlm_engine.engine import (all_reduce_sum, barrier, build_deepspeed_config, build_engine, check_world, dist_env,
                                init_distributed, shutdown, target_counts)
from pmlm_engine.layout import SpecialIds, build_seq2seq_example, collate_padded
from pmlm_engine.losses import LossOutput, pmlm_loss
from pmlm_engine.model import PMLMModel, extend_positions
from pmlm_engine.optim import OptimConfig
from pmlm_engine.rng import derive_seed
from pmlm_engine.s2s_data import EncodedPairs, encode_pairs, load_pair_spec
from pmlm_engine.tokenizer import resolve_tokenizer
from pmlm_engine.train_config import DataConfig, DeepSpeedSection, TrainConfig

log = logging.getLogger("pmlm_engine.finetune")



@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; saved beside its outputs and inside the model folder."""

    init: str
    """Model folder, Hugging Face BERT / UniLMv2 checkpoint (folder or file), or ``minilm``."""
    data: str = "news"
    """Pair spec: a .jsonl file, or a built-in corpus (``news``, ``wiki``, ``acl``; bare name = train split)."""
    out: str = "runs/finetune"
    """Output folder."""
    tokenizer: Optional[str] = None
    """Tokenizer file; default the one recorded with ``init`` (or beside it), else bert-base-uncased."""
    max_src_len: int = 464
    """Source tokens kept (the head); ``[CLS]`` and ``[SEP]`` come on top."""
    max_tgt_len: int = 48
    """Target tokens kept, including the final ``[SEP]``."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW, betas 0.9/0.98, weight decay 0.01; linear warmup then linear decay)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (torch's: ``eps`` spread uniformly over the vocabulary)."""
    target_mask_prob: float = 0.5
    """Probability of replacing a teacher-forced target copy by ``[MASK]``."""
    dtype: str = "fp32"
    """fp32 | bf16 (autocast; parameters and optimizer stay fp32)."""
    attention_backend: str = "auto"
    """Backend of :func:`pmlm_engine.attention.pseudo_mask_attention`."""
    seed: int = 0
    """Seed of shuffling, target corruption and dropout."""
    max_examples: int = 0
    """Use only the first N pairs (0 = all)."""
    log_every: int = 10
    """Steps between metric lines."""
    engine: str = "auto"
    """torch (one process) | deepspeed | auto (deepspeed under a distributed launcher, else torch)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (engine deepspeed only)."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_src_len >= 1, "max_src_len", "a positive number of tokens"),
            (self.max_tgt_len >= 2, "max_tgt_len", ">= 2 (one token plus [SEP])"),
            (self.steps >= 1, "steps", "a positive number of optimizer steps"),
            (self.batch_size >= 1, "batch_size", "a positive number of examples"),
            (self.lr > 0, "lr", "a positive learning rate"),
            (0 <= self.warmup_steps <= self.steps, "warmup_steps", f"in [0, steps={self.steps}]"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing", "a value in [0, 1)"),
            (0.0 <= self.target_mask_prob < 1.0, "target_mask_prob", "a value in [0, 1)"),
            (self.dtype in ("fp32", "bf16"), "dtype", "fp32 or bf16"),
            (self.max_examples >= 0, "max_examples", ">= 0 (0 = all)"),
            (self.log_every >= 1, "log_every", ">= 1"),
            (self.engine in ("auto", "torch", "deepspeed"), "engine", "auto, torch or deepspeed"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {want}")

    def train_config(self) -> TrainConfig:
        """The engine's view of this run (:mod:`pmlm_engine.engine` reads optim, steps, precision,
        batch size per rank and ZeRO stage from a :class:`TrainConfig`)."""
        env = dist_env()
        if self.batch_size % env.world_size:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of the world size {env.world_size}: "
                             f"each rank trains on batch_size / world size examples of every global batch")
        return TrainConfig(engine=self.engine, precision=self.dtype, steps=self.steps, out=self.out,
                           optim=OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps),
                           data=DataConfig(batch_size=self.batch_size // env.world_size),
                           deepspeed=DeepSpeedSection(zero_stage=self.zero_stage))

    @property
    def positions_needed(self) -> int:
        """Position ids used by the longest example: ``[CLS] src [SEP]`` then the target."""
        return self.max_src_len + 2 + self.max_tgt_len


# --------------------------------------------------------------------------- pieces


def build_examples(enc: EncodedPairs, special: SpecialIds, target_mask_prob: float, seed: int, epoch: int,
                   indices: Sequence[int]) -> list:
    """Layouts of the examples ``indices``; the corruption of example ``i`` in ``epoch`` is seeded
    by ``derive_seed(seed, epoch, i)`` (reproducible, different every epoch)."""
    out = []
    for i in indices:
        tgt = enc.tgt[i]
        if tgt is None:
            raise ValueError(f"example {enc.ids[i]!r} has no target; fine-tuning needs src and tgt")
        out.append(build_seq2seq_example(enc.src[i], tgt, special, target_mask_prob, derive_seed(seed, epoch, i)))
    return out


def seq2seq_loss(model: PMLMModel, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> LossOutput:
    """Forward a ``collate_padded`` batch of seq2seq layouts and score the ``[P]`` outputs.

    Args:
        batch: ``(B, L)`` tensors ``input_ids, position_ids, segment_ids, step, labels, doc_ids``.
    Returns:
        :class:`LossOutput` whose ``par_loss`` (= ``loss``) is the mean over target tokens and
        ``token_loss`` ``(N,)`` the per-token losses in row-major order of the ``[P]`` tokens.
    """
    hidden = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"],
                   batch["doc_ids"])  # (B, L, C)
    return pmlm_loss(hidden, batch["labels"], batch["step"], model.lm_head, ae_weight=0.0,
                     label_smoothing=label_smoothing)


class EpochSampler:
    """Batches of example indices: a fresh seeded permutation per epoch; the last partial batch
    of an epoch is completed from the next one, so every example is seen once per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self._order, self._pos = 0, self._perm(0), 0

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(derive_seed(self.seed, 7919, epoch)).shuffle(order)
        return order

    def next(self) -> list[tuple[int, int]]:
        """``batch_size`` pairs ``(epoch, index)``."""
        out = []
        while len(out) < self.batch_size:
            if self._pos == self.n:
                self.epoch += 1
                self._order, self._pos = self._perm(self.epoch), 0
            out.append((self.epoch, self._order[self._pos]))
            self._pos += 1
        return out


# --------------------------------------------------------------------------- training


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run fine-tuning; returns a summary (first/last losses, time, truncation counts, output folder)."""
    from pmlm_engine.convert import load_any
    from pmlm_engine.tokenizer import load_tokenizer

    env = dist_env()
    tcfg = cfg.train_config()
    check_world(tcfg, env)
    engine_name = tcfg.resolved_engine(env.world_size)
    ds_config = build_deepspeed_config(tcfg, env.world_size) if engine_name == "deepspeed" else None
    env = init_distributed(engine_name)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # identical initial weights (a fresh MLM head) on every rank
    model, recorded_tok = load_any(cfg.init, attention_backend=cfg.attention_backend)
    tok_path = resolve_tokenizer(cfg.tokenizer, recorded_tok)
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} ids but the model's embedding has "
                         f"{model.config.vocab_size} rows: pass the tokenizer the model was trained with (--tokenizer)")
    special = tokenizer.special_ids()
    if cfg.positions_needed > model.config.max_position:
        log.warning("max_src_len + 2 + max_tgt_len = %d positions exceed the model's %d: extending the position "
                    "table (rows copied cyclically)", cfg.positions_needed, model.config.max_position)
        extend_positions(model, cfg.positions_needed)

    records = load_pair_spec(cfg.data, default_split="train")
    if cfg.max_examples:
        records = records[:cfg.max_examples]
    enc = encode_pairs(records, tokenizer, cfg.max_src_len, cfg.max_tgt_len)
    enc.stats.log(f"fine-tuning data {cfg.data}")
    log.info("model: %.1fM parameters, %d layers, hidden %d; %d training pairs; engine %s%s, %d rank(s) x %d "
             "examples", model.num_parameters() / 1e6, model.config.num_layers, model.config.hidden_size,
             len(enc.ids), engine_name, f" (ZeRO stage {cfg.zero_stage})" if engine_name == "deepspeed" else "",
             env.world_size, tcfg.data.batch_size)

    if env.world_size > 1:  # dropout differs per rank (one process keeps the stream it always had)
        torch.manual_seed(derive_seed(cfg.seed, 0xD20, env.rank) & ((1 << 63) - 1))
    engine = build_engine(model, tcfg, env, ds_config, label_smoothing=cfg.label_smoothing)
    if env.is_main:
        (out / "finetune_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    sampler = EpochSampler(len(enc.ids), cfg.batch_size, cfg.seed)  # the same global batches on every rank
    micro = tcfg.data.batch_size
    lo, hi = env.rank * micro, (env.rank + 1) * micro

    history: list[float] = []
    window = dict(loss=0.0, tokens=0, targets=0, n=0)
    t_start = t0 = time.perf_counter()
    metrics = open(out / "metrics.jsonl", "w") if env.is_main else None
    try:
        bar = tqdm(range(cfg.steps), desc="fine-tune", unit="step", disable=not env.is_main)
        for step in bar:
            picks = sampler.next()[lo:hi]  # this rank's share of the global batch
            examples = []
            for epoch, i in picks:
                examples += build_examples(enc, special, cfg.target_mask_prob, cfg.seed, epoch, [i])
            batch = collate_padded(examples, special.pad)
            local_targets = target_counts(batch)[1]
            n_par = max(float(all_reduce_sum(torch.tensor([float(local_targets)], dtype=torch.float64))[0]), 1.0)
            try:
                _, par_sum = engine.forward(batch)
                loss_t = par_sum / n_par  # mean over the global batch's target tokens
                engine.backward(loss_t)
            except RuntimeError as exc:
                if step > 0:
                    raise
                raise RuntimeError(
                    f"the first training step failed with attention backend {cfg.attention_backend!r} under "
                    f"{cfg.dtype} ({exc}); another backend may support this layout and precision: try "
                    "--attention-backend sdpa (or --dtype fp32)") from exc
            stats = engine.step()
            sums = torch.tensor([float(loss_t.detach()), float((batch["doc_ids"] >= 0).sum()), float(local_targets)],
                                dtype=torch.float64)
            all_reduce_sum(sums)
            loss = float(sums[0])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}: lower --lr or use --dtype fp32")
            history.append(loss)
            window["loss"] += loss
            window["tokens"] += int(sums[1])
            window["targets"] += int(sums[2])
            window["n"] += 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                dt = time.perf_counter() - t0
                row = dict(step=step + 1, epoch=sampler.epoch, loss=window["loss"] / window["n"],
                           lr=engine.scheduler.get_last_lr()[0],
                           grad_norm=None if stats.grad_norm is None else float(stats.grad_norm),
                           tokens_per_s=window["tokens"] / dt, target_tokens_per_s=window["targets"] / dt,
                           elapsed_s=time.perf_counter() - t_start)
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                window = dict(loss=0.0, tokens=0, targets=0, n=0)
                t0 = time.perf_counter()
    finally:
        if metrics is not None:
            metrics.close()
    elapsed = time.perf_counter() - t_start
    state = engine.fp32_state_dict()  # collective: gathers ZeRO-3 partitions; empty off rank 0
    final = out / "final"
    if env.is_main:
        save_state(state, model.config, final, extra={"tokenizer": tok_path, "finetune": to_dict(cfg)})
    barrier()
    k = max(1, min(20, len(history) // 4))
    summary = dict(first_loss=sum(history[:k]) / k, last_loss=sum(history[-k:]) / k, train_seconds=elapsed,
                   examples=len(enc.ids), epochs=sampler.epoch + sampler._pos / sampler.n,
                   truncation=dataclasses.asdict(enc.stats), model=str(final))
    log.info("loss %.3f -> %.3f (mean of first/last %d steps) in %.0f s; model in %s", summary["first_loss"],
             summary["last_loss"], k, elapsed, final)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> FinetuneConfig:
    d = FinetuneConfig(init="minilm")
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True,
                   help="model folder (pmlm_engine), HF BERT / UniLMv2 checkpoint (folder or file), or 'minilm'")
    p.add_argument("--data", default=d.data, help="pairs: .jsonl {src, tgt} file, or news | wiki | acl "
                   "(train split; NAME:SPLIT for another split) (default news)")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file (default: the one recorded with --init, else bert-base-uncased)")
    p.add_argument("--max-src-len", type=int, default=d.max_src_len,
                   help=f"source tokens kept, the rest cut and counted (default {d.max_src_len})")
    p.add_argument("--max-tgt-len", type=int, default=d.max_tgt_len,
                   help=f"target tokens kept including [SEP] (default {d.max_tgt_len})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=d.warmup_steps, help=f"warmup steps (default {d.warmup_steps})")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help=f"label smoothing (default {d.label_smoothing})")
    p.add_argument("--target-mask-prob", type=float, default=d.target_mask_prob,
                   help=f"probability of [MASK]ing a teacher-forced target copy (default {d.target_mask_prob})")
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16"], help="compute dtype (default fp32)")
    p.add_argument("--attention-backend", default=d.attention_backend,
                   help="auto | reference | sdpa | torch | triton (default auto)")
    p.add_argument("--max-examples", type=int, default=0, help="use only the first N pairs (default 0 = all)")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"steps per metrics line (default {d.log_every})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default 0)")
    p.add_argument("--engine", default=d.engine, choices=["auto", "torch", "deepspeed"],
                   help="training engine (default auto: deepspeed under a distributed launcher, else torch)")
    p.add_argument("--zero-stage", type=int, default=d.zero_stage, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage (engine deepspeed; default 0)")
    # the DeepSpeed launcher passes --local_rank; the rank is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, all cores; 1 is faster on a shared, busy machine)")
    a = p.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads {a.threads}: expected a positive number")
        torch.set_num_threads(a.threads)
    return FinetuneConfig(
        init=a.init, data=a.data, out=a.out, tokenizer=a.tokenizer, max_src_len=a.max_src_len,
        max_tgt_len=a.max_tgt_len, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup,
        label_smoothing=a.label_smoothing, target_mask_prob=a.target_mask_prob, dtype=a.dtype,
        attention_backend=a.attention_backend, seed=a.seed, max_examples=a.max_examples, log_every=a.log_every,
        engine=a.engine, zero_stage=a.zero_stage)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO if dist_env().is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        summary = finetune(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if dist_env().is_main:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
