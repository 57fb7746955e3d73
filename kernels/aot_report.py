"""Ahead-of-time compile report of the Triton kernels: tensor-core instruction, TMA, registers,
spills, shared memory and occupancy.

The pseudo-mask attention kernels (below) and the fused linear cross-entropy's chunk kernel
(:func:`compile_fused_ce_rows`).

Compiles the forward, the backward preprocess, the dK/dV pass and the dQ pass for CUDA targets
without a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), with each
architecture's default :class:`BlockConfig` (:func:`default_config` with ``arch``) and the
relative position bias on (the product's configuration). Arguments are specialised the way the
JIT specialises a contiguous launch: unit strides become constants, pointers and the other
strides are 16-aligned.

Registers and shared memory come from the cubin Triton produced (``cuobjdump
--dump-resource-usage``, ``metadata.shared``); spill bytes from running the bundled ``ptxas -v``
on the same PTX with Triton's flags. The tensor-core instruction is read from the PTX
(``wgmma.mma_async``: Hopper's warpgroup MMA; ``mma.sync``: Ampere's; neither: FMA loops), TMA
from ``cp.async.bulk.tensor`` in the PTX, and the occupancy is the resident warps per SM that
registers and shared memory allow (:func:`autotune.occupancy`).

``--candidates`` compiles every candidate of the autotune sets instead and prints the
:data:`autotune.MEASURED` table the cost model prunes with.

Must run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces the
compiler); this module refuses to run otherwise.

    python -m pmlm_engine.kernels.aot_report                    # full table
    python kernels/aot_report.py --targets 90 --dtypes fp16 --head-dims 64
    python -m pmlm_engine.kernels.aot_report --candidates       # the autotune sets' resources
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

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
    instruction: str  # tensor-core instruction in the PTX: "wgmma", "mma.sync", "fma" (dots on FMA), "-" (no dot)
    tma: bool  # cp.async.bulk.tensor in the PTX
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    shared: int  # bytes of shared memory (dynamic, from Triton's metadata)
    occupancy: int  # resident warps per SM (of 64) that registers and shared memory allow

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


def _instruction(ptx: str, has_dot: bool) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma" if has_dot else "-"


_KERNELS = {"fwd": "_attn_fwd", "bwd_preprocess": "_attn_bwd_preprocess", "bwd_dkdv": "_attn_bwd_dkdv",
            "bwd_dq": "_attn_bwd_dq"}


def _constexprs(name: str, head_dim: int, dtype: str, block_m: int, block_n: int, tma: bool) -> dict[str, Any]:
    """The constexprs the launcher passes on a GPU for ``dtype`` (as ``pma._kernel_flags``)."""
    if name == "bwd_preprocess":
        return dict(BLOCK_M=block_m, HEAD_DIM=head_dim, HAS_DLSE=False)
    precision = "ieee" if dtype == "fp32" else "tf32"
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, MAX_DISTANCE=128, HAS_BIAS=True,
                DOT_FP32=False, PRECISION=precision, USE_TMA=tma)


def _variants(head_dim: int, dtype: str, cc: int) -> list[tuple[str, int, int, int, int, bool]]:
    """(pass, block_m, block_n, num_warps, num_stages, tma) of the four launches of ``cc``'s default config."""
    import torch

    from . import pseudo_mask_attention as pma

    cfg = pma.default_config(head_dim, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                             arch=90 if cc >= 90 else 80)
    return [
        ("fwd", cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.tma),
        ("bwd_preprocess", cfg.block_m0, 0, cfg.num_warps0, 1, False),
        ("bwd_dkdv", cfg.block_m1, cfg.block_n1, cfg.num_warps1, cfg.num_stages1, cfg.tma),
        ("bwd_dq", cfg.block_m2, cfg.block_n2, cfg.num_warps2, cfg.num_stages2, cfg.tma),
    ]


def compile_one(name: str, cc: int, dtype: str, head_dim: int, block_m: int, block_n: int, num_warps: int,
                num_stages: int, tma: bool) -> dict[str, Any]:
    """Compile one attention pass for ``sm_<cc>`` and return its :class:`AotRow` fields."""
    _require_compiler()
    from . import pseudo_mask_attention as pma

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
    fn = getattr(pma, _KERNELS[name])
    signature, consts, attrs = _specialise(fn, DTYPES[dtype], _constexprs(name, head_dim, dtype, block_m, block_n, tma))
    return _compile_row(name, fn, signature, consts, attrs, cc, dtype, head_dim, block_m, block_n, num_warps,
                        num_stages, has_dot=name != "bwd_preprocess")


