// A header-only CUDA emulator: lets a host C++ compiler build and run the unmodified kernel
// sources of csrc/cuda on the CPU, for tests (the way TRITON_INTERPRET=1 runs Triton kernels).
// Included by cuda_compat.cuh when PMLM_CUDA_EMULATE is defined; nothing here is used on a GPU.
//
// Execution model
//   * Blocks run one after another, in a shuffled order. Every thread of a block is a fiber
//     (ucontext) with its own stack, so a thread's locals are its registers.
//   * Fibers switch only at synchronisation points: __syncthreads() (and its _or/_and/_count
//     forms) is a block barrier; __syncwarp and the warp primitives (__shfl_xor_sync,
//     __shfl_sync, __ballot_sync) are warp barriers that exchange values when every lane of the
//     warp has arrived. Between two barriers a thread runs its whole segment at once, and the
//     segments run in an order drawn from a seeded RNG (PMLM_CUDA_EMULATE_SEED, default fixed):
//     a missing __syncthreads() lets one thread's reads run before (or after) another thread's
//     writes, so shared-memory races change the result instead of hiding behind lock-step order.
//   * The block's dynamic shared memory (PMLM_DYNAMIC_SMEM) is poisoned before every block with a
//     pattern that reads as NaN in fp32/fp16/bf16 (or, on alternate blocks, as a huge fp32 value),
//     so reading shared memory no thread wrote this block shows up in the output.
//   * Barrier misuse is an error, not a hang: a __syncthreads() that some threads never reach
//     (they exited or wait at a warp barrier), mixed barrier kinds, or an incomplete warp.
//   * Static `__shared__` variables become function statics: one copy, shared by the block that
//     runs (blocks are sequential), not poisoned. The kernels here use dynamic shared memory only.
//
// WMMA (nvcuda::wmma, m16n16k16, half / bf16 operands, float accumulator)
//   The element-to-lane mapping of a WMMA fragment is unspecified by CUDA; code may only use
//   fill_fragment, load/store_matrix_sync, mma_sync and element-wise ops that treat every element
//   alike. Within that contract each lane here computes the whole tile (num_elements = 256) and
//   stores only the elements it owns (e % 32 == lane), so every element is written by one lane. mma_sync multiplies the rounded half / bf16 operands exactly (their
//   products are exact in fp32) and accumulates in fp32, as the tensor cores do (the hardware's
//   summation order within one k-step is unspecified; here it is k = 0..15). load/store check the
//   documented preconditions: 256-bit aligned pointers and ldm a multiple of 16 bytes.
//
// Atomics are plain read-modify-writes (fibers never interleave inside one).
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Keywords and built-in types

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

/// The largest dynamic shared memory a block may opt into (sm_90: 227 KiB).
constexpr int kEmuMaxDynamicSmem = 227 * 1024;

