// Fused, tile-sparse pseudo-mask attention in CUDA (FlashAttention-2's algorithm), forward and
// backward. The same function as kernels/pseudo_mask_attention.py (Triton), written separately:
//
//   S = scale * Q K^T + bias,  P = softmax(S masked by the pseudo-mask),  O = P V,
//   lse = log(sum exp S) (natural log), rows with no visible key: O = 0, lse = -inf.
//
// * The mask comes from per-token step / doc ids and the bias from per-token positions and the
//   (H, num_buckets) table, both inside the kernels (pseudo_mask_rule.cuh): no (L, L) tensor.
// * Tiles: every block classifies each (query tile, key tile) it meets exactly, from the staged
//   metadata (classify_tile: two block reductions). EMPTY tiles are skipped before any operand
//   is loaded; the mask is evaluated on PARTIAL tiles only; FULL tiles run unmasked.
// * Forward: one block per (query tile, batch * head); online softmax in base 2; O accumulates
//   in fp32 shared memory. Backward: a preprocess (delta = rowsum(dO * O) - dlse), a key-major
//   pass (one block per key tile: dK, dV, and the bias-table gradient through shared-memory
//   atomics then one global atomic per bucket) and a query-major pass (dQ, no atomics).
// * Dtypes: fp16 / bf16 operands on tensor cores (nvcuda::wmma m16n16k16, fp32 accumulate);
//   fp32 inputs run IEEE fp32 FMA loops (a correctness path, like the Triton kernel's fp32).
//   Head dims 64 and 128. Queries may differ from keys (Lq != Lk, decoding).
// * Operands are staged in shared memory with padded rows; P and dS are rounded to the input
//   dtype before their matmuls, exactly where the Triton kernel rounds them.
//
// The same source runs on the CPU under csrc/cuda/emulate (PMLM_CUDA_EMULATE): keep every
// shared-memory handoff behind a __syncthreads() and use only the primitives the emulator has.
#include <type_traits>

#include "cuda_compat.cuh"
#include "pseudo_mask_attention.h"
#include "pseudo_mask_rule.cuh"

namespace pmlm {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

/// Tile sizes per dtype and head dim, chosen so every block fits the shared memory of sm_80
/// (at most ~110 KiB here) with 4 warps; see README.md for the ptxas report.
template <class T, int D>
struct Tiles {
  static constexpr bool kFp32 = std::is_same<T, float>::value;
  static constexpr int kFwdM = kFp32 ? 32 : 64;                  // forward: queries per block
  static constexpr int kFwdN = kFp32 ? 32 : (D == 64 ? 64 : 32);  // forward: keys per step
  static constexpr int kKvN = kFp32 ? 32 : (D == 64 ? 64 : 32);   // dK/dV: keys per block
  static constexpr int kKvM = 32;                                 // dK/dV: queries per step
  static constexpr int kDqM = kFp32 ? 32 : (D == 64 ? 64 : 32);   // dQ: queries per block
  static constexpr int kDqN = 32;                                 // dQ: keys per step
};

/// Row padding (elements) of staged operand tiles: keeps WMMA's 16-byte ldm rule and shifts
/// consecutive rows across shared-memory banks.
template <class T>
constexpr int kPad = sizeof(T) == 2 ? 8 : 4;

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) & ~static_cast<size_t>(127); }

/// Hands out 128-byte aligned pieces of the dynamic shared memory. On the host (base 0) it only
/// counts, so the launch size and the kernel's carving come from the same code.
struct Carve {
  uintptr_t base;
  size_t used;
  template <class U>
  __host__ __device__ U* take(size_t n) {
    U* p = reinterpret_cast<U*>(base + used);
    used = align128(used + n * sizeof(U));
    return p;
  }
};

template <class Layout>
size_t smem_bytes(int num_buckets) {
  Layout layout;
  Carve c{0, 0};
  layout.carve(c, num_buckets);
  return c.used;
}

// ---------------------------------------------------------------------------------------------
// Block-wide helpers (every thread of the block calls them)

