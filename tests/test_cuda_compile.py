"""GPU readiness of the CUDA sources in ``csrc/cuda/``, checked by compilation only.

No test here runs a kernel: the dev machines have no GPU. ``csrc/cuda/check.sh`` compiles every
``.cu`` for sm_80 and sm_90 with ``nvcc -cubin -Xptxas -v`` and reports registers, spills and
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
MAX_REGISTERS = 64
"""At 256 threads per block, 64 registers per thread still fit 4 blocks per SM (64K registers)."""

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc is not on PATH: CUDA sources are compile-checked only where it is")

_RESOURCE = re.compile(r"^RESOURCE (?P<fields>.*) kernel=(?P<kernel>\S+)$")


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


def test_kernels_compile_for_sm80_sm90_without_spills() -> None:
    """Every .cu in csrc/cuda compiles to a cubin for sm_80 and sm_90, each kernel uses no spill
    stores or loads, no stack and at most MAX_REGISTERS registers, and the host launcher compiles."""
    code, out, rows = run_check()
    assert code == 0, out
    sources = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
    assert sources, "no CUDA sources in csrc/cuda"
    for source in sources:
        for arch in ARCHS:
            found = [r for r in rows if r["file"] == source and r["arch"] == arch]
            assert found, f"no ptxas report for {source} on {arch}:\n{out}"
            for r in found:
                assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, r
                assert int(r["stack"]) == 0, r
                assert int(r["registers"]) <= MAX_REGISTERS, r
        assert f"HOST_OK arch={ARCHS[0]} file={source}" in out, out


def test_tile_classifier_exports_c_launcher(tmp_path: Path) -> None:
    """The tile classifier's launcher is exported unmangled (``extern "C"``), so a torch binding
    or ctypes can find it by name without CUDA or torch headers."""
    obj = tmp_path / "classify.o"
    subprocess.run(["nvcc", "-c", f"-arch={ARCHS[0]}", "-o", str(obj), str(CUDA_DIR / "pseudo_mask_tile_classify.cu")],
                   check=True, capture_output=True, timeout=300)
    assert b"pmlm_pseudo_mask_tile_classify\x00" in obj.read_bytes()


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
