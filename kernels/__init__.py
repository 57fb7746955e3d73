"""Triton kernels of pmlm-engine, installed as ``pmlm_engine.kernels``.

:mod:`pmlm_engine.attention` imports :mod:`.pseudo_mask_attention` and registers its ``BACKEND``
as the ``"triton"`` attention backend (only a missing ``triton`` package makes it unavailable).
Nothing here touches CUDA at import: availability is checked when the backend is chosen.

* :mod:`.pseudo_mask_attention`: the fused kernels, the custom ops and the backend.
* :mod:`.tile_stats`: tile classification and the FLOP model (``tile_stats.tile_stats``).
* :mod:`.aot_report`: ahead-of-time compile report (registers, spills, shared memory).
"""

from . import pseudo_mask_attention, tile_stats
from .pseudo_mask_attention import BlockConfig, fused_pseudo_mask_attention

__all__ = ["BlockConfig", "fused_pseudo_mask_attention", "pseudo_mask_attention", "tile_stats"]