/// C[M x N] (+)= A[M x K] * op(B), op(B) = B^T for B stored [N x K] (B_T) or B for B stored
/// [K x N]. A, B in shared memory (T, row-major), C fp32 in shared memory.
template <class T, int M, int N, int K, bool B_T>
__device__ void block_mma(float* C, int ldc, const T* A, int lda, const T* B, int ldb, bool accumulate) {
  if constexpr (std::is_same<T, float>::value) {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int i = idx / N, j = idx % N;
      float acc = accumulate ? C[i * ldc + j] : 0.f;
      for (int k = 0; k < K; ++k) acc = fmaf(A[i * lda + k], B_T ? B[j * ldb + k] : B[k * ldb + j], acc);
      C[i * ldc + j] = acc;
    }
  } else {
    using namespace nvcuda;
    constexpr int TN = N / 16;
    for (int t = threadIdx.x / 32; t < (M / 16) * TN; t += kWarps) {
      const int i = t / TN, j = t % TN;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate)
        wmma::load_matrix_sync(c, C + i * 16 * ldc + j * 16, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(c, 0.f);
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, A + i * 16 * lda + k, lda);
        if constexpr (B_T) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, B + j * 16 * ldb + k, ldb);
          wmma::mma_sync(c, a, b, c);
        } else {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, B + k * ldb + j * 16, ldb);
          wmma::mma_sync(c, a, b, c);
        }
      }
      wmma::store_matrix_sync(C + i * 16 * ldc + j * 16, c, ldc, wmma::mem_row_major);
    }
  }
}

/// Stage rows [row0, row0 + ROWS) of a (length, D) matrix into shared memory; rows past the end are 0.
template <class T, int ROWS, int D>
__device__ void stage_rows(T* dst, int ld, const T* __restrict__ src, int row0, int length) {
  for (int idx = threadIdx.x; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    dst[r * ld + c] = row0 + r < length ? src[static_cast<size_t>(row0 + r) * D + c] : pmlm_from_float<T>(0.f);
  }
}

/// Stage step / doc / position of tokens [t0, t0 + N) of one batch row; past the end: padding.
template <int N>
__device__ void stage_meta(int32_t* step, int32_t* doc, int32_t* pos, const int32_t* __restrict__ g_step,
                           const int32_t* __restrict__ g_doc, const int32_t* __restrict__ g_pos, int t0,
                           int length) {
  for (int i = threadIdx.x; i < N; i += kThreads) {
    const bool in = t0 + i < length;
    step[i] = in ? g_step[t0 + i] : 0;
    doc[i] = in ? g_doc[t0 + i] : -1;
    pos[i] = in && g_pos ? g_pos[t0 + i] : 0;
  }
}

struct Bias {
  const float* table_h;  // this head's row of the table, or null
  const int32_t* lut;
  int half_buckets, max_distance;
};

__device__ __forceinline__ Bias make_bias(const pmlm_attention_args& p, int h) {
  return Bias{p.table ? p.table + static_cast<size_t>(h) * p.num_buckets : nullptr, p.bucket_lut,
              p.num_buckets / 2, p.max_distance};
}

// ---------------------------------------------------------------------------------------------
// Forward

