"""Training engines: plain torch (one process) and DeepSpeed (ZeRO 0-3, bf16/fp16, any world size).

Both engines drive the same :class:`PMLMTrainStep` module (encoder + AE/PAR loss sums), so
under ZeRO-3 every parameter is gathered inside one DeepSpeed forward. Both expose the
same small interface to the loop in :mod:`pmlm_engine.runner`: ``forward`` / ``backward`` per
micro-batch, ``step`` per optimizer step, ``save`` / ``load`` of a resumable checkpoint
folder, and ``fp32_state_dict`` for the consolidated export.

The DeepSpeed configuration is generated from :class:`pmlm_engine.train_config.TrainConfig`
(:func:`deepspeed_config`); a user JSON of extra keys (``deepspeed.overrides``) is merged in
by :func:`merge_deepspeed_overrides`, which refuses unknown keys, an ``optimizer`` or
``scheduler`` (those come from ``optim``), and any value that contradicts the typed
configuration, naming the key and the field it contradicts. :func:`validate_deepspeed_config`
then lets DeepSpeed's own parser check the result, before anything is built.

Loss normalisation: the objective of an optimizer step is the mean AE cross-entropy over all
masked positions of the *global* batch plus the mean PAR cross-entropy over all its pseudo
positions. The loop counts both over every micro-batch of every rank first (one all-reduce),
so each micro-batch contributes ``sum / global count`` and the result does not depend on how
the global batch is split over ranks and accumulation steps.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint import read_safetensors
from .fused_ops import fuse_layer_norms
from .layout import IGNORE
from .losses import pmlm_loss
from .model import PMLMModel
from .optim import build_optimizer, build_scheduler
from .train_config import TrainConfig, read_json_object

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"


# --------------------------------------------------------------------------- distributed environment


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (from the launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """The launcher's environment (a plain process is rank 0 of 1)."""
    def get(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

    env = DistEnv(get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0))
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank} is outside [0, WORLD_SIZE={env.world_size})")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed() -> Any:
    """Import DeepSpeed quietly (its INFO lines go to the ``deepspeed`` logger at WARNING)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what it detects anyway, without the warning
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(f"engine=deepspeed needs DeepSpeed: pip install deepspeed==0.19.8 ({exc})") from None
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def init_distributed(engine: str) -> DistEnv:
    """Start the process group for ``engine`` (``deepspeed``: gloo on the CPU, nccl on GPUs).

    A plain single process gets ``RANK=0 WORLD_SIZE=1`` and a free local port, so DeepSpeed
    also runs without a launcher.
    """
    env = dist_env()
    if engine == "torch":
        if env.world_size > 1:
            raise ValueError(f"engine=torch runs one process but WORLD_SIZE={env.world_size}: use engine=deepspeed "
                             f"under a distributed launcher")
        return env
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed = import_deepspeed()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return env


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (in place; identity in one process)."""
    if is_distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def shutdown() -> None:
    """Barrier, then destroy the process group (avoids a rare abort at exit, TOOLCHAIN.md)."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- DeepSpeed configuration


# DeepSpeed keys the typed configuration owns: path -> the TrainConfig field it comes from
OWNED = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "train_batch_size": "global_batch_size (= data.batch_size * grad_accum * world size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "fp16.loss_scale": "deepspeed.loss_scale",
    "fp16.initial_scale_power": "deepspeed.initial_scale_power",
    "fp16.loss_scale_window": "deepspeed.loss_scale_window",
    "fp16.hysteresis": "deepspeed.hysteresis",
    "fp16.min_loss_scale": "deepspeed.min_loss_scale",
    "zero_allow_untested_optimizer": "the engine (it hands DeepSpeed torch's AdamW built from optim)",
}
REFUSED = {
    "optimizer": "the optimizer is built from the optim section (optim.optimizer = adamw | lamb, optim.lr, "
                 "optim.betas, optim.eps, optim.weight_decay)",
    "scheduler": "the schedule is warmup + linear decay from optim.warmup_steps and steps",
    "amp": "mixed precision is the precision field (fp32 | bf16 | fp16)",
}
# Other top-level keys DeepSpeed reads that a user may add (their contents are checked by DeepSpeed)
ALLOWED_EXTRA = {
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "zero_optimization", "bf16", "fp16", "torch_autocast",
    "activation_checkpointing", "flops_profiler", "comms_logger", "checkpoint", "data_types", "aio", "timers",
    "compile", "tensorboard", "wandb", "csv_monitor", "comet", "zero_force_ds_cpu_optimizer",
    "disable_allgather", "sparse_gradients",
}


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed configuration generated from ``cfg`` for ``world_size`` ranks (no overrides)."""
    micro, accum = cfg.data.batch_size, cfg.grad_accum
    precision = cfg.resolved_precision()
    ds: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # the loop logs
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if precision == "fp16":
        d = cfg.deepspeed
        ds["fp16"].update(loss_scale=d.loss_scale, initial_scale_power=d.initial_scale_power,
                          loss_scale_window=d.loss_scale_window, hysteresis=d.hysteresis,
                          min_loss_scale=d.min_loss_scale)
    return ds


