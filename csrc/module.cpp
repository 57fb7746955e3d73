// pmlm_engine._C: CPU hot loops of pmlm-engine (pybind11 + numpy, no torch headers).
// Import torch before this module (it links libc10); the Python side is pmlm_engine/_native.py.

#include <pybind11/pybind11.h>

#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ fast paths of pmlm-engine (see pmlm_engine/_native.py)";
  pmlm::register_layout(m);
}
