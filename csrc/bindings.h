// One register_* function per csrc/*.cpp; module.cpp calls them all (one PYBIND11_MODULE).
#pragma once

#include <pybind11/pybind11.h>

namespace pmlm {

void register_layout(pybind11::module_& m);

}  // namespace pmlm
