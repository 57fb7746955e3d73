"""The one step loop of every training task: pre-training and fine-tuning are tasks on it.

A task (:class:`pmlm_engine.task.Task`) brings its data and its model (what it trains on, how
the model starts, which loss weights); the :class:`Runner` owns everything else, identically for every task:

* checks before step 1: world and batch sizes, the DeepSpeed config, the task's inputs, the
  attention backend in the training precision, resume compatibility. Nothing is written to
  ``out`` before they all pass;
* the engine step (:mod:`pmlm_engine.engine`: torch, or DeepSpeed ZeRO 0-3), gradient
  accumulation, clipping and the warmup + linear decay schedule;
* the objective: per micro-batch ``w_ae * ae_sum / n_ae + w_par * par_sum / n_par`` with ``n_*``
  the target counts of the whole *global* batch (all micro-batches of all ranks, one
  all-reduce), so the split over ranks and micro-steps does not change it;
* progress bar, ``metrics.jsonl`` (means over ``logging.every`` steps), TensorBoard, ``loss.png``;
* atomic checkpoints every ``checkpoint.every`` steps, at the end, and on SIGTERM / SIGINT
  (the step finishes, a checkpoint is saved, exit status 0), the newest ``checkpoint.keep`` kept;
* exact resume: re-running the same command continues from ``latest`` with the same batches
  (a task's batch is a pure function of the step), schedule, optimizer state and RNG, so the
  loss sequence equals an uninterrupted run's bit for bit;
* the final export: the consolidated fp32 model in ``out/final`` (safetensors + config.json),
  read back and compared bit for bit;
* safety (:mod:`pmlm_engine.guard`, :mod:`pmlm_engine.lock`, :mod:`pmlm_engine.manifest`): ``out`` is
  locked for the run; the checkpoint to resume is verified against its manifest before anything
  reads it; a non-finite gradient norm skips the update and ``guard.max_nonfinite_steps`` in a row
  stop the run; nothing non-finite is saved or exported; an earlier run's checkpoints and
  ``metrics.jsonl`` are never deleted or truncated without ``--resume never --overwrite``.

Extension points (for checks that need the gradients or the checkpoint files):
:meth:`Runner.before_optimizer_step` runs after the last backward of a step and before the
optimizer step (gradients complete on every rank); checkpoint writing and reading go
through :class:`pmlm_engine.checkpoint.CheckpointManager` (:meth:`Runner.save`,
:meth:`Runner.choose_resume`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .checkpoint import CheckpointManager, check_finite, load_model, save_state
from .engine import (
    DistEnv,
    all_reduce_sum,
    barrier,
    build_deepspeed_config,
    build_engine,
    check_attention,
    check_world,
    dist_env,
    init_distributed,
    target_counts,
)
from .errors import NonFiniteError, OutputRefusedError
from .guard import FiniteGuard
from .lock import FolderLock
from .outputs import json_safe, read_jsonl_repairing
from .rng import derive_seed
from .task import Task
from .train_config import RunConfig, to_dict

log = logging.getLogger("pmlm_engine.runner")

METRICS = "metrics.jsonl"


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


# --------------------------------------------------------------------------- metrics


class Window:
    """Means over the steps between two metrics rows."""

    def __init__(self) -> None:
        self.n = 0
        self.loss = self.ae = self.par = self.time = 0.0
        self.tokens = self.targets = 0
        self.stats: Any = None

    def add(self, loss: float, ae: float, par: float, tokens: int, targets: int, seconds: float, stats: Any) -> None:
        self.n += 1
        self.loss += loss
        self.ae += ae
        self.par += par
        self.tokens += tokens
        self.targets += targets
        self.time += seconds
        self.stats = stats

    def row(self, step: int, elapsed: float, tokens_seen: int, components: tuple[str, ...]) -> dict[str, Any]:
        n = max(self.n, 1)
        row: dict[str, Any] = dict(step=step, loss=self.loss / n)
        if "ae_loss" in components:
            row["ae_loss"] = self.ae / n
        if "par_loss" in components:
            row["par_loss"] = self.par / n
        row.update(lr=self.stats.lr, grad_norm=self.stats.grad_norm, loss_scale=self.stats.loss_scale,
                   tokens_per_s=self.tokens / max(elapsed, 1e-9), step_time_s=self.time / n, tokens=tokens_seen)
        return row


class Metrics:
    """metrics.jsonl and TensorBoard (rank 0). A resumed run drops the rows past its checkpoint."""

    TAGS = (("loss", "loss/total"), ("ae_loss", "loss/ae"), ("par_loss", "loss/par"), ("lr", "optim/lr"),
            ("grad_norm", "optim/grad_norm"), ("loss_scale", "optim/loss_scale"),
            ("tokens_per_s", "throughput/tokens_per_s"), ("step_time_s", "throughput/step_time_s"))

    def __init__(self, out: Path, tensorboard: bool, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS
        self.writer = None
        if not enabled:
            return
        if start_step and self.path.is_file():  # a torn last line (a crash mid-write) is cut back, with a warning
            rows = [r for r in read_jsonl_repairing(self.path) if r.get("step", 0) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(self.path)
        elif not start_step:  # a fresh start: earlier rows were refused before (Runner.choose_resume) or --overwrite
            self.path.write_text("")
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(json_safe(row), allow_nan=False) + "\n")  # NaN/inf -> null: valid JSON
        self.file.flush()
        if self.writer is not None:
            for key, tag in self.TAGS:
                if row.get(key) is not None and math.isfinite(row[key]):
                    self.writer.add_scalar(tag, row[key], row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def plot_losses(metrics_file: Path, png: Path, title: str) -> None:
    """The loss (and its components) against the step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("ae_loss", "--"), ("par_loss", ":")):  # AE and PAR often overlap
        if key in rows[0]:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=key, linewidth=1.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- resume


