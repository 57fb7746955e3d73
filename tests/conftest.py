"""Test-wide setup.

Triton's interpreter must be selected before ``triton`` is first imported (it cannot be switched
on afterwards): on a CPU-only machine every Triton kernel in the suite runs interpreted.
Ahead-of-time compile tests run in their own process without this variable.
Likewise ``PMLM_CUDA_EMULATE=1`` runs the ``cuda`` attention backend's kernels through the CUDA
emulator on the CPU (``pmlm_engine.cuda_attention``); it is read at dispatch time.

Hypothesis is derandomized in every suite (the ``ci`` profile): a run draws the same examples
each time, so a failure reproduces and CI cannot pass or fail by luck. ``HYPOTHESIS_PROFILE=explore``
draws fresh random examples (and keeps a local example database) for bug hunting.
"""

import os
import sys

import pytest

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("PMLM_CUDA_EMULATE", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _backend_registry_unchanged():
    """A test that registers an attention backend must remove it: the registry is global."""
    attention = sys.modules.get("pmlm_engine.attention")
    before = None
    if attention is not None:
        attention.available_backends()  # the dispatcher's own optional backends load once, not in a test
        before = dict(attention._BACKENDS)
    yield
    if before is not None:
        assert attention._BACKENDS == before, "a test left the attention backend registry changed"


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models run fastest on one; the machine is shared):
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that wants it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
