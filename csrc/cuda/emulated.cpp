// The CUDA kernels of pseudo_mask_attention.cu built for the CPU by a host compiler, through the
// emulator in emulate/cuda_emulator.h (see cuda_compat.cuh). The kernel source is included as is.
#define PMLM_CUDA_EMULATE 1
#include "pseudo_mask_attention.cu"
