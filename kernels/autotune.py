"""Per-architecture launch configurations of the pseudo-mask attention kernels, and the cost model
that picks them.

Each pass (forward, backward dK/dV, backward dQ, backward preprocess) has, per GPU architecture
(sm_80, sm_90) and head dim, an *autotune set*: candidate tiles, warps and pipeline stages. The
tile lists the kernels walk are built on the host for one tile size before launch, so the choice
cannot be left to ``triton.autotune`` timing launches; it is made here, ahead of time:

1. **Prune by resources.** :data:`MEASURED` holds, for every candidate, the registers, spill
   bytes, shared memory and tensor-core instruction of the kernel compiled for that architecture
   (``python -m pmlm_engine.kernels.aot_report --candidates`` regenerates it; ``tests/test_aot.py``
   recompiles the defaults and checks them against this table). A candidate that spills, needs
   more shared memory than a block may have, or (on sm_90) does not use ``wgmma`` is dropped.
2. **Rank by a cost model on real layouts.** :func:`pass_cost` counts, with the exact tile
   classes of a layout (:func:`tile_stats.tile_classes_multi`), the full and partial tiles every
   program computes, prices a tile by the larger of its tensor-core, element-wise and load time
   (datasheet peaks, :data:`ARCHS`), adds a per-program cost, spreads the programs over the SMs
   and divides by a latency-hiding factor from the occupancy (:func:`occupancy`: resident warps
   per SM from registers and shared memory). Larger tiles reuse each loaded tile for more rows
   but skip less of a pseudo-mask; the model weighs the two on the layout.

The defaults (:func:`default_passes`) are the cost-model winners on the pre-training layouts the
engine builds (``tests/test_autotune.py`` recomputes the ranking). The model ranks; it does not
predict times, and it has not been checked against a GPU (none was available): its constants
are peak rates from NVIDIA's A100 / H100 SXM datasheets, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from .tile_stats import FULL, PARTIAL, tile_classes_multi

PASSES = ("fwd", "bwd_dkdv", "bwd_dq")  # the passes with matmuls; the preprocess is a row reduction


@dataclass(frozen=True)
class Arch:
    """What the cost model and the occupancy estimate need to know about a GPU architecture."""

    sms: int  # streaming multiprocessors (A100 SXM 108, H100 SXM 132)
    mma_flops: int  # dense fp16/bf16 tensor-core FLOP per cycle per SM
    alu_ops: int  # fp32 lanes: element-wise ops per cycle per SM
    exp_ops: int  # special-function unit (ex2) results per cycle per SM
    load_bytes: int  # L2 -> SM bytes per cycle per SM (the streamed tiles mostly hit L2)
    smem_per_sm: int  # shared memory per SM usable by blocks, bytes
    smem_per_block: int  # the most one block may request, bytes
    instruction: str  # tensor-core instruction a candidate must use to be kept ("" = any)


ARCHS: dict[int, Arch] = {
    80: Arch(sms=108, mma_flops=2048, alu_ops=128, exp_ops=16, load_bytes=32, smem_per_sm=167936,
             smem_per_block=166912, instruction=""),
    90: Arch(sms=132, mma_flops=4096, alu_ops=128, exp_ops=16, load_bytes=32, smem_per_sm=233472,
             smem_per_block=232448, instruction="wgmma"),
}
REGISTERS_PER_SM = 65536
MAX_REGISTERS = 255  # per thread
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KiB of shared memory per resident block


@dataclass(frozen=True)
class PassConfig:
    """One launch configuration of one pass: tile (``block_m`` queries x ``block_n`` keys), warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 2


