"""The typed job configuration and the DeepSpeed configuration generated from it.

Proves: JSON + dotted overrides build the nested config with types checked; unknown keys and
bad values are refused with their dotted name; batch sizes that do not fit the world size,
DeepSpeed overrides that contradict the typed config (train_batch_size, ZeRO stage, clipping,
an optimizer or scheduler set in both places), unknown DeepSpeed keys, and combinations
that cannot run are refused before anything is built, naming the field and the fix.
"""

from __future__ import annotations

import json

import pytest

from pmlm_engine.cli import parse
from pmlm_engine.engine import (
    DistEnv,
    check_world,
    deepspeed_config,
    merge_deepspeed_overrides,
    read_deepspeed_overrides,
)
from pmlm_engine.train import main as train_main
from pmlm_engine.train_config import from_dict, load_config, to_dict


def parse_args(argv):
    return parse("train", argv)


def test_json_file_then_shortcuts_then_set(tmp_path):
    """Precedence is defaults < --config < shortcut flags < --set; values are typed from the dataclasses."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"steps": 50, "model": {"preset": "small", "num_layers": 2},
                                "data": {"batch_size": 4, "masking": {"mask_ratio": 0.2}},
                                "optim": {"lr": 1e-4, "betas": [0.9, 0.95]}}))
    cfg, _ = parse_args(["--config", str(path), "--lr", "2e-4", "--corpus", "news", "wiki",
                         "--set", "data.batch_size=8", "optim.warmup_steps=5", "checkpoint.every=10",
                         "data.corpus=[\"a.txt\"]", "logging.tensorboard=false"])
    assert cfg.steps == 50 and cfg.model.preset == "small" and cfg.model.overrides == {"num_layers": 2}
    assert cfg.data.batch_size == 8 and cfg.data.masking.mask_ratio == 0.2 and cfg.data.corpus == ["a.txt"]
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.warmup_steps == 5
    assert cfg.checkpoint.every == 10 and cfg.logging.tensorboard is False
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg  # the JSON form round-trips


@pytest.mark.parametrize("overrides,match", [
    (["optim.learning_rate=1"], r"unknown key\(s\) \['optim.learning_rate'\] in section 'optim'"),
    (["bogus=1"], r"unknown key\(s\) \['bogus'\] in the top level"),
    (["model.hidden=64"], r"unknown key\(s\) \['model.hidden'\]"),
    (["data.masking.ratio=0.2"], r"\['data.masking.ratio'\]"),
    (["data.batch_size=abc"], r"data.batch_size='abc' must be an integer"),
    (["optim.lr=-1"], r"optim.lr=-1.0 is invalid"),
    (["checkpoint.keep=0"], r"checkpoint.keep=0 is invalid"),
    (["deepspeed.zero_stage=4"], r"deepspeed.zero_stage=4 is invalid"),
    (["precision=fp8"], r"precision='fp8' is invalid"),
    (["global_batch_size=10", "data.batch_size=4"], r"global_batch_size=10 is not a multiple of data.batch_size"),
    (["optim"], r"expected KEY=VALUE"),
    (["ae_weight=0", "par_weight=0"], r"ae_weight=0.0, par_weight=0.0 are invalid"),
    (["threads=-1"], r"threads=-1 is invalid"),
])
def test_bad_values_and_unknown_keys_are_named(overrides, match):
    """Every refusal names the dotted key."""
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_unknown_key_in_config_file_names_the_file(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"data": {"batchsize": 8}}))
    with pytest.raises(ValueError, match=r"\['data.batchsize'\].*job.json"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(path)


def test_batch_sizes_must_fit_the_world_size():
    """global_batch_size must equal data.batch_size * grad_accum * world size once the world is known."""
    cfg = load_config(None, ["engine=deepspeed", "data.batch_size=4", "grad_accum=2", "global_batch_size=8"])
    check_world(cfg, DistEnv(0, 1, 0))
    with pytest.raises(ValueError, match=r"global_batch_size=8 != data.batch_size \* grad_accum \* world size = "
                                         r"4 \* 2 \* 2 = 16"):
        check_world(cfg, DistEnv(0, 2, 0))


def test_precision_auto_is_resolved_by_capability(monkeypatch):
    """precision=auto is bf16 exactly where the hardware has native bf16; explicit values are kept."""
    from pmlm_engine import train_config

    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(train_config, "native_bf16", lambda native=native: native)
        assert load_config(None, []).resolved_precision() == want
        assert load_config(None, ["precision=fp32"]).resolved_precision() == "fp32"


def test_engine_and_precision_combinations():
    """torch runs one process and no fp16; DeepSpeed-only fields need engine=deepspeed; no fp16 on the CPU."""
    with pytest.raises(ValueError, match="engine=torch runs one process but WORLD_SIZE=2"):
        check_world(load_config(None, ["engine=torch"]), DistEnv(0, 2, 0))
    with pytest.raises(ValueError, match="deepspeed.zero_stage=2 needs engine=deepspeed"):
        check_world(load_config(None, ["engine=torch", "deepspeed.zero_stage=2"]), DistEnv())
    with pytest.raises(ValueError, match="precision=fp16 needs engine=deepspeed"):
        check_world(load_config(None, ["engine=torch", "precision=fp16"]), DistEnv())
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU accelerator does not train in fp16"):
            check_world(load_config(None, ["engine=deepspeed", "precision=fp16"]), DistEnv())


def test_generated_deepspeed_config_is_the_typed_config():
    """One source of truth: batch sizes, clipping, ZeRO stage and precision come from the TrainConfig."""
    cfg = load_config(None, ["data.batch_size=3", "grad_accum=2", "optim.grad_clip=0.5", "deepspeed.zero_stage=2",
                             "precision=bf16"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds and "scheduler" not in ds  # torch AdamW + the warmup/decay schedule
    fp16 = deepspeed_config(load_config(None, ["precision=fp16", "deepspeed.initial_scale_power=12"]), 1)["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 12, "loss_scale_window": 1000,
                    "hysteresis": 2, "min_loss_scale": 1.0}  # dynamic loss scaling


@pytest.mark.parametrize("overrides,match", [
    ({"train_batch_size": 32}, r"train_batch_size=32 != train_micro_batch_size_per_gpu \* gradient_accumulation_steps"
                               r" \* world size = 4 \* 1 \* 2 = 8"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, r"'optimizer' cannot be set.*optim.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, r"'scheduler' cannot be set.*optim.warmup_steps"),
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage=3 contradicts.*deepspeed.zero_stage gives 1"),
    ({"gradient_clipping": 0.3}, r"gradient_clipping=0.3 contradicts.*optim.grad_clip gives 1.0"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled=True contradicts.*precision"),
    ({"fp16": {"initial_scale_power": 8}}, r"fp16.initial_scale_power=8 has no effect unless precision=fp16"),
    ({"zero_optimisation": {"stage": 1}}, r"unknown DeepSpeed key 'zero_optimisation'"),
])
def test_contradicting_deepspeed_overrides_are_refused(overrides, match):
    cfg = load_config(None, ["engine=deepspeed", "data.batch_size=4", "deepspeed.zero_stage=1", "precision=fp32"])
    with pytest.raises(ValueError, match=match):
        merge_deepspeed_overrides(deepspeed_config(cfg, 2), overrides, "ds.json")


def test_agreeing_and_extra_overrides_are_merged(tmp_path):
    cfg = load_config(None, ["engine=deepspeed", "data.batch_size=4", "deepspeed.zero_stage=2"])
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "gradient_clipping": 1, "zero_optimization": {
        "stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000000}, "wall_clock_breakdown": False}))
    ds = merge_deepspeed_overrides(deepspeed_config(cfg, 2), read_deepspeed_overrides(path))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000000}
    assert ds["train_batch_size"] == 8 and ds["wall_clock_breakdown"] is False


@pytest.mark.slow
def test_deepspeed_validates_the_merged_config(tmp_path):
    """Keys inside sections are checked by DeepSpeed's own parser, before any training (imports DeepSpeed, ~3 s)."""
    from pmlm_engine.engine import build_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comms": True}}))
    cfg = load_config(None, ["engine=deepspeed", "deepspeed.zero_stage=2", f"deepspeed.overrides={path}"])
    with pytest.raises(ValueError, match=r"DeepSpeed refused deepspeed.overrides file .*ds.json.*overlap_comms"):
        build_deepspeed_config(cfg, 1)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    assert build_deepspeed_config(cfg, 1)["zero_optimization"]["overlap_comm"] is False