template <class F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int value) {
  return value >= 0 && value <= kEmuMaxDynamicSmem ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// ---------------------------------------------------------------------------------------------
// fp16 and bf16 (round to nearest even, as __float2half_rn / __float2bfloat16_rn)

// Bit-level conversions (no compiler half type needed); float -> fp16 agrees with GCC's _Float16
// on every fp16 value and on 2e8 sampled floats including the subnormal and overflow ranges.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return __half{static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half (or 0)
    if (a < 0x33000000u) return __half{static_cast<uint16_t>(sign)};  // below 2^-25: 0
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // round to nearest even
    return __half{static_cast<uint16_t>(sign | r)};
  }
  const uint32_t b = a - 0x38000000u;  // rebias the exponent from 127 to 15
  uint32_t r = b >> 13;
  const uint32_t rem = b & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return __half{static_cast<uint16_t>(sign | r)};
}

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16;
  uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu, x;
  if (e == 0x1fu) {
    x = sign | 0x7f800000u | (m << 13);
  } else if (e == 0) {
    if (m == 0) {
      x = sign;
    } else {  // subnormal: normalise
      e = 113;
      while (!(m & 0x400u)) {
        m <<= 1;
        --e;
      }
      x = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
  } else {
    x = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

namespace pmlm_emu {

// ---------------------------------------------------------------------------------------------
// Fibers and the block scheduler

enum class State { Ready, BlockBarrier, WarpBarrier, Done };
enum class BarrierOp { Sync, Or, And, Count };
enum class WarpOp { Sync, Shuffle, Ballot };

struct Thread {
  ucontext_t ctx;
  uint3 tid;
  unsigned linear = 0, lane = 0, warp = 0;
  State state = State::Ready;
  BarrierOp bar_op = BarrierOp::Sync;
  int bar_in = 0, bar_out = 0;
  WarpOp warp_op = WarpOp::Sync;
  unsigned warp_mask = 0, src_lane = 0;
  uint64_t x_in = 0, x_out = 0;
};

struct Runtime {
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t scheduler;
  Thread* cur = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  std::function<void()> body;
  std::string error;
  std::mt19937_64 rng;
  uint64_t launches = 0;
};

inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kWarp = 32;

/// Seed of the adversarial schedule: PMLM_CUDA_EMULATE_SEED, or a fixed default (reproducible).
inline uint64_t base_seed() {
  const char* s = std::getenv("PMLM_CUDA_EMULATE_SEED");
  return s && *s ? std::strtoull(s, nullptr, 0) : 0x5eedc0deULL;
}

/// Stop the kernel: record why and return to the scheduler, which raises it as an exception.
[[noreturn]] inline void fail(const std::string& why) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = why;
  Thread* t = r.cur;
  t->state = State::Done;
  swapcontext(&t->ctx, &r.scheduler);
  std::abort();  // never resumed
}

inline void yield(State s) {
  Runtime& r = rt();
  Thread* t = r.cur;
  t->state = s;
  swapcontext(&t->ctx, &r.scheduler);
}

inline void fiber_main() {
  Runtime& r = rt();
  r.body();
  r.cur->state = State::Done;
  // Returning resumes uc_link, the scheduler.
}

inline unsigned char* dynamic_smem() { return rt().smem; }

inline int block_barrier(BarrierOp op, int value) {
  Thread* t = rt().cur;
  t->bar_op = op;
  t->bar_in = value;
  yield(State::BlockBarrier);
  return t->bar_out;
}

inline uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, unsigned src_lane) {
  Thread* t = rt().cur;
  t->warp_op = op;
  t->warp_mask = mask;
  t->x_in = value;
  t->src_lane = src_lane;
  yield(State::WarpBarrier);
  return t->x_out;
}

inline std::string where(const Thread& t) {
  const Runtime& r = rt();
  return "block (" + std::to_string(r.block_idx.x) + ", " + std::to_string(r.block_idx.y) + ", " +
         std::to_string(r.block_idx.z) + ") thread " + std::to_string(t.linear);
}

/// Run every thread of the current block to completion in a seeded adversarial order.
inline void run_block() {
  Runtime& r = rt();
  const unsigned n = static_cast<unsigned>(r.threads.size());
  const unsigned n_warps = (n + kWarp - 1) / kWarp;
  std::vector<unsigned> ready(n);
  std::iota(ready.begin(), ready.end(), 0u);
  std::vector<unsigned> warp_arrived(n_warps, 0);
  unsigned done = 0, at_barrier = 0;
  auto lanes_in = [&](unsigned w) { return std::min(kWarp, n - w * kWarp); };
  while (true) {
    if (!ready.empty()) {
      const size_t i = r.rng() % ready.size();
      Thread& t = r.threads[ready[i]];
      ready[i] = ready.back();
      ready.pop_back();
      t.state = State::Ready;
      r.cur = &t;
      swapcontext(&r.scheduler, &t.ctx);
      r.cur = nullptr;
      if (!r.error.empty()) throw std::runtime_error("CUDA emulator: " + r.error);
      if (t.state == State::Done) {
        ++done;
      } else if (t.state == State::BlockBarrier) {
        ++at_barrier;
      } else if (t.state == State::WarpBarrier) {
        const unsigned w = t.warp, lanes = lanes_in(w);
        const unsigned full = lanes == kWarp ? 0xffffffffu : ((1u << lanes) - 1u);
        if (t.warp_mask != full)
          throw std::runtime_error("CUDA emulator: warp primitive with mask " + std::to_string(t.warp_mask) +
                                   " at " + where(t) + ": only full-warp masks are emulated");
        if (++warp_arrived[w] < lanes) continue;
        warp_arrived[w] = 0;
        Thread* lane0 = &r.threads[w * kWarp];
        uint64_t ballot = 0;
        for (unsigned l = 0; l < lanes; ++l) {
          const Thread& u = lane0[l];
          if (u.warp_op != lane0->warp_op || u.warp_mask != lane0->warp_mask)
            throw std::runtime_error("CUDA emulator: lanes of warp " + std::to_string(w) +
                                     " met at different warp primitives (" + where(u) + ")");
          if (u.x_in) ballot |= 1ull << l;
        }
        for (unsigned l = 0; l < lanes; ++l) {
          Thread& u = lane0[l];
          if (u.warp_op == WarpOp::Shuffle) u.x_out = lane0[u.src_lane < lanes ? u.src_lane : l].x_in;
          if (u.warp_op == WarpOp::Ballot) u.x_out = ballot;
          ready.push_back(w * kWarp + l);
        }
      }
      continue;
    }
    if (done == n) return;
    if (at_barrier == n) {
      const BarrierOp op = r.threads[0].bar_op;
      int result = op == BarrierOp::And ? 1 : 0;
      for (const Thread& t : r.threads) {
        if (t.bar_op != op)
          throw std::runtime_error("CUDA emulator: threads met at different __syncthreads variants (" + where(t) + ")");
        if (op == BarrierOp::Or) result |= t.bar_in != 0;
        if (op == BarrierOp::And) result &= t.bar_in != 0;
        if (op == BarrierOp::Count) result += t.bar_in != 0;
      }
      for (Thread& t : r.threads) t.bar_out = result;
      at_barrier = 0;
      ready.resize(n);
      std::iota(ready.begin(), ready.end(), 0u);
      continue;
    }
    throw std::runtime_error("CUDA emulator: deadlock in block (" + std::to_string(r.block_idx.x) + ", " +
                             std::to_string(r.block_idx.y) + ", " + std::to_string(r.block_idx.z) + "): " +
                             std::to_string(at_barrier) + " threads wait at __syncthreads, " +
                             std::to_string(done) + " exited, the rest wait at a warp primitive");
  }
}

/// Emulated `kernel<<<grid, block, smem>>>(args...)`: runs the whole grid before returning.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args... args) {
  Runtime& r = rt();
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024) throw std::runtime_error("CUDA emulator: invalid block size");
  if (smem_bytes > static_cast<size_t>(kEmuMaxDynamicSmem))
    throw std::runtime_error("CUDA emulator: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory");
  std::tuple<Params...> params(static_cast<Params>(args)...);
  r.body = [&] { std::apply(kernel, params); };
  r.error.clear();
  r.rng.seed(base_seed() * 0x9e3779b97f4a7c15ULL + (++r.launches));
  r.block_dim = block;
  r.grid_dim = grid;
  r.threads.assign(n, Thread{});
  while (r.stacks.size() < n) r.stacks.emplace_back(new char[kStackBytes]);
  r.smem_storage.assign(smem_bytes + 256, 0);
  const uintptr_t base = reinterpret_cast<uintptr_t>(r.smem_storage.data());
  r.smem = r.smem_storage.data() + ((128 - base % 128) % 128);

  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), r.rng);

  for (const uint3& b : blocks) {
    r.block_idx = b;
    std::memset(r.smem, (r.rng() & 1) ? 0xff : 0x7f, smem_bytes);  // NaN in fp32/fp16/bf16, or huge fp32
    for (unsigned i = 0; i < n; ++i) {
      Thread& t = r.threads[i];
      t = Thread{};
      t.linear = i;
      t.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
      t.lane = i % kWarp;
      t.warp = i / kWarp;
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = r.stacks[i].get();
      t.ctx.uc_stack.ss_size = kStackBytes;
      t.ctx.uc_link = &r.scheduler;
      makecontext(&t.ctx, fiber_main, 0);
    }
    run_block();
  }
  r.cur = nullptr;
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp primitives move up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace pmlm_emu

