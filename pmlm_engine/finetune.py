"""Sequence-to-sequence fine-tuning with pseudo masks, as a task of the runner: its data and its model.

    python -m pmlm_engine.finetune --init minilm --corpus news --out runs/news-ft --steps 300 --save-every 100
    deepspeed --num_gpus 2 pmlm_engine/finetune.py --init runs/pretrain/final --zero-stage 2 --out runs/ft

Each pair is laid out by :func:`pmlm_engine.layout.build_seq2seq_example`: the source
``[CLS] src [SEP]`` is the main part (bidirectional, segment 0); target token ``t_i`` is a
factorization step of length one, an ORIGINAL copy (``step +i``) and a ``[P]`` (``step -i``) at
the same position ``|main| + i - 1`` in segment 1. The pseudo-mask rule then makes the target
causal and lets every ``[P]_i`` predict ``t_i`` from the source and ``t_<i``: all target
positions in one forward pass of the pre-training model. The loss is the pre-training PAR loss
(:class:`pmlm_engine.engine.PMLMTrainStep`, torch's label smoothing), summed over the ``[P]``
outputs and divided by the global batch's target count; the AE weight is 0. ``data.target_mask_prob``
replaces each ORIGINAL copy by ``[MASK]`` with that probability (s2s-ft's corruption). Method:
docs/finetuning.md.

Inputs: :mod:`pmlm_engine.s2s_data` (JSONL pairs with file:line errors, built-in corpora with
fixed held-out splits). Truncation: the source keeps its first ``data.max_src_len`` tokens, the
target its first ``data.max_tgt_len - 1`` plus ``[SEP]``; both are counted and logged. When
``max_src_len + 2 + max_tgt_len`` exceeds the model's position table, the table is extended
(:func:`pmlm_engine.model.extend_positions`) with a warning.

Order: optimizer step ``s`` trains on positions ``[s G, (s + 1) G)`` of an endless stream of
seeded per-epoch permutations of the pairs (``G`` the global batch); rank ``r`` at micro-step
``m`` takes the ``data.batch_size`` pairs at offset ``(m * world + r) * batch_size`` of that
block. The corruption of pair ``i`` in epoch ``e`` is seeded by ``(seed, e, i)``. Both are pure
functions of the step, which is what makes resume exact.

Outputs (the runner's): ``metrics.jsonl``, ``finetune_config.json``, ``checkpoints/``, and the model
folder ``final/`` that :mod:`pmlm_engine.decode` loads; its config records the tokenizer and
this job's configuration (decode's length defaults come from it).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pmlm_engine import cli
from pmlm_engine.task import Task

if TYPE_CHECKING:
    from pmlm_engine.engine import DistEnv
    from pmlm_engine.layout import SpecialIds
    from pmlm_engine.losses import LabelSmoothing
    from pmlm_engine.model import PMLMModel
    from pmlm_engine.s2s_data import EncodedPairs
    from pmlm_engine.train_config import FinetuneConfig

log = logging.getLogger("pmlm_engine.finetune")


def build_examples(enc: EncodedPairs, special: SpecialIds, target_mask_prob: float, seed: int, epoch: int,
                   indices: Sequence[int], recipe: str = "pmlm", keep_prob: float = 0.1,
                   random_prob: float = 0.1) -> list:
    """Layouts of the pairs ``indices``; the corruption of pair ``i`` in ``epoch`` is seeded
    by ``derive_seed(seed, epoch, i)`` (reproducible, different every epoch)."""
    from pmlm_engine.layout import build_seq2seq_example
    from pmlm_engine.rng import derive_seed

    out = []
    for i in indices:
        tgt = enc.tgt[i]
        if tgt is None:
            raise ValueError(f"example {enc.ids[i]!r} has no target; fine-tuning needs src and tgt")
        out.append(build_seq2seq_example(enc.src[i], tgt, special, target_mask_prob, derive_seed(seed, epoch, i),
                                         recipe, keep_prob, random_prob))
    return out


class PairStream:
    """Global position ``q`` of an endless stream of epochs -> ``(epoch, pair index)``; epoch ``e``
    is a permutation seeded by ``(seed, 7919, e)``."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no training pairs")
        self.n, self.seed = n, seed
        self._cache: tuple[int, list[int]] = (-1, [])

    def order(self, epoch: int) -> list[int]:
        import random

        from pmlm_engine.rng import derive_seed

        if self._cache[0] != epoch:
            order = list(range(self.n))
            random.Random(derive_seed(self.seed, 7919, epoch)).shuffle(order)
            self._cache = (epoch, order)
        return self._cache[1]

    def at(self, q: int) -> tuple[int, int]:
        epoch, k = divmod(q, self.n)
        return epoch, self.order(epoch)[k]


