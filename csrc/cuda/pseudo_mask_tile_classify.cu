// Exact tile classification of the PMLM pseudo-mask (PMLM.md section 3) on the GPU.
//
// STATUS: compile-checked only (nvcc for sm_80 and sm_90 by csrc/cuda/check.sh and
// tests/test_cuda_compile.py: registers, spills, shared memory). It has never been run on a GPU
// in this project; do not rely on its output before a GPU test compares it with
// pmlm_engine.attention.dense_pseudo_mask.
//
// For every batch b, query tile i (rows i*BLOCK_M ..) and key tile j (columns j*BLOCK_N ..) it
// writes one class:
//   EMPTY   (0): no (query, key) pair of the tile is visible      -> the attention kernel skips it;
//   PARTIAL (1): some pairs are visible, some are not              -> computed with the mask;
//   FULL    (2): every pair of the tile is visible                 -> computed without a mask.
// Visibility is dense_pseudo_mask's rule, pair by pair (so the result is exact, not a bound):
//   w_q >= 0:  0 <= w_k <= w_q;   w_q < 0:  0 <= w_k < -w_q  or  w_k == w_q;
//   and doc_q == doc_k and doc_k >= 0 (padding keys, doc -1, are never visible).
// Rows or columns past the end of the sequence count as padding, so a tail tile is never FULL:
// the same convention as kernels/tile_stats.py, whose summary-based tile_classes is a
// conservative version of this (its FULL and EMPTY tiles are FULL and EMPTY here too; tiles it
// calls PARTIAL may be exactly FULL or EMPTY here).
//
// No torch headers (torch's CUDAExtension cannot build on the CPU-only dev machines, see
// TOOLCHAIN.md): the host side is the extern "C" launcher at the bottom, callable from a torch
// binding or ctypes with raw device pointers.

#include <cuda_runtime.h>

#include <cstdint>

namespace pmlm {
namespace {

constexpr int8_t kEmpty = 0;
constexpr int8_t kPartial = 1;
constexpr int8_t kFull = 2;
constexpr int kThreads = 256;
constexpr int kMinBlock = 16;   // tile sizes: powers of two in [kMinBlock, kMaxBlock]
constexpr int kMaxBlock = 512;  // 2 * (512 + 512) * 8 bytes = 16 KiB of shared memory at most

__device__ __forceinline__ bool visible(int64_t wq, int64_t dq, int64_t wk, int64_t dk) {
  // dq == dk and dk >= 0 also rule out padding queries (doc -1).
  if (dk < 0 || dq != dk) return false;
  if (wq >= 0) return wk >= 0 && wk <= wq;
  return (wk >= 0 && wk < -wq) || wk == wq;
}

// One thread block per (key tile, query tile, batch): blockIdx = (j, i, b). The tile's metadata
// is staged in shared memory once; the threads then stride over the block_m * block_n pairs
// and the block reduces "any visible" / "all visible" with __syncthreads_or / _and.
// Tile sizes are runtime powers of two (the Triton kernels' BlockConfig uses 16 .. 128 in every
// combination), so one compiled kernel serves them all.
__global__ void __launch_bounds__(kThreads) pseudo_mask_tile_classify_kernel(
    const int64_t* __restrict__ q_step,  // (B, Lq) signed step of every query
    const int64_t* __restrict__ q_doc,   // (B, Lq) document of every query, -1 = padding
    const int64_t* __restrict__ k_step,  // (B, Lk) signed step of every key
    const int64_t* __restrict__ k_doc,   // (B, Lk) document of every key, -1 = padding
    int8_t* __restrict__ classes,        // out, (B, n_q_tiles, n_k_tiles) EMPTY/PARTIAL/FULL
    int64_t lq, int64_t lk, int64_t n_q_tiles, int64_t n_k_tiles,
    int block_m, int log2_block_n) {
  // Dynamic shared memory, 2 * (block_m + block_n) int64: q steps, q docs, k steps, k docs.
  extern __shared__ int64_t smem[];
  const int block_n = 1 << log2_block_n;
  int64_t* s_q_step = smem;
  int64_t* s_q_doc = s_q_step + block_m;
  int64_t* s_k_step = s_q_doc + block_m;
  int64_t* s_k_doc = s_k_step + block_n;

  const int64_t j = blockIdx.x;
  const int64_t i = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t q0 = i * block_m;
  const int64_t k0 = j * block_n;

  for (int t = threadIdx.x; t < block_m; t += blockDim.x) {
    const int64_t q = q0 + t;
    const bool in = q < lq;
    s_q_step[t] = in ? q_step[b * lq + q] : 0;
    s_q_doc[t] = in ? q_doc[b * lq + q] : -1;  // past the end: a padding query
  }
  for (int t = threadIdx.x; t < block_n; t += blockDim.x) {
    const int64_t k = k0 + t;
    const bool in = k < lk;
    s_k_step[t] = in ? k_step[b * lk + k] : 0;
    s_k_doc[t] = in ? k_doc[b * lk + k] : -1;  // past the end: a padding key
  }
  __syncthreads();

  bool any_visible = false;
  bool all_visible = true;
  const int pairs = block_m << log2_block_n;
  // Consecutive threads take consecutive keys of one query row: conflict-free shared reads of
  // the key metadata and a broadcast of the query's.
  for (int pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
    const int r = pair >> log2_block_n;
    const int c = pair & (block_n - 1);
    const bool v = visible(s_q_step[r], s_q_doc[r], s_k_step[c], s_k_doc[c]);
    any_visible |= v;
    all_visible &= v;
    if (any_visible && !all_visible) break;  // this thread already proves PARTIAL
  }
  // Every thread reaches both barriers (the loop above only exits early, it never returns).
  const int any = __syncthreads_or(any_visible);
  const int all = __syncthreads_and(all_visible);
  if (threadIdx.x == 0)
    classes[(b * n_q_tiles + i) * n_k_tiles + j] = !any ? kEmpty : (all ? kFull : kPartial);
}

int log2_if_pow2(int x) {
  if (x < kMinBlock || x > kMaxBlock || (x & (x - 1)) != 0) return -1;
  int log2 = 0;
  while ((1 << log2) < x) ++log2;
  return log2;
}

}  // namespace
}  // namespace pmlm