// ---------------------------------------------------------------------------------------------
// Built-in variables, barriers, warp primitives, atomics

#define threadIdx (::pmlm_emu::rt().cur->tid)
#define blockIdx (::pmlm_emu::rt().block_idx)
#define blockDim (::pmlm_emu::rt().block_dim)
#define gridDim (::pmlm_emu::rt().grid_dim)

inline void __syncthreads() { ::pmlm_emu::block_barrier(::pmlm_emu::BarrierOp::Sync, 0); }
inline int __syncthreads_or(int p) { return ::pmlm_emu::block_barrier(::pmlm_emu::BarrierOp::Or, p); }
inline int __syncthreads_and(int p) { return ::pmlm_emu::block_barrier(::pmlm_emu::BarrierOp::And, p); }
inline int __syncthreads_count(int p) { return ::pmlm_emu::block_barrier(::pmlm_emu::BarrierOp::Count, p); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::pmlm_emu::warp_exchange(::pmlm_emu::WarpOp::Sync, mask, 0, 0);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = ::pmlm_emu::rt().cur->lane;
  const unsigned src = (lane ^ static_cast<unsigned>(lane_mask)) % 32u;
  // Lanes outside the caller's width-sized segment return their own value.
  const unsigned seg = static_cast<unsigned>(width);
  const unsigned from = (src / seg == lane / seg) ? src : lane;
  return ::pmlm_emu::from_bits<T>(
      ::pmlm_emu::warp_exchange(::pmlm_emu::WarpOp::Shuffle, mask, ::pmlm_emu::to_bits(v), from));
}

