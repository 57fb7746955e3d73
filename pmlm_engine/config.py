"""Typed configuration: one dataclass per concern, validated on construction.

Every field has a docstring-style comment; ``__post_init__`` raises ``ValueError``
naming the field and the accepted range. Presets for the model live here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


def _check(cond: bool, name: str, value: Any, want: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: expected {want}")


@dataclass
class MaskingConfig:
    """Blockwise masking of docs/layout.md (defaults are the paper's)."""

    mask_ratio: float = 0.15
    """Fraction of maskable tokens to mask: the loop stops once ceil(ratio * n) are masked."""
    span_prob: float = 0.4
    """Probability that a sampled span has a length drawn from [span_min, span_max] instead of 1."""
    span_min: int = 2
    """Shortest multi-token span."""
    span_max: int = 6
    """Longest multi-token span (inclusive)."""
    mask_prob: float = 0.8
    """Share of masked main-sequence positions replaced by [MASK]."""
    random_prob: float = 0.1
    """Share replaced by a random token; the remainder keeps the original token."""

    def __post_init__(self) -> None:
        _check(0.0 < self.mask_ratio < 1.0, "mask_ratio", self.mask_ratio, "a value in (0, 1)")
        _check(0.0 <= self.span_prob <= 1.0, "span_prob", self.span_prob, "a value in [0, 1]")
        _check(1 <= self.span_min <= self.span_max, "span_min/span_max",
               (self.span_min, self.span_max), "1 <= span_min <= span_max")
        _check(0.0 <= self.mask_prob and 0.0 <= self.random_prob
               and self.mask_prob + self.random_prob <= 1.0,
               "mask_prob/random_prob", (self.mask_prob, self.random_prob),
               "non-negative values summing to at most 1")


@dataclass
class ModelConfig:
    """BERT-style post-LayerNorm encoder with a shared T5 relative position bias (docs/model.md)."""

    vocab_size: int = 30522
    """Rows of the (tied) token embedding; must match the tokenizer."""
    hidden_size: int = 768
    """Model width."""
    num_layers: int = 12
    """Transformer layers."""
    num_heads: int = 12
    """Attention heads; hidden_size must be a multiple."""
    intermediate_size: int = 3072
    """Feed-forward width."""
    max_position: int = 512
    """Rows of the absolute position table (positions are 0 .. max_position - 1)."""
    type_vocab_size: int = 2
    """Segment ids (0 = first segment / source, 1 = second segment / target)."""
    hidden_dropout: float = 0.1
    """Dropout after embeddings, attention output and FFN output."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities. 0 by default: the fused kernels do not implement it."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT's value)."""
    rel_pos_buckets: int = 32
    """Buckets of the relative position bias; 0 turns the bias off."""
    rel_pos_max_distance: int = 128
    """Distances at or beyond this share the last bucket."""
    initializer_range: float = 0.02
    """Std of the normal init of weights."""
    attention_backend: str = "auto"
    """Backend of ``pmlm_engine.attention.pseudo_mask_attention``."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position", "type_vocab_size"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
               f"a multiple of num_heads={self.num_heads}")
        _check(self.rel_pos_buckets >= 0 and self.rel_pos_buckets % 2 == 0, "rel_pos_buckets",
               self.rel_pos_buckets, "0 (off) or an even positive integer")
        _check(self.rel_pos_max_distance > self.rel_pos_buckets // 4, "rel_pos_max_distance",
               self.rel_pos_max_distance, "larger than rel_pos_buckets / 4")
        for name in ("hidden_dropout", "attention_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, name, getattr(self, name), "a value in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """``tiny`` (CPU demos and tests), ``small`` (MiniLM-L6 shape), ``base`` (BERT-base)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, max_position=512),
    "small": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, max_position=512),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_position=512),
}


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys with their names."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}: allowed keys are {sorted(known)}")
    return cls(**data)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


__all__ = ["MaskingConfig", "ModelConfig", "PRESETS", "from_dict", "to_dict", "field"]
