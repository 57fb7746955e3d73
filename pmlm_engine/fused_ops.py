"""Fused GPU ops for training: which optimizer and LayerNorm implementation each environment gets.

| environment | ``optim.optimizer=adamw`` | ``optim.optimizer=lamb`` | LayerNorm |
|---|---|---|---|
| CPU (any engine) | ``torch.optim.AdamW`` (unchanged) | error: LAMB needs a GPU | ``torch.nn.LayerNorm`` |
| CUDA + NVIDIA apex | ``apex.optimizers.FusedAdam`` (AdamW mode) | ``apex.optimizers.FusedLAMB`` | ``apex.normalization.FusedLayerNorm`` |
| CUDA, no apex, DeepSpeed engine | ``deepspeed.ops.adam.FusedAdam`` (AdamW mode) | ``deepspeed.ops.lamb.FusedLamb`` | ``torch.nn.LayerNorm`` |
| CUDA, no apex, torch engine | ``torch.optim.AdamW(fused=True)`` | ``deepspeed.ops.lamb.FusedLamb`` if DeepSpeed is installed, else an error | ``torch.nn.LayerNorm`` |

NVIDIA apex is optional and never installed by this project (the PyPI package named ``apex`` is an
unrelated web toolkit): it counts as present only when ``apex.optimizers`` and
``apex.normalization`` import. DeepSpeed's fused ops build just in time on first use.
The choice is logged once per process. Every optimizer gets the same hyper-parameters and
parameter groups (:func:`pmlm_engine.optim.param_groups`).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lamb")
_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class OptimizerChoice:
    """What :func:`choose_optimizer` picked: ``impl`` names the class, ``why`` the rule that chose it."""

    name: str
    impl: str
    why: str


def apex_available() -> bool:
    """True when NVIDIA apex (with its CUDA extensions) imports, not the unrelated PyPI ``apex``."""
    try:
        importlib.import_module("apex.optimizers")
        importlib.import_module("apex.normalization")
    except Exception:  # ImportError, or apex's own errors when its CUDA extensions are missing
        return False
    return True


def deepspeed_available() -> bool:
    try:
        importlib.import_module("deepspeed")
    except Exception:
        return False
    return True


def choose_optimizer(name: str, device_type: str, engine: str, apex: bool, deepspeed: bool) -> OptimizerChoice:
    """The optimizer implementation for a request (pure: the environment is passed in).

    Args:
        name: ``adamw`` or ``lamb`` (``optim.optimizer``).
        device_type: where the parameters live (``cpu`` or ``cuda``).
        engine: ``torch`` or ``deepspeed``.
        apex, deepspeed: whether NVIDIA apex / DeepSpeed import here.
    Raises:
        ValueError: a request this environment cannot serve, naming the fix.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer={name!r} is invalid: expected one of {OPTIMIZERS}")
    if device_type != "cuda":
        if name == "lamb":
            raise ValueError("optim.optimizer=lamb needs a GPU (apex's FusedLAMB or DeepSpeed's FusedLamb): "
                             "use optim.optimizer=adamw on the CPU")
        return OptimizerChoice("adamw", "torch.optim.AdamW", "CPU: torch's AdamW, as always")
    if apex:
        if name == "adamw":
            return OptimizerChoice("adamw", "apex.optimizers.FusedAdam", "CUDA with NVIDIA apex")
        return OptimizerChoice("lamb", "apex.optimizers.FusedLAMB", "CUDA with NVIDIA apex")
    if name == "adamw":
        if engine == "deepspeed" and deepspeed:
            return OptimizerChoice("adamw", "deepspeed.ops.adam.FusedAdam", "CUDA, DeepSpeed engine, no apex")
        return OptimizerChoice("adamw", "torch.optim.AdamW(fused=True)", "CUDA without apex")
    if deepspeed:
        return OptimizerChoice("lamb", "deepspeed.ops.lamb.FusedLamb", "CUDA without apex: DeepSpeed's fused LAMB")
    raise ValueError("optim.optimizer=lamb on CUDA needs NVIDIA apex or DeepSpeed (`pip install deepspeed`); "
                     "or use optim.optimizer=adamw")


def build_optimizer(groups: list[dict], name: str, lr: float, betas: tuple[float, float], eps: float,
                    device_type: str, engine: str = "torch") -> torch.optim.Optimizer:
    """Instantiate the chosen optimizer over ``groups`` and log the choice once per process."""
    choice = choose_optimizer(name, device_type, engine, apex_available() if device_type == "cuda" else False,
                              deepspeed_available() if device_type == "cuda" else False)
    if (choice.impl, engine) not in _logged:
        log.info("optimizer: %s (%s; engine %s)", choice.impl, choice.why, engine)
        _logged.add((choice.impl, engine))
    kw: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps)
    if choice.impl == "torch.optim.AdamW":
        return torch.optim.AdamW(groups, **kw)
    if choice.impl == "torch.optim.AdamW(fused=True)":
        return torch.optim.AdamW(groups, fused=True, **kw)
    if choice.impl == "apex.optimizers.FusedAdam":
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    if choice.impl == "apex.optimizers.FusedLAMB":
        from apex.optimizers import FusedLAMB

        return FusedLAMB(groups, **kw)
    if choice.impl == "deepspeed.ops.adam.FusedAdam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    from deepspeed.ops.lamb import FusedLamb

    return FusedLamb(groups, **kw)


def fuse_layer_norms(model: nn.Module, device_type: str) -> Optional[str]:
    """On CUDA with NVIDIA apex, swap every ``nn.LayerNorm`` for ``apex.normalization.FusedLayerNorm``
    in place (same parameter names and values, so checkpoints are unchanged); log once.

    Returns the implementation now in use, or None when nothing changed (CPU, or no apex).
    """
    if device_type != "cuda" or not apex_available():
        return None
    from apex.normalization import FusedLayerNorm

    count = 0
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps,
                                       elementwise_affine=child.elementwise_affine)
                fused.load_state_dict(child.state_dict())
                setattr(parent, child_name, fused.to(child.weight.device if child.weight is not None else "cuda"))
                count += 1
    if ("layernorm", "apex") not in _logged:
        log.info("LayerNorm: apex.normalization.FusedLayerNorm (%d modules)", count)
        _logged.add(("layernorm", "apex"))
    return "apex.normalization.FusedLayerNorm"
