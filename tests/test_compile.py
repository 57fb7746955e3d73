"""``model.compile=true``: the encoder compiles as one graph per layer, and compiled equals eager.

The graph-break test is per attention backend: a break inside a layer would split the layer's
graph (and run part of it eagerly on every step). The equality tests train-step the same
weights eagerly and compiled (inductor, CPU) and compare the AE and PAR losses and every
parameter gradient; tolerances follow the dtype (fp32: inductor fuses and reorders reductions,
so ~1e-5 relative; bf16 autocast: a few bf16 ulps).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pmlm_engine.config import ModelConfig
from pmlm_engine.engine import PMLMTrainStep
from pmlm_engine.layout import collate_padded
from pmlm_engine.model import PMLMModel
from tests.helpers import SPECIAL, VOCAB, random_example

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position": 64,
        "hidden_dropout": 0.0}


def _batch():
    """Three examples of different lengths (padding), masked main tokens and appended pseudo tokens."""
    rng = np.random.default_rng(5)
    return collate_padded([random_example(rng, n, seed=i) for i, n in enumerate((23, 17, 30))], SPECIAL.pad,
                          pad_to_multiple=8)


def _model(backend: str, compile: bool = False) -> PMLMModel:
    torch.manual_seed(0)
    return PMLMModel(ModelConfig(vocab_size=VOCAB, attention_backend=backend, compile=compile, **TINY))


def _layer_args(model: PMLMModel, batch):
    """The arguments the model's forward passes to its first layer."""
    seen = {}
    hook = model.encoder["layer"][0].register_forward_pre_hook(lambda mod, args: seen.setdefault("args", args))
    with torch.no_grad():
        model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
    hook.remove()
    return seen["args"]


@pytest.mark.parametrize("backend", ["sdpa", "reference", "torch", "triton"])
def test_encoder_layer_has_no_graph_breaks(backend):
    """torch._dynamo.explain over a layer of a real PMLM batch (appended tokens, padding, relative
    bias): one graph, no break. ``triton`` runs its custom ops through their fake kernels; ``torch``
    (the structured CPU path) keeps its data-dependent plan in the per-forward layout."""
    torch._dynamo.reset()
    model = _model(backend)
    explained = torch._dynamo.explain(model.encoder["layer"][0])(*_layer_args(model, _batch()))
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


def _step(module: PMLMTrainStep, batch, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ae, par = module(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"],
                         batch["doc_ids"], batch["labels"])
    (ae / 7 + par / 3).backward()
    return ae.detach(), par.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast,rtol,atol", [(False, 2e-5, 1e-6), (True, 3e-2, 2e-3)])
def test_compiled_step_equals_eager(autocast, rtol, atol):
    """Same weights, same batch: compiled (``ModelConfig.compile``) and eager AE/PAR losses and
    gradients agree within the dtype's tolerance; parameter names are unchanged by compiling."""
    torch._dynamo.reset()
    eager = _model("torch")  # the structured CPU path: auto's choice on the CPU
    compiled = _model("torch", compile=True)
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = _batch()
    want = _step(PMLMTrainStep(eager), batch, autocast)
    got = _step(PMLMTrainStep(compiled), batch, autocast)
    assert compiled._compiled is not None
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol)
    assert got[2].keys() == want[2].keys()
    for name, g in want[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=rtol, atol=atol * max(1.0, g.abs().max().item()), msg=name)


def test_model_compile_config_field_reaches_the_model():
    """``model.compile=true`` in a training config builds a model whose layers run compiled (wrappers outside
    the module tree: same parameter names); cached decoding runs the eager layers."""
    from pmlm_engine.model import KVCache
    from pmlm_engine.train_config import load_config

    cfg = load_config(None, ["model.compile=true"]).model.build(VOCAB)
    assert cfg.compile is True
    model = PMLMModel(cfg)
    assert model._compiled is not None and len(model._compiled) == cfg.num_layers
    assert model._layers(None) is model._compiled
    assert model._layers(KVCache()) == list(model.encoder["layer"])
    assert not any("_orig_mod" in name for name in model.state_dict())


def test_compile_flag_reaches_pretraining_and_finetuning(tmp_path):
    """``--compile`` sets ``model.compile`` in both training entry points, and a fine-tune built with
    it trains through the compiled layers (the pre-training model compiles from its config above)."""
    from pmlm_engine import cli
    from pmlm_engine.checkpoint import save_model
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.finetune import FinetuneTask
    from pmlm_engine.engine import DistEnv
    from pmlm_engine.tokenizer import load_tokenizer

    train_cfg, _ = cli.parse("train", ["--compile"])
    assert train_cfg.model.build(VOCAB).compile is True
    assert cli.parse("train", [])[0].model.build(VOCAB).compile is False
    for kind in ("train", "finetune"):
        with pytest.raises(ValueError, match="zero_stage=3"):
            cli.parse(kind, ["--compile", "--zero-stage", "3"])

    vocab = minilm_dir() / "vocab.txt"
    torch.manual_seed(0)
    init = save_model(PMLMModel(ModelConfig(vocab_size=load_tokenizer(vocab).vocab_size, **TINY)), tmp_path / "init",
                      extra={"tokenizer": str(vocab)})
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"src": "the harbour works", "tgt": "harbour"}\n')
    for flags, compiled in ((["--compile"], True), ([], False)):
        cfg, _ = cli.parse("finetune", ["--init", str(init), "--corpus", str(data), "--out", str(tmp_path / "o"),
                                        *flags])
        assert cfg.model.compile is compiled
        task = FinetuneTask(cfg)
        task.prepare(DistEnv())
        assert (task.model._compiled is not None) is compiled
