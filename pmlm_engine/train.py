"""Pre-train a PMLM (AE + PAR in one pass): one process, or many under DeepSpeed.

    python -m pmlm_engine.train                                   # the CPU demo: tiny model, news corpus
    python -m pmlm_engine.train --config job.json --set optim.lr=3e-4 data.batch_size=8
    deepspeed --num_gpus 2 pmlm_engine/train.py --config job.json --set deepspeed.zero_stage=2

Configuration: :class:`pmlm_engine.train_config.TrainConfig` (a JSON file with ``--config``,
dotted ``--set KEY=VALUE`` overrides, and a few shortcut flags; ``--print-config`` shows the
result and the generated DeepSpeed config). Everything that can be wrong with it, with the
data or with the tokenizer is reported before the first step.

Outputs under ``out``: ``train_config.json``, ``metrics.jsonl`` (loss, AE and PAR loss, lr,
grad norm, tokens/s), ``tb/`` (TensorBoard), ``loss.png``, ``checkpoints/`` (resumable, atomic,
the newest ``checkpoint.keep``), and ``final/``: the consolidated fp32 model
(``model.safetensors`` + ``config.json``) that fine-tuning and decoding load with
:func:`pmlm_engine.checkpoint.load_model`.

SIGTERM / SIGINT: the current step finishes, a checkpoint is saved and the job exits with
status 0; run the same command again to continue exactly where it stopped (the batches, the
schedule, the optimizer state and the dropout RNG are restored, so the loss curve continues
as if never interrupted). A second Ctrl-C aborts at once.

This file runs both as ``python -m pmlm_engine.train`` and as a script path (the DeepSpeed
launcher's form), hence its absolute imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pmlm_engine.checkpoint import CheckpointManager, load_model, save_state
from pmlm_engine.config import ModelConfig
from pmlm_engine.data import PretrainData
from pmlm_engine.engine import (DistEnv, all_reduce_sum, barrier, build_deepspeed_config, build_engine,
                                check_attention, check_world, dist_env, init_distributed, shutdown, target_counts)
from pmlm_engine.model import PMLMModel
from pmlm_engine.rng import derive_seed
from pmlm_engine.train_config import SHAPE_FIELDS, TrainConfig, load_config, to_dict

log = logging.getLogger("pmlm_engine.train")

DEFAULT_TOKENIZER = "bert-base-uncased"
METRICS = "metrics.jsonl"


def resolve_tokenizer_path(spec: str) -> str:
    """``bert-base-uncased`` -> the vocab.txt shipped with MiniLM; anything else is a path."""
    if spec == DEFAULT_TOKENIZER:
        from pmlm_engine.corpus import minilm_dir

        return str(minilm_dir() / "vocab.txt")
    return spec


# --------------------------------------------------------------------------- signals


class StopRequest:
    """SIGTERM / SIGINT set a flag that the loop checks after each step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: give up on the clean stop
        if self.signal is None:
            log.warning("received %s: finishing this step, saving a checkpoint, then exiting "
                        "(Ctrl-C again to abort)", name)
        self.signal = name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal is not None


# --------------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """Everything checked and loaded before the first step."""

    cfg: TrainConfig
    env: DistEnv
    engine: str
    tokenizer: Any
    tokenizer_path: str
    model_cfg: ModelConfig
    ds_config: Optional[dict[str, Any]]
    checkpoints: CheckpointManager
    resume_from: Optional[Path]
    tokenizer_sha: str
    data: Optional[PretrainData] = None


