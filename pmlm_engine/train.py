"""Pre-training (AE + PAR in one pass) as a task of the runner: its data and its model.

    python -m pmlm_engine.train --corpus news --steps 200 --out runs/pretrain
    python -m pmlm_engine.train --config examples/demo-pretrain.json --set optim.lr=3e-4
    deepspeed --num_gpus 2 pmlm_engine/train.py --config job.json --set deepspeed.zero_stage=2

Configuration: :class:`pmlm_engine.train_config.TrainConfig`; flags: :mod:`pmlm_engine.cli`.
The loop, checkpoints, resume, metrics and export are :mod:`pmlm_engine.runner`'s.

Data: the corpus is tokenized once into a cached token store, cut into main sequences of at
most ``data.max_len`` tokens, and each optimizer step's global batch is a pure function of the
step (:class:`pmlm_engine.data.PretrainData`). Model: a fresh ``model.preset`` (its vocabulary
from the tokenizer), or a warm start from ``init`` (:func:`warm_start`).

This file runs both as ``python -m pmlm_engine.train`` and as a script path (the DeepSpeed
launcher's form), hence its absolute imports; it imports torch only when a job runs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pmlm_engine import cli
from pmlm_engine.task import Task

if TYPE_CHECKING:
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.engine import DistEnv
    from pmlm_engine.model import PMLMModel
    from pmlm_engine.train_config import TrainConfig

log = logging.getLogger("pmlm_engine.train")


class PretrainTask(Task):
    """PMLM pre-training on a text corpus."""

    name = "pre-train"
    config_file = "train_config.json"
    loss_weights = (1.0, 1.0)
    components = ("ae_loss", "par_loss")
    resume_ignores = ("init", "init_from")  # the weights come from the checkpoint

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.cfg: TrainConfig = cfg
        self.loss_weights = (cfg.ae_weight, cfg.par_weight)
        self.tokenizer: Any = None
        self.data: Any = None
        self.warm: Optional[dict[str, Any]] = None

    def check(self, env: DistEnv) -> None:
        from pmlm_engine.stream import resolve_sources

        resolve_sources(self.cfg.data.corpus)  # missing / empty files and unknown names, before anything else
        if self.cfg.init and self.cfg.init != "minilm" and not Path(self.cfg.init).exists():
            raise FileNotFoundError(f"init={self.cfg.init!r} does not exist: use 'minilm', a model folder written by "
                                    f"pmlm_engine or a Hugging Face BERT checkpoint folder")

    def prepare(self, env: DistEnv) -> None:
        from pmlm_engine.stream import tokenizer_fingerprint
        from pmlm_engine.tokenizer import load_tokenizer, resolve_tokenizer

        cfg = self.cfg
        self.tokenizer_path = resolve_tokenizer(cfg.data.tokenizer)
        try:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise type(exc)(f"data.tokenizer={cfg.data.tokenizer!r}: {exc}") from None
        self.model_cfg = cfg.model.build(self.tokenizer.vocab_size, self.tokenizer_path)
        if cfg.data.max_len > self.model_cfg.max_position:  # appended tokens reuse main positions
            raise ValueError(f"data.max_len={cfg.data.max_len} exceeds the model's max_position="
                             f"{self.model_cfg.max_position}: lower data.max_len or raise model.max_position")
        self.fingerprint = {"tokenizer vocabulary (sha256)": tokenizer_fingerprint(self.tokenizer)}

    def load_data(self, env: DistEnv) -> None:
        from pmlm_engine.data import PretrainData
        from pmlm_engine.stream import StoreSequences, build_token_store

        cfg = self.cfg
        store = build_token_store(cfg.data.corpus, self.tokenizer, cfg.data.cache_dir or None, cfg.data.max_docs,
                                  progress=cfg.logging.progress and env.is_main)
        sequences = StoreSequences(store, cfg.data.max_len, self.tokenizer.special_ids(), cfg.data.seed)
        if len(sequences) == 0:
            raise ValueError(f"data.corpus={cfg.data.corpus}: no text after tokenization")
        self.data = PretrainData(sequences, self.tokenizer.special_ids(), cfg.data, env.world_size, cfg.grad_accum)

    def prepare_init(self, resuming: bool) -> None:
        """A warm start is loaded and checked here, before any output; its fresh parts (an MLM head
        missing from the checkpoint) are drawn from a generator seeded by ``data.seed``."""
        if not self.cfg.init:
            return
        if resuming:
            log.info("resuming: init=%s is not used (the weights come from the checkpoint)", self.cfg.init)
            return
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.data.seed)
            self.warm = warm_start_state(self.cfg.init, self.model_cfg, self.tokenizer)

    def build_model(self, resuming: bool) -> PMLMModel:
        from pmlm_engine.model import PMLMModel

        model = PMLMModel(self.model_cfg)
        if self.warm is not None and not resuming:
            model.load_state_dict(self.warm, strict=True)
            self.warm = None
        log.info("model %s: %s parameters", self.cfg.model.preset, f"{model.num_parameters():,}")
        return model

    def batches(self, step: int, rank: int) -> list:
        return [self.data.batch(step, rank, m) for m in range(self.cfg.grad_accum)]

    def describe(self, env: DistEnv, engine: str) -> str:
        d = self.data
        return (f"{len(d.sequences)} sequences of <= {self.cfg.data.max_len} tokens; global batch "
                f"{d.global_batch_size} ({self.cfg.data.batch_size} per rank x {self.cfg.grad_accum} micro-steps x "
                f"{env.world_size} ranks)")


def warm_start_state(spec: str, cfg: ModelConfig, tokenizer: Any) -> dict[str, Any]:
    """The parameters of a pretrained encoder (``minilm``, a model folder or a HF BERT checkpoint)
    for a model of configuration ``cfg``, checked against it.

    The checkpoint's shapes must match; a checkpoint without an MLM head gets a fresh one, without
    a relative bias table a zero one (:func:`pmlm_engine.convert.load_any`). Its ``vocab.txt``, if
    any, must be the tokenizer's.
    """
    from pmlm_engine.convert import is_model_folder, load_any
    from pmlm_engine.train_config import SHAPE_FIELDS

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
        raise ValueError(f"init={spec!r}: the checkpoint has {have} but the configured model has {want}: "
                         f"set the model section to match{hint}")
    if tok_path and Path(tok_path).is_file() and Path(tok_path).read_bytes() != Path(tokenizer.source).read_bytes():
        raise ValueError(f"init={spec!r} was trained with the vocabulary {tok_path}, but data.tokenizer is "
                         f"{tokenizer.source}: set data.tokenizer to {tok_path}")
    log.info("warm start from %s: %s", path, f"{src.num_parameters() / 1e6:.1f}M parameters")
    return src.state_dict()


def warm_start(model: PMLMModel, spec: str, tokenizer: Any) -> None:
    """Copy a pretrained encoder into ``model`` (:func:`warm_start_state`)."""
    model.load_state_dict(warm_start_state(spec, model.config, tokenizer), strict=True)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a pre-training job; return the runner's summary."""
    from pmlm_engine.runner import Runner

    return Runner(PretrainTask(cfg)).run()


def check(cfg: TrainConfig) -> None:
    """The checks of a real run that need no data loading (``--print-config``)."""
    from pmlm_engine.runner import Runner

    ds = Runner(PretrainTask(cfg)).validate()
    if ds:
        log.info("generated DeepSpeed config: %s", json.dumps(ds))


def report(cfg: TrainConfig, summary: dict[str, Any]) -> None:
    from pmlm_engine.engine import dist_env

    if dist_env().is_main and "first_loss" in summary:
        where = summary.get("export") or summary.get("checkpoint")
        print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over steps "
              f"{summary['start_step'] + 1}-{summary['steps']} in {summary['elapsed_s']:.0f} s; outputs in {cfg.out}"
              + (f" (model: {where})" if where else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.main("train", train, check, report, argv)


if __name__ == "__main__":
    sys.exit(main())
