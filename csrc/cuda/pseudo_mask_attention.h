// C interface of the CUDA pseudo-mask attention (pseudo_mask_attention.cu). No CUDA or torch
// headers: a pybind11 binding (binding.cpp), ctypes or C++ serving code can call it with raw
// device pointers (host pointers in the CPU emulation build).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Every tensor is contiguous row-major. q (B, H, Lq, D); k, v (B, H, Lk, D), all of one dtype;
/// out like q; lse (B, H, Lq) fp32, natural log, -inf on rows with no visible key (whose output
/// is 0). Metadata int32: q_step/q_doc/q_pos (B, Lq), k_step/k_doc/k_pos (B, Lk); doc -1 =
/// padding. table (H, num_buckets) fp32 and bucket_lut (max_distance + 1) int32, or both null
/// for no bias (q_pos/k_pos may then be null). Backward: dout like q, dlse (B, H, Lq) fp32 or
/// null, delta a (B, H, Lq) fp32 workspace, dq/dk/dv like q/k/v, dtable (H, num_buckets) fp32
/// zeroed by the caller (accumulated with atomics).
typedef struct pmlm_attention_args {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* q_step;
  const int32_t* q_doc;
  const int32_t* q_pos;
  const int32_t* k_step;
  const int32_t* k_doc;
  const int32_t* k_pos;
  const float* table;
  const int32_t* bucket_lut;
  const void* dout;
  const float* dlse;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  float* dtable;
  int batch, heads, lq, lk, head_dim, num_buckets, max_distance;
  float scale;
} pmlm_attention_args;

/// dtype: 0 fp32, 1 fp16, 2 bf16. head_dim: 64 or 128. stream: a cudaStream_t (null = default).
/// Return a cudaError_t as int: 0 on success, 1 (cudaErrorInvalidValue) for bad arguments.
int pmlm_pseudo_mask_attention_forward(const pmlm_attention_args* args, int dtype, void* stream);
int pmlm_pseudo_mask_attention_backward(const pmlm_attention_args* args, int dtype, void* stream);

/// Dynamic shared memory (bytes) of one block of a pass (0 forward, 1 dK/dV, 2 dQ) for a dtype,
/// head dim and bucket count (the dK/dV pass keeps the table gradient in shared memory), and the
/// pass's tile in *block_m (queries) x *block_n (keys); -1 if the arguments are invalid.
int pmlm_pseudo_mask_attention_pass_info(int dtype, int head_dim, int num_buckets, int pass, int* block_m,
                                          int* block_n);

#ifdef __cplusplus
}
#endif
