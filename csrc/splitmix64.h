// SplitMix64 (Steele et al., 2014): the C++ twin of pmlm_engine/rng.py, bit for bit.
//
// The masking hot loop draws from this generator on both sides; any change here must be
// mirrored in rng.py (and the equivalence tests in tests/test_layout_native.py will fail if not).
#pragma once

#include <cstdint>

namespace pmlm {

struct SplitMix64 {
  static constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

  uint64_t state;

  explicit SplitMix64(uint64_t seed) : state(seed) {}

  static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  inline uint64_t next_u64() {
    state += kGolden;  // wraps mod 2**64, as `& MASK64` does in Python
    return mix(state);
  }

  // An integer in [0, n) for 0 < n < 2**32: multiply-shift on the high 32 bits, as rng.py.
  inline uint64_t randbelow(uint64_t n) { return ((next_u64() >> 32) * n) >> 32; }

  // A double in [0, 1) with 53 random bits; exact in IEEE double, so identical to Python.
  inline double uniform() {
    return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0);
  }
};

// derive_seed(seed, *keys) of rng.py: one independent stream per (epoch, example, ...).
inline uint64_t derive_seed(uint64_t seed, const uint64_t* keys, int64_t num_keys) {
  uint64_t z = seed;
  for (int64_t i = 0; i < num_keys; ++i) z = SplitMix64::mix(z + SplitMix64::kGolden + keys[i]);
  return z;
}

}  // namespace pmlm
