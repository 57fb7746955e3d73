"""One laid-out example (:class:`Example`) and the special token ids a layout needs (:class:`SpecialIds`).

Plain containers shared by the Python layout (:mod:`pmlm_engine.layout`) and its C++ twin
(:mod:`pmlm_engine._native`); ``docs/layout.md`` describes the fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100
FIELDS = ("input_ids", "position_ids", "segment_ids", "step", "labels")


@dataclass
class Example:
    """One laid-out example: ``num_main`` main tokens then the appended region."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray
    step: np.ndarray
    labels: np.ndarray
    num_main: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Example) and self.num_main == other.num_main
                and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in FIELDS))


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the layout needs. ``pseudo`` defaults to ``mask`` as in the released code."""

    cls: int
    sep: int
    mask: int
    pad: int
    pseudo: int | None = None
    random_lo: int = 0
    """Random replacements are drawn from ``[random_lo, random_hi)``."""
    random_hi: int = 1

    @property
    def p(self) -> int:
        return self.mask if self.pseudo is None else self.pseudo