def trajectory(cfg_dict: dict[str, Any], world_size: int, engine: str, precision: str) -> dict[str, Any]:
    """The configuration fields that decide the loss curve (a resumed run must match them)."""
    d = json.loads(json.dumps(cfg_dict))
    d["precision"] = precision  # resolved: "auto" may mean different things on different machines
    for key in ("checkpoint", "logging", "out", "init_from", "global_batch_size", "engine", "threads"):
        d.pop(key, None)
    d.get("data", {}).pop("cache_dir", None)
    d.get("data", {}).pop("tokenizer", None)  # its content is compared (sha256), not its path
    d.get("deepspeed", {}).pop("overrides", None)
    d["world_size"], d["engine"] = world_size, engine
    return _flat(d)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _choose_resume(cfg: TrainConfig, manager: CheckpointManager, env: DistEnv, engine: str,
                   tokenizer_sha: str) -> Optional[Path]:
    spec = cfg.checkpoint.resume
    if spec == "never":
        if manager.tags():
            raise ValueError(f"checkpoint.resume=never but {manager.root} already holds checkpoints {manager.tags()}: "
                             f"choose another out / checkpoint.dir, delete them, or set checkpoint.resume=auto")
        return None
    folder = manager.latest() if spec == "auto" else Path(spec)
    if folder is None:
        return None
    state = CheckpointManager.read_state(folder)
    saved = trajectory(state["config"], state["world_size"], state["engine"], state["precision"])
    now = trajectory(to_dict(cfg), env.world_size, engine, cfg.resolved_precision())
    saved["tokenizer vocabulary (sha256)"] = state.get("tokenizer_sha256")
    now["tokenizer vocabulary (sha256)"] = tokenizer_sha
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff[:6])
        raise ValueError(f"cannot resume from {folder}: it was written by a different job ({shown}). Use the same "
                         f"configuration to continue it, or a new out / checkpoint.resume=never to start afresh")
    return folder


def prepare(cfg: TrainConfig) -> Prepared:
    """Every check that can fail, before any training: world and batch sizes, DeepSpeed config,
    tokenizer vs model, resume compatibility; then the process group and the data."""
    env = dist_env()
    check_world(cfg, env)
    engine = cfg.resolved_engine(env.world_size)
    ds_config = build_deepspeed_config(cfg, env.world_size) if engine == "deepspeed" else None

    from pmlm_engine.stream import resolve_sources, tokenizer_fingerprint
    from pmlm_engine.tokenizer import load_tokenizer

    resolve_sources(cfg.data.corpus)  # missing / empty files and unknown names, before anything else
    tokenizer_path = resolve_tokenizer_path(cfg.data.tokenizer)
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise type(exc)(f"data.tokenizer={cfg.data.tokenizer!r}: {exc}") from None
    model_cfg = cfg.model.build(tokenizer.vocab_size, tokenizer_path)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    check_attention(model_cfg.attention_backend, cfg.resolved_precision(), device)
    if cfg.data.max_len > model_cfg.max_position:  # appended tokens reuse main positions
        raise ValueError(f"data.max_len={cfg.data.max_len} exceeds the model's max_position={model_cfg.max_position}: "
                         f"lower data.max_len or raise model.max_position")
    if cfg.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ImportError("logging.tensorboard=true needs TensorBoard: pip install tensorboard "
                              "(or set logging.tensorboard=false)") from None
    manager = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep, env.is_main, barrier)
    tokenizer_sha = tokenizer_fingerprint(tokenizer)
    resume_from = _choose_resume(cfg, manager, env, engine, tokenizer_sha)
    if cfg.init_from and resume_from is None:
        _check_warm_start_source(cfg.init_from)

    env = init_distributed(engine)
    prepared = Prepared(cfg, env, engine, tokenizer, tokenizer_path, model_cfg, ds_config, manager, resume_from,
                        tokenizer_sha)
    prepared.data = _on_local_main_first(env, lambda: _load_data(prepared))
    return prepared


def _check_warm_start_source(spec: str) -> None:
    if spec != "minilm" and not Path(spec).exists():
        raise FileNotFoundError(f"init_from={spec!r} does not exist: use 'minilm', a model folder written by "
                                f"pmlm_engine or a Hugging Face BERT checkpoint folder")


def _on_local_main_first(env: DistEnv, fn: Any) -> Any:
    """Run ``fn`` on local rank 0 first (it may build a cache), then on the others; an error on
    local rank 0 stops every rank instead of leaving them waiting."""
    result, error = None, None
    if env.local_rank == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks have been told
            error = exc
    failed = all_reduce_sum(torch.tensor([1.0 if error is not None else 0.0]))
    if error is not None:
        raise error
    if float(failed) > 0:
        raise RuntimeError("another rank failed while preparing the data; see its error")
    if env.local_rank != 0:
        result = fn()
    return result


