"""Loader of the optional C++ extension ``pmlm_engine._C`` (built by ``setup.py`` from ``csrc/``).

Imported lazily: torch must be imported before the extension (it links ``libc10``).
The extension reproduces :func:`pmlm_engine.layout.build_example_python` draw for draw
(``csrc/layout.cpp``); ``tests/test_layout_native.py`` checks that the two agree.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike

from .config import MaskingConfig
from .example import Example, SpecialIds

_C: Any = None
_ERROR: str | None = None
_MASK64 = (1 << 64) - 1


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
    """True when ``pmlm_engine._C`` imports."""
    _load()
    return _C is not None


def why_unavailable() -> str:
    """Why the extension is unavailable (with the command that builds it), or ``"available"``."""
    _load()
    return _ERROR or "available"


def _require() -> Any:
    _load()
    if _C is None:
        raise RuntimeError(why_unavailable())
    return _C


def _config_args(cfg: MaskingConfig, special: SpecialIds) -> tuple[Any, ...]:
    return (cfg.mask_ratio, cfg.span_prob, cfg.span_min, cfg.span_max, cfg.mask_prob, cfg.random_prob,
            special.mask, special.p, special.random_lo, special.random_hi)


def _example(result: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]) -> Example:
    ids, pos, seg, step, labels, num_main = result
    return Example(input_ids=ids, position_ids=pos, segment_ids=seg, step=step, labels=labels,
                   num_main=int(num_main))


def build_example(
    tokens: ArrayLike,
    segment_ids: ArrayLike,
    maskable: ArrayLike,
    seed: int,
    cfg: MaskingConfig,
    special: SpecialIds,
) -> Example:
    """C++ twin of :func:`pmlm_engine.layout.build_example_python` (same arguments, same result).

    Raises:
        ValueError: bad shapes or configuration, naming the argument (raised by the extension).
        RuntimeError: the extension is not built.
    """
    ext = _require()
    return _example(ext.build_example(
        np.ascontiguousarray(tokens, dtype=np.int64),
        np.ascontiguousarray(segment_ids, dtype=np.int64),
        np.ascontiguousarray(maskable, dtype=np.bool_),
        int(seed) & _MASK64,
        *_config_args(cfg, special),
    ))


def build_examples(
    tokens: Sequence[ArrayLike],
    segment_ids: Sequence[ArrayLike],
    maskable: Sequence[ArrayLike],
    seeds: Sequence[int],
    cfg: MaskingConfig,
    special: SpecialIds,
) -> list[Example]:
    """Batched :func:`build_example`: one call into C++ for many sequences (GIL released once).

    ``tokens[i]``, ``segment_ids[i]``, ``maskable[i]`` and ``seeds[i]`` describe example ``i``.
    """
    ext = _require()
    results = ext.build_examples(
        [np.ascontiguousarray(t, dtype=np.int64) for t in tokens],
        [np.ascontiguousarray(s, dtype=np.int64) for s in segment_ids],
        [np.ascontiguousarray(m, dtype=np.bool_) for m in maskable],
        [int(s) & _MASK64 for s in seeds],
        *_config_args(cfg, special),
    )
    return [_example(r) for r in results]
