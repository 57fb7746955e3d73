"""Build and install pmlm-engine.

* ``pmlm_engine/`` is the engine; the top-level ``kernels/`` folder is installed as
  ``pmlm_engine.kernels`` (``package_dir``), so it claims no generic top-level name.
* ``pmlm_engine._C`` is a pybind11 extension built from ``csrc/*.cpp`` (CPU hot loops).
  CUDA sources in ``csrc/cuda/`` are compiled by nvcc in CI for GPU readiness only.

Install with ``pip install --no-build-isolation -e .`` after ``torch==2.13.0`` is installed
(see README.md): build isolation would pull a CUDA torch into the build environment.
"""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "pmlm_engine._C",
        sorted(glob("csrc/*.cpp")),
        depends=sorted(glob("csrc/*.h")),  # rebuild when a header changes
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="pmlm-engine",
    version="0.1.0",
    description="Training engine for UniLMv2-style pseudo-masked language models",
    python_requires=">=3.10",
    packages=["pmlm_engine", "pmlm_engine.kernels"],
    package_dir={"pmlm_engine": "pmlm_engine", "pmlm_engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch==2.13.0",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tqdm",
    ],
)
