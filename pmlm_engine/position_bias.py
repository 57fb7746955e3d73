"""The T5-style relative position bias shared by all layers (``docs/model.md``).

The bias of query ``q`` and key ``k`` in head ``h`` is ``table[h, bucket(pos_k - pos_q)]``:
bidirectional buckets, exact for small distances and logarithmic up to ``max_distance``.
:func:`bucket_lut` is the one statement of the bucket formula; every backend (torch, Triton)
derives its indices from it, so they agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["RelativePositionBias", "bucket_lut", "relative_position_bucket"]


_LUTS: dict[tuple[int, int], tuple[int, ...]] = {}


@torch._dynamo.assume_constant_result  # compiled code takes the table as a constant (no trace, no host read)
def bucket_lut(num_buckets: int, max_distance: int) -> tuple[int, ...]:
    """Bucket of every distance ``0 .. max_distance`` for one direction (``num_buckets // 2``
    buckets). This is T5's float32 formula evaluated once per integer distance, so every
    implementation (torch, Triton) agrees exactly, including at the boundaries 16, 32, 64
    where the formula's logarithm lands on an integer. Computed once per argument pair."""
    key = (num_buckets, max_distance)
    if key not in _LUTS:
        half = num_buckets // 2
        max_exact = half // 2
        n = torch.arange(max_distance + 1)
        large = max_exact + (torch.log(n.clamp(min=1).float() / max_exact)
                             / math.log(max_distance / max_exact) * (half - max_exact)).long()
        _LUTS[key] = tuple(torch.where(n < max_exact, n, large.clamp(max=half - 1)).tolist())
    return _LUTS[key]


def relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5 bidirectional bucket of ``relative_position = pos_k - pos_q`` (any integer shape)."""
    half = num_buckets // 2
    lut = torch.tensor(bucket_lut(num_buckets, max_distance), device=relative_position.device)
    n = relative_position.abs().clamp(max=max_distance)
    return lut[n] + (relative_position > 0).long() * half


@dataclass(frozen=True)
class RelativePositionBias:
    """What a backend needs to add the relative position bias itself.

    ``table`` is the ``(H, num_buckets)`` parameter shared by all layers; the bias of
    query ``q`` and key ``k`` in head ``h`` is ``table[h, bucket(pos_k - pos_q)]``.
    """

    table: Tensor  # (H, num_buckets)
    position_ids: Tensor  # (B, Lk) key positions
    q_position_ids: Optional[Tensor] = None  # (B, Lq); default: the keys'
    max_distance: int = 128

    @property
    def num_buckets(self) -> int:
        return self.table.shape[-1]

    def buckets(self) -> Tensor:
        """``(B, Lq, Lk)`` bucket indices."""
        q_pos = self.position_ids if self.q_position_ids is None else self.q_position_ids
        rel = self.position_ids.unsqueeze(-2) - q_pos.unsqueeze(-1)
        return relative_position_bucket(rel, self.num_buckets, self.max_distance)

    def dense(self, buckets: Optional[Tensor] = None) -> Tensor:
        """The materialised ``(B, H, Lq, Lk)`` bias (dense backends only); ``buckets`` as from
        :meth:`buckets`, computed here when not given."""
        return self.table[:, self.buckets() if buckets is None else buckets].permute(1, 0, 2, 3)
