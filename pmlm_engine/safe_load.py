"""Loading DeepSpeed checkpoints without executing what a pickle asks for.

DeepSpeed's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``: a checkpoint
file is a pickle, and unpickling runs whatever callable it names. Two defences, both on by default:

1. the checkpoint folder's manifest is verified BEFORE DeepSpeed sees the folder, and a folder
   without one is refused unless ``--trust-checkpoint`` (:class:`pmlm_engine.checkpoint.CheckpointManager`);
2. DeepSpeed reads the files through :class:`WeightsOnlyCheckpointEngine`: ``torch.load(weights_only=True)``,
   torch's restricted unpickler, which builds tensors, containers and numbers, plus exactly the few
   plain DeepSpeed classes its ZeRO checkpoints hold (:data:`DEEPSPEED_SAFE_GLOBALS`, rebuilt from
   their saved attributes without running their constructors). A file naming anything else is refused
   with the name of that global; ``--trust-checkpoint`` falls back to DeepSpeed's own loader.

What remains (also in the README): whoever can write the checkpoint folder can also rewrite its
manifest, and the allowed DeepSpeed classes are restored attribute by attribute; a checkpoint
from someone else should still be treated as code you run.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch

from .errors import DamagedInputError

log = logging.getLogger(__name__)

DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an int enum
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # a static loss scale: numbers only
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the fp16 dynamic scale: numbers only
    "deepspeed.utils.tensor_fragment.fragment_address",  # a (start, numel) dataclass
)
"""Globals a ZeRO checkpoint of this project holds (listed by
``torch.serialization.get_unsafe_globals_in_checkpoint``)."""


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def weights_only_load(path: str, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` with :data:`DEEPSPEED_SAFE_GLOBALS` allowed; anything else refused."""
    allowed = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        try:
            allowed.append(_resolve(dotted))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is simply not allowed
            continue
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- UnpicklingError, RuntimeError, zip errors: all reported below
        try:  # lists the globals a pickle names without running any of them
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 -- not even a readable torch file
            unsafe = []
        named = f"it names {unsafe}" if unsafe else f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise DamagedInputError(f"{path} is not loadable as a weights-only checkpoint ({named}): if you wrote it "
                                f"yourself, pass --trust-checkpoint to load it with DeepSpeed's own (unpickling) "
                                f"loader") from None


@functools.cache
def weights_only_engine_class() -> type:
    """A subclass of DeepSpeed's ``TorchCheckpointEngine`` whose ``load`` is :func:`weights_only_load`
    (built on first use, so that importing this module does not import DeepSpeed)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with the restricted unpickler."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return weights_only_load(path, map_location)

    return WeightsOnlyCheckpointEngine


def install_weights_only_loader(ds_engine: Any) -> None:
    """Make ``ds_engine`` (a ``deepspeed.DeepSpeedEngine``) read checkpoints with :func:`weights_only_load`.

    Only DeepSpeed's default ``TorchCheckpointEngine`` is replaced (its ``save`` is kept); another
    checkpoint engine (Nebula, fast/decoupled writers) is an error naming ``--trust-checkpoint``.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    cls = weights_only_engine_class()
    current = getattr(ds_engine, "checkpoint_engine", None)
    if isinstance(current, cls):
        return
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed uses the checkpoint engine {type(current).__name__}, which pmlm_engine cannot "
                         f"make weights-only: pass --trust-checkpoint to load through it")
    ds_engine.checkpoint_engine = cls(getattr(ds_engine, "_config", None))