def read_deepspeed_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of ``deepspeed.overrides`` (errors name the file)."""
    return read_json_object(path, "deepspeed.overrides file")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_deepspeed_overrides(generated: dict[str, Any], overrides: Mapping[str, Any],
                              source: str = "deepspeed.overrides") -> dict[str, Any]:
    """``generated`` with ``overrides`` merged in; contradictions and unknown keys are refused.

    Raises:
        ValueError: naming the override key, and for owned keys the TrainConfig field to set instead.
    """
    for key in overrides:
        if key in REFUSED:
            raise ValueError(f"{source}: '{key}' cannot be set in the DeepSpeed overrides: {REFUSED[key]}. "
                             f"Remove '{key}' from {source}")
        if key not in ALLOWED_EXTRA and key not in generated:
            allowed = sorted(ALLOWED_EXTRA | set(generated))
            raise ValueError(f"{source}: unknown DeepSpeed key '{key}': allowed top-level keys are {allowed}")
    flat_gen = _flatten(generated)
    for key, value in _flatten(overrides).items():
        if key not in OWNED:
            continue
        want = flat_gen.get(key)
        same = value == want and type(value) is type(want) or (
            isinstance(value, (int, float)) and isinstance(want, (int, float)) and not isinstance(value, bool)
            and not isinstance(want, bool) and float(value) == float(want))
        if want is None and key.startswith("fp16.") and key != "fp16.enabled":
            raise ValueError(f"{source}: {key}={value!r} has no effect unless precision=fp16; set it with "
                             f"{OWNED[key]} and precision=fp16")
        if not same:
            if key == "train_batch_size":
                micro, accum = generated["train_micro_batch_size_per_gpu"], generated["gradient_accumulation_steps"]
                raise ValueError(
                    f"{source}: train_batch_size={value!r} != train_micro_batch_size_per_gpu * "
                    f"gradient_accumulation_steps * world size = {micro} * {accum} * {want // (micro * accum)} = "
                    f"{want}: set data.batch_size / grad_accum instead, or remove train_batch_size")
            raise ValueError(f"{source}: {key}={value!r} contradicts the typed configuration ({OWNED[key]} gives "
                             f"{want!r}): set {OWNED[key].split(' ')[0]} instead and remove {key} from {source}")
    return _deep_merge(generated, overrides)


def validate_deepspeed_config(ds: dict[str, Any], source: str = "the generated DeepSpeed config") -> None:
    """Let DeepSpeed's own parser check ``ds`` (sub-sections reject unknown keys) before anything runs."""
    deepspeed = import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in ds.items() if k != "train_batch_size"}  # the world size is checked by us
    try:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            probe["train_batch_size"] = ds["train_batch_size"]
        DeepSpeedConfig(probe)
    except Exception as exc:  # pydantic ValidationError, AssertionError, DeepSpeedConfigError, ValueError
        msg = " ".join(str(exc).split())
        raise ValueError(f"DeepSpeed refused {source}: {type(exc).__name__}: {msg[:600]}") from None
    del deepspeed


