"""A tiny deterministic random generator shared bit-for-bit by Python and C++.

The masking hot loop has a C++ fast path (``csrc/layout.cpp``) and this Python
reference; for the same seed both must produce identical examples. Neither
``random`` nor ``numpy.random`` has a stable C++ twin, so both sides use
SplitMix64 (Steele et al., 2014) with the same three derived draws:

* ``randbelow(n)``: ``((x >> 32) * n) >> 32`` (multiply-shift; bias < n / 2**32),
* ``uniform()``: ``(x >> 11) * 2**-53``, exact in IEEE double on both sides,
* ``derive_seed(seed, *keys)``: one independent stream per (epoch, example).
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """Hash a base seed and integer keys (epoch, example index, ...) into one 64-bit seed."""
    z = seed & MASK64
    for key in keys:
        z = _mix((z + _GOLDEN + (key & MASK64)) & MASK64)
    return z


class SplitMix64:
    """SplitMix64; mirrored exactly by ``struct SplitMix64`` in ``csrc/layout.cpp``."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + _GOLDEN) & MASK64
        return _mix(self.state)

    def randbelow(self, n: int) -> int:
        """An integer in ``[0, n)``; ``0 < n < 2**32``."""
        return ((self.next_u64() >> 32) * n) >> 32

    def uniform(self) -> float:
        """A float in ``[0, 1)`` with 53 random bits."""
        return (self.next_u64() >> 11) * (1.0 / 9007199254740992.0)
