// PMLM masking + layout of one example (docs/layout.md): the C++ fast path of
// pmlm_engine.layout.build_example_python. Pure C++ (no Python, no torch): the pybind11
// binding in layout.cpp validates inputs, releases the GIL and calls build_example_core.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pmlm {

constexpr int64_t kIgnore = -100;  // layout.IGNORE

// Masking configuration and special ids, already validated by the caller.
struct LayoutParams {
  double mask_ratio;    // stop once ceil(mask_ratio * n) maskable tokens are masked
  double span_prob;     // probability of a span of length span_min..span_max instead of 1
  int64_t span_min;
  int64_t span_max;     // inclusive
  double mask_prob;     // 80/10/10: share replaced by mask_id
  double random_prob;   // share replaced by a token of [random_lo, random_hi)
  int64_t mask_id;
  int64_t pseudo_id;    // [P]; equal to mask_id in the released code
  int64_t random_lo;
  int64_t random_hi;
};

// Raised by the core for inputs that cannot be laid out (translated to ValueError).
struct LayoutError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The laid-out example: five int64 fields of `length` tokens stored back to back in `buffer`
// (input_ids, position_ids, segment_ids, step, labels), main part first.
struct LayoutResult {
  std::vector<int64_t> buffer;
  int64_t length = 0;
  int64_t num_main = 0;
};

// Masks tokens[0:m) and lays the example out; draws from SplitMix64(seed) in exactly the order
// fixed by the docstring of pmlm_engine/masking.py. maskable is 0/1 per token.
LayoutResult build_example_core(const int64_t* tokens, const int64_t* segment_ids,
                                const uint8_t* maskable, int64_t m, uint64_t seed,
                                const LayoutParams& params);

}  // namespace pmlm