def trajectory(cfg_dict: dict[str, Any], world_size: int, engine: str, precision: str,
               ignores: tuple[str, ...] = ()) -> dict[str, Any]:
    """The configuration fields that decide the loss curve (a resumed run must match them)."""
    d = json.loads(json.dumps(cfg_dict))
    d["precision"] = precision  # resolved: "auto" may mean different things on different machines
    for key in ("checkpoint", "logging", "out", "global_batch_size", "engine", "threads", "guard"):
        d.pop(key, None)
    d.get("data", {}).pop("cache_dir", None)
    d.get("data", {}).pop("tokenizer", None)  # its content is compared (sha256), not its path
    d.get("deepspeed", {}).pop("overrides", None)
    d["world_size"], d["engine"] = world_size, engine
    flat = _flat(d)
    for key in ignores:
        flat.pop(key, None)
    return flat


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def on_local_main_first(env: DistEnv, fn: Callable[[], Any]) -> Any:
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


def objective(ae_sum: torch.Tensor, par_sum: torch.Tensor, n_ae: float, n_par: float,
              weights: tuple[float, float]) -> torch.Tensor:
    """The loss one micro-batch contributes: its summed AE and PAR cross-entropies over the global
    batch's target counts ``n_ae``, ``n_par`` (at least 1), weighted; the micro-batches of all ranks
    add up to ``w_ae * mean AE + w_par * mean PAR`` of the global batch."""
    return weights[0] * ae_sum / n_ae + weights[1] * par_sum / n_par


def apply_threads(threads: int) -> None:
    """``threads`` > 0: torch's intra-op threads; 0: torch's default (one per core)."""
    if threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the runner