template <class T, int D, int BM, int BN>
struct FwdSmem {
  static constexpr int LDT = D + kPad<T>;   // staged Q, K, V rows
  static constexpr int LDS = BN + 4;        // fp32 scores
  static constexpr int LDP = BN + kPad<T>;  // P in the input dtype
  static constexpr int LDO = D + 4;         // fp32 output accumulator
  T *q, *k, *v, *p;
  float *s, *o, *m, *l;
  int32_t *qs, *qd, *qp, *ks, *kd, *kp;
  __host__ __device__ void carve(Carve& c, int) {
    q = c.take<T>(BM * LDT);
    k = c.take<T>(BN * LDT);
    v = c.take<T>(BN * LDT);
    p = c.take<T>(BM * LDP);
    s = c.take<float>(BM * LDS);
    o = c.take<float>(BM * LDO);
    m = c.take<float>(BM);
    l = c.take<float>(BM);
    qs = c.take<int32_t>(BM);
    qd = c.take<int32_t>(BM);
    qp = c.take<int32_t>(BM);
    ks = c.take<int32_t>(BN);
    kd = c.take<int32_t>(BN);
    kp = c.take<int32_t>(BN);
  }
};

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 2) attn_fwd_kernel(const pmlm_attention_args p) {
  using S = FwdSmem<T, D, BM, BN>;
  constexpr int TPR = kThreads / BM;  // threads per query row in the softmax step (adjacent lanes)
  static_assert(TPR >= 1 && kThreads % BM == 0 && 32 % TPR == 0, "a row's threads must share a warp");
  PMLM_DYNAMIC_SMEM(smem_raw);
  S s;
  Carve carve{reinterpret_cast<uintptr_t>(smem_raw), 0};
  s.carve(carve, p.num_buckets);

  const int q0 = blockIdx.x * BM;
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const T* Q = static_cast<const T*>(p.q) + static_cast<size_t>(bh) * p.lq * D;
  const T* K = static_cast<const T*>(p.k) + static_cast<size_t>(bh) * p.lk * D;
  const T* V = static_cast<const T*>(p.v) + static_cast<size_t>(bh) * p.lk * D;
  const Bias bias = make_bias(p, h);
  const float qk_scale = p.scale * kLog2e;  // scores in base-2 units

  stage_rows<T, BM, D>(s.q, S::LDT, Q, q0, p.lq);
  stage_meta<BM>(s.qs, s.qd, s.qp, p.q_step + static_cast<size_t>(b) * p.lq, p.q_doc + static_cast<size_t>(b) * p.lq,
                 p.q_pos ? p.q_pos + static_cast<size_t>(b) * p.lq : nullptr, q0, p.lq);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    s.m[r] = -INFINITY;
    s.l[r] = 0.f;
  }
  for (int idx = threadIdx.x; idx < BM * D; idx += kThreads) s.o[(idx / D) * S::LDO + idx % D] = 0.f;

  const int32_t* k_step = p.k_step + static_cast<size_t>(b) * p.lk;
  const int32_t* k_doc = p.k_doc + static_cast<size_t>(b) * p.lk;
  const int32_t* k_pos = p.k_pos ? p.k_pos + static_cast<size_t>(b) * p.lk : nullptr;
  const int n_k_tiles = (p.lk + BN - 1) / BN;
  for (int kt = 0; kt < n_k_tiles; ++kt) {
    const int k0 = kt * BN;
    stage_meta<BN>(s.ks, s.kd, s.kp, k_step, k_doc, k_pos, k0, p.lk);
    __syncthreads();
    const int cls = classify_tile<BM, BN>(s.qs, s.qd, s.ks, s.kd);
    if (cls == kEmpty) continue;  // uniform across the block
    stage_rows<T, BN, D>(s.k, S::LDT, K, k0, p.lk);
    stage_rows<T, BN, D>(s.v, S::LDT, V, k0, p.lk);
    __syncthreads();
    block_mma<T, BM, BN, D, true>(s.s, S::LDS, s.q, S::LDT, s.k, S::LDT, false);  // S = Q K^T
    __syncthreads();

    // Online softmax of this tile's scores: row r is owned by TPR adjacent lanes.
    {
      const int r = threadIdx.x / TPR, sub = threadIdx.x % TPR;
      const int wq = s.qs[r], dq = s.qd[r], pq = s.qp[r];
      float row_max = -INFINITY;
      for (int c = sub; c < BN; c += TPR) {
        float x = s.s[r * S::LDS + c] * qk_scale;
        if (bias.table_h)
          x += relative_bias(bias.table_h, bias.lut, bias.half_buckets, bias.max_distance, pq, s.kp[c]) * kLog2e;
        if (cls == kPartial && !visible(wq, dq, s.ks[c], s.kd[c])) x = -INFINITY;
        s.s[r * S::LDS + c] = x;
        row_max = fmaxf(row_max, x);
      }
      for (int off = 1; off < TPR; off <<= 1) row_max = fmaxf(row_max, __shfl_xor_sync(kFullMask, row_max, off));
      const float m_old = s.m[r];
      const float m_new = fmaxf(m_old, row_max);
      // A row with nothing visible so far keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
      const float m_shift = m_new == -INFINITY ? 0.f : m_new;
      float row_sum = 0.f;
      for (int c = sub; c < BN; c += TPR) {
        const float pv = exp2f(s.s[r * S::LDS + c] - m_shift);
        s.p[r * S::LDP + c] = pmlm_from_float<T>(pv);
        row_sum += pv;
      }
      // The shuffles also order every lane's read of m_old before lane `sub == 0` rewrites it.
      for (int off = 1; off < TPR; off <<= 1) row_sum += __shfl_xor_sync(kFullMask, row_sum, off);
      const float alpha = exp2f(m_old - m_shift);
      for (int c = sub; c < D; c += TPR) s.o[r * S::LDO + c] *= alpha;
      if (sub == 0) {
        s.m[r] = m_new;
        s.l[r] = s.l[r] * alpha + row_sum;
      }
    }
    __syncthreads();
    block_mma<T, BM, D, BN, false>(s.o, S::LDO, s.p, S::LDP, s.v, S::LDT, true);  // O += P V
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out) + static_cast<size_t>(bh) * p.lq * D;
  for (int idx = threadIdx.x; idx < BM * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    if (q0 + r >= p.lq) continue;
    const float l = s.l[r];
    out[static_cast<size_t>(q0 + r) * D + c] = pmlm_from_float<T>(l > 0.f ? s.o[r * S::LDO + c] / l : 0.f);
  }
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    if (q0 + r >= p.lq) continue;
    const float l = s.l[r];
    p.lse[static_cast<size_t>(bh) * p.lq + q0 + r] = l > 0.f ? (s.m[r] + log2f(l)) * kLn2 : -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

