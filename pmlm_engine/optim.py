"""Optimizer and schedule of the paper (docs/model.md): AdamW, warmup then linear decay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import fused_ops


@dataclass
class OptimConfig:
    """AdamW with the paper's settings; weight decay skips LayerNorm weights and biases."""

    lr: float = 6e-4
    """Peak learning rate (reached at the end of warmup)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's (beta1, beta2); the paper's (0.9, 0.98)."""
    eps: float = 1e-6
    """Adam's epsilon (the paper's 1e-6)."""
    weight_decay: float = 0.01
    """Decoupled weight decay of matrices and embeddings (the paper's 0.01)."""
    warmup_steps: int = 24000
    """Linear warmup from 0 to ``lr``; then linear decay to 0 at ``total_steps``."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    optimizer: str = "adamw"
    """``adamw`` or ``lamb``; on a GPU the fused implementation is picked per environment
    (:mod:`pmlm_engine.fused_ops`); on the CPU only ``adamw`` (torch's AdamW)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives lists
        if not math.isfinite(self.lr) or self.lr <= 0:  # NaN passes "<= 0"; inf is no learning rate
            raise ValueError(f"lr={self.lr} is invalid: expected a positive, finite learning rate")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} is invalid: expected >= 0")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas={self.betas} is invalid: expected two values in [0, 1)")
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps={self.eps} is invalid: expected a positive, finite epsilon")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} is invalid: expected >= 0")
        if not math.isfinite(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} is invalid: expected 0 (off) or a positive norm")
        if self.optimizer not in ("adamw", "lamb"):
            raise ValueError(f"optimizer={self.optimizer!r} is invalid: expected 'adamw' or 'lamb'")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; not biases, LayerNorm weights or the relative bias table."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "rel_pos_bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: Optional[str] = None,
                    engine: str = "torch") -> torch.optim.Optimizer:
    """``cfg.optimizer`` over :func:`param_groups` (also the client optimizer handed to DeepSpeed):
    torch's AdamW on the CPU; the fused implementation :func:`pmlm_engine.fused_ops.choose_optimizer`
    picks on CUDA. ``device_type`` defaults to where the model's parameters are."""
    if device_type is None:
        device_type = next(model.parameters()).device.type
    return fused_ops.build_optimizer(param_groups(model, cfg.weight_decay), cfg.optimizer, cfg.lr, cfg.betas,
                                     cfg.eps, device_type, engine)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to ``cfg.lr`` over ``cfg.warmup_steps``, then linear decay to 0 at ``total_steps``.

    The factor is a pure function of the step (:func:`lr_factor`); the scheduler's state
    (its step count) is saved in checkpoints.
    """
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps))