class Runner:
    """Runs one :class:`Task` to completion (or to a clean stop on SIGTERM / SIGINT)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.cfg: RunConfig = task.cfg
        self.env = dist_env()
        self.engine_name = ""
        self.ds_config: Optional[dict[str, Any]] = None
        self.checkpoints: Optional[CheckpointManager] = None
        self.resume_from: Optional[Path] = None
        self._lock: Optional[FolderLock] = None
        self.last_saved: Optional[Path] = None
        """The newest checkpoint of this job (named when the run has to stop)."""
        self.engine: Any = None

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """The checks that need no loading: world and batch sizes, engine and precision, the
        DeepSpeed config (generated and validated here), the attention backend's name, the task's
        input paths."""
        check_world(self.cfg, self.env)
        self.engine_name = self.cfg.resolved_engine(self.env.world_size)
        if self.engine_name == "deepspeed":
            self.ds_config = build_deepspeed_config(self.cfg, self.env.world_size)
        from .attention import resolve_backend

        resolve_backend(self.task.attention_backend, self.device)  # an unknown backend name fails here
        from .fused_ops import apex_available, choose_optimizer, deepspeed_available

        cuda = self.device.type == "cuda"  # the optimizer's implementation exists here (lamb needs a GPU)
        choose_optimizer(self.cfg.optim.optimizer, self.device.type, self.engine_name, cuda and apex_available(),
                         cuda and deepspeed_available())
        self.task.check(self.env)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.env.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def validate(self, resources: Optional[contextlib.ExitStack] = None) -> dict[str, Any]:
        """Every check that can fail before any output or training (``--print-config`` runs it too):
        :meth:`check`, the task's tokenizer and model configuration, the attention backend in the
        training precision, TensorBoard if asked for, the resume decision and the starting weights.
        Returns the generated DeepSpeed config ({} under the torch engine). With ``resources``
        (a real run) an existing ``out`` is locked before its checkpoints are looked at, until
        ``resources`` closes (a new one is locked by :meth:`prepare`, once every check has passed)."""
        self.check()
        self.task.prepare(self.env)
        check_attention(self.task.attention_backend, self.cfg.resolved_precision(), self.device)
        if self.cfg.logging.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ImportError("logging.tensorboard=true needs TensorBoard: pip install tensorboard "
                                  "(or set logging.tensorboard=false)") from None
        if resources is not None and self.env.is_main and Path(self.cfg.out).is_dir():
            self._lock = resources.enter_context(FolderLock(self.cfg.out))  # a second run fails here, at once
        self.checkpoints = CheckpointManager(self.cfg.checkpoint_dir, self.cfg.checkpoint.keep, self.env.is_main,
                                             barrier, trust=self.cfg.checkpoint.trust)
        self.resume_from = self.choose_resume()
        self.task.prepare_init(resuming=self.resume_from is not None)
        return self.ds_config or {}

    def prepare(self, resources: Optional[contextlib.ExitStack] = None) -> None:
        """:meth:`validate`, then the process group and the data."""
        self.validate(resources)
        self.env = init_distributed(self.engine_name)
        on_local_main_first(self.env, lambda: self.task.load_data(self.env))
        if resources is not None and self.env.is_main and self._lock is None:
            # out did not exist at validation: it is created (and locked) only now that every check passed
            self._lock = resources.enter_context(FolderLock(self.cfg.out))
            if self.choose_resume() != self.resume_from:
                raise OutputRefusedError(f"out={self.cfg.out} received checkpoints from another run while this "
                                         f"one was starting: run the same command again")

    def choose_resume(self) -> Optional[Path]:
        """The checkpoint to continue from (``checkpoint.resume``), refused if written by another job."""
        cfg, manager = self.cfg, self.checkpoints
        assert manager is not None
        spec = cfg.checkpoint.resume
        if spec == "never":
            if manager.tags() and not cfg.checkpoint.overwrite:
                raise OutputRefusedError(
                    f"checkpoint.resume=never but {manager.root} already holds checkpoints {manager.tags()} of an "
                    f"earlier run: to start afresh over them (deleting them and metrics.jsonl) pass --resume never "
                    f"--overwrite; or choose another out, or --resume auto to continue")
            self._check_fresh_metrics()
            return None
        # the manifest is verified before anything (DeepSpeed included) reads the folder
        folder = manager.latest() if spec == "auto" else manager.verify(Path(spec))
        if folder is None:
            self._check_fresh_metrics()
            return None
        state = CheckpointManager.read_state(folder)
        ignores = self.task.resume_ignores
        saved = trajectory(state["config"], state["world_size"], state["engine"], state["precision"], ignores)
        now = trajectory(to_dict(cfg), self.env.world_size, self.engine_name, cfg.resolved_precision(), ignores)
        recorded = state.get("fingerprint") or {"tokenizer vocabulary (sha256)": state.get("tokenizer_sha256")}
        saved.update({k: recorded.get(k) for k in self.task.fingerprint})
        now.update(self.task.fingerprint)
        diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diff:
            shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff[:6])
            raise ValueError(f"cannot resume from {folder}: it was written by a different job ({shown}). Use the "
                             f"same configuration to continue it, or a new out / checkpoint.resume=never to start "
                             f"afresh")
        return folder

    def _check_fresh_metrics(self) -> None:
        """A fresh start empties metrics.jsonl: refused when it holds rows, unless ``--overwrite``."""
        path = Path(self.cfg.out) / METRICS
        if not self.cfg.checkpoint.overwrite and path.is_file() and path.read_bytes().strip():
            raise OutputRefusedError(f"{path} holds the metrics of an earlier run that left no checkpoint to resume: "
                                     f"to start afresh over it pass --resume never --overwrite, or choose another out")

    # ------------------------------------------------------------------ hooks

    def before_optimizer_step(self, step: int) -> None:
        """Called after the last backward of optimizer step ``step`` (0-based), before the optimizer
        step: the gradients of the whole global batch are in place on every rank."""

    def save(self, step: int, tokens: int) -> Path:
        """A resumable checkpoint after ``step`` steps (every rank calls it); refused, on every rank, when
        any rank's parameters hold NaN or inf (nothing non-finite is ever written)."""
        assert self.checkpoints is not None
        # this rank's values: under ZeRO-3 a parameter is a placeholder and its shard is ``ds_tensor``
        local = {name: getattr(p, "ds_tensor", p).detach() for name, p in self.engine.model.named_parameters()}
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(t).all()) for t in local.values()) else 1.0])
        if float(all_reduce_sum(bad)) > 0:
            check_finite(local, f"the model at step {step} (not saved; the last good checkpoint is {self.last_saved})")
            raise NonFiniteError(f"the model at step {step} holds non-finite values on another rank: not saved; the "
                                 f"last good checkpoint is {self.last_saved}")
        state = {"step": step, "tokens": tokens, "config": to_dict(self.cfg), "world_size": self.env.world_size,
                 "engine": self.engine_name, "precision": self.cfg.resolved_precision(), "task": self.task.name,
                 "fingerprint": self.task.fingerprint, "format": 2, "time": time.time()}
        self.last_saved = self.checkpoints.save(step, self.engine.save, state)
        return self.last_saved

    def export(self, path: Path) -> Path:
        """The consolidated fp32 model (gathered from every rank under ZeRO), re-loaded and compared bit for bit."""
        state = self.engine.fp32_state_dict()  # collective
        if self.env.is_main:
            assert self.task.model_cfg is not None
            save_state(state, self.task.model_cfg, path, extra={**self.task.export_meta(),
                                                                "trained_steps": self.cfg.steps})
            reloaded = dict(load_model(path).named_parameters())
            bad = [k for k, v in state.items() if not torch.equal(reloaded[k], v)]
            if bad or set(reloaded) != set(state):
                raise RuntimeError(f"export to {path} does not read back bit for bit: {bad[:5]}")
            log.info("exported the fp32 model to %s", path)
        barrier()
        return path

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Run (or resume) the task; return a summary (first/last loss, steps, where things are).
        ``out`` is locked from before the resume decision to the end of the run."""
        with contextlib.ExitStack() as resources:
            return self._run(resources)

    def _run(self, resources: contextlib.ExitStack) -> dict[str, Any]:
        t_start = time.perf_counter()
        cfg, task = self.cfg, self.task
        apply_threads(cfg.threads)
        self.prepare(resources)
        env = self.env
        out = Path(cfg.out)
        if self.resume_from is None and cfg.checkpoint.resume == "never" and cfg.checkpoint.overwrite:
            assert self.checkpoints is not None
            cleared = self.checkpoints.clear()  # --resume never --overwrite: the earlier run's checkpoints go
            if cleared:
                log.warning("--resume never --overwrite: deleted the earlier run's checkpoints %s in %s", cleared,
                            self.checkpoints.root)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / task.config_file).write_text(json.dumps(to_dict(cfg), indent=2))
        log.info("%s; engine %s, precision %s%s", task.describe(env, self.engine_name), self.engine_name,
                 cfg.resolved_precision(),
                 f", ZeRO stage {cfg.deepspeed.zero_stage}" if self.engine_name == "deepspeed" else "")

        seed = cfg.data.seed  # type: ignore[attr-defined]
        torch.manual_seed(seed)  # identical initial weights on every rank
        model = task.build_model(resuming=self.resume_from is not None)
        torch.manual_seed(derive_seed(seed, 0xD20, env.rank) & ((1 << 63) - 1))  # dropout, per rank
        self.engine = engine = build_engine(model, cfg, env, self.ds_config, label_smoothing=task.label_smoothing)

        start, tokens_seen = 0, 0
        if self.resume_from is not None:
            state = CheckpointManager.read_state(self.resume_from)
            engine.load(self.resume_from, trust=cfg.checkpoint.trust)
            self.last_saved = self.resume_from
            start, tokens_seen = int(state["step"]), int(state["tokens"])
            log.info("resumed from %s at step %d", self.resume_from, start)

        metrics = Metrics(out, cfg.logging.tensorboard, start, env.is_main)
        summary: dict[str, Any] = {"start_step": start, "stopped_by": None}
        history: list[float] = []
        steps_run = 0
        window = Window()
        guard = FiniteGuard(cfg.resolved_precision(), cfg.guard)
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=task.name, unit="step", dynamic_ncols=True,
                   disable=not (env.is_main and cfg.logging.progress))
        w_ae, w_par = task.loss_weights
        step = start
        with StopRequest() as stop:
            t_window = time.perf_counter()
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                batches = task.batches(step, env.rank)
                counts = torch.tensor([0.0, 0.0], dtype=torch.float64)
                for b in batches:
                    ae_n, par_n = target_counts(b)
                    counts += torch.tensor([ae_n, par_n], dtype=torch.float64)
                all_reduce_sum(counts)
                n_ae = max(float(counts[0]), 1.0)
                n_par = max(float(counts[1]), 1.0) + task.par_denominator_eps
                sums = torch.zeros(4, dtype=torch.float64)  # ae sum, par sum, tokens, stop requests
                for b in batches:
                    ae_sum, par_sum = engine.forward(b)
                    engine.backward(objective(ae_sum, par_sum, n_ae, n_par, task.loss_weights))
                    sums[0] += float(ae_sum.detach())
                    sums[1] += float(par_sum.detach())
                    sums[2] += task.count_tokens(b)
                self.before_optimizer_step(step)
                stats = engine.step()
                sums[3] = 1.0 if stop.requested else 0.0
                all_reduce_sum(sums)
                ae_loss, par_loss = float(sums[0]) / n_ae, float(sums[1]) / n_par
                loss = w_ae * ae_loss + w_par * par_loss
                done = step + 1
                steps_run += 1
                tokens_seen += int(sums[2])
                if math.isfinite(loss):
                    history.append(loss)
                window.add(loss, ae_loss, par_loss, int(sums[2]), int(counts[1]), time.perf_counter() - t0, stats)
                bar.update(1)
                if env.is_main and cfg.logging.progress:
                    shown = {"loss": f"{loss:.3f}"}
                    if "ae_loss" in task.components:
                        shown.update(ae=f"{ae_loss:.3f}", par=f"{par_loss:.3f}")
                    bar.set_postfix(**shown, tok_s=f"{window.tokens / max(time.perf_counter() - t_window, 1e-9):.0f}",
                                    refresh=False)
                stopping = float(sums[3]) > 0
                try:  # a non-finite step was skipped by the engine; too many in a row stop the run here
                    guard.after_step(done, loss, stats.grad_norm, stats.skipped, self.last_saved)
                except NonFiniteError:
                    elapsed = time.perf_counter() - t_window
                    metrics.write({**window.row(done, elapsed, tokens_seen, task.components),
                                   **task.row_extra(done, window, elapsed)})  # the stopping step's row first
                    metrics.close()
                    raise
                if done % cfg.logging.every == 0 or done == cfg.steps or stopping:
                    elapsed = time.perf_counter() - t_window
                    row = window.row(done, elapsed, tokens_seen, task.components)
                    row.update(task.row_extra(done, window, elapsed))
                    metrics.write(row)
                    window = Window()
                    t_window = time.perf_counter()
                periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps
                if periodic or stopping or (done == cfg.steps and cfg.checkpoint.at_end):
                    self.save(done, tokens_seen)
                if stopping and done < cfg.steps:
                    summary["stopped_by"] = stop.signal or "a signal on another rank"
                    break
        bar.close()
        metrics.close()
        done = step + 1 if steps_run else start
        assert self.checkpoints is not None
        summary.update(steps=done, tokens=tokens_seen,
                       checkpoint=str(self.checkpoints.latest() or "") if env.is_main else "",
                       elapsed_s=time.perf_counter() - t_start)
        if done == cfg.steps and cfg.checkpoint.export and summary["stopped_by"] is None:
            summary["export"] = str(self.export(out / "final"))
        if env.is_main and cfg.logging.plot and (out / METRICS).is_file():
            plot_losses(out / METRICS, out / "loss.png", task.name)
        if history:
            k = max(1, min(10, len(history) // 4))
            summary.update(first_loss=sum(history[:k]) / k, last_loss=sum(history[-k:]) / k, losses=history)
            log.info("loss %.3f -> %.3f (mean of the first / last %d steps of this run)", summary["first_loss"],
                     summary["last_loss"], k)
        if summary["stopped_by"]:
            log.warning("stopped by %s after step %d; checkpoint %s. Run the same command again to resume.",
                        summary["stopped_by"], done, summary.get("checkpoint") or self.checkpoints.root)
        return summary