// Host launcher. All pointers are device pointers to contiguous row-major arrays:
// q_step/q_doc (batch, lq), k_step/k_doc (batch, lk), classes (batch, ceil(lq / block_m),
// ceil(lk / block_n)) int8. For self-attention pass the same arrays as queries and keys.
// block_m and block_n: powers of two in [16, 512] (the attention kernel's tile sizes).
// Returns a cudaError_t as int: cudaSuccess (0), cudaErrorInvalidValue (1) for bad arguments
// or a grid beyond CUDA's limits, or the launch error. `stream` is a cudaStream_t (nullptr =
// the default stream); void* keeps the signature free of CUDA headers for ctypes callers.
extern "C" int pmlm_pseudo_mask_tile_classify(const int64_t* q_step, const int64_t* q_doc,
                                              const int64_t* k_step, const int64_t* k_doc,
                                              int8_t* classes, int64_t batch, int64_t lq,
                                              int64_t lk, int block_m, int block_n, void* stream) {
  using namespace pmlm;
  const int log2_block_n = log2_if_pow2(block_n);
  if (!q_step || !q_doc || !k_step || !k_doc || !classes || batch < 0 || lq < 0 || lk < 0 ||
      log2_if_pow2(block_m) < 0 || log2_block_n < 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (batch == 0 || lq == 0 || lk == 0) return static_cast<int>(cudaSuccess);  // nothing to do
  const int64_t n_q_tiles = (lq + block_m - 1) / block_m;
  const int64_t n_k_tiles = (lk + block_n - 1) / block_n;
  // Grid limits: x up to 2**31 - 1, y and z up to 65535.
  if (n_k_tiles > 2147483647LL || n_q_tiles > 65535 || batch > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(n_k_tiles), static_cast<unsigned>(n_q_tiles),
                  static_cast<unsigned>(batch));
  const size_t smem = 2 * static_cast<size_t>(block_m + block_n) * sizeof(int64_t);
  pseudo_mask_tile_classify_kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      q_step, q_doc, k_step, k_doc, classes, lq, lk, n_q_tiles, n_k_tiles, block_m, log2_block_n);
  return static_cast<int>(cudaGetLastError());
}