def check_world(cfg: TrainConfig, env: DistEnv) -> None:
    """Batch sizes that do not fit the world size, engine/precision combinations that cannot run."""
    derived = cfg.data.batch_size * cfg.grad_accum * env.world_size
    if cfg.global_batch_size and cfg.global_batch_size != derived:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} != data.batch_size * grad_accum * world size = "
            f"{cfg.data.batch_size} * {cfg.grad_accum} * {env.world_size} = {derived}: change data.batch_size or "
            f"grad_accum (or global_batch_size) so that they agree")
    engine = cfg.resolved_engine(env.world_size)
    if engine == "torch":
        if env.world_size > 1:
            raise ValueError(f"engine=torch runs one process but WORLD_SIZE={env.world_size}: set engine=deepspeed")
        if cfg.resolved_precision() == "fp16":
            raise ValueError("precision=fp16 needs engine=deepspeed (dynamic loss scaling); use bf16 with engine=torch")
        default = type(cfg.deepspeed)()
        for name in ("zero_stage", "overrides"):
            if getattr(cfg.deepspeed, name) != getattr(default, name):
                raise ValueError(f"deepspeed.{name}={getattr(cfg.deepspeed, name)!r} needs engine=deepspeed "
                                 f"(the engine is {cfg.engine!r}, resolved to torch): set engine=deepspeed")
    if engine == "deepspeed" and cfg.resolved_precision() == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision=fp16: DeepSpeed's CPU accelerator does not train in fp16 (\"Type fp16 is not "
                         "supported on your device\"); use precision=bf16 or fp32 on the CPU")


def check_attention(backend: str, precision: str, device: torch.device) -> None:
    """Run the attention backend once, forward and backward, under ``precision`` (a few tokens):
    a backend that cannot run in this precision fails here, before any training."""
    from .attention import RelativePositionBias, pseudo_mask_attention, resolve_backend

    name = resolve_backend(backend, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else None
    proj = nn.Linear(16, 48).to(device)  # q, k, v come out of a projection, as in the model
    x = torch.randn(1, 6, 16, device=device)
    step = torch.tensor([[0, 0, 0, 0, 1, -1]], device=device)
    table = torch.zeros(2, 32, device=device, requires_grad=True)
    bias = RelativePositionBias(table, torch.tensor([[0, 1, 2, 3, 2, 2]], device=device))
    try:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            q, k, v = proj(x).view(1, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
            out = pseudo_mask_attention(q, k, v, step, torch.zeros_like(step), bias, backend)
        out.float().sum().backward()
    except Exception as exc:  # any failure of the backend in this precision; re-raised with the fix
        raise ValueError(f"model.attention_backend={backend!r} (resolved to {name!r}) fails under "
                         f"precision={precision} ({type(exc).__name__}: {exc}): set model.attention_backend=sdpa "
                         f"or precision=fp32") from None


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """Generated config + ``deepspeed.overrides``, validated by DeepSpeed."""
    ds = deepspeed_config(cfg, world_size)
    source = "the generated DeepSpeed config"
    if cfg.deepspeed.overrides:
        source = f"deepspeed.overrides file {cfg.deepspeed.overrides}"
        ds = merge_deepspeed_overrides(ds, read_deepspeed_overrides(cfg.deepspeed.overrides), source)
    validate_deepspeed_config(ds, source)
    return ds


# --------------------------------------------------------------------------- the step module


def target_counts(batch: Mapping[str, Tensor]) -> tuple[int, int]:
    """(AE targets, PAR targets) of a batch: labelled main tokens and labelled pseudo tokens."""
    labelled = batch["labels"] != IGNORE
    return int((labelled & (batch["step"] == 0)).sum()), int((labelled & (batch["step"] < 0)).sum())


class PMLMTrainStep(nn.Module):
    """Encoder + tied head + AE/PAR loss sums in one forward (what DeepSpeed wraps).

    ``forward`` returns ``(ae_sum, par_sum)``: summed cross-entropy over the batch's AE and
    PAR targets (fp32, or float64 for a float64 model). The caller divides by the global target
    counts (:func:`pmlm_engine.runner.objective`). ``label_smoothing`` is a float (torch's;
    fine-tuning uses it, pre-training 0) or a :class:`pmlm_engine.losses.LabelSmoothing`
    (s2s-ft's KL smoothing).
    """

    def __init__(self, model: PMLMModel, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor, step: Tensor,
                doc_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model(input_ids, position_ids, segment_ids, step, doc_ids)  # (B, L, C)
        out = pmlm_loss(hidden, labels, step, self.model.lm_head, label_smoothing=self.label_smoothing)
        kind = step[out.token_index[:, 0], out.token_index[:, 1]]  # (N,)
        # at least fp32 (bf16 losses summed in fp32); a float64 model keeps float64 (the exact tests)
        token_loss = out.token_loss.to(torch.promote_types(out.token_loss.dtype, torch.float32))
        return token_loss[kind == 0].sum(), token_loss[kind < 0].sum()


def _inputs(batch: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, ...]:
    return tuple(batch[k].to(device, non_blocking=True)
                 for k in ("input_ids", "position_ids", "segment_ids", "step", "doc_ids", "labels"))


@dataclass
class StepStats:
    """What one optimizer step reports."""

    grad_norm: Optional[float]
    """Global gradient norm before clipping (None where DeepSpeed does not compute it)."""
    lr: float
    """Learning rate used by this step."""
    loss_scale: Optional[float] = None
    """fp16 only: the current loss scale."""
    skipped: bool = False
    """The update was skipped: a non-finite gradient norm (torch engine; DeepSpeed's fp16 loss scaler
    and its bf16 ZeRO-1/2 overflow check), parameters and optimizer state unchanged."""


def _rng_save(folder: Path, rank: int) -> None:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    save_file(state, str(folder / f"rng-rank{rank:05d}.safetensors"))


def _rng_load(folder: Path, rank: int) -> None:
    path = folder / f"rng-rank{rank:05d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {path.name}: was it written with another world size?")
    state = read_safetensors(path)  # a damaged file is named
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k] for k in sorted(state) if k.startswith("cuda")])