def _compile_row(name: str, fn: Any, signature: dict[str, str], consts: dict[str, Any], attrs: dict, cc: int,
                 dtype: str, head_dim: int, block_m: int, block_n: int, num_warps: int, num_stages: int,
                 has_dot: bool) -> dict[str, Any]:
    """Compile one specialised kernel for ``sm_<cc>`` and return its :class:`AotRow` fields."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    from . import autotune

    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    regs_log, stores, loads, stack = _ptxas_spills(ptx, sm_arch_from_capability(cc))
    regs = _cubin_registers(compiled.asm["cubin"])
    if regs != regs_log:
        raise RuntimeError(f"{name} sm_{cc}: ptxas reports {regs_log} registers but the cubin "
                           f"has {regs}; the report's ptxas flags no longer match Triton's")
    shared = int(compiled.metadata.shared)
    blocks = autotune.occupancy(90 if cc >= 90 else 80, regs, shared, num_warps)
    return asdict(AotRow(
        kernel=name, target=f"sm_{cc}", dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
        num_warps=num_warps, num_stages=num_stages, instruction=_instruction(ptx, has_dot),
        tma="cp.async.bulk.tensor" in ptx, registers=regs, spill_stores=stores, spill_loads=loads, stack=stack,
        shared=shared, occupancy=blocks * num_warps))


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
    rows: list[dict[str, Any]] = []
    for cc in targets:
        for dtype in dtypes:
            for head_dim in head_dims:
                for name, bm, bn, warps, stages, tma in _variants(head_dim, dtype, cc):
                    if kernels is None or name in kernels:
                        rows.append(compile_one(name, cc, dtype, head_dim, bm, bn, warps, stages, tma))
    return rows


def compile_fused_ce_rows(targets: Iterable[int] = TARGETS) -> list[dict[str, Any]]:
    """The fused linear cross-entropy's chunk kernel (``fused_linear_ce._ce_fwd_bwd_kernel``), without
    and with label smoothing, as launched: fp32 chunk logits (the head upcasts them), ``BLOCK_V``
    columns per iteration (``block_n``), one row per program (``block_m`` 1), no head dim (0)."""
    _require_compiler()
    from . import fused_linear_ce as flce

    rows = []
    for cc in targets:
        for smoothing in (False, True):
            signature = {"Logits": "*fp32", "stride_row": "i32", "Labels": "*i64", "Loss": "*fp32", "V": "i32",
                         "Smoothing": "*fp32", "IGNORE_INDEX": "constexpr", "HAS_SMOOTHING": "constexpr",
                         "BLOCK_V": "constexpr"}
            consts = {"IGNORE_INDEX": -100, "HAS_SMOOTHING": smoothing, "BLOCK_V": flce.BLOCK_V}
            attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(signature) if signature[k].startswith("*")}
            rows.append(_compile_row("fused_ce_smooth" if smoothing else "fused_ce", flce._ce_fwd_bwd_kernel,
                                     signature, consts, attrs, cc, "fp32", 0, 1, flce.BLOCK_V, flce.NUM_WARPS, 1,
                                     has_dot=False))
    return rows


def candidate_rows(targets: Iterable[int] = TARGETS) -> list[dict[str, Any]]:
    """Compile every candidate of :data:`autotune.AUTOTUNE_SETS` (fp16, TMA on sm_90)."""
    from . import autotune

    return [compile_one(name, arch, "fp16", hd, c.block_m, c.block_n, c.num_warps, c.num_stages, arch >= 90)
            for arch, hd, name, c in autotune.candidate_rows(list(targets))]


def measured_table(rows: Sequence[dict[str, Any]]) -> str:
    """:data:`autotune.MEASURED` entries (Python source) for :func:`candidate_rows` output."""
    lines = []
    for r in rows:
        key = (int(r["target"][3:]), r["head_dim"], r["kernel"], r["block_m"], r["block_n"], r["num_warps"],
               r["num_stages"])
        lines.append(f"    {key!r}: Resources({r['registers']}, {r['spill_stores'] + r['spill_loads']}, "
                     f"{r['shared']}, {r['instruction']!r}),")
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """GitHub-style table of :func:`compile_rows` output."""
    cols = list(AotRow.__dataclass_fields__)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES), choices=sorted(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--kernels", nargs="+", default=None, choices=list(_KERNELS))
    parser.add_argument("--candidates", action="store_true",
                        help="compile every autotune candidate (fp16) and print autotune.MEASURED entries too")
    parser.add_argument("--no-fused-ce", action="store_true", help="leave out the fused cross-entropy kernel")
    args = parser.parse_args(argv)
    if args.candidates:
        rows = candidate_rows(args.targets)
        print(format_table(rows))
        print("\n" + measured_table(rows))
        return 0  # spilling candidates are expected here: the cost model prunes them
    rows = compile_rows(args.targets, args.dtypes, args.head_dims, args.kernels)
    if not args.no_fused_ce:
        rows += compile_fused_ce_rows(args.targets)
    print(format_table(rows))
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spilling:
        print(f"\n{len(spilling)} variant(s) spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
