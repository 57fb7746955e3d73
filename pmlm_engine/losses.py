"""AE + PAR losses (docs/losses.md). This module owns the loss gathering.

Labels live on the layout (``pmlm_engine.layout``): a label at a main token
(``step == 0``) is an autoencoding target, a label at a pseudo token (``step < 0``)
is a partially autoregressive target. Only those rows are projected onto the
vocabulary: the ``(N, V)`` logits never exist for the other tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import IGNORE


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
    token_loss: Tensor
    """``(N,)`` per-target cross-entropy, in the order of ``token_index``."""
    token_index: Tensor
    """``(N, 2)`` (row, column) of each target."""


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
) -> LossOutput:
    """Cross-entropy of the labelled tokens, split into AE (main) and PAR (pseudo) terms.

    Args:
        hidden: ``(B, L, C)`` encoder output.
        labels: ``(B, L)`` target ids, ``IGNORE`` elsewhere.
        step: ``(B, L)`` the layout's steps (0 main, < 0 pseudo).
        head: maps ``(N, C)`` to ``(N, V)`` logits (the tied LM head).
    """
    index = gather_targets(labels)  # (N, 2)
    rows, cols = index[:, 0], index[:, 1]
    logits = head(hidden[rows, cols])  # (N, V): only the targets are projected
    token_loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[rows, cols], reduction="none",
                                 label_smoothing=label_smoothing)
    kind = step[rows, cols]
    is_ae, is_par = kind == 0, kind < 0
    if bool((kind > 0).any()):
        raise ValueError("labels found on ORIGINAL tokens (step > 0): the layout puts targets on main "
                         "(AE) and pseudo (PAR) tokens only")
    ae_n, par_n = int(is_ae.sum()), int(is_par.sum())
    zero = token_loss.new_zeros(())
    ae = token_loss[is_ae].sum() / ae_n if ae_n else zero
    par = token_loss[is_par].sum() / par_n if par_n else zero
    return LossOutput(
        loss=ae_weight * ae + par_weight * par,
        ae_loss=ae, par_loss=par, ae_tokens=ae_n, par_tokens=par_n,
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