/// delta = rowsum(dO * O) - dlse, one thread per query row.
template <class T, int D>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_preprocess_kernel(const pmlm_attention_args p) {
  const int row = blockIdx.x * kThreads + threadIdx.x;
  const int bh = blockIdx.y;
  if (row >= p.lq) return;
  const size_t at = static_cast<size_t>(bh) * p.lq + row;
  const T* o = static_cast<const T*>(p.out) + at * D;
  const T* dout = static_cast<const T*>(p.dout) + at * D;
  float acc = 0.f;
  for (int c = 0; c < D; ++c) acc += pmlm_to_float(o[c]) * pmlm_to_float(dout[c]);
  // d lse / d S = P, so a gradient on lse enters dS = P * (dP - delta) as -dlse in delta.
  p.delta[at] = p.dlse ? acc - p.dlse[at] : acc;
}

/// Query metadata of the backward passes: step / doc / position, lse (base 2, +inf where no key
/// is visible or past the end, so p = 0 there) and delta.
template <int N>
__device__ void stage_query_stats(float* lse2, float* delta, const pmlm_attention_args& p, int bh, int q0) {
  for (int i = threadIdx.x; i < N; i += kThreads) {
    const bool in = q0 + i < p.lq;
    const size_t at = static_cast<size_t>(bh) * p.lq + q0 + i;
    const float lse = in ? p.lse[at] : -INFINITY;
    lse2[i] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    delta[i] = in ? p.delta[at] : 0.f;
  }
}

