"""The finite-state guard of a training run: skip non-finite updates, stop a diverged run, warn on spikes.

What a step reports (its loss and its gradient norm before clipping) decides:

* a non-finite gradient norm: the update is skipped (the engine zeroes the gradients and does
  not step the optimizer or the schedule), as torch's ``GradScaler`` and DeepSpeed's loss scaler
  do; one warning line per skipped step;
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
from pathlib import Path

from .errors import NonFiniteError

log = logging.getLogger(__name__)


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

    def __init__(self, precision: str, max_nonfinite_steps: int = 3, spike_factor: float = 10.0,
                 window: int = 50) -> None:
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps={max_nonfinite_steps} is invalid: expected >= 1")
        self.precision = precision
        self.max_nonfinite_steps = max_nonfinite_steps
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.skipped_total = 0

    def after_step(self, step: int, loss: float, grad_norm: float | None, skipped: bool,
                   last_good: str | Path | None) -> None:
        """Record step ``step`` (1-based); raise :class:`NonFiniteError` when the run must stop.

        Args:
            loss: the step's loss (reduced over ranks).
            grad_norm: the global gradient norm before clipping (None if the engine does not report it).
            skipped: the engine skipped this update (non-finite gradients or an fp16 overflow).
            last_good: the newest checkpoint, named in the error.
        """
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite and not skipped:
            self.consecutive = 0
            if len(self.recent) >= 5:
                median = statistics.median(self.recent)
                if median > 0 and loss > self.spike_factor * median:
                    log.warning("loss spike at step %d: %.4g is %.0fx the running median %.4g of the last %d steps",
                                step, loss, loss / median, median, len(self.recent))
            self.recent.append(loss)
            return
        if finite:  # an fp16 overflow skip with finite values: the loss scaler's business
            return
        self.consecutive += 1
        self.skipped_total += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        if self.consecutive >= self.max_nonfinite_steps:
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
            raise NonFiniteError(
                f"training diverged at step {step}: {self.consecutive} consecutive non-finite steps ({what}; limit "
                f"max_nonfinite_steps={self.max_nonfinite_steps}); nothing non-finite was saved and {where}: "
                f"{precision_hint(self.precision)}" + (f", then resume with --resume {last_good}" if last_good else ""))
        log.warning("step %d: %s is not finite: update skipped (%d in a row; the run stops at %d)", step, what,
                    self.consecutive, self.max_nonfinite_steps)
