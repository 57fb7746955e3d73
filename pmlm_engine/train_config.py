"""The typed configuration of every job: nested dataclasses, one source of truth per setting.

    RunConfig (what the runner reads; shared by every training task)
      (top level) engine, precision, steps, grad_accum, global_batch_size, out, threads, init
      optim       OptimConfig        AdamW and the warmup + linear decay schedule
      checkpoint  CheckpointConfig   interval, retention, resume, export
      logging     LoggingConfig      metrics interval, progress bar, TensorBoard, plot
      deepspeed   DeepSpeedSection   ZeRO stage, fp16 loss scaling, a JSON of extra DeepSpeed keys
    TrainConfig(RunConfig)     pre-training: + model (ModelSection), data (DataConfig), ae/par weights
    FinetuneConfig(RunConfig)  fine-tuning: + model (ModelOptions), data (PairDataConfig), label_smoothing
    DecodeJobConfig            decoding: init, out, threads, device, model, data, search

The DeepSpeed configuration is generated from a RunConfig (:func:`pmlm_engine.engine.deepspeed_config`).

A configuration is a JSON file (``--config FILE``, ``-`` for stdin) of the same nesting, plus
dotted overrides (``--set optim.lr=3e-4 data.batch_size=8``); values are parsed as JSON where
they parse (``8``, ``3e-4``, ``true``, ``["news", "wiki"]``) and taken as strings otherwise.
Unknown keys and values of the wrong type are refused with their dotted name; each section
validates its own ranges in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .config import PRESETS, MaskingConfig, ModelConfig
from .data import DataConfig
from .guard import GuardConfig
from .optim import OptimConfig

log = logging.getLogger("pmlm_engine.config")

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

    @property
    def attention_backend(self) -> str:
        """The attention backend asked for (``model.attention_backend``, else ModelConfig's default)."""
        return self.overrides.get("attention_backend", ModelConfig.attention_backend)

    @property
    def compile(self) -> bool:
        """``model.compile`` (else ModelConfig's default)."""
        return bool(self.overrides.get("compile", ModelConfig.compile))

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
    overwrite: bool = False
    """With ``resume=never``: start afresh over an existing job's checkpoints and metrics.jsonl
    (``--resume never --overwrite``). Without it, they are never deleted or truncated."""
    trust: bool = False
    """Resume from a checkpoint folder without a manifest (written by an older version), and let
    DeepSpeed unpickle its files (``--trust-checkpoint``): only for checkpoints you wrote yourself."""

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
class RunConfig:
    """What every training task shares: the runner (:mod:`pmlm_engine.runner`) reads only these
    fields plus ``data.batch_size`` and ``data.seed`` of the task's own data section."""

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
    """Output folder: metrics.jsonl, tb/, loss.png, checkpoints/, final/ and the job's config JSON."""
    threads: int = 0
    """torch intra-op threads of each process (0 = auto: torch's default, one per core). On a machine
    shared with other jobs, 1 avoids the slowdown of oversubscribed threads."""
    init: str = ""
    """The model to start from: ``minilm`` (the real MiniLM-L6 checkpoint), a model folder written by
    pmlm_engine, or a Hugging Face BERT / UniLMv2 checkpoint."""
    optim: OptimConfig = field(default_factory=_default_optim)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    guard: GuardConfig = field(default_factory=GuardConfig)

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
        batch = self.data.batch_size  # type: ignore[attr-defined]  (every task's data section has one)
        if self.global_batch_size and self.global_batch_size % (batch * self.grad_accum):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of data.batch_size * grad_accum = "
                f"{batch} * {self.grad_accum}: it must equal data.batch_size * grad_accum * world size")
        if self.optim.warmup_steps > self.steps:
            log.warning("optim.warmup_steps=%d exceeds steps=%d: warming up over all %d steps instead (set --warmup "
                        "to choose)", self.optim.warmup_steps, self.steps, self.steps)
            self.optim.warmup_steps = self.steps
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} is invalid: 0 (auto: torch's default) or a positive count")
        if self.model.compile and self.deepspeed.zero_stage == 3:  # type: ignore[attr-defined]
            raise ValueError("model.compile=true with deepspeed.zero_stage=3 is not supported (ZeRO-3 gathers the "
                             "parameters inside the layers): drop --compile or use zero_stage 0-2")
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


@dataclass
class TrainConfig(RunConfig):
    """A pre-training job. Defaults: a tiny model on the news corpus (examples/pretrain-demo.json is the demo's)."""

    ae_weight: float = 1.0
    """Weight of the AE loss in the objective (docs/losses.md: 1)."""
    par_weight: float = 1.0
    """Weight of the PAR loss in the objective (docs/losses.md: 1)."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ae_weight < 0 or self.par_weight < 0 or self.ae_weight + self.par_weight == 0:
            raise ValueError(f"ae_weight={self.ae_weight}, par_weight={self.par_weight} are invalid: expected "
                             f"non-negative weights, not both 0")


@dataclass
class PairDataConfig:
    """Fine-tuning data: source/target pairs, their truncation and corruption, batches."""

    corpus: str = "news"
    """Pairs: a ``.jsonl`` file of ``{"src", "tgt"}`` (token lists allowed), or a built-in corpus
    (``news``, ``wiki``, ``acl``; the bare name is the train split, ``NAME:SPLIT`` another)."""
    tokenizer: str = ""
    """Tokenizer file; "" = the one recorded with ``init`` (or beside it), else bert-base-uncased."""
    max_src_len: int = 464
    """Source tokens kept (the head); ``[CLS]`` and ``[SEP]`` come on top. The rest is cut and counted."""
    max_tgt_len: int = 48
    """Target tokens kept, including the final ``[SEP]``."""
    batch_size: int = 16
    """Examples per micro-batch and rank (the global batch is batch_size * grad_accum * world size)."""
    target_mask_prob: float = 0.5
    """Probability of replacing a teacher-forced target copy by ``[MASK]`` (s2s-ft: 0.7 for
    CNN/DailyMail, 0.4 for XSum)."""
    keep_prob: float = 0.1
    """``recipe=s2s-ft``: probability that a ``[P]`` input (and a corrupted copy) is the label itself."""
    random_prob: float = 0.1
    """``recipe=s2s-ft``: probability that it is a random token."""
    seed: int = 0
    """Seed of the order, the target corruption and dropout."""
    max_examples: int = 0
    """Use only the first N pairs (0 = all)."""

    def __post_init__(self) -> None:
        checks = [
            (bool(self.corpus), "corpus", "a .jsonl file or a built-in corpus name"),
            (self.max_src_len >= 1, "max_src_len", "a positive number of tokens"),
            (self.max_tgt_len >= 2, "max_tgt_len", ">= 2 (one token plus [SEP])"),
            (self.batch_size >= 1, "batch_size", "a positive number of examples"),
            (0.0 <= self.target_mask_prob < 1.0, "target_mask_prob", "a value in [0, 1)"),
            (0.0 <= self.keep_prob and 0.0 <= self.random_prob and self.keep_prob + self.random_prob <= 1.0,
             "keep_prob", "keep_prob, random_prob >= 0 with keep_prob + random_prob <= 1"),
            (self.max_examples >= 0, "max_examples", ">= 0 (0 = all)"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {want}")

    @property
    def positions_needed(self) -> int:
        """Position ids used by the longest example: ``[CLS] src [SEP]`` then the target."""
        return self.max_src_len + 2 + self.max_tgt_len


@dataclass
class ModelOptions:
    """Settings of a loaded model that do not change its parameters."""

    attention_backend: str = "auto"
    """Backend of :func:`pmlm_engine.attention.pseudo_mask_attention`: auto | reference | sdpa | torch | triton."""
    compile: bool = False
    """Training: run the encoder layers through ``torch.compile``
    (:meth:`pmlm_engine.model.PMLMModel.compile_encoder`). Decoding: run each decoding step through
    ``torch.compile`` (:class:`pmlm_engine.decode.CompiledStaticScorer`)."""


def _finetune_optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, warmup_steps=100)


@dataclass
class FinetuneConfig(RunConfig):
    """A sequence-to-sequence fine-tuning job (docs/finetuning.md): the pre-training model, mask and
    loss on source/target pairs. ``init`` is required."""

    precision: str = "fp32"
    steps: int = 1000
    out: str = "runs/finetune"
    optim: OptimConfig = field(default_factory=_finetune_optim)
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (torch's: ``eps`` spread uniformly over the vocabulary)."""
    recipe: str = "pmlm"
    """``pmlm`` ([P] inputs always the pseudo token, masked copies ``[MASK]``, torch's label smoothing)
    or ``s2s-ft`` (s2s-ft's corruption, KL label smoothing and loss normalisation; see
    :func:`pmlm_engine.layout.s2sft_corruption` and :func:`pmlm_engine.losses.s2sft_smoothed_loss`)."""
    model: ModelOptions = field(default_factory=ModelOptions)
    data: PairDataConfig = field(default_factory=PairDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} is invalid: expected a value in [0, 1)")
        if self.recipe not in ("pmlm", "s2s-ft"):
            raise ValueError(f"recipe={self.recipe!r} is invalid: choose pmlm or s2s-ft")


@dataclass
class SearchSection:
    """Decoding search (docs/decoding.md); turned into :class:`pmlm_engine.decode.DecodeConfig`."""

    beam_size: int = 1
    """Beams per sentence; 1 = greedy."""
    min_len: Optional[int] = None
    """``[SEP]`` is forbidden before this many tokens were generated (null: 0, or 1 with ``rules=s2s-ft``)."""
    length_penalty: float = 0.0
    """GNMT ``alpha``: hypotheses are ranked by ``score / ((5 + len) / 6) ** alpha``."""
    rules: str = "pmlm"
    """Search rules: ``pmlm`` (docs/decoding.md) or ``s2s-ft`` (s2s-ft's beam search reproduced)."""
    ban_special: bool = True
    """Never generate ``[PAD]``, ``[CLS]``, ``[MASK]`` (``rules=s2s-ft`` allows them when false, as s2s-ft does)."""
    max_seq_length: int = 0
    """``rules=s2s-ft``: s2s-ft's ``--max_seq_length`` (steps = min(max_tgt_len, this - longest source - 2));
    0 = off."""
    no_repeat_ngram_size: int = 0
    """Block repeated n-grams of this size (0 = off)."""
    ngram_ignore: list[str] = field(default_factory=list)
    """Vocabulary tokens whose n-grams are never blocked (s2s-ft used ``.``)."""
    repetition_penalty: float = 1.0
    """Multiply the log-probability of tokens already generated by this (CTRL; 1 = off)."""
    coverage_penalty: float = 0.0
    """Subtract this per use of a token beyond its count in the source (0 = off)."""

    def __post_init__(self) -> None:
        checks = [(self.beam_size >= 1, "beam_size", ">= 1"),
                  (self.min_len is None or self.min_len >= 0, "min_len", ">= 0 (or null: the rules' default)"),
                  (self.rules in ("pmlm", "s2s-ft"), "rules", "pmlm or s2s-ft"),
                  (self.max_seq_length >= 0, "max_seq_length", ">= 0 (0 = off)"),
                  (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", ">= 0 (0 = off)")]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {want}")


@dataclass
class DecodeDataConfig:
    """Decoding inputs: sources only (a target, if present, plays no part)."""

    corpus: str = "news:test"
    """A ``.jsonl`` of ``{"src"}`` (optional ``id``), or a built-in split such as ``news:test``."""
    tokenizer: str = ""
    """Tokenizer file; "" = the one recorded in the model folder, else bert-base-uncased."""
    max_src_len: int = 0
    """Source tokens kept; 0 = the model's fine-tuning ``data.max_src_len``, else 464."""
    max_tgt_len: int = 0
    """Most tokens generated per sentence, the final ``[SEP]`` included; 0 = the model's fine-tuning
    ``data.max_tgt_len``, else 48."""
    batch_size: int = 16
    """Sources per batch."""

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("corpus='' is invalid: name a .jsonl file or a built-in split such as news:test")
        for name in ("max_src_len", "max_tgt_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected >= 0 (0 = the model's)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid: expected >= 1")


@dataclass
class DecodeJobConfig:
    """A decoding job: which model, which inputs, which search, where the predictions go."""

    init: str = ""
    """The model folder to decode with (``pmlm_engine.finetune``'s ``final/``). Required."""
    out: str = "predictions.jsonl"
    """The JSONL to write: ``{id, prediction, score, length}`` per input, in input order."""
    threads: int = 0
    """torch intra-op threads (0 = auto: torch's default, one per core)."""
    device: str = "cpu"
    """torch device, e.g. ``cpu`` or ``cuda:0``."""
    detok: str = "surface"
    """Text of the predictions: ``surface`` (readable, the source's casing and spacing where copied),
    ``rules`` (readable, lowercase) or ``tokenizer`` (the tokenizer's plain decode)."""
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DecodeDataConfig = field(default_factory=DecodeDataConfig)
    search: SearchSection = field(default_factory=SearchSection)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} is invalid: 0 (auto: torch's default) or a positive count")
        if not self.out:
            raise ValueError("out='' is invalid: name the predictions file")
        if self.detok not in ("surface", "rules", "tokenizer"):
            raise ValueError(f"detok={self.detok!r} is invalid: choose surface, rules or tokenizer")


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


def from_dict(data: Mapping[str, Any], cls: type = None) -> Any:
    """A job config (default :class:`TrainConfig`) from a (partial) nested mapping laid over its defaults.

    A partial section keeps the job's defaults for the keys it does not name (e.g. ``{"optim":
    {"lr": 3e-4}}`` keeps the job's ``warmup_steps``, not :class:`OptimConfig`'s).
    """
    cls = cls or TrainConfig
    return build(cls, _merge(to_dict(cls()), data))


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
    """The JSON object in ``path`` (``-``: standard input); errors name ``what`` and the file."""
    if str(path) == "-":
        text, p = sys.stdin.read(), Path("<stdin>")
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{what} {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} {p} is not valid UTF-8: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {p} must hold a JSON object, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                extra: Mapping[str, Any] | None = None, cls: type = None) -> Any:
    """Defaults of ``cls`` (default :class:`TrainConfig`) < the JSON file ``path`` < ``extra`` (dotted
    key -> value, the CLI's shortcut flags) < ``overrides`` (``KEY=VALUE``, the CLI's ``--set``)."""
    data: dict[str, Any] = read_json_object(path, "config file") if path else {}
    for dotted, value in (extra or {}).items():
        apply_override(data, dotted, value)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        dotted, text = item.split("=", 1)
        apply_override(data, dotted.strip(), parse_value(text))
    try:
        return from_dict(data, cls)
    except ValueError as exc:
        raise ValueError(f"{exc}" + (f" (config file {path})" if path else "")) from None


__all__ = ["RunConfig", "TrainConfig", "FinetuneConfig", "DecodeJobConfig", "ModelSection", "ModelOptions",
           "PairDataConfig", "DecodeDataConfig", "SearchSection", "CheckpointConfig", "LoggingConfig",
           "DeepSpeedSection", "DataConfig", "OptimConfig", "MaskingConfig", "load_config", "from_dict", "to_dict",
           "build", "SHAPE_FIELDS"]