template <class T, int D, int BM, int BN>
struct DkDvSmem {  // BN keys owned by the block, BM queries per step
  static constexpr int LDT = D + kPad<T>;
  static constexpr int LDS = BM + 4;        // fp32 S^T, dP^T (keys x queries)
  static constexpr int LDP = BM + kPad<T>;  // P^T, dS^T in the input dtype
  static constexpr int LDA = D + 4;         // fp32 dK, dV accumulators
  T *k, *v, *q, *dout, *pt, *dst;
  float *st, *dpt, *dk, *dv, *lse2, *delta, *dtable;
  int32_t *qs, *qd, *qp, *ks, *kd, *kp;
  __host__ __device__ void carve(Carve& c, int num_buckets) {
    k = c.take<T>(BN * LDT);
    v = c.take<T>(BN * LDT);
    q = c.take<T>(BM * LDT);
    dout = c.take<T>(BM * LDT);
    pt = c.take<T>(BN * LDP);
    dst = c.take<T>(BN * LDP);
    st = c.take<float>(BN * LDS);
    dpt = c.take<float>(BN * LDS);
    dk = c.take<float>(BN * LDA);
    dv = c.take<float>(BN * LDA);
    lse2 = c.take<float>(BM);
    delta = c.take<float>(BM);
    dtable = c.take<float>(num_buckets);
    qs = c.take<int32_t>(BM);
    qd = c.take<int32_t>(BM);
    qp = c.take<int32_t>(BM);
    ks = c.take<int32_t>(BN);
    kd = c.take<int32_t>(BN);
    kp = c.take<int32_t>(BN);
  }
};

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dkdv_kernel(const pmlm_attention_args p) {
  using S = DkDvSmem<T, D, BM, BN>;
  PMLM_DYNAMIC_SMEM(smem_raw);
  S s;
  Carve carve{reinterpret_cast<uintptr_t>(smem_raw), 0};
  s.carve(carve, p.num_buckets);

  const int k0 = blockIdx.x * BN;
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const size_t q_base = static_cast<size_t>(bh) * p.lq * D, k_base = static_cast<size_t>(bh) * p.lk * D;
  const T* Q = static_cast<const T*>(p.q) + q_base;
  const T* DO = static_cast<const T*>(p.dout) + q_base;
  const Bias bias = make_bias(p, h);
  const float qk_scale = p.scale * kLog2e;
  const int32_t* q_step = p.q_step + static_cast<size_t>(b) * p.lq;
  const int32_t* q_doc = p.q_doc + static_cast<size_t>(b) * p.lq;
  const int32_t* q_pos = p.q_pos ? p.q_pos + static_cast<size_t>(b) * p.lq : nullptr;

  stage_rows<T, BN, D>(s.k, S::LDT, static_cast<const T*>(p.k) + k_base, k0, p.lk);
  stage_rows<T, BN, D>(s.v, S::LDT, static_cast<const T*>(p.v) + k_base, k0, p.lk);
  stage_meta<BN>(s.ks, s.kd, s.kp, p.k_step + static_cast<size_t>(b) * p.lk, p.k_doc + static_cast<size_t>(b) * p.lk,
                 p.k_pos ? p.k_pos + static_cast<size_t>(b) * p.lk : nullptr, k0, p.lk);
  for (int idx = threadIdx.x; idx < BN * D; idx += kThreads) {
    s.dk[(idx / D) * S::LDA + idx % D] = 0.f;
    s.dv[(idx / D) * S::LDA + idx % D] = 0.f;
  }
  for (int i = threadIdx.x; i < p.num_buckets; i += kThreads) s.dtable[i] = 0.f;

  const int n_q_tiles = (p.lq + BM - 1) / BM;
  for (int qt = 0; qt < n_q_tiles; ++qt) {
    const int q0 = qt * BM;
    stage_meta<BM>(s.qs, s.qd, s.qp, q_step, q_doc, q_pos, q0, p.lq);
    stage_query_stats<BM>(s.lse2, s.delta, p, bh, q0);
    __syncthreads();
    const int cls = classify_tile<BM, BN>(s.qs, s.qd, s.ks, s.kd);
    if (cls == kEmpty) continue;
    stage_rows<T, BM, D>(s.q, S::LDT, Q, q0, p.lq);
    stage_rows<T, BM, D>(s.dout, S::LDT, DO, q0, p.lq);
    __syncthreads();
    block_mma<T, BN, BM, D, true>(s.st, S::LDS, s.k, S::LDT, s.q, S::LDT, false);      // S^T = K Q^T
    block_mma<T, BN, BM, D, true>(s.dpt, S::LDS, s.v, S::LDT, s.dout, S::LDT, false);  // dP^T = V dO^T
    __syncthreads();
    for (int idx = threadIdx.x; idx < BN * BM; idx += kThreads) {
      const int i = idx / BM, j = idx % BM;  // key i, query j
      float x = s.st[i * S::LDS + j] * qk_scale;
      if (bias.table_h)
        x += relative_bias(bias.table_h, bias.lut, bias.half_buckets, bias.max_distance, s.qp[j], s.kp[i]) * kLog2e;
      float pv = exp2f(x - s.lse2[j]);
      if (cls == kPartial && !visible(s.qs[j], s.qd[j], s.ks[i], s.kd[i])) pv = 0.f;
      const float ds = pv * (s.dpt[i * S::LDS + j] - s.delta[j]);  // gradient of the natural-log score
      s.pt[i * S::LDP + j] = pmlm_from_float<T>(pv);
      s.dst[i * S::LDP + j] = pmlm_from_float<T>(ds);
      if (bias.table_h && ds != 0.f)
        atomicAdd(&s.dtable[relative_bucket(bias.lut, bias.half_buckets, bias.max_distance, s.qp[j], s.kp[i])], ds);
    }
    __syncthreads();
    block_mma<T, BN, D, BM, false>(s.dv, S::LDA, s.pt, S::LDP, s.dout, S::LDT, true);  // dV += P^T dO
    block_mma<T, BN, D, BM, false>(s.dk, S::LDA, s.dst, S::LDP, s.q, S::LDT, true);    // dK += dS^T Q
  }
  __syncthreads();

  T* dk = static_cast<T*>(p.dk) + k_base;
  T* dv = static_cast<T*>(p.dv) + k_base;
  for (int idx = threadIdx.x; idx < BN * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    if (k0 + r >= p.lk) continue;
    // dK = scale * dS^T Q: the softmax scale multiplied the scores only.
    dk[static_cast<size_t>(k0 + r) * D + c] = pmlm_from_float<T>(s.dk[r * S::LDA + c] * p.scale);
    dv[static_cast<size_t>(k0 + r) * D + c] = pmlm_from_float<T>(s.dv[r * S::LDA + c]);
  }
  if (bias.table_h)
    for (int i = threadIdx.x; i < p.num_buckets; i += kThreads)
      if (s.dtable[i] != 0.f) atomicAdd(&p.dtable[static_cast<size_t>(h) * p.num_buckets + i], s.dtable[i]);
}

