"""The typed configuration of a pre-training job: one nested dataclass, one source of truth.

    TrainConfig
      model       ModelSection       preset + ModelConfig fields
      data        DataConfig         corpus, tokenizer, lengths, batch per rank, masking
      optim       OptimConfig        AdamW and the warmup + linear decay schedule
      checkpoint  CheckpointConfig   interval, retention, resume, export
      logging     LoggingConfig      metrics interval, progress bar, TensorBoard, plot
      deepspeed   DeepSpeedSection   ZeRO stage, fp16 loss scaling, a JSON of extra DeepSpeed keys
      (top level) engine, precision, steps, grad_accum, global_batch_size, out, init_from

The DeepSpeed configuration is generated from this (:func:`pmlm_engine.engine.deepspeed_config`).

A configuration is a JSON file (``--config``) of the same nesting, plus dotted overrides
(``--set optim.lr=3e-4 data.batch_size=8``); values are parsed as JSON where they parse
(``8``, ``3e-4``, ``true``, ``["news", "wiki"]``) and taken as strings otherwise. Unknown keys
and values of the wrong type are refused with their dotted name; each section validates
its own ranges in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import PRESETS, MaskingConfig, ModelConfig
from .data import DataConfig
from .optim import OptimConfig

ENGINES = ("auto", "torch", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# ModelConfig fields that decide parameter shapes (a warm start or resume must agree on them)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position",
                "type_vocab_size", "rel_pos_buckets")


@dataclass
class ModelSection:
    """The model: a preset plus any :class:`pmlm_engine.config.ModelConfig` field to override.

    In JSON the overrides sit beside the preset: ``{"preset": "tiny", "num_layers": 2}``.
    ``vocab_size`` comes from the tokenizer; setting it is allowed only to assert it.
    """

    preset: str = "tiny"
    """``tiny`` (4 x 256), ``small`` (6 x 384, MiniLM's shape) or ``base`` (12 x 768)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that replace the preset's (flattened into this section in JSON)."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is invalid: choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {['model.' + k for k in unknown]}: allowed keys are "
                             f"['preset'] + {sorted(known)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], path: str) -> "ModelSection":
        data = dict(data)
        preset = _coerce(data.pop("preset", "tiny"), str, f"{path}.preset")
        hints = typing.get_type_hints(ModelConfig)
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {[f'{path}.{k}' for k in unknown]}: allowed keys are "
                             f"['preset'] + {sorted(known)}")
        overrides = {k: _coerce(v, hints[k], f"{path}.{k}") for k, v in data.items()}
        return cls(preset=preset, overrides=overrides)

    def to_mapping(self) -> dict[str, Any]:
        return {"preset": self.preset, **self.overrides}

    def build(self, vocab_size: int, tokenizer_source: str = "the tokenizer") -> ModelConfig:
        """The ModelConfig for a tokenizer of ``vocab_size`` ids."""
        if "vocab_size" in self.overrides and self.overrides["vocab_size"] != vocab_size:
            raise ValueError(f"model.vocab_size={self.overrides['vocab_size']} does not match the tokenizer's "
                             f"vocabulary ({vocab_size} entries in {tokenizer_source}): use the tokenizer the "
                             f"model was built for (data.tokenizer) or drop model.vocab_size")
        overrides = {k: v for k, v in self.overrides.items() if k != "vocab_size"}
        try:
            return ModelConfig.preset(self.preset, vocab_size=vocab_size, **overrides)
        except ValueError as exc:
            raise ValueError(f"model.{exc}") from None


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (model, optimizer, schedule, data position, RNG) and the final export."""

    every: int = 0
    """Save every N optimizer steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep: int = 2
    """Keep the newest K checkpoints; older ones are deleted after a save succeeds."""
    dir: str = ""
    """Checkpoint folder ("" = ``<out>/checkpoints``). Must be shared by all ranks."""
    resume: str = "auto"
    """``auto``: continue from the newest checkpoint in ``dir`` if there is one; ``never``: refuse
    to start when ``dir`` already holds checkpoints; or the path of one checkpoint folder."""
    at_end: bool = True
    """Save a checkpoint after the last step."""
    export: bool = True
    """Write the consolidated fp32 model (``<out>/final``: model.safetensors + config.json) at the end."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every={self.every} is invalid: expected 0 (off) or a positive step interval")
        if self.keep < 1:
            raise ValueError(f"keep={self.keep} is invalid: keep at least 1 checkpoint")
        if not self.resume:
            raise ValueError("resume='' is invalid: use 'auto', 'never' or a checkpoint folder")


@dataclass
class LoggingConfig:
    """Where progress and metrics go (rank 0 only)."""

    every: int = 10
    """Steps per metrics row (JSONL and TensorBoard): losses, tokens/s and step time are means over
    the window; lr and grad_norm are its last step's."""
    progress: bool = True
    """tqdm progress bar with loss and tokens/s."""
    tensorboard: bool = True
    """TensorBoard event files under ``<out>/tb``."""
    plot: bool = True
    """``<out>/loss.png`` (total, AE and PAR loss) at the end."""
    level: str = "INFO"
    """Python logging level of the job."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every={self.every} is invalid: expected a positive number of steps")
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"level={self.level!r} is invalid: choose DEBUG, INFO, WARNING or ERROR")


@dataclass
class DeepSpeedSection:
    """DeepSpeed settings the engine does not derive from the rest of the configuration."""

    zero_stage: int = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters)."""
    overrides: str = ""
    """A JSON file of extra DeepSpeed keys (e.g. ``zero_optimization.overlap_comm``). Keys this
    configuration owns must agree with it; ``optimizer`` / ``scheduler`` are refused."""
    loss_scale: float = 0.0
    """fp16 only: 0 = dynamic loss scaling, else a fixed scale."""
    initial_scale_power: int = 16
    """fp16 only: the dynamic scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the scale is raised."""
    hysteresis: int = 2
    """fp16 only: overflows tolerated before the scale is lowered."""
    min_loss_scale: float = 1.0
    """fp16 only: the dynamic scale never drops below this."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage} is invalid: choose 0, 1, 2 or 3")
        if self.loss_scale < 0:
            raise ValueError(f"loss_scale={self.loss_scale} is invalid: 0 (dynamic) or a positive scale")
        if not 0 <= self.initial_scale_power <= 32:
            raise ValueError(f"initial_scale_power={self.initial_scale_power} is invalid: expected 0..32")
        if self.loss_scale_window < 1 or self.hysteresis < 1 or self.min_loss_scale <= 0:
            raise ValueError("loss_scale_window, hysteresis and min_loss_scale must be positive")


def _default_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, warmup_steps=20)


@dataclass
class TrainConfig:
    """A pre-training job. Defaults: the README's CPU demo (tiny model, news corpus)."""

    engine: str = "auto"
    """``torch`` (one process), ``deepspeed``, or ``auto``: deepspeed under a distributed launcher
    (``WORLD_SIZE`` set), torch otherwise."""
    precision: str = "auto"
    """``fp32``; ``bf16`` (fp32 master weights; torch engine: autocast, deepspeed: its bf16 mode);
    ``fp16`` (deepspeed on a GPU, with loss scaling: see the ``deepspeed`` section); ``auto``: bf16
    where the hardware computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32."""
    steps: int = 200
    """Optimizer steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step and rank (gradient accumulation)."""
    global_batch_size: int = 0
    """Examples per optimizer step; 0 = ``data.batch_size * grad_accum * world size``. If set,
    it must equal that product (checked at start, when the world size is known)."""
    out: str = "runs/pretrain"
    """Output folder: metrics.jsonl, tb/, loss.png, checkpoints/, final/, train_config.json."""
    ae_weight: float = 1.0
    """Weight of the AE loss in the objective (docs/losses.md: 1)."""
    par_weight: float = 1.0
    """Weight of the PAR loss in the objective (docs/losses.md: 1)."""
    threads: int = 0
    """torch intra-op threads of each process (0 = torch's default, one per core). On a machine shared
    with other jobs, 1 avoids the slowdown of oversubscribed threads."""
    init_from: str = ""
    """Warm start: ``minilm`` (the real MiniLM-L6 checkpoint), a model folder or a HF BERT checkpoint.
    The MLM head is initialized fresh, an added relative bias table at zero."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=_default_optim)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r} is invalid: choose one of {list(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is invalid: choose one of {list(PRECISIONS)}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is invalid: expected a positive number of optimizer steps")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum} is invalid: expected a positive integer")
        if self.global_batch_size < 0:
            raise ValueError(f"global_batch_size={self.global_batch_size} is invalid: 0 (derived) or positive")
        if self.global_batch_size and self.global_batch_size % (self.data.batch_size * self.grad_accum):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of data.batch_size * grad_accum = "
                f"{self.data.batch_size} * {self.grad_accum}: it must equal data.batch_size * grad_accum * world size")
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}: "
                             "lower the warmup or raise steps")
        if self.ae_weight < 0 or self.par_weight < 0 or self.ae_weight + self.par_weight == 0:
            raise ValueError(f"ae_weight={self.ae_weight}, par_weight={self.par_weight} are invalid: expected "
                             f"non-negative weights, not both 0")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} is invalid: 0 (torch's default) or a positive count")
        if not self.out:
            raise ValueError("out='' is invalid: name an output folder")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.out) / "checkpoints"

    def resolved_precision(self) -> str:
        """``fp32`` / ``bf16`` / ``fp16`` for this machine (``auto`` resolved by capability)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if native_bf16() else "fp32"

    def resolved_engine(self, world_size: int) -> str:
        """``torch`` or ``deepspeed`` for this launch (``auto`` resolved by the world size)."""
        if self.engine != "auto":
            return self.engine
        return "deepspeed" if "WORLD_SIZE" in os.environ else "torch"


