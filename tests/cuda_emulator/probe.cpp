// Small kernels that probe the CUDA emulator (csrc/cuda/emulate) itself; run by
// tests/test_cuda_emulator.py as `probe <case>`. Each case prints what it computed.
#define PMLM_CUDA_EMULATE 1
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "cuda_compat.cuh"

// Every thread writes its element to shared memory, then reads its mirror's: needs the barrier.
__global__ void reverse_kernel(const float* in, float* out, int with_barrier) {
  PMLM_DYNAMIC_SMEM(raw);
  float* s = reinterpret_cast<float*>(raw);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = in[i];
  if (with_barrier) __syncthreads();
  out[i] = s[blockDim.x - 1 - threadIdx.x];
}

// Warp sums with butterfly shuffles, and a ballot of odd lanes.
__global__ void warp_kernel(const float* in, float* sums, unsigned* ballots) {
  float v = in[threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const float first = __shfl_sync(0xffffffffu, in[threadIdx.x], 0);
  const unsigned odd = __ballot_sync(0xffffffffu, threadIdx.x & 1);
  if (threadIdx.x % 32 == 0) {
    sums[threadIdx.x / 32] = v + 0.f * first;
    ballots[threadIdx.x / 32] = odd;
  }
  if (threadIdx.x % 32 == 5) sums[blockDim.x / 32 + threadIdx.x / 32] = first;
}

// A barrier only some threads reach.
__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 5) __syncthreads();
  out[threadIdx.x] = 1;
}

// One 16 x 16 x 16 bf16 WMMA product, C = A B (A row-major, B col-major), through shared memory;
// `misalign` shifts A by that many elements.
__global__ void wmma_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, int misalign) {
  using namespace nvcuda;
  PMLM_DYNAMIC_SMEM(raw);
  __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(raw) + misalign;
  __nv_bfloat16* sb = reinterpret_cast<__nv_bfloat16*>(raw + 768);
  float* sc = reinterpret_cast<float*>(raw + 1280);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    sa[i] = a[i];
    sb[i] = b[i];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, sa, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(sc, fc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) c[i] = sc[i];
}

int main(int argc, char** argv) {
  const char* what = argc > 1 ? argv[1] : "";
  try {
    if (!std::strcmp(what, "reverse") || !std::strcmp(what, "reverse_no_barrier")) {
      std::vector<float> in(256), out(256);
      for (int i = 0; i < 256; ++i) in[i] = static_cast<float>(i);
      pmlm_launch(reverse_kernel, dim3(2), dim3(128), 128 * sizeof(float), nullptr, in.data(), out.data(),
                  std::strcmp(what, "reverse") == 0 ? 1 : 0);
      int wrong = 0;
      for (int i = 0; i < 256; ++i) wrong += out[i] != in[(i / 128) * 128 + 127 - i % 128];
      std::printf("wrong %d\n", wrong);
    } else if (!std::strcmp(what, "warp")) {
      std::vector<float> in(64), sums(4);
      std::vector<unsigned> ballots(2);
      for (int i = 0; i < 64; ++i) in[i] = static_cast<float>(i);
      pmlm_launch(warp_kernel, dim3(1), dim3(64), 0, nullptr, in.data(), sums.data(), ballots.data());
      std::printf("sums %g %g first %g %g ballot %x %x\n", sums[0], sums[1], sums[2], sums[3], ballots[0], ballots[1]);
    } else if (!std::strcmp(what, "divergent")) {
      std::vector<int> out(128);
      pmlm_launch(divergent_kernel, dim3(1), dim3(128), 0, nullptr, out.data());
      std::printf("no error\n");
    } else if (!std::strcmp(what, "wmma") || !std::strcmp(what, "wmma_misaligned")) {
      std::vector<__nv_bfloat16> a(256), b(256);
      std::vector<float> c(256);
      double max_err = 0;
      for (int i = 0; i < 256; ++i) {
        a[i] = __float2bfloat16_rn(0.37f * static_cast<float>(i % 17) - 2.9f);
        b[i] = __float2bfloat16_rn(0.11f * static_cast<float>(i % 23) - 1.3f);
      }
      pmlm_launch(wmma_kernel, dim3(1), dim3(32), 2560, nullptr, a.data(), b.data(), c.data(),
                  std::strcmp(what, "wmma") == 0 ? 0 : 8);
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j) {
          double ref = 0;
          for (int k = 0; k < 16; ++k)
            ref += static_cast<double>(__bfloat162float(a[i * 16 + k])) * __bfloat162float(b[j * 16 + k]);
          const double err = ref - c[i * 16 + j] < 0 ? c[i * 16 + j] - ref : ref - c[i * 16 + j];
          max_err = err > max_err ? err : max_err;
        }
      std::printf("max_err %.3g\n", max_err);
    } else {
      std::printf("unknown case\n");
      return 2;
    }
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
  }
  return 0;
}
