"""Ahead-of-time compile report of the pseudo-mask attention kernels: registers, spills, shared memory.

Compiles the forward, the backward preprocess, the dK/dV pass and the dQ pass for CUDA targets
without a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), with the
default :class:`BlockConfig` of each head dim and the relative position bias on (the product's
configuration). Arguments are specialised the way the JIT specialises a contiguous launch:
unit strides become constants, pointers and the other strides are 16-aligned.

Registers and shared memory come from the cubin Triton produced (``cuobjdump
--dump-resource-usage``, ``metadata.shared``); spill bytes from running the bundled ``ptxas -v``
on the same PTX with Triton's flags.

Must run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces the
compiler); this module refuses to run otherwise.

    python -m pmlm_engine.kernels.aot_report                    # full table
    python kernels/aot_report.py --targets 90 --dtypes fp16 --head-dims 64
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

if __package__ in (None, ""):
    # Run as a script (``python kernels/aot_report.py``): the relative imports resolve in the installed
    # package (this folder is pmlm_engine.kernels; under any other name the kernels refuse to load).
    __package__ = "pmlm_engine.kernels"

# Report name -> Triton pointer element type. fp32 is available on request (IEEE dots, slow path).
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
DEFAULT_DTYPES = ("fp16", "bf16")
TARGETS = (80, 90)
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class AotRow:
    """One compiled kernel variant."""

    kernel: str
    target: str  # e.g. "sm_90"
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    shared: int  # bytes of shared memory (dynamic, from Triton's metadata)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _require_compiler() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot_report needs Triton's compiler, but TRITON_INTERPRET is set: run it in a "
                           "separate process with TRITON_INTERPRET unset (env -u TRITON_INTERPRET ...)")


def _nvidia_bin(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: this triton wheel lacks the bundled CUDA tools")
    return path


_PTR_FP32 = {"LSE", "Delta", "DLSE", "LUT", "DLUT"}
_PTR_I32 = {"Q_STEP", "Q_DOC", "Q_POS", "K_STEP", "K_DOC", "K_POS", "FULL_IDX", "FULL_CNT", "PART_IDX",
            "PART_CNT"}
_PTR_DATA = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
_FLOATS = {"qk_scale", "sm_scale"}


def _specialise(fn: Any, dtype: str, constexprs: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any], dict]:
    """Signature, constants and alignment attributes of one kernel for a contiguous launch."""
    signature: dict[str, str] = {}
    consts = dict(constexprs)
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in _PTR_DATA:
            signature[name] = f"*{dtype}"
        elif name in _PTR_FP32:
            signature[name] = "*fp32"
        elif name in _PTR_I32:
            signature[name] = "*i32"
        elif name in _FLOATS:
            signature[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("k"):
            consts[name] = 1  # unit stride over the head dim: the JIT makes it a constant too
            signature[name] = "constexpr"
            continue
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _ptxas_spills(ptx: str, arch: str) -> tuple[int, int, int, int]:
    """``(registers, spill store bytes, spill load bytes, stack bytes)`` from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_nvidia_bin("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spill.group(2)), int(spill.group(3)), int(spill.group(1))


def _cubin_registers(cubin: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+)", out)
    if match is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{out}")
    return int(match.group(1))


def _variants(head_dim: int, dtype: str) -> list[tuple[str, Callable, dict[str, Any], int, int, int, int]]:
    """(name, kernel, constexprs, block_m, block_n, num_warps, num_stages) of the four launches,
    with the constexprs the launcher would pass on a GPU for ``dtype``."""
    import torch

    from . import pseudo_mask_attention as pma

    cfg = pma.default_config(head_dim, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    precision = "ieee" if dtype == "fp32" else "tf32"  # as pma._kernel_flags on a GPU
    common = dict(HEAD_DIM=head_dim, MAX_DISTANCE=128, HAS_BIAS=True, DOT_FP32=False, PRECISION=precision)
    return [
        ("fwd", pma._attn_fwd, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common),
         cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages),
        ("bwd_preprocess", pma._attn_bwd_preprocess, dict(BLOCK_M=64, HEAD_DIM=head_dim, HAS_DLSE=False),
         64, 0, 4, 1),
        ("bwd_dkdv", pma._attn_bwd_dkdv, dict(BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, **common),
         cfg.block_m1, cfg.block_n1, cfg.num_warps1, cfg.num_stages1),
        ("bwd_dq", pma._attn_bwd_dq, dict(BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, **common),
         cfg.block_m2, cfg.block_n2, cfg.num_warps2, cfg.num_stages2),
    ]


def compile_rows(
    targets: Iterable[int] = TARGETS,
    dtypes: Iterable[str] = DEFAULT_DTYPES,
    head_dims: Iterable[int] = HEAD_DIMS,
    kernels: Optional[Sequence[str]] = None,
) -> list[dict[str, Any]]:
    """Compile every requested variant and return one dict per kernel (the fields of :class:`AotRow`).

    Args:
        targets: CUDA compute capabilities, e.g. ``(80, 90)``.
        dtypes: ``"fp16"``, ``"bf16"`` (default both) and/or ``"fp32"``.
        head_dims: head dims with a default block configuration.
        kernels: subset of ``fwd, bwd_preprocess, bwd_dkdv, bwd_dq``; default all.
    """
    _require_compiler()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    rows: list[dict[str, Any]] = []
    for cc in targets:
        arch = sm_arch_from_capability(cc)
        for dtype in dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
            for head_dim in head_dims:
                for name, fn, constexprs, bm, bn, warps, stages in _variants(head_dim, dtype):
                    if kernels is not None and name not in kernels:
                        continue
                    signature, consts, attrs = _specialise(fn, DTYPES[dtype], constexprs)
                    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=consts, attrs=attrs),
                                              target=GPUTarget("cuda", cc, 32),
                                              options={"num_warps": warps, "num_stages": stages})
                    regs_log, stores, loads, stack = _ptxas_spills(compiled.asm["ptx"], arch)
                    regs = _cubin_registers(compiled.asm["cubin"])
                    if regs != regs_log:
                        raise RuntimeError(f"{name} sm_{cc}: ptxas reports {regs_log} registers but the cubin "
                                           f"has {regs}; the report's ptxas flags no longer match Triton's")
                    rows.append(asdict(AotRow(
                        kernel=name, target=f"sm_{cc}", dtype=dtype, head_dim=head_dim, block_m=bm, block_n=bn,
                        num_warps=warps, num_stages=stages, registers=regs, spill_stores=stores,
                        spill_loads=loads, stack=stack, shared=int(compiled.metadata.shared))))
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """GitHub-style table of :func:`compile_rows` output."""
    cols = ["kernel", "target", "dtype", "head_dim", "block_m", "block_n", "num_warps", "num_stages",
            "registers", "spill_stores", "spill_loads", "stack", "shared"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES), choices=sorted(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--kernels", nargs="+", default=None,
                        choices=["fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"])
    args = parser.parse_args(argv)
    rows = compile_rows(args.targets, args.dtypes, args.head_dims, args.kernels)
    print(format_table(rows))
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spilling:
        print(f"\n{len(spilling)} variant(s) spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