def native_bf16() -> bool:
    """True where bf16 matmuls are native: a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 / AMX-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --------------------------------------------------------------------------- building from JSON


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` (JSON-level types), converting lists to tuples and
    integral floats to ints; raise ValueError naming ``path`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{path}={value!r} has the wrong type")
    if hasattr(tp, "from_mapping"):
        if not isinstance(value, Mapping):
            raise ValueError(f"{path} must be a JSON object, got {value!r}")
        return tp.from_mapping(value, path)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{path} must be a JSON object (a section), got {value!r}")
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r} must be a string")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} must be a list")
        return [_coerce(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ValueError(f"{path}={value!r} must be a list of {len(args)} values")
        item_types = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args)
        return tuple(_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path} must be a JSON object, got {value!r}")
        return dict(value)
    return value


def build(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys and wrong types name their dotted path."""
    prefix = f"{path}." if path else ""
    known = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"section {path!r}" if path else "the top level"
        raise ValueError(f"unknown key(s) {[prefix + k for k in unknown]} in {where}: allowed keys are {known}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        msg = str(exc)
        first = msg.split("=", 1)[0].split(" ", 1)[0]
        if path and first in known:  # "lr=-1 is invalid" -> "optim.lr=-1 is invalid"
            raise ValueError(prefix + msg) from None
        raise
    except TypeError as exc:  # a comparison of a value of the wrong type inside __post_init__
        raise ValueError(f"{path or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The JSON form of a config (ModelSection flattened), loadable by :func:`from_dict`."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ModelSection):
            out[f.name] = value.to_mapping()
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a (partial) nested mapping laid over the defaults of :class:`TrainConfig`.

    A partial section keeps the job's defaults for the keys it does not name (e.g. ``{"optim":
    {"lr": 3e-4}}`` keeps the job's ``warmup_steps``, not :class:`OptimConfig`'s).
    """
    return build(TrainConfig, _merge(to_dict(TrainConfig()), data))


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON if it parses (numbers, booleans, lists, objects, quoted strings), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating sections as needed.

    Whether the key exists is checked when the config is built (with the full dotted name).
    """
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"--set {dotted}=...: empty key segment; write e.g. optim.lr=3e-4")
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; errors name ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {p} must hold a JSON object, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                extra: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults < the JSON file ``path`` < ``extra`` (dotted key -> value) < ``overrides`` (``KEY=VALUE``)."""
    data: dict[str, Any] = read_json_object(path, "config file") if path else {}
    for dotted, value in (extra or {}).items():
        apply_override(data, dotted, value)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        dotted, text = item.split("=", 1)
        apply_override(data, dotted.strip(), parse_value(text))
    try:
        return from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{exc}" + (f" (config file {path})" if path else "")) from None


__all__ = ["TrainConfig", "ModelSection", "CheckpointConfig", "LoggingConfig", "DeepSpeedSection", "DataConfig",
           "OptimConfig", "MaskingConfig", "load_config", "from_dict", "to_dict", "build", "SHAPE_FIELDS"]
