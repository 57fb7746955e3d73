"""Test-wide setup.

Triton's interpreter must be selected before ``triton`` is first imported (TOOLCHAIN.md):
on this CPU-only machine every Triton kernel in the suite runs interpreted.
Ahead-of-time compile tests run in their own process without this variable.
Likewise ``PMLM_CUDA_EMULATE=1`` runs the ``cuda`` attention backend's kernels through the CUDA
emulator on the CPU (``pmlm_engine.cuda_attention``); it is read at dispatch time.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("PMLM_CUDA_EMULATE", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
