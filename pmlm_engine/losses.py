"""AE + PAR losses (docs/losses.md). This module owns the loss gathering.

Labels live on the layout (``pmlm_engine.layout``): a label at a main token
(``step == 0``) is an autoencoding target, a label at a pseudo token (``step < 0``)
is a partially autoregressive target. Only those rows are projected onto the
vocabulary: the ``(N, V)`` logits never exist for the other tokens. With the fused head
(:mod:`pmlm_engine.fused_ce`, the default) they never exist in full for the targets either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import IGNORE
from .model import LMHead


@dataclass
class LossOutput:
    loss: Tensor
    """``ae_weight * ae_loss + par_weight * par_loss`` (the training objective)."""
    ae_loss: Tensor
    """Mean AE cross-entropy over the batch's masked positions (0 if none)."""
    par_loss: Tensor
    """Mean PAR cross-entropy over the batch's pseudo positions (0 if none)."""
    ae_tokens: int
    par_tokens: int
    ae_sum: Tensor
    """Summed AE cross-entropy (differentiable; fp32, fp64 for fp64 models)."""
    par_sum: Tensor
    """Summed PAR cross-entropy (differentiable)."""
    token_loss: Tensor
    """``(N,)`` per-target cross-entropy, in the order of ``token_index``. Carries no gradient
    with the fused head: differentiate ``loss``, ``ae_sum`` or ``par_sum``."""
    token_index: Tensor
    """``(N, 2)`` (row, column) of each target."""


FUSED_MIN_ROWS = 512
"""Targets from which ``pmlm_loss`` fuses the head by default. Measured on the CPU (1 thread, V = 30522,
C = 384, AE + PAR groups): fused 1.8x / 1.3x / 1.0x the unfused time at 64 / 150 / 300 rows (its fixed
cost is one ``(V, C)`` fp32 gradient accumulator per group), 0.9x at 600; at 16 x 512 (2,510 rows)
0.8x (fp32) / 0.45-0.7x (bf16) the time with 5.2x / 3.6-4.2x less head memory (``small``) and 3.2x /
2.7x (``base``). Below ~500 rows the ``(N, V)`` logits are at most ~60 MB anyway."""


def gather_targets(labels: Tensor) -> Tensor:
    """``(N, 2)`` (row, column) of every labelled token, row-major."""
    return (labels != IGNORE).nonzero()


def pmlm_loss(
    hidden: Tensor,
    labels: Tensor,
    step: Tensor,
    head: nn.Module,
    ae_weight: float = 1.0,
    par_weight: float = 1.0,
    label_smoothing: float = 0.0,
    fused: Optional[bool] = None,
) -> LossOutput:
    """Cross-entropy of the labelled tokens, split into AE (main) and PAR (pseudo) terms.

    Args:
        hidden: ``(B, L, C)`` encoder output.
        labels: ``(B, L)`` target ids, ``IGNORE`` elsewhere.
        step: ``(B, L)`` the layout's steps (0 main, < 0 pseudo).
        head: maps ``(N, C)`` to ``(N, V)`` logits (the tied LM head).
        label_smoothing: torch's formulation, in ``[0, 1)``.
        fused: project and score the targets in row chunks without materialising their
            ``(N, V)`` logits (:func:`pmlm_engine.fused_ce.linear_cross_entropy`); needs the
            model's :class:`pmlm_engine.model.LMHead`. None: fused when the head is one and
            there are at least ``FUSED_MIN_ROWS`` targets (see there).
    """
    index = gather_targets(labels)  # (N, 2)
    rows, cols = index[:, 0], index[:, 1]
    kind = step[rows, cols]
    if bool((kind > 0).any()):
        raise ValueError("labels found on ORIGINAL tokens (step > 0): the layout puts targets on main "
                         "(AE) and pseudo (PAR) tokens only")
    is_ae, is_par = kind == 0, kind < 0
    ae_n, par_n = int(is_ae.sum()), int(is_par.sum())
    fusable = isinstance(head, LMHead)
    if fused and not fusable:
        raise ValueError(f"pmlm_loss(fused=True) needs the model's LMHead (pmlm_engine.model.LMHead); got "
                         f"{type(head).__name__}: pass fused=False")
    if fused is None:
        fused = fusable and ae_n + par_n >= FUSED_MIN_ROWS
    if fused:
        sums, token_loss = head(hidden[rows, cols], labels[rows, cols], groups=is_par.long(), num_groups=2,
                                label_smoothing=label_smoothing)
        ae_sum, par_sum = sums[0], sums[1]
    else:
        logits = head(hidden[rows, cols])  # (N, V): only the targets are projected
        token_loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[rows, cols],
                                     reduction="none", label_smoothing=label_smoothing)
        ae_sum, par_sum = token_loss[is_ae].sum(), token_loss[is_par].sum()
    zero = ae_sum.new_zeros(())
    ae = ae_sum / ae_n if ae_n else zero
    par = par_sum / par_n if par_n else zero
    return LossOutput(
        loss=ae_weight * ae + par_weight * par,
        ae_loss=ae, par_loss=par, ae_tokens=ae_n, par_tokens=par_n, ae_sum=ae_sum, par_sum=par_sum,
        token_loss=token_loss, token_index=index,
    )


def per_example_losses(out: LossOutput, step: Tensor, example_index: Tensor) -> dict[int, tuple[float, float]]:
    """Summed (AE, PAR) loss per example, keyed by ``example_index[row, col]`` of each target."""
    rows, cols = out.token_index[:, 0], out.token_index[:, 1]
    ex = example_index[rows, cols]
    kind = step[rows, cols]
    result: dict[int, tuple[float, float]] = {}
    for e in ex.unique().tolist():
        sel = ex == e
        result[e] = (float(out.token_loss[sel & (kind == 0)].sum()), float(out.token_loss[sel & (kind < 0)].sum()))
    return result


def example_index_padded(doc_ids: Tensor) -> Tensor:
    """``example_index`` of a padded batch: row ``r`` is example ``r`` (-1 on padding)."""
    rows = torch.arange(doc_ids.shape[0], device=doc_ids.device).unsqueeze(1).expand_as(doc_ids)
    return torch.where(doc_ids >= 0, rows, torch.full_like(rows, -1))