class FinetuneTask(Task):
    """Seq2seq fine-tuning on source/target pairs."""

    name = "fine-tune"
    config_file = "finetune_config.json"
    loss_weights = (0.0, 1.0)  # fine-tuning layouts have PAR targets only
    components = ()

    def __init__(self, cfg: FinetuneConfig) -> None:
        super().__init__(cfg)
        self.cfg: FinetuneConfig = cfg
        self.model: Optional[PMLMModel] = None
        self.tokenizer: Any = None
        self.enc: Optional[EncodedPairs] = None
        self.stream: Optional[PairStream] = None
        self.world_size = 1

    @property
    def label_smoothing(self) -> LabelSmoothing:
        """torch's for the ``pmlm`` recipe, s2s-ft's KL smoothing for ``s2s-ft``."""
        from pmlm_engine.losses import LabelSmoothing

        return LabelSmoothing(self.cfg.label_smoothing, "s2s-ft" if self.cfg.recipe == "s2s-ft" else "torch")

    @property
    def par_denominator_eps(self) -> float:
        from pmlm_engine.losses import S2SFT_LOSS_DENOMINATOR_EPS

        return S2SFT_LOSS_DENOMINATOR_EPS if self.cfg.recipe == "s2s-ft" else 0.0

    def check(self, env: DistEnv) -> None:
        from pathlib import Path

        init = self.cfg.init
        if not init:
            raise ValueError("init is not set: fine-tuning starts from a model (--init minilm, a model folder "
                             "or a Hugging Face BERT / UniLMv2 checkpoint)")
        if init != "minilm" and not Path(init).exists():
            raise FileNotFoundError(f"init={init!r} does not exist: use 'minilm', a model folder written by "
                                    f"pmlm_engine or a Hugging Face BERT / UniLMv2 checkpoint")

    def prepare(self, env: DistEnv) -> None:
        import torch

        from pmlm_engine.convert import load_any
        from pmlm_engine.model import extend_positions
        from pmlm_engine.stream import tokenizer_fingerprint
        from pmlm_engine.tokenizer import load_tokenizer, resolve_tokenizer

        cfg = self.cfg
        torch.manual_seed(cfg.data.seed)  # a fresh MLM head (minilm has none) is the same on every rank
        model, recorded = load_any(cfg.init, attention_backend=cfg.model.attention_backend)
        self.tokenizer_path = resolve_tokenizer(cfg.data.tokenizer, recorded)
        try:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise type(exc)(f"data.tokenizer={self.tokenizer_path!r}: {exc}") from None
        if self.tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer {self.tokenizer_path} has {self.tokenizer.vocab_size} ids but the model's "
                             f"embedding has {model.config.vocab_size} rows: set data.tokenizer (--tokenizer) to "
                             f"the tokenizer the model was trained with")
        needed = cfg.data.positions_needed
        if needed > model.config.max_position:
            log.warning("data.max_src_len + 2 + data.max_tgt_len = %d positions exceed the model's %d: extending "
                        "the position table (rows copied cyclically)", needed, model.config.max_position)
            extend_positions(model, needed)
        if cfg.model.compile:
            model.compile_encoder()
        self.model, self.model_cfg = model, model.config
        self.fingerprint = {"tokenizer vocabulary (sha256)": tokenizer_fingerprint(self.tokenizer)}

    def load_data(self, env: DistEnv) -> None:
        from pmlm_engine.s2s_data import encode_pairs, load_pair_spec

        d = self.cfg.data
        records = load_pair_spec(d.corpus, default_split="train")
        if d.max_examples:
            records = records[:d.max_examples]
        self.enc = encode_pairs(records, self.tokenizer, d.max_src_len, d.max_tgt_len)
        if env.is_main:
            self.enc.stats.log(f"fine-tuning data {d.corpus}")
        self.stream = PairStream(len(self.enc.ids), d.seed)
        self.world_size = env.world_size

    def build_model(self, resuming: bool) -> PMLMModel:
        assert self.model is not None
        m = self.model.config
        log.info("model: %.1fM parameters, %d layers, hidden %d", self.model.num_parameters() / 1e6, m.num_layers,
                 m.hidden_size)
        return self.model

    @property
    def global_batch_size(self) -> int:
        return self.cfg.data.batch_size * self.cfg.grad_accum * self.world_size

    def batches(self, step: int, rank: int) -> list:
        from pmlm_engine.layout import collate_padded

        assert self.stream is not None and self.enc is not None
        d, special = self.cfg.data, self.tokenizer.special_ids()
        out = []
        for m in range(self.cfg.grad_accum):
            first = step * self.global_batch_size + (m * self.world_size + rank) * d.batch_size
            examples = []
            for q in range(first, first + d.batch_size):
                epoch, i = self.stream.at(q)
                examples += build_examples(self.enc, special, d.target_mask_prob, d.seed, epoch, [i],
                                           self.cfg.recipe, d.keep_prob, d.random_prob)
            out.append(collate_padded(examples, special.pad))
        return out

    def count_tokens(self, batch: dict) -> int:
        return int((batch["doc_ids"] >= 0).sum())  # source and target tokens

    def row_extra(self, step: int, window: Any, elapsed: float) -> dict[str, Any]:
        assert self.stream is not None
        return {"epoch": round(step * self.global_batch_size / self.stream.n, 4),
                "target_tokens_per_s": window.targets / max(elapsed, 1e-9)}

    def export_meta(self) -> dict[str, Any]:
        from pmlm_engine.train_config import to_dict

        return {"tokenizer": self.tokenizer_path, "finetune": to_dict(self.cfg)}

    def describe(self, env: DistEnv, engine: str) -> str:
        assert self.enc is not None
        return (f"{len(self.enc.ids)} training pairs; global batch {self.global_batch_size} ({self.cfg.data.batch_size}"
                f" per rank x {self.cfg.grad_accum} micro-steps x {env.world_size} ranks)")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning job; return the runner's summary (``model``: the final folder)."""
    from pmlm_engine.runner import Runner

    task = FinetuneTask(cfg)
    summary = Runner(task).run()
    if task.enc is not None:
        summary["truncation"] = vars(task.enc.stats)
    if "export" in summary:
        summary["model"] = summary["export"]
    return summary


def check(cfg: FinetuneConfig) -> None:
    """The checks of a real run that need no data loading (``--print-config``)."""
    from pmlm_engine.runner import Runner

    ds = Runner(FinetuneTask(cfg)).validate()
    if ds:
        log.info("generated DeepSpeed config: %s", json.dumps(ds))


def report(cfg: FinetuneConfig, summary: dict[str, Any]) -> None:
    from pmlm_engine.engine import dist_env

    if dist_env().is_main:
        shown = {k: v for k, v in summary.items() if k != "losses"}
        print(json.dumps(shown, indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.main("finetune", finetune, check, report, argv)


if __name__ == "__main__":
    sys.exit(main())
