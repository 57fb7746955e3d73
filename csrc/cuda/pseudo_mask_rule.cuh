// The pseudo-mask rule, the T5 relative-position bias and exact tile classification, as device
// functions for the CUDA attention kernels (pseudo_mask_attention.cu).
//
// Visibility (pmlm_engine.attention.dense_pseudo_mask, pair by pair):
//   w_q >= 0:  0 <= w_k <= w_q;   w_q < 0:  0 <= w_k < -w_q  or  w_k == w_q;
//   and doc_q == doc_k and doc_k >= 0 (padding keys, doc -1, are never visible).
// Bias: table[h, bucket(pos_k - pos_q)], bucket(d) = lut[min(|d|, max_distance)] + (d > 0) * half,
// where lut is pmlm_engine.attention.bucket_lut (T5's float formula evaluated once per distance
// on the host, so the kernel agrees with the torch reference exactly).
#pragma once

#include "cuda_compat.cuh"

namespace pmlm {

constexpr int kEmpty = 0;    // no (query, key) pair of the tile is visible: skipped
constexpr int kPartial = 1;  // some pairs visible: computed with the mask
constexpr int kFull = 2;     // every pair visible: computed without a mask
constexpr int kThreads = 128;  // every attention kernel runs 4 warps per block
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ bool visible(int wq, int dq, int wk, int dk) {
  // dq == dk and dk >= 0 also rule out padding queries (doc -1).
  if (dk < 0 || dq != dk) return false;
  if (wq >= 0) return wk >= 0 && wk <= wq;
  return (wk >= 0 && wk < -wq) || wk == wq;
}

/// Bias of one (query, key) pair for one head (``table_h`` is that head's row of the table).
__device__ __forceinline__ float relative_bias(const float* __restrict__ table_h, const int32_t* __restrict__ lut,
                                               int half_buckets, int max_distance, int q_pos, int k_pos) {
  const int rel = k_pos - q_pos;
  int n = rel < 0 ? -rel : rel;
  n = n < max_distance ? n : max_distance;
  return table_h[lut[n] + (rel > 0 ? half_buckets : 0)];
}

/// Bucket index of one pair (for the table gradient).
__device__ __forceinline__ int relative_bucket(const int32_t* __restrict__ lut, int half_buckets, int max_distance,
                                               int q_pos, int k_pos) {
  const int rel = k_pos - q_pos;
  int n = rel < 0 ? -rel : rel;
  n = n < max_distance ? n : max_distance;
  return lut[n] + (rel > 0 ? half_buckets : 0);
}

/// Exact class of one tile of NQ queries x NK keys whose metadata is staged in shared memory
/// (positions past the end of the sequence staged as padding, doc -1, so a tail tile is never
/// FULL). Every thread of the block must call it: it ends with two block-wide reductions.
template <int NQ, int NK>
__device__ int classify_tile(const int32_t* q_step, const int32_t* q_doc, const int32_t* k_step,
                             const int32_t* k_doc) {
  bool any_visible = false;
  bool all_visible = true;
  // Consecutive threads take consecutive keys of one query: a broadcast of the query's metadata.
  for (int pair = threadIdx.x; pair < NQ * NK; pair += kThreads) {
    const int qi = pair / NK;
    const int ki = pair % NK;
    const bool v = visible(q_step[qi], q_doc[qi], k_step[ki], k_doc[ki]);
    any_visible |= v;
    all_visible &= v;
    if (any_visible && !all_visible) break;  // this thread already proves PARTIAL
  }
  const int any = __syncthreads_or(any_visible);
  const int all = __syncthreads_and(all_visible);
  return !any ? kEmpty : (all ? kFull : kPartial);
}

}  // namespace pmlm
