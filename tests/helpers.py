"""Shared builders for tests: small random PMLM layouts and a tiny model."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from pmlm_engine.attention import register_backend, unregister_backend
from pmlm_engine.attention_api import AttentionLayout
from pmlm_engine.dense_attention import DenseBackend, DensePrepared, reference_attention

from pmlm_engine.config import MaskingConfig, ModelConfig
from pmlm_engine.data import chunk_document
from pmlm_engine.layout import Example, SpecialIds, build_example_python
from pmlm_engine.model import PMLMModel

SPECIAL = SpecialIds(cls=1, sep=2, mask=3, pad=0, pseudo=4, random_lo=5, random_hi=61)
VOCAB = 61


def random_example(rng: np.random.Generator, text_len: int, seed: int,
                   cfg: MaskingConfig | None = None, special: SpecialIds = SPECIAL) -> Example:
    """A PMLM example over random text of ``text_len`` tokens ([CLS] A [SEP] B [SEP])."""
    ids = rng.integers(special.random_lo, special.random_hi, text_len)
    (seq,) = list(chunk_document(ids, text_len + 3, special, seed))
    return build_example_python(seq.tokens, seq.segment_ids, seq.maskable, seed, cfg or MaskingConfig(), special)


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, backend: str = "reference", **kw) -> PMLMModel:
    """A 2-layer model in eval mode with a non-trivial relative bias table."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=128)
    cfg = ModelConfig(**{**shape, **kw}, attention_backend=backend)
    model = PMLMModel(cfg).to(dtype).eval()
    if model.rel_pos_bias is not None:
        with torch.no_grad():
            model.rel_pos_bias.weight.normal_(0, 1.0)
    return model


class ExplicitMaskBackend(DenseBackend):
    """A test-only backend that ignores the layout's rule and attends through ``self.mask``
    ``(B, Lq, Lk)`` (with the layout's bias), so a naive computation never goes through the
    rule it checks."""

    def __init__(self, name: str) -> None:
        super().__init__(name, reference_attention, supports_dropout=True)
        self.mask: torch.Tensor | None = None

    def prepare(self, layout: AttentionLayout) -> DensePrepared:
        assert self.mask is not None, "set the explicit mask first"
        return DensePrepared(self.mask, None if layout.bias is None else layout.bias.buckets())


@contextlib.contextmanager
def explicit_mask(model: PMLMModel, mask: torch.Tensor) -> Iterator[None]:
    """Run ``model`` through :class:`ExplicitMaskBackend` with ``mask``; the backend is registered for
    the block only and the model's backend is restored afterwards."""
    backend = ExplicitMaskBackend("explicit-test-mask")
    backend.mask = mask
    before = model.attention_backend
    register_backend(backend)
    model.set_attention_backend(backend.name)
    try:
        yield
    finally:
        model.set_attention_backend(before)
        unregister_backend(backend.name)
