"""The CUDA emulator itself (``csrc/cuda/emulate``): the properties the CUDA kernel suite relies on.

``tests/cuda_emulator/probe.cpp`` holds tiny kernels compiled once by g++ through the emulator;
each test runs one case. What is shown: a missing ``__syncthreads()`` changes the result (the
adversarial order plus poisoned shared memory), with the barrier the result is exact under every
seed; the warp shuffles and ballot follow their documented semantics; a barrier that not every
thread reaches is reported instead of hanging; a bf16 WMMA product equals the exact product of
the rounded operands to fp32 accumulation error; a misaligned WMMA pointer is refused, as the
hardware requires 256-bit alignment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("emu") / "probe"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'cuda'}", str(ROOT / "tests" / "cuda_emulator" / "probe.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, timeout=300)
    return exe


def run(probe: Path, case: str, seed: int = 1) -> str:
    env = dict(os.environ, PMLM_CUDA_EMULATE_SEED=str(seed))
    return subprocess.run([str(probe), case], env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


def test_missing_barrier_changes_the_result(probe: Path):
    for seed in range(5):
        assert run(probe, "reverse", seed) == "wrong 0"
        wrong = int(run(probe, "reverse_no_barrier", seed).split()[1])
        assert wrong > 50, f"seed {seed}: only {wrong} of 256 elements read stale shared memory"


def test_warp_primitives(probe: Path):
    # sums of 0..31 and 32..63; lane 0's value broadcast by __shfl_sync; odd lanes in the ballot
    assert run(probe, "warp") == "sums 496 1520 first 0 32 ballot aaaaaaaa aaaaaaaa"


def test_divergent_barrier_is_an_error(probe: Path):
    out = run(probe, "divergent")
    assert out.startswith("error: CUDA emulator: deadlock") and "5 threads wait at __syncthreads" in out


def test_wmma_bf16_product(probe: Path):
    assert float(run(probe, "wmma").split()[1]) < 1e-5  # exact products of bf16 values, fp32 sums
    assert "not 256-bit aligned" in run(probe, "wmma_misaligned")
