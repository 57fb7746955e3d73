// One include for the CUDA kernels of csrc/cuda: the real toolkit under nvcc, the CPU emulator
// (emulate/cuda_emulator.h) when PMLM_CUDA_EMULATE is defined and a host compiler builds the
// unmodified kernel source. Only the few spellings that differ between the two live here:
//
//   PMLM_DYNAMIC_SMEM(name)      the block's dynamic shared memory as `unsigned char* name`
//                                (an `extern __shared__` array under nvcc, a per-block buffer
//                                that the emulator poisons before every block otherwise);
//   pmlm_launch(kernel, grid, block, smem_bytes, stream, args...)
//                                `kernel<<<grid, block, smem_bytes, stream>>>(args...)`;
//   pmlm_to_float / pmlm_from_float<T>
//                                conversions of float, __half and __nv_bfloat16 (round to nearest).
#pragma once

#include <cstdint>

#if defined(PMLM_CUDA_EMULATE)

#include "emulate/cuda_emulator.h"

#define PMLM_DYNAMIC_SMEM(name) unsigned char* name = ::pmlm_emu::dynamic_smem()

template <class... Params, class... Args>
inline void pmlm_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                        Args... args) {
  ::pmlm_emu::launch(kernel, grid, block, smem, stream, args...);
}

#else  // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define PMLM_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

template <class... Params, class... Args>
inline void pmlm_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                        Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
}

#endif

__device__ __forceinline__ float pmlm_to_float(float x) { return x; }
__device__ __forceinline__ float pmlm_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float pmlm_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T pmlm_from_float(float x);
template <>
__device__ __forceinline__ float pmlm_from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half pmlm_from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 pmlm_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
