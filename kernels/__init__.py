"""Triton kernels of pmlm-engine, installed as ``pmlm_engine.kernels``.

:mod:`pmlm_engine.attention` imports :mod:`.pseudo_mask_attention` and registers its ``BACKEND``
as the ``"triton"`` attention backend (only a missing ``triton`` package makes it unavailable).
Nothing here touches CUDA at import: availability is checked when the backend is chosen.

* :mod:`.pseudo_mask_attention`: the fused kernels, the custom ops and the backend.
* :mod:`.tile_stats`: tile classification and the FLOP model (``tile_stats.tile_stats``).
* :mod:`.aot_report`: ahead-of-time compile report (registers, spills, shared memory).

Only as ``pmlm_engine.kernels``: from the repository root this folder is also importable as a
top-level ``kernels`` (other libraries probe for a package of that name, e.g. transformers for
Hugging Face's kernel hub). Under that name it stays an empty shell: executing the modules a
second time would define the custom ops again, which makes torch free the first definition
while the engine still holds it (``docs/kernels.md``, "One definition of the custom ops").
"""

if __name__ == "pmlm_engine.kernels":
    from . import pseudo_mask_attention, tile_stats
    from .pseudo_mask_attention import BlockConfig, fused_pseudo_mask_attention

    __all__ = ["BlockConfig", "fused_pseudo_mask_attention", "pseudo_mask_attention", "tile_stats"]
