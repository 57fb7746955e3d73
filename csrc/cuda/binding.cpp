// pybind11 binding of the CUDA pseudo-mask attention's C interface (pseudo_mask_attention.h).
//
// Built twice from this one file: as pmlm_engine._cuda_emu with emulated.cpp (the kernels run on
// the CPU, for tests; setup.py), and with pseudo_mask_attention.cu by nvcc on a CUDA machine
// (torch.utils.cpp_extension.load, or setup.py when CUDA_HOME is set). Tensors travel as raw
// data pointers (ints) so that neither build needs torch or CUDA headers here; the Python side
// (pmlm_engine/cuda_attention.py) checks shapes, dtypes, devices and contiguity before calling.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pseudo_mask_attention.h"

#ifndef PMLM_MODULE_NAME
#define PMLM_MODULE_NAME TORCH_EXTENSION_NAME
#endif

namespace py = pybind11;

namespace {

template <class T>
T* ptr(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return nullptr;
  return reinterpret_cast<T*>(d[key].cast<uintptr_t>());
}

pmlm_attention_args unpack(const py::dict& d) {
  pmlm_attention_args a{};
  a.q = ptr<const void>(d, "q");
  a.k = ptr<const void>(d, "k");
  a.v = ptr<const void>(d, "v");
  a.out = ptr<void>(d, "out");
  a.lse = ptr<float>(d, "lse");
  a.q_step = ptr<const int32_t>(d, "q_step");
  a.q_doc = ptr<const int32_t>(d, "q_doc");
  a.q_pos = ptr<const int32_t>(d, "q_pos");
  a.k_step = ptr<const int32_t>(d, "k_step");
  a.k_doc = ptr<const int32_t>(d, "k_doc");
  a.k_pos = ptr<const int32_t>(d, "k_pos");
  a.table = ptr<const float>(d, "table");
  a.bucket_lut = ptr<const int32_t>(d, "bucket_lut");
  a.dout = ptr<const void>(d, "dout");
  a.dlse = ptr<const float>(d, "dlse");
  a.delta = ptr<float>(d, "delta");
  a.dq = ptr<void>(d, "dq");
  a.dk = ptr<void>(d, "dk");
  a.dv = ptr<void>(d, "dv");
  a.dtable = ptr<float>(d, "dtable");
  a.batch = d["batch"].cast<int>();
  a.heads = d["heads"].cast<int>();
  a.lq = d["lq"].cast<int>();
  a.lk = d["lk"].cast<int>();
  a.head_dim = d["head_dim"].cast<int>();
  a.num_buckets = d["num_buckets"].cast<int>();
  a.max_distance = d["max_distance"].cast<int>();
  a.scale = d["scale"].cast<float>();
  return a;
}

void check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string(what) + " failed with CUDA error " + std::to_string(err));
}

}  // namespace

PYBIND11_MODULE(PMLM_MODULE_NAME, m) {
  m.doc() = "CUDA pseudo-mask attention (raw-pointer interface; see pmlm_engine/cuda_attention.py)";
#ifdef PMLM_CUDA_EMULATE
  m.attr("emulated") = true;
#else
  m.attr("emulated") = false;
#endif
  m.def(
      "forward",
      [](const py::dict& args, int dtype, uintptr_t stream) {
        const pmlm_attention_args a = unpack(args);
        int err;
        {
          py::gil_scoped_release release;
          err = pmlm_pseudo_mask_attention_forward(&a, dtype, reinterpret_cast<void*>(stream));
        }
        check(err, "pmlm_pseudo_mask_attention_forward");
      },
      py::arg("args"), py::arg("dtype"), py::arg("stream") = 0);
  m.def(
      "backward",
      [](const py::dict& args, int dtype, uintptr_t stream) {
        const pmlm_attention_args a = unpack(args);
        int err;
        {
          py::gil_scoped_release release;
          err = pmlm_pseudo_mask_attention_backward(&a, dtype, reinterpret_cast<void*>(stream));
        }
        check(err, "pmlm_pseudo_mask_attention_backward");
      },
      py::arg("args"), py::arg("dtype"), py::arg("stream") = 0);
  m.def(
      "pass_info",
      [](int dtype, int head_dim, int num_buckets, int pass) {
        int block_m = 0, block_n = 0;
        const int smem =
            pmlm_pseudo_mask_attention_pass_info(dtype, head_dim, num_buckets, pass, &block_m, &block_n);
        if (smem < 0) throw std::invalid_argument("invalid dtype, head_dim, num_buckets or pass");
        return py::make_tuple(smem, block_m, block_n);
      },
      "(shared memory bytes, block_m, block_n) of a pass: 0 forward, 1 dK/dV, 2 dQ", py::arg("dtype"),
      py::arg("head_dim"), py::arg("num_buckets"), py::arg("pass_"));
}