@dataclass(frozen=True)
class Resources:
    """What ptxas and Triton report for one compiled candidate (fp16; bf16 compiles the same)."""

    registers: int
    spills: int  # spill store + load bytes
    shared: int  # bytes
    instruction: str  # "wgmma", "mma.sync" or "fma"


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM: the smallest of the register, shared-memory, warp and block limits.

    Registers are allocated per warp in units of 256; every block also costs 1 KiB of reserved
    shared memory. (CUDA's occupancy calculator, for compute capability 8.0 and 9.0.)
    """
    a = ARCHS[arch]
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = REGISTERS_PER_SM // (per_warp * num_warps)
    by_smem = a.smem_per_sm // (shared + SMEM_RESERVED_PER_BLOCK)
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)


# The autotune sets: arch -> head dim -> pass -> candidates. The first of each is the default
# (the cost model's winner on the engine's pre-training layouts, checked by tests/test_autotune.py).
AUTOTUNE_SETS: dict[int, dict[int, dict[str, tuple[PassConfig, ...]]]] = {
    80: {
        64: {
            "fwd": (PassConfig(128, 64, 8), PassConfig(64, 64, 4), PassConfig(128, 64, 4), PassConfig(128, 32, 4)),
            "bwd_dkdv": (PassConfig(16, 128, 8), PassConfig(32, 128, 8), PassConfig(32, 64, 4), PassConfig(16, 64, 4)),
            "bwd_dq": (PassConfig(32, 64, 4), PassConfig(64, 64, 4), PassConfig(128, 64, 8), PassConfig(64, 32, 4)),
        },
        128: {
            "fwd": (PassConfig(64, 64, 8), PassConfig(128, 64, 8), PassConfig(128, 32, 8)),
            "bwd_dkdv": (PassConfig(16, 64, 8), PassConfig(32, 64, 8), PassConfig(16, 128, 8)),
            "bwd_dq": (PassConfig(64, 64, 8), PassConfig(64, 32, 8), PassConfig(128, 32, 8)),
        },
    },
    90: {
        64: {
            "fwd": (PassConfig(128, 128, 8), PassConfig(128, 64, 8), PassConfig(128, 64, 8, 3), PassConfig(128, 64, 4),
                    PassConfig(64, 64, 4)),
            "bwd_dkdv": (PassConfig(32, 128, 8), PassConfig(16, 128, 8), PassConfig(64, 128, 8), PassConfig(32, 64, 4),
                         PassConfig(64, 64, 4)),
            "bwd_dq": (PassConfig(128, 64, 8), PassConfig(64, 64, 4), PassConfig(64, 32, 4), PassConfig(128, 32, 8)),
        },
        128: {
            "fwd": (PassConfig(128, 64, 8), PassConfig(128, 64, 8, 3), PassConfig(128, 32, 8), PassConfig(64, 64, 4)),
            "bwd_dkdv": (PassConfig(32, 64, 8), PassConfig(16, 64, 8), PassConfig(32, 128, 8), PassConfig(64, 64, 8)),
            "bwd_dq": (PassConfig(128, 32, 8), PassConfig(64, 32, 8), PassConfig(64, 64, 8), PassConfig(64, 32, 4)),
        },
    },
}

# Backward preprocess (delta = rowsum(dO * O)): no matmul, memory-bound; rows per program and warps.
PREPROCESS: dict[int, PassConfig] = {80: PassConfig(64, 0, 4, 1), 90: PassConfig(128, 0, 4, 1)}

# Measured by ``aot_report --candidates`` (triton 3.7.1, fp16, relative bias on, TMA on for sm_90):
# (arch, head_dim, pass, block_m, block_n, num_warps, num_stages) -> Resources.
MEASURED: dict[tuple[int, int, str, int, int, int, int], Resources] = {
    (80, 64, 'fwd', 64, 64, 4, 2): Resources(184, 0, 41472, 'mma.sync'),
    (80, 64, 'fwd', 128, 64, 8, 2): Resources(177, 0, 66048, 'mma.sync'),
    (80, 64, 'fwd', 128, 64, 4, 2): Resources(255, 0, 66048, 'mma.sync'),
    (80, 64, 'fwd', 128, 32, 4, 2): Resources(255, 0, 41216, 'mma.sync'),
    (80, 64, 'bwd_dkdv', 16, 128, 8, 2): Resources(226, 0, 53504, 'mma.sync'),
    (80, 64, 'bwd_dkdv', 32, 128, 8, 2): Resources(255, 0, 74240, 'mma.sync'),
    (80, 64, 'bwd_dkdv', 32, 64, 4, 2): Resources(255, 0, 41472, 'mma.sync'),
    (80, 64, 'bwd_dkdv', 16, 64, 4, 2): Resources(219, 0, 28928, 'mma.sync'),
    (80, 64, 'bwd_dq', 32, 64, 4, 2): Resources(159, 0, 35328, 'mma.sync'),
    (80, 64, 'bwd_dq', 64, 64, 4, 2): Resources(255, 0, 51712, 'mma.sync'),
    (80, 64, 'bwd_dq', 128, 64, 8, 2): Resources(255, 0, 86528, 'mma.sync'),
    (80, 64, 'bwd_dq', 64, 32, 4, 2): Resources(255, 0, 35072, 'mma.sync'),
    (80, 128, 'fwd', 64, 64, 8, 2): Resources(177, 0, 74240, 'mma.sync'),
    (80, 128, 'fwd', 128, 64, 8, 2): Resources(255, 0, 98816, 'mma.sync'),
    (80, 128, 'fwd', 128, 32, 8, 2): Resources(255, 0, 65792, 'mma.sync'),
    (80, 128, 'bwd_dkdv', 16, 64, 8, 2): Resources(234, 0, 49408, 'mma.sync'),
    (80, 128, 'bwd_dkdv', 32, 64, 8, 2): Resources(255, 0, 61952, 'mma.sync'),
    (80, 128, 'bwd_dkdv', 16, 128, 8, 2): Resources(255, 24, 90368, 'mma.sync'),
    (80, 128, 'bwd_dq', 64, 32, 8, 2): Resources(177, 0, 61696, 'mma.sync'),
    (80, 128, 'bwd_dq', 64, 64, 8, 2): Resources(227, 0, 86528, 'mma.sync'),
    (80, 128, 'bwd_dq', 128, 32, 8, 2): Resources(255, 108, 102656, 'mma.sync'),
    (90, 64, 'fwd', 128, 64, 8, 2): Resources(158, 0, 83232, 'wgmma'),
    (90, 64, 'fwd', 128, 64, 8, 3): Resources(176, 0, 83236, 'wgmma'),
    (90, 64, 'fwd', 128, 128, 8, 2): Resources(236, 0, 149024, 'wgmma'),
    (90, 64, 'fwd', 128, 64, 4, 2): Resources(227, 0, 83232, 'wgmma'),
    (90, 64, 'fwd', 64, 64, 4, 2): Resources(153, 0, 58656, 'wgmma'),
    (90, 64, 'bwd_dkdv', 16, 128, 8, 2): Resources(182, 0, 57616, 'wgmma'),
    (90, 64, 'bwd_dkdv', 32, 128, 8, 2): Resources(232, 0, 82448, 'wgmma'),
    (90, 64, 'bwd_dkdv', 64, 128, 8, 2): Resources(255, 400, 132368, 'wgmma'),
    (90, 64, 'bwd_dkdv', 32, 64, 4, 2): Resources(232, 0, 49680, 'wgmma'),
    (90, 64, 'bwd_dkdv', 64, 64, 4, 2): Resources(255, 644, 83216, 'wgmma'),
    (90, 64, 'bwd_dq', 64, 64, 4, 2): Resources(168, 0, 66848, 'wgmma'),
    (90, 64, 'bwd_dq', 128, 64, 8, 2): Resources(173, 0, 99616, 'wgmma'),
    (90, 64, 'bwd_dq', 64, 32, 4, 2): Resources(128, 0, 41248, 'wgmma'),
    (90, 64, 'bwd_dq', 128, 32, 8, 2): Resources(126, 0, 65824, 'wgmma'),
    (90, 128, 'fwd', 128, 64, 8, 2): Resources(200, 0, 131616, 'wgmma'),
    (90, 128, 'fwd', 128, 64, 8, 3): Resources(239, 0, 131876, 'wgmma'),
    (90, 128, 'fwd', 128, 32, 8, 2): Resources(172, 0, 82208, 'wgmma'),
    (90, 128, 'fwd', 64, 64, 4, 2): Resources(205, 0, 99616, 'wgmma'),
    (90, 128, 'bwd_dkdv', 16, 64, 8, 2): Resources(183, 0, 57616, 'wgmma'),
    (90, 128, 'bwd_dkdv', 32, 64, 8, 2): Resources(218, 0, 82448, 'wgmma'),
    (90, 128, 'bwd_dkdv', 32, 128, 8, 2): Resources(255, 532, 131600, 'wgmma'),
    (90, 128, 'bwd_dkdv', 64, 64, 8, 2): Resources(255, 408, 132368, 'wgmma'),
    (90, 128, 'bwd_dq', 64, 32, 8, 2): Resources(144, 0, 74016, 'wgmma'),
    (90, 128, 'bwd_dq', 64, 64, 8, 2): Resources(204, 0, 116000, 'wgmma'),
    (90, 128, 'bwd_dq', 128, 32, 8, 2): Resources(188, 0, 114976, 'wgmma'),
    (90, 128, 'bwd_dq', 64, 32, 4, 2): Resources(184, 0, 74016, 'wgmma'),
}


def usable(arch: int, head_dim: int, name: str, cand: PassConfig) -> Optional[str]:
    """None when ``cand`` survives the resource pruning, else why it is dropped."""
    res = MEASURED.get((arch, head_dim, name, cand.block_m, cand.block_n, cand.num_warps, cand.num_stages))
    if res is None:
        return "not compiled (run aot_report --candidates)"
    if res.spills:
        return f"spills {res.spills} bytes"
    if res.registers >= MAX_REGISTERS:
        return f"at the {MAX_REGISTERS}-register ceiling (no headroom: ptxas is already rematerialising)"
    if res.shared > ARCHS[arch].smem_per_block:
        return f"needs {res.shared} bytes of shared memory"
    if ARCHS[arch].instruction and res.instruction != ARCHS[arch].instruction:
        return f"uses {res.instruction}, not {ARCHS[arch].instruction}"
    return None


# Element-wise work per score of a tile (fp32 ops; one ex2 each), by pass: scaling, row max / sum,
# rescale (forward); dP - delta, dS, casts (backward). The bias adds an index clamp and a gather
# (and in dK/dV an atomic add of dS, priced as 4 ops); a partial tile adds the mask rule.
_ALU_PER_SCORE = {"fwd": 10, "bwd_dkdv": 10, "bwd_dq": 8}
_BIAS_PER_SCORE = {"fwd": 6, "bwd_dkdv": 10, "bwd_dq": 6}
_MASK_PER_SCORE = 10
_MATMULS = {"fwd": 2, "bwd_dkdv": 4, "bwd_dq": 3}
_PROGRAM_CYCLES = 2000  # launch, prologue (stationary tile load) and epilogue of one program
_TILE_CYCLES = 200  # per visited tile: tile-list index load, pipeline wait, loop and barrier overhead


def _tile_cycles(arch: int, name: str, cand: PassConfig, head_dim: int, elem_bytes: int, partial: bool) -> float:
    a = ARCHS[arch]
    scores = cand.block_m * cand.block_n
    mma = _MATMULS[name] * 2 * scores * head_dim / a.mma_flops
    alu = scores * (_ALU_PER_SCORE[name] + _BIAS_PER_SCORE[name] + (_MASK_PER_SCORE if partial else 0)) / a.alu_ops
    alu += scores / a.exp_ops
    if name == "fwd":  # online softmax: the (block_m, head_dim) accumulator is rescaled once per tile
        alu += cand.block_m * head_dim / a.alu_ops
    streamed_rows = cand.block_m if name == "bwd_dkdv" else cand.block_n  # Q, dO or K, V rows per tile
    load = (2 * streamed_rows * head_dim * elem_bytes + 12 * streamed_rows) / a.load_bytes
    return _TILE_CYCLES + max(mma, alu, load)


def pass_cost(arch: int, head_dim: int, name: str, cand: PassConfig, classes: Tensor, num_heads: int,
              elem_bytes: int = 2) -> float:
    """Modelled cycles of one pass over a batch: ``classes`` ``(B, n_q_tiles, n_k_tiles)`` at ``cand``'s tile.

    Programs own a query tile (forward, dQ) or a key tile (dK/dV) of one (row, head) and walk its
    full and partial tiles. Time is the larger of "all work spread evenly over the SMs" and "the
    longest program", divided by a latency-hiding factor ``min(1, resident warps / 8)``.
    """
    res = MEASURED[(arch, head_dim, name, cand.block_m, cand.block_n, cand.num_warps, cand.num_stages)]
    if name == "bwd_dkdv":
        classes = classes.transpose(1, 2)
    full = (classes == FULL).sum(dim=-1).double()  # (B, programs per row)
    part = (classes == PARTIAL).sum(dim=-1).double()
    per_program = (_PROGRAM_CYCLES + full * _tile_cycles(arch, name, cand, head_dim, elem_bytes, False)
                   + part * _tile_cycles(arch, name, cand, head_dim, elem_bytes, True))
    total = float(per_program.sum()) * num_heads
    warps = occupancy(arch, res.registers, res.shared, cand.num_warps) * cand.num_warps
    hiding = min(1.0, warps / 8)
    return max(total / ARCHS[arch].sms, float(per_program.max())) / hiding


Layout = tuple[Tensor, Tensor, Tensor, Tensor]  # q_step, q_doc, k_step, k_doc, each (B, L) int


def rank(arch: int, head_dim: int, name: str, layouts: Iterable[Layout], num_heads: int = 12,
         elem_bytes: int = 2) -> list[tuple[PassConfig, Optional[float], Optional[str]]]:
    """Every candidate of one pass with its summed modelled cost over ``layouts`` (None if pruned)
    and why it was pruned (None if kept), cheapest first, pruned last."""
    cands = AUTOTUNE_SETS[arch][head_dim][name]
    kept = [c for c in cands if usable(arch, head_dim, name, c) is None]
    cost = {c: 0.0 for c in kept}
    for q_step, q_doc, k_step, k_doc in layouts:
        if kept:
            classes = tile_classes_multi(q_step, q_doc, k_step, k_doc, [(c.block_m, c.block_n) for c in kept])
            for c, cls in zip(kept, classes):
                cost[c] += pass_cost(arch, head_dim, name, c, cls, num_heads, elem_bytes)
    out: list[tuple[PassConfig, Optional[float], Optional[str]]] = sorted(
        ((c, cost[c], None) for c in kept), key=lambda row: row[1])
    return out + [(c, None, usable(arch, head_dim, name, c)) for c in cands if c not in cost]


def default_passes(arch: int, head_dim: int) -> dict[str, PassConfig]:
    """The default configuration of every pass (the first candidate of each autotune set)."""
    return {name: AUTOTUNE_SETS[arch][head_dim][name][0] for name in PASSES} | {"bwd_preprocess": PREPROCESS[arch]}


def current_arch(device: Optional[torch.device] = None) -> int:
    """The autotune architecture for a CUDA device: 90 for compute capability 9.x and above, else 80."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def candidate_rows(archs: Sequence[int] = tuple(ARCHS)) -> list[tuple[int, int, str, PassConfig]]:
    """``(arch, head_dim, pass, candidate)`` of every autotune set (what ``aot_report --candidates`` compiles)."""
    return [(arch, hd, name, c) for arch in archs for hd, sets in AUTOTUNE_SETS[arch].items()
            for name, cands in sets.items() for c in cands]