# --------------------------------------------------------------------------- engines


class TorchEngine:
    """One process, torch's AdamW, optional bf16 autocast (fp32 weights)."""

    name = "torch"

    def __init__(self, model: PMLMModel, cfg: TrainConfig, env: DistEnv, label_smoothing: float = 0.0) -> None:
        self.model = model
        self.env = env
        self.device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.module = PMLMTrainStep(model, label_smoothing).to(self.device)
        fuse_layer_norms(model, self.device.type)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.grad_clip = cfg.optim.grad_clip
        self.autocast_dtype = torch.bfloat16 if cfg.resolved_precision() == "bf16" else None
        self.world_size = 1
        self.module.train()

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.module(*_inputs(batch, self.device))

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> StepStats:
        lr = self.optimizer.param_groups[0]["lr"]
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or math.inf)
        if not math.isfinite(float(norm)):  # skip the update as loss scalers do; pmlm_engine.guard decides on stopping
            self.optimizer.zero_grad(set_to_none=True)
            return StepStats(grad_norm=float(norm), lr=lr, skipped=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=float(norm), lr=lr)

    def save(self, root: Path, tag: str) -> None:
        folder = root / tag
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.fp32_state_dict(), str(folder / MODEL_FILE), metadata={"format": "pmlm-engine"})
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / OPTIM_FILE)
        _rng_save(folder, 0)

    def load(self, folder: Path, trust: bool = False) -> None:
        """Resume from ``folder`` (safetensors and a weights-only ``torch.load``: nothing to trust)."""
        state = read_safetensors(folder / MODEL_FILE)
        state["lm_head.embedding.weight"] = state["embeddings.word_embeddings.weight"]
        self.model.load_state_dict(state, strict=True)
        opt = torch.load(folder / OPTIM_FILE, map_location="cpu", weights_only=True)  # tensors and numbers only
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        _rng_load(folder, 0)

    def fp32_state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in self.model.named_parameters()}


