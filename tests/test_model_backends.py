"""The model trains the same through every attention backend (Triton under the interpreter included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmlm_engine.config import MaskingConfig
from pmlm_engine.layout import collate_packed, collate_padded
from pmlm_engine.losses import pmlm_loss
from pmlm_engine.optim import OptimConfig, build_optimizer

from .helpers import SPECIAL, random_example, tiny_model


def _train(backend: str, batches, steps: int = 3):
    """A few AdamW steps in fp32; returns the losses and the gradients of the first step."""
    model = tiny_model(torch.float32, seed=0, backend=backend, num_heads=2)  # head dim 16
    model.train()  # dropout is 0.1 on hidden states: seed it identically for every backend
    opt = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
    losses, first_grads = [], None
    for i in range(steps):
        torch.manual_seed(100 + i)
        batch = batches[i % len(batches)]
        h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
        out = pmlm_loss(h, batch["labels"], batch["step"], model.lm_head)
        opt.zero_grad()
        out.loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(out.loss.item())
    return losses, first_grads


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    examples = [random_example(rng, n, 50 + i, MaskingConfig(mask_ratio=0.3)) for i, n in enumerate([23, 40, 9, 31])]
    return [collate_padded(examples[:2], SPECIAL.pad), collate_packed(examples, SPECIAL.pad, row_len=90)]


@pytest.mark.parametrize("backend", ["sdpa", "torch", "triton"])
def test_training_matches_reference_backend(backend, batches):
    """Losses over three training steps (padded and packed batches) and first-step gradients of every
    parameter, the relative bias table included, match the dense reference backend in fp32."""
    ref_losses, ref_grads = _train("reference", batches)
    losses, grads = _train(backend, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and "rel_pos_bias.weight" in grads
    for name, g in grads.items():
        # fp32 sums in a different order: relative error ~1e-6 per op, a few layers deep
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_bf16_autocast_forward_and_backward(backend, batches):
    """Under CPU bf16 autocast (the trainer's bf16 mode) every CPU backend runs forward and backward,
    also with backward called inside the autocast region. Error rule as for the kernels: against
    an fp32 run, the backend's loss and bias-table gradient err by at most twice what the dense
    reference backend errs under the same autocast, plus a floor of 1e-3 of the largest value."""

    def run(name: str, bf16: bool):
        model = tiny_model(torch.float32, seed=0, backend=name, num_heads=2)
        batch = batches[1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"],
                      batch["doc_ids"])
            out = pmlm_loss(h, batch["labels"], batch["step"], model.lm_head)
            out.loss.backward()
        return torch.cat([out.loss.detach().reshape(1), model.rel_pos_bias.weight.grad.flatten()])

    exact = run("reference", bf16=False)
    ref_err = (run("reference", bf16=True) - exact).abs()
    err = (run(backend, bf16=True) - exact).abs()
    for part, name in ((slice(0, 1), "loss"), (slice(1, None), "bias-table gradient")):
        bound = 2 * ref_err[part].max() + 1e-3 * exact[part].abs().max()
        assert err[part].max() <= bound, f"{name}: max error {float(err[part].max()):.3g} > {float(bound):.3g}"