def test_cli_prints_errors_and_the_resolved_config(capsys, tmp_path):
    """The CLI exits 2 with `error: ...` on a bad config; --print-config shows the generated DeepSpeed config."""
    assert train_main(["--set", "optim.lrr=1"]) == 2
    assert "['optim.lrr']" in capsys.readouterr().err
    assert train_main(["--engine", "torch", "--steps", "40", "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["steps"] == 40 and from_dict(shown) == parse_args(["--engine", "torch", "--steps", "40"])[0]


def test_attention_backend_is_tried_in_the_training_precision():
    """A backend that cannot run under the chosen precision is refused before training, with the fix."""
    import torch

    from pmlm_engine.attention import register_backend, unregister_backend
    from pmlm_engine.dense_attention import DenseBackend, reference_attention
    from pmlm_engine.engine import check_attention

    def fp32_only(q, k, v, *args):
        if q.dtype != torch.float32:
            raise RuntimeError("expected scalar type Float")
        return reference_attention(q, k, v, *args)

    register_backend(DenseBackend("fp32-only-test", fp32_only, supports_dropout=False))
    try:
        check_attention("fp32-only-test", "fp32", torch.device("cpu"))
        check_attention("sdpa", "bf16", torch.device("cpu"))
        with pytest.raises(ValueError, match=r"model.attention_backend='fp32-only-test' .* fails under "
                                             r"precision=bf16 .*set model.attention_backend=sdpa or precision=fp32"):
            check_attention("fp32-only-test", "bf16", torch.device("cpu"))
    finally:
        unregister_backend("fp32-only-test")
