"""Which optimizer and LayerNorm each environment gets (``pmlm_engine.fused_ops``).

The selection is a pure function of (request, device, engine, apex present, DeepSpeed present),
so every row of the table in the module docstring is checked here without a GPU; the CPU path
is also built for real and must stay torch's AdamW with the paper's settings.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pmlm_engine import fused_ops
from pmlm_engine.optim import OptimConfig, build_optimizer
from tests.helpers import tiny_model


@pytest.mark.parametrize("name,device,engine,apex,ds,impl", [
    ("adamw", "cpu", "torch", False, True, "torch.optim.AdamW"),
    ("adamw", "cpu", "deepspeed", True, True, "torch.optim.AdamW"),  # CPU: unchanged even with apex
    ("adamw", "cuda", "torch", True, True, "apex.optimizers.FusedAdam"),
    ("lamb", "cuda", "deepspeed", True, True, "apex.optimizers.FusedLAMB"),
    ("adamw", "cuda", "torch", False, True, "torch.optim.AdamW(fused=True)"),
    ("adamw", "cuda", "torch", False, False, "torch.optim.AdamW(fused=True)"),
    ("adamw", "cuda", "deepspeed", False, True, "deepspeed.ops.adam.FusedAdam"),
    ("lamb", "cuda", "torch", False, True, "deepspeed.ops.lamb.FusedLamb"),
    ("lamb", "cuda", "deepspeed", False, True, "deepspeed.ops.lamb.FusedLamb"),
])
def test_selection_table(name, device, engine, apex, ds, impl):
    assert fused_ops.choose_optimizer(name, device, engine, apex, ds).impl == impl


def test_unservable_requests_name_the_fix():
    with pytest.raises(ValueError, match="use optim.optimizer=adamw on the CPU"):
        fused_ops.choose_optimizer("lamb", "cpu", "torch", apex=True, deepspeed=True)
    with pytest.raises(ValueError, match="apex or DeepSpeed"):
        fused_ops.choose_optimizer("lamb", "cuda", "torch", apex=False, deepspeed=False)
    with pytest.raises(ValueError, match="expected one of"):
        fused_ops.choose_optimizer("sgd", "cuda", "torch", apex=False, deepspeed=False)
    with pytest.raises(ValueError, match="optimizer='sgd' is invalid"):
        OptimConfig(optimizer="sgd")


def test_cpu_build_is_unchanged_and_logged_once(caplog: pytest.LogCaptureFixture):
    """On the CPU the optimizer is torch's AdamW (not fused, not foreach-changed) with the config's
    hyper-parameters; the choice is logged once however many times it is built; LayerNorms stay."""
    model = tiny_model(torch.float32)
    cfg = OptimConfig(lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    fused_ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="pmlm_engine.fused_ops"):
        opts = [build_optimizer(model, cfg) for _ in range(2)]
    assert all(type(o) is torch.optim.AdamW and not o.defaults["fused"] for o in opts)
    assert opts[0].defaults["lr"] == 1e-3 and opts[0].defaults["betas"] == (0.9, 0.98)
    assert [r.getMessage() for r in caplog.records].count(
        "optimizer: torch.optim.AdamW (CPU: torch's AdamW, as always; engine torch)") == 1
    assert fused_ops.fuse_layer_norms(model, "cpu") is None
    assert any(type(m) is torch.nn.LayerNorm for m in model.modules())


def test_pypi_apex_is_not_nvidia_apex(monkeypatch: pytest.MonkeyPatch):
    """An ``apex`` package without ``apex.optimizers`` (the unrelated PyPI toolkit) is not apex."""
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "apex.optimizers":
            raise ModuleNotFoundError("No module named 'apex.optimizers'", name="apex.optimizers")
        if name == "apex.normalization":
            return object()
        return real(name, *a, **k)

    monkeypatch.setattr(fused_ops.importlib, "import_module", fake)
    assert fused_ops.apex_available() is False


def test_optimizer_flag_sets_the_config():
    """``--optimizer lamb`` reaches ``optim.optimizer``; the default stays adamw."""
    from pmlm_engine.train import parse_args

    cfg, _ = parse_args(["--optimizer", "lamb"])
    assert cfg.optim.optimizer == "lamb"
    assert parse_args([])[0].optim.optimizer == "adamw"


def test_apex_wiring_with_a_stand_in(monkeypatch: pytest.MonkeyPatch):
    """With (a stand-in for) NVIDIA apex on CUDA: the optimizer is apex's FusedAdam in AdamW mode
    with the config's hyper-parameters, and every nn.LayerNorm is swapped for FusedLayerNorm with
    the same parameter names and values (so checkpoints do not change)."""
    import sys
    import types

    class FusedAdam(torch.optim.AdamW):
        def __init__(self, params, adam_w_mode: bool, **kw):
            assert adam_w_mode
            super().__init__(params, **kw)

    class FusedLayerNorm(torch.nn.LayerNorm):
        pass

    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", types.SimpleNamespace(FusedAdam=FusedAdam))
    monkeypatch.setitem(sys.modules, "apex.normalization", types.SimpleNamespace(FusedLayerNorm=FusedLayerNorm))
    assert fused_ops.apex_available()
    model = tiny_model(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_norms = sum(type(m) is torch.nn.LayerNorm for m in model.modules())
    assert fused_ops.fuse_layer_norms(model, "cuda") == "apex.normalization.FusedLayerNorm"
    assert sum(type(m) is FusedLayerNorm for m in model.modules()) == n_norms > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    opt = build_optimizer(model, OptimConfig(lr=2e-4), device_type="cuda")
    assert type(opt) is FusedAdam and opt.defaults["lr"] == 2e-4