template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const unsigned lane = ::pmlm_emu::rt().cur->lane;
  const unsigned seg = static_cast<unsigned>(width);
  const unsigned from = (lane / seg) * seg + static_cast<unsigned>(src_lane) % seg;
  return ::pmlm_emu::from_bits<T>(
      ::pmlm_emu::warp_exchange(::pmlm_emu::WarpOp::Shuffle, mask, ::pmlm_emu::to_bits(v), from));
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(::pmlm_emu::warp_exchange(::pmlm_emu::WarpOp::Ballot, mask, predicate != 0, 0));
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

// ---------------------------------------------------------------------------------------------
// WMMA

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct frag_shape;
template <int M, int N, int K>
struct frag_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct frag_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct frag_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

/// Every lane holds the whole tile, row-major (see the header comment for why that is faithful).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only the m16n16k16 shape is emulated");
  static constexpr int rows = frag_shape<Use, M, N, K>::rows;
  static constexpr int cols = frag_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

namespace detail {
template <class T>
inline void check_ptr(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::pmlm_emu::fail(std::string(what) + ": pointer is not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) ::pmlm_emu::fail(std::string(what) + ": ldm is not a multiple of 16 bytes");
}
inline float f(float v) { return v; }
inline float f(__half v) { return __half2float(v); }
inline float f(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace detail

template <int M, int N, int K>
inline void fill_fragment(fragment<accumulator, M, N, K, float>& a, float v) {
  for (float& e : a.x) e = v;
}

template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& a, const T* p, unsigned ldm) {
  detail::check_ptr(p, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool col = std::is_same_v<Layout, col_major>;
  for (int i = 0; i < F::rows; ++i)
    for (int j = 0; j < F::cols; ++j) a.x[i * F::cols + j] = col ? p[i + j * ldm] : p[i * ldm + j];
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& a, const float* p, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm, "load_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) a.x[i * N + j] = l == mem_col_major ? p[i + j * ldm] : p[i * ldm + j];
}

/// Each lane stores only the elements it owns (element e belongs to lane e % 32), as on the
/// hardware, where every element of a fragment lives in exactly one lane. That is what makes the
/// load -> mma -> store read-modify-write of one accumulator tile correct without a warp
/// barrier: a lane that stores early never changes an element another lane still has to load.
template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& a, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm, "store_matrix_sync");
  const unsigned lane = ::pmlm_emu::rt().cur->lane;
  for (int e = static_cast<int>(lane); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    (l == mem_col_major ? p[i + j * ldm] : p[i * ldm + j]) = a.x[e];
  }
}

template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "half or bf16 operands");
  float fa[M * K], fb[K * N], out[M * N];
  for (int e = 0; e < M * K; ++e) fa[e] = detail::f(a.x[e]);
  for (int e = 0; e < K * N; ++e) fb[e] = detail::f(b.x[e]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += fa[i * K + k] * fb[k * N + j];  // exact products, fp32 sums
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