def _load_data(p: Prepared) -> PretrainData:
    from pmlm_engine.stream import StoreSequences, build_token_store

    cfg = p.cfg
    store = build_token_store(cfg.data.corpus, p.tokenizer, cfg.data.cache_dir or None, cfg.data.max_docs,
                              progress=cfg.logging.progress and p.env.is_main)
    sequences = StoreSequences(store, cfg.data.max_len, p.tokenizer.special_ids(), cfg.data.seed)
    if len(sequences) == 0:
        raise ValueError(f"data.corpus={cfg.data.corpus}: no text after tokenization")
    return PretrainData(sequences, p.tokenizer.special_ids(), cfg.data, p.env.world_size, cfg.grad_accum)


def warm_start(model: PMLMModel, spec: str, tokenizer: Any) -> None:
    """Copy a pretrained encoder into ``model`` (``minilm``, a model folder or a HF BERT checkpoint).

    The checkpoint's shapes must match the configured model; a checkpoint without an MLM
    head gets a fresh one, without a relative bias table a zero one
    (:func:`pmlm_engine.convert.load_any`). Its ``vocab.txt``, if any, must be the tokenizer's.
    """
    from pmlm_engine.convert import is_model_folder, load_any

    cfg = model.config
    path = spec
    if spec == "minilm":
        from pmlm_engine.corpus import minilm_dir

        path = str(minilm_dir())
    kwargs = {} if is_model_folder(path) else {"rel_pos_buckets": cfg.rel_pos_buckets or None}
    src, tok_path = load_any(path, **kwargs)
    fields = SHAPE_FIELDS + ("layer_norm_eps", "rel_pos_max_distance")
    diff = [f for f in fields if getattr(src.config, f) != getattr(cfg, f)]
    if diff:
        have = ", ".join(f"{f}={getattr(src.config, f)}" for f in diff)
        want = ", ".join(f"{f}={getattr(cfg, f)}" for f in diff)
        hint = " (MiniLM is model.preset=small with the bert-base-uncased tokenizer)" if spec == "minilm" else ""
        if "vocab_size" in diff:
            hint += (f"; the model's vocab_size comes from data.tokenizer ({tokenizer.source}): use the "
                     f"checkpoint's tokenizer")
        raise ValueError(f"init_from={spec!r}: the checkpoint has {have} but the configured model has {want}: "
                         f"set the model section to match{hint}")
    if tok_path and Path(tok_path).is_file() and Path(tok_path).read_bytes() != Path(tokenizer.source).read_bytes():
        raise ValueError(f"init_from={spec!r} was trained with the vocabulary {tok_path}, but data.tokenizer is "
                         f"{tokenizer.source}: set data.tokenizer to {tok_path}")
    model.load_state_dict(src.state_dict(), strict=True)
    log.info("warm start from %s: %s", path, f"{src.num_parameters() / 1e6:.1f}M parameters")


# --------------------------------------------------------------------------- outputs


