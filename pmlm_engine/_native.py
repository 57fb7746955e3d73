"""Loader of the optional C++ extension ``pmlm_engine._C`` (built by ``setup.py`` from ``csrc/``).

Imported lazily: torch must be imported before the extension (it links ``libc10``).
"""

from __future__ import annotations

import numpy as np

from .config import MaskingConfig

_C = None
_ERROR: str | None = None


def _load() -> None:
    global _C, _ERROR
    if _C is not None or _ERROR is not None:
        return
    try:
        import torch  # noqa: F401  (loads libc10 before the extension)

        from . import _C as ext

        _C = ext
    except ImportError as exc:  # pragma: no cover - depends on the install
        _ERROR = (f"the C++ extension pmlm_engine._C is not built ({exc}); build it with "
                  "`pip install --no-build-isolation -e .`")


def available() -> bool:
    _load()
    return _C is not None


def why_unavailable() -> str:
    _load()
    return _ERROR or "available"


def build_example(tokens, segment_ids, maskable, seed: int, cfg: MaskingConfig, special):
    """C++ twin of :func:`pmlm_engine.layout.build_example_python`."""
    from .layout import Example

    _load()
    ids, pos, seg, step, labels, num_main = _C.build_example(
        np.ascontiguousarray(tokens, dtype=np.int64),
        np.ascontiguousarray(segment_ids, dtype=np.int64),
        np.ascontiguousarray(maskable, dtype=np.bool_),
        int(seed) & ((1 << 64) - 1),
        cfg.mask_ratio, cfg.span_prob, cfg.span_min, cfg.span_max, cfg.mask_prob, cfg.random_prob,
        special.mask, special.p, special.random_lo, special.random_hi,
    )
    return Example(input_ids=ids, position_ids=pos, segment_ids=seg, step=step, labels=labels,
                   num_main=int(num_main))
