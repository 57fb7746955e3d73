"""The interface between a training task and the runner (:mod:`pmlm_engine.runner`).

Kept free of heavy imports (no torch at import time), so that an entry point's ``--help``
and ``--print-config`` answer without loading the training stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from torch import Tensor

    from .config import ModelConfig
    from .engine import DistEnv
    from .model import PMLMModel
    from .train_config import RunConfig

class Task:
    """What a training task brings to the runner: its data, its model, its loss weights.
    Subclasses set the class attributes and implement the methods; the rest is the runner's.

    Order of calls: :meth:`check` (cheap; also run by ``--print-config``), :meth:`prepare`
    (tokenizer, model configuration; before any output is written), :meth:`prepare_init` (after
    the resume decision), :meth:`load_data` (after the
    process group exists; local rank 0 first), :meth:`build_model`, then :meth:`batches` per step.
    """

    name = "train"
    """Progress-bar label and plot title."""
    config_file = "config.json"
    """The job's configuration is written to ``out/<config_file>``."""
    loss_weights = (1.0, 1.0)
    """``(w_ae, w_par)`` of the objective."""
    components: tuple[str, ...] = ("ae_loss", "par_loss")
    """Loss components reported in the metrics rows beside ``loss``."""
    resume_ignores: tuple[str, ...] = ()
    """Dotted config keys that may differ between a run and its resume (beside out, logging, threads, ...)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.model_cfg: Optional[ModelConfig] = None
        self.tokenizer_path = ""
        self.fingerprint: dict[str, Any] = {}
        """Values beside the config that a resumed run must share (e.g. the vocabulary's sha256)."""

    @property
    def label_smoothing(self) -> Any:
        """Of the cross-entropy: torch's ``eps`` (a float) or a :class:`pmlm_engine.losses.LabelSmoothing`."""
        return 0.0

    @property
    def par_denominator_eps(self) -> float:
        """Added to the global PAR target count in the objective's denominator (s2s-ft's recipe: 1e-5)."""
        return 0.0

    @property
    def attention_backend(self) -> str:
        return self.cfg.model.attention_backend  # type: ignore[attr-defined]  (every task has a model section)

    def check(self, env: DistEnv) -> None:
        """Static checks of the inputs (files exist, names are known), no heavy loading."""

    def prepare(self, env: DistEnv) -> None:
        """Load the tokenizer and settle the model configuration (``self.model_cfg``)."""
        raise NotImplementedError

    def prepare_init(self, resuming: bool) -> None:
        """Load and check the starting weights once the resume decision is made (a resumed run
        takes its weights from the checkpoint); still before any output."""

    def load_data(self, env: DistEnv) -> None:
        """Read and encode the training data (it may build a cache, so it runs on local rank 0 first)."""
        raise NotImplementedError

    def build_model(self, resuming: bool) -> PMLMModel:
        """The model before training (fresh or from ``init``); when ``resuming``, the checkpoint's
        weights replace it right after, so only its shape matters."""
        raise NotImplementedError

    def batches(self, step: int, rank: int) -> list[dict[str, Tensor]]:
        """This rank's ``grad_accum`` micro-batches of optimizer step ``step`` (0-based): a pure
        function of the step, so a resumed run sees the batches it would have seen."""
        raise NotImplementedError

    def count_tokens(self, batch: dict[str, Tensor]) -> int:
        """Tokens of a batch counted for throughput (default: main-part tokens)."""
        return int(((batch["step"] == 0) & (batch["doc_ids"] >= 0)).sum())

    def row_extra(self, step: int, window: Any, elapsed: float) -> dict[str, Any]:
        """Task-specific fields of a metrics row (``window``: the runner's means since the last row)."""
        return {}

    def export_meta(self) -> dict[str, Any]:
        """Extra keys of ``final/config.json`` beside ``model``."""
        return {"tokenizer": self.tokenizer_path}

    def describe(self, env: DistEnv, engine: str) -> str:
        """One log line about the data and the batch split."""
        return self.name
