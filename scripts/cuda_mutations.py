"""Mutation check of the CUDA kernel's test suite: break the kernel on purpose, see what catches it.

Each mutation edits one line of a copy of ``csrc/cuda`` (the repository is untouched), rebuilds the
emulated module (``pmlm_engine._cuda_emu``) in that copy with g++ and runs
``tests/test_cuda_attention.py`` there. A mutation that no test catches is a gap in the CUDA
emulator or in the suite. Slow (a few minutes per mutation): a development tool, not part of CI.

    python scripts/cuda_mutations.py                 # every mutation
    python scripts/cuda_mutations.py no_doc_rule     # some of them
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (file in csrc/cuda, exact text, replacement): each text occurs exactly once.
MUTATIONS: dict[str, tuple[str, str, str]] = {
    "no_syncthreads_after_S": (
        "pseudo_mask_attention.cu",
        "S::LDS, s.q, S::LDT, s.k, S::LDT, false);  // S = Q K^T\n    __syncthreads();",
        "S::LDS, s.q, S::LDT, s.k, S::LDT, false);  // S = Q K^T\n"),
    "no_syncthreads_before_pv": (
        "pseudo_mask_attention.cu",
        "    __syncthreads();\n    block_mma<T, BM, D, BN, false>(s.o,",
        "    block_mma<T, BM, D, BN, false>(s.o,"),
    "no_syncthreads_before_dv_dk": (
        "pseudo_mask_attention.cu",
        "    __syncthreads();\n    block_mma<T, BN, D, BM, false>(s.dv,",
        "    block_mma<T, BN, D, BM, false>(s.dv,"),
    "tile_bound_off_by_one": ("pseudo_mask_attention.cu", "const bool in = t0 + i < length;",
                              "const bool in = t0 + i <= length;"),
    "tile_count_off_by_one": ("pseudo_mask_attention.cu",
                              "const int n_k_tiles = (p.lk + BN - 1) / BN;\n  for (int kt = 0; kt < n_k_tiles; ++kt) {\n"
                              "    const int k0 = kt * BN;\n    stage_meta<BN>(s.ks, s.kd, s.kp, k_step, k_doc, k_pos, k0, p.lk);\n"
                              "    __syncthreads();\n    const int cls = classify_tile<BM, BN>(s.qs, s.qd, s.ks, s.kd);\n"
                              "    if (cls == kEmpty) continue;  // uniform",
                              "const int n_k_tiles = p.lk / BN;\n  for (int kt = 0; kt < n_k_tiles; ++kt) {\n"
                              "    const int k0 = kt * BN;\n    stage_meta<BN>(s.ks, s.kd, s.kp, k_step, k_doc, k_pos, k0, p.lk);\n"
                              "    __syncthreads();\n    const int cls = classify_tile<BM, BN>(s.qs, s.qd, s.ks, s.kd);\n"
                              "    if (cls == kEmpty) continue;  // uniform"),
    "step_rule_le_to_lt": ("pseudo_mask_rule.cuh", "return wk >= 0 && wk <= wq;", "return wk >= 0 && wk < wq;"),
    "no_same_step_pseudo_rule": ("pseudo_mask_rule.cuh", "return (wk >= 0 && wk < -wq) || wk == wq;",
                                 "return (wk >= 0 && wk < -wq);"),
    "no_doc_rule": ("pseudo_mask_rule.cuh", "if (dk < 0 || dq != dk) return false;", "if (dk < 0) return false;"),
    "bias_bucket_sign": ("pseudo_mask_rule.cuh", "return table_h[lut[n] + (rel > 0 ? half_buckets : 0)];",
                         "return table_h[lut[n] + (rel < 0 ? half_buckets : 0)];"),
    "transposed_dkdv_mask": ("pseudo_mask_attention.cu",
                             "if (cls == kPartial && !visible(s.qs[j], s.qd[j], s.ks[i], s.kd[i])) pv = 0.f;",
                             "if (cls == kPartial && !visible(s.ks[i], s.kd[i], s.qs[j], s.qd[j])) pv = 0.f;"),
    "empty_tile_as_full": ("pseudo_mask_rule.cuh", "return !any ? kEmpty : (all ? kFull : kPartial);",
                           "return !any ? kFull : (all ? kFull : kPartial);"),
}


def build(cuda_dir: Path, out: Path) -> None:
    """g++ build of the emulated module from ``cuda_dir`` (what setup.py does for _cuda_emu)."""
    import pybind11

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden", "-DPMLM_CUDA_EMULATE=1",
                    "-DPMLM_MODULE_NAME=_cuda_emu", f"-I{cuda_dir}", f"-I{pybind11.get_include()}",
                    f"-I{sysconfig.get_paths()['include']}", str(cuda_dir / "binding.cpp"), str(cuda_dir / "emulated.cpp"),
                    "-o", str(out / f"_cuda_emu{suffix}")], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"mutations to try (default: all): {', '.join(MUTATIONS)}")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutations {unknown}: choose from {list(MUTATIONS)}")
    gaps = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, copy / f)
        for so in (ROOT / "pmlm_engine").glob("_C*.so"):  # the data pipeline's extension, unchanged
            shutil.copy2(so, copy / "pmlm_engine")
        (copy / "pmlm_engine" / "kernels").symlink_to(copy / "kernels")  # as setup.py's package_dir
        for name in args.names or list(MUTATIONS):
            cuda_dir = copy / "csrc" / "cuda"
            shutil.rmtree(cuda_dir)
            shutil.copytree(ROOT / "csrc" / "cuda", cuda_dir)
            file, old, new = MUTATIONS[name]
            text = (cuda_dir / file).read_text()
            if text.count(old) != 1:
                print(f"{name}: the text to mutate occurs {text.count(old)} times in {file}; update MUTATIONS")
                return 2
            (cuda_dir / file).write_text(text.replace(old, new))
            build(cuda_dir, copy / "pmlm_engine")
            env = dict(os.environ, PYTHONPATH=str(copy), PMLM_CUDA_EMULATE="1", OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda_attention.py", "-q", "-p",
                                   "no:cacheprovider", "-rf"], cwd=copy, env=env, capture_output=True, text=True)
            failed = sorted(set(re.findall(r"^FAILED \S+::(\S+)", proc.stdout, re.M)))
            print(f"{name}: {len(failed)} failed: {', '.join(failed) or 'NONE (a gap)'}", flush=True)
            if not failed:
                gaps.append(name)
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