template <class T, int D, int BM, int BN>
struct DqSmem {  // BM queries owned by the block, BN keys per step
  static constexpr int LDT = D + kPad<T>;
  static constexpr int LDS = BN + 4;
  static constexpr int LDP = BN + kPad<T>;
  static constexpr int LDA = D + 4;
  T *q, *dout, *k, *v, *ds;
  float *s, *dp, *dq, *lse2, *delta;
  int32_t *qs, *qd, *qp, *ks, *kd, *kp;
  __host__ __device__ void carve(Carve& c, int) {
    q = c.take<T>(BM * LDT);
    dout = c.take<T>(BM * LDT);
    k = c.take<T>(BN * LDT);
    v = c.take<T>(BN * LDT);
    ds = c.take<T>(BM * LDP);
    s = c.take<float>(BM * LDS);
    dp = c.take<float>(BM * LDS);
    dq = c.take<float>(BM * LDA);
    lse2 = c.take<float>(BM);
    delta = c.take<float>(BM);
    qs = c.take<int32_t>(BM);
    qd = c.take<int32_t>(BM);
    qp = c.take<int32_t>(BM);
    ks = c.take<int32_t>(BN);
    kd = c.take<int32_t>(BN);
    kp = c.take<int32_t>(BN);
  }
};

template <class T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dq_kernel(const pmlm_attention_args p) {
  using S = DqSmem<T, D, BM, BN>;
  PMLM_DYNAMIC_SMEM(smem_raw);
  S s;
  Carve carve{reinterpret_cast<uintptr_t>(smem_raw), 0};
  s.carve(carve, p.num_buckets);

  const int q0 = blockIdx.x * BM;
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const size_t q_base = static_cast<size_t>(bh) * p.lq * D, k_base = static_cast<size_t>(bh) * p.lk * D;
  const T* K = static_cast<const T*>(p.k) + k_base;
  const T* V = static_cast<const T*>(p.v) + k_base;
  const Bias bias = make_bias(p, h);
  const float qk_scale = p.scale * kLog2e;

  stage_rows<T, BM, D>(s.q, S::LDT, static_cast<const T*>(p.q) + q_base, q0, p.lq);
  stage_rows<T, BM, D>(s.dout, S::LDT, static_cast<const T*>(p.dout) + q_base, q0, p.lq);
  stage_meta<BM>(s.qs, s.qd, s.qp, p.q_step + static_cast<size_t>(b) * p.lq, p.q_doc + static_cast<size_t>(b) * p.lq,
                 p.q_pos ? p.q_pos + static_cast<size_t>(b) * p.lq : nullptr, q0, p.lq);
  stage_query_stats<BM>(s.lse2, s.delta, p, bh, q0);
  for (int idx = threadIdx.x; idx < BM * D; idx += kThreads) s.dq[(idx / D) * S::LDA + idx % D] = 0.f;

  const int32_t* k_step = p.k_step + static_cast<size_t>(b) * p.lk;
  const int32_t* k_doc = p.k_doc + static_cast<size_t>(b) * p.lk;
  const int32_t* k_pos = p.k_pos ? p.k_pos + static_cast<size_t>(b) * p.lk : nullptr;
  const int n_k_tiles = (p.lk + BN - 1) / BN;
  for (int kt = 0; kt < n_k_tiles; ++kt) {
    const int k0 = kt * BN;
    stage_meta<BN>(s.ks, s.kd, s.kp, k_step, k_doc, k_pos, k0, p.lk);
    __syncthreads();
    const int cls = classify_tile<BM, BN>(s.qs, s.qd, s.ks, s.kd);
    if (cls == kEmpty) continue;
    stage_rows<T, BN, D>(s.k, S::LDT, K, k0, p.lk);
    stage_rows<T, BN, D>(s.v, S::LDT, V, k0, p.lk);
    __syncthreads();
    block_mma<T, BM, BN, D, true>(s.s, S::LDS, s.q, S::LDT, s.k, S::LDT, false);      // S = Q K^T
    block_mma<T, BM, BN, D, true>(s.dp, S::LDS, s.dout, S::LDT, s.v, S::LDT, false);  // dP = dO V^T
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
      const int i = idx / BN, j = idx % BN;  // query i, key j
      float x = s.s[i * S::LDS + j] * qk_scale;
      if (bias.table_h)
        x += relative_bias(bias.table_h, bias.lut, bias.half_buckets, bias.max_distance, s.qp[i], s.kp[j]) * kLog2e;
      float pv = exp2f(x - s.lse2[i]);
      if (cls == kPartial && !visible(s.qs[i], s.qd[i], s.ks[j], s.kd[j])) pv = 0.f;
      s.ds[i * S::LDP + j] = pmlm_from_float<T>(pv * (s.dp[i * S::LDS + j] - s.delta[i]));
    }
    __syncthreads();
    block_mma<T, BM, D, BN, false>(s.dq, S::LDA, s.ds, S::LDP, s.k, S::LDT, true);  // dQ += dS K
  }
  __syncthreads();

  T* dq = static_cast<T*>(p.dq) + q_base;
  for (int idx = threadIdx.x; idx < BM * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    if (q0 + r >= p.lq) continue;
    dq[static_cast<size_t>(q0 + r) * D + c] = pmlm_from_float<T>(s.dq[r * S::LDA + c] * p.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <class Kernel>
int launch_tiled(Kernel kernel, size_t smem, int tiles, const pmlm_attention_args& p, cudaStream_t stream) {
  const int err = static_cast<int>(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (err != 0) return err;
  pmlm_launch(kernel, dim3(tiles, p.batch * p.heads), dim3(kThreads), smem, stream, p);
  return static_cast<int>(cudaGetLastError());
}

template <class T, int D>
int forward(const pmlm_attention_args& p, cudaStream_t stream) {
  using TL = Tiles<T, D>;
  using L = FwdSmem<T, D, TL::kFwdM, TL::kFwdN>;
  return launch_tiled(attn_fwd_kernel<T, D, TL::kFwdM, TL::kFwdN>, smem_bytes<L>(p.num_buckets),
                      (p.lq + TL::kFwdM - 1) / TL::kFwdM, p, stream);
}

template <class T, int D>
int backward(const pmlm_attention_args& p, cudaStream_t stream) {
  using TL = Tiles<T, D>;
  pmlm_launch(attn_bwd_preprocess_kernel<T, D>, dim3((p.lq + kThreads - 1) / kThreads, p.batch * p.heads),
              dim3(kThreads), 0, stream, p);
  int err = static_cast<int>(cudaGetLastError());
  if (err != 0) return err;
  using LKV = DkDvSmem<T, D, TL::kKvM, TL::kKvN>;
  err = launch_tiled(attn_bwd_dkdv_kernel<T, D, TL::kKvM, TL::kKvN>, smem_bytes<LKV>(p.num_buckets),
                     (p.lk + TL::kKvN - 1) / TL::kKvN, p, stream);
  if (err != 0) return err;
  using LQ = DqSmem<T, D, TL::kDqM, TL::kDqN>;
  return launch_tiled(attn_bwd_dq_kernel<T, D, TL::kDqM, TL::kDqN>, smem_bytes<LQ>(p.num_buckets),
                      (p.lq + TL::kDqM - 1) / TL::kDqM, p, stream);
}

bool valid(const pmlm_attention_args* p, bool backward_pass) {
  if (!p || !p->q || !p->k || !p->v || !p->out || !p->lse || !p->q_step || !p->q_doc || !p->k_step || !p->k_doc)
    return false;
  if (p->batch < 0 || p->heads < 0 || p->lq < 0 || p->lk < 0 || (p->head_dim != 64 && p->head_dim != 128))
    return false;
  if (static_cast<long long>(p->batch) * p->heads > 65535) return false;  // gridDim.y
  if (p->table) {
    // The table gradient accumulates in shared memory: at most 1024 buckets.
    if (!p->bucket_lut || !p->q_pos || !p->k_pos || p->num_buckets < 2 || p->num_buckets % 2 ||
        p->num_buckets > 1024 || p->max_distance < 1)
      return false;
  }
  if (backward_pass && (!p->dout || !p->delta || !p->dq || !p->dk || !p->dv || (p->table && !p->dtable)))
    return false;
  return true;
}

template <template <class, int> class Fn>
int dispatch(const pmlm_attention_args* p, int dtype, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool d64 = p->head_dim == 64;
  switch (dtype) {
    case 0:
      return d64 ? Fn<float, 64>::run(*p, st) : Fn<float, 128>::run(*p, st);
    case 1:
      return d64 ? Fn<__half, 64>::run(*p, st) : Fn<__half, 128>::run(*p, st);
    case 2:
      return d64 ? Fn<__nv_bfloat16, 64>::run(*p, st) : Fn<__nv_bfloat16, 128>::run(*p, st);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

/// Shared memory of one block of a pass and its tile (queries x keys).
template <class T, int D>
int pass_info(int pass, int num_buckets, int* block_m, int* block_n) {
  using TL = Tiles<T, D>;
  if (pass == 0) {
    *block_m = TL::kFwdM, *block_n = TL::kFwdN;
    return static_cast<int>(smem_bytes<FwdSmem<T, D, TL::kFwdM, TL::kFwdN>>(num_buckets));
  }
  if (pass == 1) {
    *block_m = TL::kKvM, *block_n = TL::kKvN;
    return static_cast<int>(smem_bytes<DkDvSmem<T, D, TL::kKvM, TL::kKvN>>(num_buckets));
  }
  *block_m = TL::kDqM, *block_n = TL::kDqN;
  return static_cast<int>(smem_bytes<DqSmem<T, D, TL::kDqM, TL::kDqN>>(num_buckets));
}

template <class T, int D>
struct Forward {
  static int run(const pmlm_attention_args& p, cudaStream_t st) { return forward<T, D>(p, st); }
};
template <class T, int D>
struct Backward {
  static int run(const pmlm_attention_args& p, cudaStream_t st) { return backward<T, D>(p, st); }
};

}  // namespace
}  // namespace pmlm

extern "C" int pmlm_pseudo_mask_attention_forward(const pmlm_attention_args* args, int dtype, void* stream) {
  if (!pmlm::valid(args, false)) return static_cast<int>(cudaErrorInvalidValue);
  if (args->batch == 0 || args->heads == 0 || args->lq == 0) return static_cast<int>(cudaSuccess);
  return pmlm::dispatch<pmlm::Forward>(args, dtype, stream);
}

extern "C" int pmlm_pseudo_mask_attention_backward(const pmlm_attention_args* args, int dtype, void* stream) {
  if (!pmlm::valid(args, true)) return static_cast<int>(cudaErrorInvalidValue);
  if (args->batch == 0 || args->heads == 0 || args->lq == 0 || args->lk == 0) return static_cast<int>(cudaSuccess);
  return pmlm::dispatch<pmlm::Backward>(args, dtype, stream);
}

extern "C" int pmlm_pseudo_mask_attention_pass_info(int dtype, int head_dim, int num_buckets, int pass,
                                                     int* block_m, int* block_n) {
  using namespace pmlm;
  if ((head_dim != 64 && head_dim != 128) || num_buckets < 0 || pass < 0 || pass > 2 || !block_m || !block_n)
    return -1;
  const bool d64 = head_dim == 64;
  switch (dtype) {
    case 0:
      return d64 ? pass_info<float, 64>(pass, num_buckets, block_m, block_n)
                 : pass_info<float, 128>(pass, num_buckets, block_m, block_n);
    case 1:
      return d64 ? pass_info<__half, 64>(pass, num_buckets, block_m, block_n)
                 : pass_info<__half, 128>(pass, num_buckets, block_m, block_n);
    case 2:
      return d64 ? pass_info<__nv_bfloat16, 64>(pass, num_buckets, block_m, block_n)
                 : pass_info<__nv_bfloat16, 128>(pass, num_buckets, block_m, block_n);
    default:
      return -1;
  }
}
