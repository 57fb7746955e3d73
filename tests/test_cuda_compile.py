"""GPU readiness of the CUDA sources in ``csrc/cuda/``, checked by compilation only.

No test here runs a kernel (``tests/test_cuda_attention.py`` runs them under the CPU emulator).
``csrc/cuda/check.sh`` compiles every ``.cu`` for sm_80 and sm_90 with ``nvcc -cubin -Xptxas -v`` and reports registers, spills and
shared memory per kernel, plus a host object for the ``extern "C"`` launcher. Skipped when
``nvcc`` is not on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
CHECK = CUDA_DIR / "check.sh"
ARCHS = ("sm_80", "sm_90")
MAX_REGISTERS = 255
"""The attention kernels run 128 threads with ``__launch_bounds__(128, 2)``: ptxas may use up to
255 registers per thread; what must never happen is a spill (checked separately)."""
KERNELS = ("attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")
DTYPES = ("float", "__half", "__nv_bfloat16")
HEAD_DIMS = (64, 128)
SM80_MAX_DYNAMIC_SMEM = 163 * 1024
"""The most dynamic shared memory one block may opt into on sm_80 (sm_90 allows 227 KiB)."""

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc is not on PATH: CUDA sources are compile-checked only where it is")

_RESOURCE = re.compile(r"^RESOURCE (?P<fields>.*?) kernel=(?P<kernel>.+)$")


def run_check(*sources: Path) -> tuple[int, str, list[dict[str, str]]]:
    """Run check.sh on ``sources`` (default: all of csrc/cuda); return (exit code, output, rows)."""
    proc = subprocess.run(["bash", str(CHECK), *map(str, sources)], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        m = _RESOURCE.match(line)
        if m:
            row = dict(kv.split("=", 1) for kv in m["fields"].split())
            row["kernel"] = m["kernel"]
            rows.append(row)
    return proc.returncode, out, rows


@pytest.fixture(scope="module")
def report() -> tuple[int, str, list[dict[str, str]]]:
    """One run of check.sh over csrc/cuda (about 40 s: every kernel variant for two targets)."""
    return run_check()


def test_kernels_compile_for_sm80_sm90_without_spills(report) -> None:
    """Every .cu in csrc/cuda compiles to a cubin for sm_80 and sm_90; every variant of every
    attention kernel (fp32 / fp16 / bf16 x head dim 64 / 128) is in the ptxas report with no
    spill stores or loads, no stack, and the host launcher compiles."""
    code, out, rows = report
    assert code == 0, out
    sources = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
    assert sources == ["pseudo_mask_attention.cu"], sources
    for arch in ARCHS:
        found = [r for r in rows if r["arch"] == arch]
        for kernel in KERNELS:
            for dtype in DTYPES:
                for d in HEAD_DIMS:
                    assert any(r["kernel"].startswith(f"{kernel}<{dtype},{d}") or
                               r["kernel"].startswith(f"{kernel}<{dtype}, {d}") for r in found), \
                        f"no ptxas report for {kernel}<{dtype}, {d}> on {arch}:\n{out}"
        for r in found:
            assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, r
            assert int(r["stack"]) == 0, r
            assert int(r["registers"]) <= MAX_REGISTERS, r
    assert f"HOST_OK arch={ARCHS[0]} file=pseudo_mask_attention.cu" in out, out


def test_shared_memory_fits_sm80() -> None:
    """Every pass of every variant asks for at most the dynamic shared memory sm_80 can give one
    block (the launcher sizes it with the same carving code the kernel uses)."""
    emu = pytest.importorskip("pmlm_engine._cuda_emu")
    for dtype in range(3):
        for d in HEAD_DIMS:
            for pass_ in range(3):
                size, _, _ = emu.pass_info(dtype, d, 32, pass_)
                assert 0 < size <= SM80_MAX_DYNAMIC_SMEM, (dtype, d, pass_, size)


def test_attention_exports_c_launchers(report) -> None:
    """The launchers are exported unmangled (``extern "C"``), so a torch binding, ctypes or C++
    serving code finds them by name without CUDA or torch headers."""
    _, out, _ = report
    line = next((ln for ln in out.splitlines() if ln.startswith("EXPORTS file=pseudo_mask_attention.cu")), None)
    assert line is not None, out
    symbols = set(line.split("symbols=", 1)[1].split(","))
    for name in ("forward", "backward", "pass_info"):
        assert f"pmlm_pseudo_mask_attention_{name}" in symbols, symbols


def test_check_flags_spills(tmp_path: Path) -> None:
    """The check can fail: a kernel forced to spill (96 live floats under a 32-register launch
    bound) makes check.sh report SPILLS and exit 1."""
    src = tmp_path / "spilly.cu"
    src.write_text("""
__global__ void __launch_bounds__(1024, 2) spilly(float* out, const float* in) {
  float acc[96];
#pragma unroll
  for (int i = 0; i < 96; ++i) acc[i] = in[threadIdx.x + i * 1024];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int i = 0; i < 96; ++i) acc[i] = acc[i] * acc[(i + r + 1) % 96] + 1.0f;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 96; ++i) s += acc[i] * i;
  out[threadIdx.x] = s;
}
""")
    code, out, rows = run_check(src)
    assert code == 1, out
    assert "SPILLS arch=sm_80 file=spilly.cu" in out
    assert any(int(r["spill_stores"]) > 0 for r in rows), out


def test_check_flags_compile_errors(tmp_path: Path) -> None:
    """A source that does not compile makes check.sh exit 2 with nvcc's message."""
    src = tmp_path / "broken.cu"
    src.write_text("__global__ void broken(int* x) { x[0] = undefined_name; }\n")
    code, out, _ = run_check(src)
    assert code == 2, out
    assert "COMPILE_ERROR" in out and "undefined_name" in out
