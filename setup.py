"""Build and install pmlm-engine.

* ``pmlm_engine/`` is the engine; the top-level ``kernels/`` folder is installed as
  ``pmlm_engine.kernels`` (``package_dir``), so it claims no generic top-level name.
* ``pmlm_engine._C`` is a pybind11 extension built from ``csrc/*.cpp`` (CPU hot loops).
* ``pmlm_engine._cuda_emu``: the CUDA attention kernels of ``csrc/cuda/`` compiled by the host
  C++ compiler through the CUDA emulator (``csrc/cuda/emulate``), so ``backend="cuda"`` runs on
  the CPU with ``PMLM_CUDA_EMULATE=1`` (tests; slow). No CUDA toolkit needed.
* ``pmlm_engine._cuda_attention``: the same kernels compiled by nvcc, built only when
  ``CUDA_HOME`` is set and torch is a CUDA build; otherwise ``pmlm_engine.cuda_attention``
  builds them just in time on first use on a GPU machine.

Install with ``pip install --no-build-isolation -e .`` after ``torch==2.13.0`` is installed
(see README.md): build isolation would pull a CUDA torch into the build environment.
"""

import os
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CUDA_DIR = "csrc/cuda"
CUDA_HEADERS = sorted(glob(f"{CUDA_DIR}/*.cuh") + glob(f"{CUDA_DIR}/*.h") + glob(f"{CUDA_DIR}/emulate/*.h"))

ext_modules = [
    Pybind11Extension(
        "pmlm_engine._C",
        sorted(glob("csrc/*.cpp")),
        depends=sorted(glob("csrc/*.h")),  # rebuild when a header changes
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    Pybind11Extension(
        "pmlm_engine._cuda_emu",
        [f"{CUDA_DIR}/binding.cpp", f"{CUDA_DIR}/emulated.cpp"],
        depends=CUDA_HEADERS + [f"{CUDA_DIR}/pseudo_mask_attention.cu"],
        include_dirs=[CUDA_DIR],
        define_macros=[("PMLM_CUDA_EMULATE", "1"), ("PMLM_MODULE_NAME", "_cuda_emu")],
        cxx_std=17,
        extra_compile_args=["-O2"],
    ),
]


cmdclass = {"build_ext": build_ext}
if os.environ.get("CUDA_HOME"):
    import torch

    if torch.version.cuda is not None:
        # A GPU build: the same binding, linked with the kernels compiled by nvcc (sm_80+ for
        # bf16 WMMA; TORCH_CUDA_ARCH_LIST picks the targets). torch's BuildExtension drives nvcc.
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        ext_modules.append(CUDAExtension(
            "pmlm_engine._cuda_attention",
            [f"{CUDA_DIR}/binding.cpp", f"{CUDA_DIR}/pseudo_mask_attention.cu"],
            include_dirs=[os.path.abspath(CUDA_DIR)],
            define_macros=[("PMLM_MODULE_NAME", "_cuda_attention")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        ))
        cmdclass = {"build_ext": BuildExtension}

setup(
    name="pmlm-engine",
    version="0.1.0",
    description="Training engine for UniLMv2-style pseudo-masked language models",
    python_requires=">=3.10",
    packages=["pmlm_engine", "pmlm_engine.kernels"],
    package_dir={"pmlm_engine": "pmlm_engine", "pmlm_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch==2.13.0",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tqdm",
    ],
)
