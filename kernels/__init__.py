"""Triton kernels of pmlm-engine, installed as ``pmlm_engine.kernels``.

Importing this package registers the ``"triton"`` attention backend with
:func:`pmlm_engine.attention.register_backend` (``pmlm_engine.attention`` imports it lazily).
Nothing here touches CUDA at import: availability is checked when the backend is chosen.

* :mod:`.pseudo_mask_attention`: the fused kernels, the custom ops and the backend.
* :mod:`.tile_stats`: tile classification and the FLOP model (``tile_stats.tile_stats``).
* :mod:`.aot_report`: ahead-of-time compile report (registers, spills, shared memory).
"""

from . import pseudo_mask_attention, tile_stats
from .pseudo_mask_attention import BlockConfig, fused_pseudo_mask_attention

__all__ = ["BlockConfig", "fused_pseudo_mask_attention", "pseudo_mask_attention", "tile_stats"]