class Metrics:
    """metrics.jsonl and TensorBoard (rank 0)."""

    def __init__(self, out: Path, cfg: TrainConfig, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS
        self.writer = None
        if not enabled:
            return
        if start_step and self.path.is_file():  # drop rows past the checkpoint we resume from
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(r + "\n" for r in rows))
            tmp.replace(self.path)
        elif not start_step:
            self.path.write_text("")
        self.file = self.path.open("a")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = row["step"]
            for key, tag in (("loss", "loss/total"), ("ae_loss", "loss/ae"), ("par_loss", "loss/par"),
                             ("lr", "optim/lr"), ("grad_norm", "optim/grad_norm"), ("loss_scale", "optim/loss_scale"),
                             ("tokens_per_s", "throughput/tokens_per_s"), ("step_time_s", "throughput/step_time_s")):
                if row.get(key) is not None:
                    self.writer.add_scalar(tag, row[key], step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def plot_losses(metrics_file: Path, png: Path) -> None:
    """Total, AE and PAR loss against the step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("ae_loss", "--"), ("par_loss", ":")):  # AE and PAR often overlap
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=key, linewidth=1.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("PMLM pre-training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a pre-training job; return a summary (first/last loss, steps, where things are)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    p = prepare(cfg)
    env, data = p.env, p.data
    out = Path(cfg.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    log.info("%d sequences of <= %d tokens; global batch %d (%d per rank x %d micro-steps x %d ranks); engine %s, "
             "precision %s%s", len(data.sequences), cfg.data.max_len, data.global_batch_size, cfg.data.batch_size,
             cfg.grad_accum, env.world_size, p.engine, cfg.resolved_precision(),
             f", ZeRO stage {cfg.deepspeed.zero_stage}" if p.engine == "deepspeed" else "")

    torch.manual_seed(cfg.data.seed)  # identical initial weights on every rank
    model = PMLMModel(p.model_cfg)
    if cfg.init_from and p.resume_from is None:
        warm_start(model, cfg.init_from, p.tokenizer)
    elif cfg.init_from:
        log.info("resuming: init_from=%s is not used (the weights come from the checkpoint)", cfg.init_from)
    log.info("model %s: %s parameters", cfg.model.preset, f"{model.num_parameters():,}")
    torch.manual_seed(derive_seed(cfg.data.seed, 0xD20, env.rank) & ((1 << 63) - 1))  # dropout, per rank
    engine = build_engine(model, cfg, env, p.ds_config)

    start, tokens_seen = 0, 0
    if p.resume_from is not None:
        state = CheckpointManager.read_state(p.resume_from)
        engine.load(p.resume_from)
        start, tokens_seen = int(state["step"]), int(state["tokens"])
        log.info("resumed from %s at step %d", p.resume_from, start)

    metrics = Metrics(out, cfg, start, env.is_main)
    summary: dict[str, Any] = {"start_step": start, "stopped_by": None}
    history: list[float] = []
    window = _Window()
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="pre-train", unit="step", dynamic_ncols=True,
               disable=not (env.is_main and cfg.logging.progress))
    step = start
    with StopRequest() as stop:
        t_window = time.perf_counter()
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batches = [data.batch(step, env.rank, m) for m in range(cfg.grad_accum)]
            counts = torch.tensor([0.0, 0.0], dtype=torch.float64)
            for b in batches:
                ae_n, par_n = target_counts(b)
                counts += torch.tensor([ae_n, par_n], dtype=torch.float64)
            all_reduce_sum(counts)
            n_ae, n_par = max(float(counts[0]), 1.0), max(float(counts[1]), 1.0)
            sums = torch.zeros(4, dtype=torch.float64)  # ae sum, par sum, main tokens, stop requests
            w_ae, w_par = cfg.ae_weight, cfg.par_weight
            for b in batches:
                ae_sum, par_sum = engine.forward(b)
                engine.backward(w_ae * ae_sum / n_ae + w_par * par_sum / n_par)
                sums[0] += float(ae_sum.detach())
                sums[1] += float(par_sum.detach())
                sums[2] += float(((b["step"] == 0) & (b["doc_ids"] >= 0)).sum())
            stats = engine.step()
            sums[3] = 1.0 if stop.requested else 0.0
            all_reduce_sum(sums)
            ae_loss, par_loss = float(sums[0]) / n_ae, float(sums[1]) / n_par
            loss = w_ae * ae_loss + w_par * par_loss
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}: lower optim.lr, or use "
                                         f"precision=fp32")
            done = step + 1
            tokens_seen += int(sums[2])
            history.append(loss)
            window.add(loss, ae_loss, par_loss, int(sums[2]), time.perf_counter() - t0, stats)
            bar.update(1)
            if env.is_main and cfg.logging.progress:
                bar.set_postfix(loss=f"{loss:.3f}", ae=f"{ae_loss:.3f}", par=f"{par_loss:.3f}",
                                tok_s=f"{window.tokens / max(time.perf_counter() - t_window, 1e-9):.0f}", refresh=False)
            stopping = float(sums[3]) > 0
            if done % cfg.logging.every == 0 or done == cfg.steps or stopping:
                elapsed = time.perf_counter() - t_window
                metrics.write(window.row(done, elapsed, tokens_seen))
                window = _Window()
                t_window = time.perf_counter()
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps
            if periodic or stopping or (done == cfg.steps and cfg.checkpoint.at_end):
                _save(engine, p, done, tokens_seen)
            if stopping and done < cfg.steps:
                summary["stopped_by"] = stop.signal or "a signal on another rank"
                break
    bar.close()
    metrics.close()
    done = step + 1 if history else start
    summary.update(steps=done, tokens=tokens_seen, checkpoint=str(p.checkpoints.latest() or "") if env.is_main else "",
                   elapsed_s=time.perf_counter() - t_start)
    if done == cfg.steps and cfg.checkpoint.export and summary["stopped_by"] is None:
        summary["export"] = str(export(engine, p, out / "final"))
    if env.is_main and cfg.logging.plot and (out / METRICS).is_file():
        plot_losses(out / METRICS, out / "loss.png")
    if history:
        k = max(1, min(20, len(history) // 4))
        summary.update(first_loss=sum(history[:k]) / k, last_loss=sum(history[-k:]) / k, losses=history)
        log.info("loss %.3f -> %.3f (mean of the first / last %d steps of this run)", summary["first_loss"],
                 summary["last_loss"], k)
    if summary["stopped_by"]:
        log.warning("stopped by %s after step %d; checkpoint %s. Run the same command again to resume.",
                    summary["stopped_by"], done, summary.get("checkpoint") or p.checkpoints.root)
    return summary


class _Window:
    """Means over the steps between two metrics rows."""

    def __init__(self) -> None:
        self.n = 0
        self.loss = self.ae = self.par = self.time = 0.0
        self.tokens = 0
        self.stats: Any = None

    def add(self, loss: float, ae: float, par: float, tokens: int, seconds: float, stats: Any) -> None:
        self.n += 1
        self.loss += loss
        self.ae += ae
        self.par += par
        self.tokens += tokens
        self.time += seconds
        self.stats = stats

    def row(self, step: int, elapsed: float, tokens_seen: int) -> dict[str, Any]:
        n = max(self.n, 1)
        return dict(step=step, loss=self.loss / n, ae_loss=self.ae / n, par_loss=self.par / n,
                    lr=self.stats.lr, grad_norm=self.stats.grad_norm, loss_scale=self.stats.loss_scale,
                    tokens_per_s=self.tokens / max(elapsed, 1e-9), step_time_s=self.time / n, tokens=tokens_seen)


def _save(engine: Any, p: Prepared, step: int, tokens: int) -> Path:
    state = {"step": step, "tokens": tokens, "config": to_dict(p.cfg), "world_size": p.env.world_size,
             "engine": p.engine, "precision": p.cfg.resolved_precision(), "tokenizer_sha256": p.tokenizer_sha,
             "format": 1, "time": time.time()}
    return p.checkpoints.save(step, engine.save, state)


def export(engine: Any, p: Prepared, path: Path) -> Path:
    """The consolidated fp32 model (gathered from every rank under ZeRO), re-loaded and compared bit for bit."""
    state = engine.fp32_state_dict()  # collective
    if p.env.is_main:
        save_state(state, p.model_cfg, path, extra={"tokenizer": p.tokenizer_path, "trained_steps": p.cfg.steps})
        reloaded = dict(load_model(path).named_parameters())
        bad = [k for k, v in state.items() if not torch.equal(reloaded[k], v)]
        if bad or set(reloaded) != set(state):
            raise RuntimeError(f"export to {path} does not read back bit for bit: {bad[:5]}")
        log.info("exported the fp32 model to %s", path)
    barrier()
    return path


# --------------------------------------------------------------------------- CLI


SHORTCUTS = {  # flag dest -> dotted config key
    "preset": "model.preset", "corpus": "data.corpus", "tokenizer": "data.tokenizer", "steps": "steps",
    "batch_size": "data.batch_size", "batching": "data.batching", "grad_accum": "grad_accum", "max_len": "data.max_len", "lr": "optim.lr",
    "warmup": "optim.warmup_steps", "precision": "precision", "engine": "engine", "zero_stage": "deepspeed.zero_stage",
    "ds_config": "deepspeed.overrides", "init_from": "init_from", "out": "out", "seed": "data.seed",
    "resume": "checkpoint.resume", "max_docs": "data.max_docs", "attention_backend": "model.attention_backend",
    "log_every": "logging.every", "save_every": "checkpoint.every", "threads": "threads",
    "optimizer": "optim.optimizer",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="JSON file of a TrainConfig (see pmlm_engine/train_config.py)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set optim.lr=3e-4 data.batch_size=8 (applied last)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (and the generated DeepSpeed config) and exit")
    g = p.add_argument_group("shortcuts (each sets one config key; --set wins)")
    g.add_argument("--preset", choices=["tiny", "small", "base"], help="model.preset")
    g.add_argument("--corpus", nargs="+", help="data.corpus: news, wiki, acl, .txt/.jsonl files, folders, globs")
    g.add_argument("--tokenizer", help="data.tokenizer: bert-base-uncased, a vocab.txt or a sentencepiece .model")
    g.add_argument("--steps", type=int, help="steps (optimizer steps)")
    g.add_argument("--batch-size", type=int, help="data.batch_size (examples per rank and micro-step)")
    g.add_argument("--batching", choices=["padded", "packed"], help="data.batching")
    g.add_argument("--grad-accum", type=int, help="grad_accum (micro-steps per optimizer step)")
    g.add_argument("--max-len", type=int, help="data.max_len (main-part tokens per example)")
    g.add_argument("--lr", type=float, help="optim.lr (peak learning rate)")
    g.add_argument("--warmup", type=int, help="optim.warmup_steps")
    g.add_argument("--optimizer", choices=["adamw", "lamb"],
                   help="optim.optimizer (on a GPU the fused implementation of each environment; lamb needs a GPU)")
    g.add_argument("--precision", "--dtype", dest="precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision (auto: bf16 where the hardware has native bf16, else fp32)")
    g.add_argument("--engine", choices=["auto", "torch", "deepspeed"], help="engine")
    g.add_argument("--no-deepspeed", dest="engine", action="store_const", const="torch", help="engine=torch")
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="deepspeed.zero_stage")
    g.add_argument("--ds-config", metavar="FILE", help="deepspeed.overrides (JSON of extra DeepSpeed keys)")
    g.add_argument("--init-from", help="init_from: minilm, a model folder or a HF BERT checkpoint")
    g.add_argument("--out", help="out (output folder)")
    g.add_argument("--seed", type=int, help="data.seed")
    g.add_argument("--resume", help="checkpoint.resume: auto, never, or a checkpoint folder")
    g.add_argument("--max-docs", type=int, help="data.max_docs")
    g.add_argument("--attention-backend", help="model.attention_backend: auto | reference | sdpa | torch | triton")
    g.add_argument("--log-every", type=int, help="logging.every")
    g.add_argument("--save-every", type=int, help="checkpoint.every")
    g.add_argument("--threads", type=int, help="threads (torch intra-op threads; 0 = one per core)")
    # the DeepSpeed launcher passes --local_rank; the rank is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    extra = {key: getattr(args, dest) for dest, key in SHORTCUTS.items() if getattr(args, dest) is not None}
    return load_config(args.config, args.set, extra), args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, args = parse_args(argv)
        env = dist_env()
        logging.getLogger().setLevel(cfg.logging.level.upper() if env.is_main else logging.WARNING)
        if args.print_config:
            check_world(cfg, env)
            shown: dict[str, Any] = {"train_config": to_dict(cfg)}
            if cfg.resolved_engine(env.world_size) == "deepspeed":
                shown["deepspeed_config"] = build_deepspeed_config(cfg, env.world_size)
            print(json.dumps(shown, indent=2))
            return 0
        summary = train(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if dist_env().is_main and "first_loss" in summary:
        where = summary.get("export") or summary.get("checkpoint")
        print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over steps "
              f"{summary['start_step'] + 1}-{summary['steps']} in {summary['elapsed_s']:.0f} s; outputs in {cfg.out}"
              + (f" (model: {where})" if where else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
