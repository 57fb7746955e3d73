"""The per-architecture autotune sets of the Triton attention kernel and the cost model that prunes and
ranks them (``pmlm_engine.kernels.autotune``). CPU only: tile classes of real layouts and the
resources table that ``tests/test_aot.py`` checks against the compiler."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import pytest
import torch

from pmlm_engine.kernels import autotune as at
from pmlm_engine.kernels import pseudo_mask_attention as pma
from tests.test_pseudo_mask_attention import engine_layout


@lru_cache(maxsize=1)
def pretraining_layouts() -> list[at.Layout]:
    """The engine's pre-training layouts: 8 rows of 510 + 2 main tokens at mask ratio 0.15, padded;
    and examples of 255..509 tokens packed into rows of 666 (as benchmarks/attention_flop_model.py)."""
    padded = engine_layout([510] * 8, seed=0, ratio=0.15)
    lengths = torch.randint(255, 510, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    packed = engine_layout(lengths, seed=1, ratio=0.15, packed_len=666)
    return [(lay.step, lay.doc, lay.step, lay.doc) for lay in (padded, packed)]


@pytest.mark.parametrize("arch", sorted(at.ARCHS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_defaults_are_the_cost_model_winners(arch: int, head_dim: int):
    """For every pass, the default (first candidate of the autotune set) survives the resource
    pruning and is the cheapest survivor on the pre-training layouts; on sm_90 every survivor uses
    wgmma and the forward tile is at least 128 x 64 (FlashAttention-2/3's)."""
    for name in at.PASSES:
        ranked = at.rank(arch, head_dim, name, pretraining_layouts())
        best, cost, why = ranked[0]
        assert why is None and cost is not None, ranked
        assert best == at.AUTOTUNE_SETS[arch][head_dim][name][0], (name, ranked)
        for cand, cost, why in ranked:
            res = at.MEASURED[(arch, head_dim, name, cand.block_m, cand.block_n, cand.num_warps, cand.num_stages)]
            if why is None:
                assert res.spills == 0 and res.shared <= at.ARCHS[arch].smem_per_block
                assert arch != 90 or res.instruction == "wgmma", (name, cand, res)
    if arch == 90:
        fwd = at.AUTOTUNE_SETS[90][head_dim]["fwd"][0]
        assert fwd.block_m * fwd.block_n >= 128 * 64 and fwd.block_m >= 128


def test_pruning_reasons():
    """A spilling candidate, one beyond the shared-memory limit and (on sm_90 only) one without
    wgmma are dropped with the reason; an unmeasured one is dropped, not guessed."""
    cand = at.AUTOTUNE_SETS[90][64]["bwd_dkdv"][0]
    key = (90, 64, "bwd_dkdv", cand.block_m, cand.block_n, cand.num_warps, cand.num_stages)
    good = at.MEASURED[key]
    assert at.usable(90, 64, "bwd_dkdv", cand) is None
    cases = {"spills": dataclasses.replace(good, spills=8),
             "shared memory": dataclasses.replace(good, shared=at.ARCHS[90].smem_per_block + 1),
             "not wgmma": dataclasses.replace(good, instruction="mma.sync")}
    for reason, res in cases.items():
        patched = dict(at.MEASURED)
        patched[key] = res
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(at, "MEASURED", patched)
            why = at.usable(90, 64, "bwd_dkdv", cand)
        assert why is not None and reason.split()[-1] in why, (reason, why)
    assert "not compiled" in at.usable(90, 64, "bwd_dkdv", at.PassConfig(256, 256, 8))
    # mma.sync is fine on sm_80 (no wgmma there).
    cand80 = at.AUTOTUNE_SETS[80][64]["bwd_dq"][0]
    assert at.MEASURED[(80, 64, "bwd_dq", cand80.block_m, cand80.block_n, cand80.num_warps,
                        cand80.num_stages)].instruction == "mma.sync"
    assert at.usable(80, 64, "bwd_dq", cand80) is None


def test_occupancy_limits():
    """Resident blocks per SM follow CUDA's occupancy rules: registers per warp rounded up to 256,
    1 KiB reserved shared memory per block, 64 warps and 32 blocks per SM."""
    assert at.occupancy(90, 255, 1024, 4) == 2  # 8192 registers per warp x 4 warps -> 2 blocks of 64K
    assert at.occupancy(90, 128, 0, 4) == 4  # registers: 65536 / (4096 * 4)
    assert at.occupancy(80, 32, 0, 1) == 32  # block limit
    assert at.occupancy(80, 32, 0, 4) == 16  # warp limit: 64 / 4
    assert at.occupancy(80, 64, 80 * 1024, 4) == 2  # shared memory: 164 KiB / 81 KiB
    assert at.occupancy(90, 64, 100 * 1024, 4) == 2  # 228 KiB / 101 KiB


def test_cost_model_trades_reuse_against_skipping():
    """On a dense layout (nothing to skip) the larger forward tile is cheaper; on a layout whose
    visible pairs lie in small diagonal blocks the smaller tile wins (it skips more); with too few
    programs to fill the SMs (one row), smaller tiles win too (more parallelism)."""
    B, L = 8, 1024
    dense = torch.zeros(B, L, dtype=torch.long)
    doc_dense = torch.zeros(B, L, dtype=torch.long)
    blocky = torch.arange(L).div(64, rounding_mode="floor").expand(B, L)  # 16 documents of 64 tokens
    big, small = at.PassConfig(128, 64, 8), at.PassConfig(64, 64, 4)
    for step, doc, cheaper in ((dense, doc_dense, big), (dense, blocky, small), (dense[:1], doc_dense[:1], small)):
        costs = {}
        for cand in (big, small):
            cls = at.tile_classes_multi(step, doc, step, doc, [(cand.block_m, cand.block_n)])[0]
            costs[cand] = at.pass_cost(90, 64, "fwd", cand, cls, num_heads=12)
        assert min(costs, key=costs.get) == cheaper, costs


def test_block_configs_per_architecture():
    """``default_config`` gives each architecture its own passes, from the autotune sets; sm_90 loads
    through TMA, sm_80 does not; the interpreter (no GPU) uses sm_80's; fp32 is architecture-free;
    an unknown architecture is an error."""
    for hd in (64, 128):
        for arch in (80, 90):
            cfg = pma.default_config(hd, torch.bfloat16, arch=arch)
            p = at.default_passes(arch, hd)
            assert (cfg.block_m, cfg.block_n, cfg.num_warps) == (p["fwd"].block_m, p["fwd"].block_n, p["fwd"].num_warps)
            assert (cfg.block_m1, cfg.block_n1) == (p["bwd_dkdv"].block_m, p["bwd_dkdv"].block_n)
            assert (cfg.block_m2, cfg.block_n2) == (p["bwd_dq"].block_m, p["bwd_dq"].block_n)
            assert cfg.block_m0 == p["bwd_preprocess"].block_m and cfg.tma == (arch == 90)
        assert pma.default_config(hd, torch.float16) == pma.default_config(hd, torch.float16, arch=80)
        assert pma.default_config(hd, torch.float32, arch=90) == pma.FP32_CONFIGS[hd]
    assert pma.default_config(64, torch.float16, arch=90) != pma.default_config(64, torch.float16, arch=80)
    with pytest.raises(ValueError, match="arch=70"):
        pma.default_config(64, torch.float16, arch=70)
    values = pma._cfg_values(pma.default_config(64, torch.float16, arch=90))
    assert pma._cfg(values) == pma.default_config(64, torch.float16, arch=90)