class DeepSpeedEngine:
    """DeepSpeed with torch's AdamW as client optimizer and the warmup + linear decay schedule."""

    name = "deepspeed"

    def __init__(self, model: PMLMModel, cfg: TrainConfig, env: DistEnv, ds_config: dict[str, Any],
                 label_smoothing: float = 0.0) -> None:
        deepspeed = import_deepspeed()
        self.model = model
        self.env = env
        self.world_size = env.world_size
        self.stage = ds_config["zero_optimization"]["stage"]
        module = PMLMTrainStep(model, label_smoothing)
        if self.stage == 3:
            # parameters read outside their owner's forward: the tied decoder (LMHead reads the word
            # embedding's weight) and the shared relative bias table (read by PMLMModel.forward)
            deepspeed.zero.register_external_parameter(model.lm_head, model.embeddings.word_embeddings.weight)
            if model.rel_pos_bias is not None:
                deepspeed.zero.register_external_parameter(model, model.rel_pos_bias.weight)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"  # where DeepSpeed will put the model
        fuse_layer_norms(model, device_type)
        optimizer = build_optimizer(model, cfg.optim, device_type, engine="deepspeed")
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.device = self.ds.device
        self._fp32_norm = self.stage == 0 and cfg.resolved_precision() == "fp32"
        self.ds.train()

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.ds(*_inputs(batch, self.device))

    def backward(self, loss: Tensor) -> None:
        # DeepSpeed averages gradients over ranks: scale by the world size so that the gradient is
        # that of the global objective; accumulation is summed (the loss is already normalised)
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> StepStats:
        lr = self.ds.get_lr()[0]
        manual = None
        if self._fp32_norm:  # plain data parallel in fp32: DeepSpeed clips but does not report the norm
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            manual = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        skipped_before = self.ds.skipped_steps
        self.ds.step()
        norm = self.ds.get_global_grad_norm() if manual is None else manual
        scale = getattr(self.ds.optimizer, "cur_scale", None) if self.ds.fp16_enabled() else None
        return StepStats(grad_norm=None if norm is None else float(norm), lr=lr,
                         loss_scale=None if scale is None else float(scale),
                         skipped=self.ds.skipped_steps > skipped_before)

    def save(self, root: Path, tag: str) -> None:
        self.ds.save_checkpoint(str(root), tag=tag, save_latest=False)
        _rng_save(root / tag, self.env.rank)

    def load(self, folder: Path, trust: bool = False) -> None:
        """Resume from ``folder``; its files are read with the restricted (weights-only) unpickler unless
        ``trust`` (:mod:`pmlm_engine.safe_load`). The folder's manifest was verified by the caller."""
        if not trust:
            from .safe_load import install_weights_only_loader

            install_weights_only_loader(self.ds)
        path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")
        _rng_load(folder, self.env.rank)

    def fp32_state_dict(self) -> dict[str, Tensor]:
        """Full fp32 (master) parameters; a collective call: every rank must call it. Empty off rank 0."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters: dict[int, Tensor] = {}
        opt = self.ds.optimizer
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups") and self.stage == 0:
            for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups):  # bf16 without ZeRO: FP16_UnfusedOptimizer
                if isinstance(g32, (list, tuple)):
                    masters.update({id(p16): p32 for p16, p32 in zip(g16, g32)})
        out: dict[str, Tensor] = {}
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:
                full = masters.get(id(p))
            if full is None:
                if p.dtype != torch.float32:
                    raise RuntimeError(f"no fp32 master copy of {name} ({p.dtype}) found in "
                                       f"{type(opt).__name__}: cannot export an fp32 model")
                full = p
            if self.env.is_main:
                out[name] = full.detach().float().cpu().clone()
        return out


def build_engine(model: PMLMModel, cfg: TrainConfig, env: DistEnv,
                 ds_config: Optional[dict[str, Any]] = None,
                 label_smoothing: float = 0.0) -> TorchEngine | DeepSpeedEngine:
    """The engine ``cfg`` resolves to; ``label_smoothing`` goes to the loss (fine-tuning's, 0 in pre-training)."""
    engine = cfg.resolved_engine(env.world_size)
    if engine == "torch":
        return TorchEngine(model, cfg, env, label_smoothing)
    if ds_config is None:
        raise ValueError("engine=deepspeed needs the DeepSpeed config (build_deepspeed_config)")
    return DeepSpeedEngine(model, cfg, env, ds_config, label_smoothing)
