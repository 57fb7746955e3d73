"""FLOP and byte model of the two fused pseudo-mask attention kernels on real layouts.

Nothing runs on a GPU: this counts, for the Triton kernel (``pmlm_engine.kernels``, at its default
fp16/bf16 tiles) and the CUDA kernel (``pmlm_engine.cuda_attention``, at its bf16 tiles), both with
exact tile classes, how many
(query tile, key tile) pairs each pass computes against the dense count, the matmul FLOPs of the
computed tiles, the bytes they stream from global memory, and the arithmetic intensity
(FLOP per byte) of one computed tile and of the whole pass. Per attention head.

Layouts: pre-training (8 rows of 512 main tokens at mask ratio 0.15, padded; and the same
examples packed into 666-token rows) and fine-tuning (8 source/target pairs, 464 source and up
to 48 target tokens, as s2s-ft's CNN/DM recipe).

    python benchmarks/attention_flop_model.py [--head-dim 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pmlm_engine import cuda_attention as ca
from pmlm_engine.config import MaskingConfig
from pmlm_engine.kernels import pseudo_mask_attention as pma
from pmlm_engine.layout import SpecialIds, build_example_python, build_seq2seq_example, collate_packed, collate_padded

SPECIAL = SpecialIds(cls=1, sep=2, mask=3, pad=0, pseudo=4, random_lo=5, random_hi=1000)


def pretrain_batch(packed: bool, rows: int = 8, length: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(rows):
        n = int(rng.integers(length // 2, length - 1)) if packed else length - 2
        tokens = np.concatenate([[SPECIAL.cls], rng.integers(SPECIAL.random_lo, SPECIAL.random_hi, n), [SPECIAL.sep]])
        maskable = np.r_[False, np.ones(n, bool), False]
        examples.append(build_example_python(tokens, np.zeros(n + 2, np.int64), maskable, seed + i,
                                             MaskingConfig(mask_ratio=0.15), SPECIAL))
    return collate_packed(examples, SPECIAL.pad, 666) if packed else collate_padded(examples, SPECIAL.pad)


def finetune_batch(rows: int = 8, src: int = 464, tgt: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    examples = [build_seq2seq_example(rng.integers(SPECIAL.random_lo, SPECIAL.random_hi, int(rng.integers(src // 2, src))),
                                      rng.integers(SPECIAL.random_lo, SPECIAL.random_hi, int(rng.integers(tgt // 2, tgt))),
                                      SPECIAL, seed=seed + i) for i in range(rows)]
    return collate_padded(examples, SPECIAL.pad)


def triton_model(step: torch.Tensor, doc: torch.Tensor, head_dim: int) -> dict[str, dict[str, float]]:
    """The same quantities for the Triton kernel (its tile lists, its default fp16/bf16 tiles)."""
    cfg = pma.default_config(head_dim, torch.bfloat16)
    out = {}
    for name, stats in pma.flop_model(step, doc, head_dim=head_dim, dtype=torch.bfloat16, config=cfg).items():
        bm, bn = stats.block_m, stats.block_n
        computed = stats.partial + stats.full
        matmuls = {"fwd": 2, "bwd_dkdv": 4, "bwd_dq": 3}[name]
        # Streamed per computed tile: K, V (forward, dQ) or Q, dO, lse, delta (dK/dV), 2-byte operands.
        per_tile = 2 * bm * head_dim * 2 + 8 * bm if name == "bwd_dkdv" else 2 * bn * head_dim * 2
        out[name] = {"block_m": bm, "block_n": bn, "empty": stats.empty, "partial": stats.partial, "full": stats.full,
                     "computed_fraction": stats.computed_fraction, "visible_fraction": stats.visible_fraction,
                     "flops": computed * matmuls * 2 * bm * bn * head_dim,
                     "intensity": matmuls * 2 * bm * bn * head_dim / per_tile}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    args = parser.parse_args()
    layouts = {"pre-training, padded (8 x 666)": pretrain_batch(False),
               "pre-training, packed rows of 666": pretrain_batch(True),
               "fine-tuning, padded (8 x <= 562)": finetune_batch()}
    print(f"head_dim={args.head_dim}, bf16 operands, FLOPs per head; intensity = FLOP/byte of one computed tile")
    print("| layout | kernel | pass | tile | computed / dense tiles | visible pairs | GFLOP | "
          "intensity (tile) | intensity (pass, incl. stationary + metadata) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, batch in layouts.items():
        step, doc = batch["step"], batch["doc_ids"]
        models = {"triton": triton_model(step, doc, args.head_dim),
                  "cuda": ca.flop_model(step, doc, head_dim=args.head_dim, dtype=torch.bfloat16)}
        for kernel, passes in models.items():
            for name, m in passes.items():
                overall = f"{m['overall_intensity']:.0f}" if "overall_intensity" in m else "-"
                print(f"| {label} | {kernel} | {name} | {m['block_m']} x {m['block_n']} | "
                      f"{m['computed_fraction']:.1%} | {m['visible_fraction']:.1%} | {m['flops'] / 1e9:.3f} | "
                      f"{m['intensity']:.0f} | {overall} |")


if __name__ == "__main__":
    main()
