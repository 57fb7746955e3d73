"""The finite-state guard of a training run: skip non-finite updates, stop a diverged run, warn on spikes.

What a step reports (its loss and its gradient norm before clipping) decides:

* a non-finite gradient norm: the update is skipped (the engine zeroes the gradients and does
  not step the optimizer or the schedule), as torch's ``GradScaler`` and DeepSpeed's loss scaler
  do; one warning line per skipped step. Under fp16 the skips are the dynamic loss scaler's own
  (several in a row are normal while the scale settles) and are left to it;
* ``max_nonfinite_steps`` consecutive non-finite steps (loss or gradient norm): the run stops with
  one error line giving the step and the last good checkpoint (and a hint that fits the precision
  in use: "fp32" is never suggested to a run that already is fp32);
* a finite loss above ``spike_factor`` times the running median of the last ``window`` losses:
  a warning (a loss spike is not an error, but worth knowing before it diverges).

Nothing non-finite is ever written: :func:`pmlm_engine.checkpoint.check_finite` guards every
checkpoint and export, and this guard stops the run before the next save.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .errors import NonFiniteError

log = logging.getLogger(__name__)


@dataclass
class GuardConfig:
    """What counts as a diverged run (not part of the job's trajectory: changing it never blocks a resume)."""

    max_nonfinite_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient norm (each one skipped) before the run stops."""
    spike_factor: float = 10.0
    """A loss above this many times the running median of the last ``window`` steps logs a warning."""
    window: int = 50
    """Steps in the running median of the loss."""

    def __post_init__(self) -> None:
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps={self.max_nonfinite_steps} is invalid: expected >= 1")
        if not math.isfinite(self.spike_factor) or self.spike_factor <= 1:
            raise ValueError(f"spike_factor={self.spike_factor} is invalid: expected a finite number > 1")
        if self.window < 5:
            raise ValueError(f"window={self.window} is invalid: expected >= 5 steps")


def precision_hint(precision: str) -> str:
    """What to try next after a divergence, for the precision actually used."""
    if precision == "fp16":
        return "lower optim.lr, or use precision=bf16 or fp32 (fp16 overflows easily)"
    if precision == "bf16":
        return "lower optim.lr or optim.grad_clip, or use precision=fp32"
    return "lower optim.lr or optim.grad_clip, or raise optim.warmup_steps"


class FiniteGuard:
    """Per-step bookkeeping of non-finite steps and loss spikes (rank-independent: feed it the
    globally reduced loss and gradient norm so that every rank decides the same)."""

    def __init__(self, precision: str, cfg: GuardConfig | None = None) -> None:
        cfg = cfg or GuardConfig()
        self.precision = precision
        self.max_nonfinite_steps = cfg.max_nonfinite_steps
        self.spike_factor = cfg.spike_factor
        self.recent: deque[float] = deque(maxlen=cfg.window)
        self.consecutive = 0

    def after_step(self, step: int, loss: float, grad_norm: float | None, skipped: bool,
                   last_good: str | Path | None) -> None:
        """Record step ``step`` (1-based); raise :class:`NonFiniteError` when the run must stop.

        Args:
            loss: the step's loss (reduced over ranks).
            grad_norm: the global gradient norm before clipping (None if the engine does not report it).
            skipped: the engine skipped this update (non-finite gradients or an fp16 overflow).
            last_good: the newest checkpoint, named in the error.
        """
        if skipped and self.precision == "fp16":  # the dynamic loss scaler's overflow skips (often several in a
            return  # row while the scale settles); DeepSpeed stops the run itself at its minimum scale
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            if not skipped:
                self._track(step, loss)
            self.consecutive = 0
            return
        self.consecutive += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        applied = not skipped  # DeepSpeed without an overflow check applied it: the weights are not finite now
        if applied or self.consecutive >= self.max_nonfinite_steps:
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
            why = (f"{self.consecutive} consecutive non-finite steps ({what}; limit guard.max_nonfinite_steps="
                   f"{self.max_nonfinite_steps})" if not applied else
                   f"{what}, and this engine applied the update (it cannot skip one)")
            raise NonFiniteError(
                f"training diverged at step {step}: {why}; nothing non-finite was saved and {where}: "
                f"{precision_hint(self.precision)}" + (f", then resume with --resume {last_good}" if last_good else ""))
        log.warning("step %d: %s is not finite: update skipped (%d in a row; the run stops at %d)", step, what,
                    self.consecutive, self.max_nonfinite_steps)

    def _track(self, step: int, loss: float) -> None:
        if len(self.recent) >= 5:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.spike_factor * median:
                log.warning("loss spike at step %d: %.4g is %.0fx the running median %.4g of the last %d steps",
                            step, loss, loss / median, median, len(self.recent))
        self.recent.append(loss)
