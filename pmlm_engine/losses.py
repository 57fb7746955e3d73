"""AE + PAR losses (docs/losses.md). This module owns the loss gathering.

Labels live on the layout (``pmlm_engine.layout``): a label at a main token
(``step == 0``) is an autoencoding target, a label at a pseudo token (``step < 0``)
is a partially autoregressive target. Only those rows are projected onto the
vocabulary: the ``(N, V)`` logits never exist for the other tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


@dataclass(frozen=True)
class LabelSmoothing:
    """Which label smoothing :func:`pmlm_loss` applies (a plain float means torch's).

    * ``kind="torch"``: ``F.cross_entropy(label_smoothing=eps)``: the target distribution puts
      ``1 - eps + eps / V`` on the label and ``eps / V`` on every id.
    * ``kind="s2s-ft"``: :func:`s2sft_smoothed_loss`, s2s-ft's KL divergence.
    """

    eps: float
    kind: str = "torch"

    def __post_init__(self) -> None:
        if self.kind not in ("torch", "s2s-ft"):
            raise ValueError(f"label smoothing kind {self.kind!r}: expected 'torch' or 's2s-ft'")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"label smoothing eps={self.eps}: expected a value in [0, 1)")


S2SFT_LOSS_DENOMINATOR_EPS = 1e-5
"""s2s-ft divides a batch's summed target loss by ``target tokens + 1e-5``."""


def s2sft_smoothed_loss(logits: Tensor, labels: Tensor, eps: float, pad_id: int = 0) -> Tensor:
    """Per-row ``KL(q || softmax(logits))`` with s2s-ft's smoothed target ``q`` (``(N,)``, fp32 or wider).

    ``q`` puts ``1 - eps`` on the label, ``eps / (V - 2)`` on every other id except ``pad_id``,
    and 0 on ``pad_id``; rows whose label is ``pad_id`` contribute 0. Computed in closed form,
    without the ``(N, V)`` target matrix::

        KL = sum_v q_v log q_v - sum_v q_v log p_v
           = (V - 2) s log s + (1 - eps) log(1 - eps)
             - s (sum_v log p_v - log p_pad - log p_y) - (1 - eps) log p_y,     s = eps / (V - 2)

    Unlike torch's smoothing, the value includes the constant ``sum q log q`` (the loss s2s-ft
    reports), and the gradient has no component towards ``pad_id``.
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, V)
    v = logp.shape[-1]
    s = eps / (v - 2)
    conf = torch.tensor(1.0 - eps, dtype=logp.dtype)
    entropy_term = (v - 2) * torch.special.xlogy(torch.tensor(s, dtype=logp.dtype), s) + torch.special.xlogy(conf, conf)
    lp_y = logp.gather(1, labels.unsqueeze(1)).squeeze(1)  # (N,)
    cross = s * (logp.sum(-1) - logp[:, pad_id] - lp_y) + (1.0 - eps) * lp_y
    return torch.where(labels == pad_id, torch.zeros_like(lp_y), entropy_term - cross)


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
    label_smoothing: Union[float, LabelSmoothing] = 0.0,
) -> LossOutput:
    """Cross-entropy of the labelled tokens, split into AE (main) and PAR (pseudo) terms.

    Args:
        hidden: ``(B, L, C)`` encoder output.
        labels: ``(B, L)`` target ids, ``IGNORE`` elsewhere.
        step: ``(B, L)`` the layout's steps (0 main, < 0 pseudo).
        head: maps ``(N, C)`` to ``(N, V)`` logits (the tied LM head).
        label_smoothing: a float (torch's smoothing) or a :class:`LabelSmoothing`.
    """
    index = gather_targets(labels)  # (N, 2)
    rows, cols = index[:, 0], index[:, 1]
    logits = head(hidden[rows, cols])  # (N, V): only the targets are projected
    smoothing = label_smoothing if isinstance(label_smoothing, LabelSmoothing) else LabelSmoothing(label_smoothing)
    if smoothing.kind == "s2s-ft" and smoothing.eps > 0:
        token_loss = s2sft_smoothed_loss(logits, labels[rows, cols], smoothing.eps)
    else:
        token_loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[rows, cols],
                                     reduction="none", label_smoothing=smoothing.eps)
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
