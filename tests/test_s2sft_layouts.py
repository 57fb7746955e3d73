"""s2s-ft checkpoint layouts: each one built key by key from random weights, imported, exported, compared.

The layouts are restated here from s2s-ft's modeling and save code, independently of
``pmlm_engine.convert``:

* pre-trained UniLMv2: ``bert.*`` with fused ``qkv_linear.weight`` / ``q_bias`` / ``v_bias``,
  ``bert.rel_pos_bias.weight``, ``cls.predictions.*`` (decoder weight left out, as saved), pooler;
* converted (s2s-ft's ``unilm_to_hf_bert`` output): separate query/key/value (key bias zero) and
  the table renamed ``bert.encoder.rel_pos_bias.weight``;
* fine-tuned (``BertForSequenceToSequenceWithPseudoMask.save_pretrained``): separate q/k/v,
  ``bert.rel_pos_bias.weight``, ``cls.predictions.decoder_weight`` (= word embedding), no pooler
  (``BertForSeq2SeqConfig`` builds none), ``crit_mask_lm_smoothed.one_hot`` when smoothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pmlm_engine.config import ModelConfig
from pmlm_engine.convert import export_s2sft, import_checkpoint, normalize_state_dict
from pmlm_engine.model import PMLMModel

V, C, LAYERS, HEADS, FFN, POS, BUCKETS = 53, 16, 2, 2, 24, 40, 8


def _random_layer_dict(g: torch.Generator, split_qkv: bool, key_bias_zero: bool = True) -> dict[str, torch.Tensor]:
    """``bert.*`` encoder tensors of one random model, s2s-ft names, fused or split attention."""
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    d = {
        "bert.embeddings.word_embeddings.weight": r(V, C),
        "bert.embeddings.position_embeddings.weight": r(POS, C),
        "bert.embeddings.token_type_embeddings.weight": r(2, C),
        "bert.embeddings.LayerNorm.weight": 1 + 0.1 * r(C),
        "bert.embeddings.LayerNorm.bias": r(C),
    }
    for i in range(LAYERS):
        p = f"bert.encoder.layer.{i}."
        if split_qkv:
            for name in ("query", "key", "value"):
                d[p + f"attention.self.{name}.weight"] = r(C, C)
                d[p + f"attention.self.{name}.bias"] = torch.zeros(C) if name == "key" and key_bias_zero else r(C)
        else:
            d[p + "attention.self.qkv_linear.weight"] = r(3 * C, C)
            d[p + "attention.self.q_bias"] = r(C)
            d[p + "attention.self.v_bias"] = r(C)
        d[p + "attention.output.dense.weight"] = r(C, C)
        d[p + "attention.output.dense.bias"] = r(C)
        d[p + "attention.output.LayerNorm.weight"] = 1 + 0.1 * r(C)
        d[p + "attention.output.LayerNorm.bias"] = r(C)
        d[p + "intermediate.dense.weight"] = r(FFN, C)
        d[p + "intermediate.dense.bias"] = r(FFN)
        d[p + "output.dense.weight"] = r(C, FFN)
        d[p + "output.dense.bias"] = r(C)
        d[p + "output.LayerNorm.weight"] = 1 + 0.1 * r(C)
        d[p + "output.LayerNorm.bias"] = r(C)
    d.update({
        "cls.predictions.transform.dense.weight": r(C, C),
        "cls.predictions.transform.dense.bias": r(C),
        "cls.predictions.transform.LayerNorm.weight": 1 + 0.1 * r(C),
        "cls.predictions.transform.LayerNorm.bias": r(C),
        "cls.predictions.bias": r(V),
    })
    return d


def _layout(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "pretrained":
        d = _random_layer_dict(g, split_qkv=False)
        d["bert.rel_pos_bias.weight"] = torch.randn(HEADS, BUCKETS, generator=g)
        d["bert.pooler.dense.weight"] = torch.randn(C, C, generator=g)
        d["bert.pooler.dense.bias"] = torch.randn(C, generator=g)
    elif kind == "converted":
        d = _random_layer_dict(g, split_qkv=True)
        d["bert.encoder.rel_pos_bias.weight"] = torch.randn(HEADS, BUCKETS, generator=g)
    elif kind == "finetuned":
        d = _random_layer_dict(g, split_qkv=True, key_bias_zero=False)
        d["bert.rel_pos_bias.weight"] = torch.randn(HEADS, BUCKETS, generator=g)
        d["cls.predictions.decoder_weight"] = d["bert.embeddings.word_embeddings.weight"]
        one_hot = torch.full((1, V), 0.1 / (V - 2))
        one_hot[0, 0] = 0
        d["crit_mask_lm_smoothed.one_hot"] = one_hot
    else:
        raise AssertionError(kind)
    return d


def _write(tmp: Path, state: dict[str, torch.Tensor]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / "pytorch_model.bin")
    (tmp / "config.json").write_text(json.dumps({"num_attention_heads": HEADS, "rel_pos_bins": BUCKETS,
                                                 "max_rel_pos": 32, "layer_norm_eps": 1e-12,
                                                 "source_type_id": 0, "target_type_id": 1,
                                                 "label_smoothing": 0.1}))
    return tmp


def _expected_params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names for a layout, restated: prefixes off, fused attention split, table renamed."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("bert.")
        if k.startswith(("pooler.", "crit_mask_lm_smoothed.")) or k == "cls.predictions.decoder_weight":
            continue
        k = k.replace("cls.predictions.", "lm_head.").replace("encoder.rel_pos_bias", "rel_pos_bias")
        if k.endswith("qkv_linear.weight"):
            p = k.removesuffix("qkv_linear.weight")
            out[p + "query.weight"], out[p + "key.weight"], out[p + "value.weight"] = v.split(C, 0)
            continue
        if k.endswith("q_bias"):
            p = k.removesuffix("q_bias")
            out[p + "query.bias"], out[p + "key.bias"] = v, torch.zeros(C)
            continue
        if k.endswith("v_bias"):
            out[k.removesuffix("v_bias") + "value.bias"] = v
            continue
        out[k] = v
    return out


@pytest.mark.parametrize("kind", ["pretrained", "converted", "finetuned"])
def test_s2sft_layout_imports_and_round_trips(tmp_path: Path, kind: str):
    """Each s2s-ft layout imports tensor for tensor; exporting to the fine-tuned layout and importing that
    again gives the same parameters; for the fine-tuned layout the export equals the input key for key."""
    state = _layout(kind)
    model, report = import_checkpoint(_write(tmp_path / "in", state), attention_backend="reference")
    assert report.initialized == []
    ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.embedding.weight"}
    want = _expected_params(state)
    assert set(ours) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    assert model.config.rel_pos_buckets == BUCKETS and model.config.num_heads == HEADS
    if kind == "finetuned":
        assert "crit_mask_lm_smoothed.one_hot" in report.ignored
        assert "cls.predictions.decoder_weight (tied)" in report.ignored

    export_s2sft(model, tmp_path / "out", label_smoothing=0.1)
    exported = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    back, _ = import_checkpoint(tmp_path / "out", attention_backend="reference")
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0, msg=k)
    if kind == "finetuned":
        assert set(exported) == set(state)
        for k, v in state.items():
            torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=k)


def _s2sft_decoder_param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Parameters s2s-ft's ``BertForSeq2SeqDecoder`` (decode_seq2seq.py) builds from its config.json,
    restated from its modeling_decoding code: BertModelIncr (+ pooler) and BertPreTrainingHeads."""
    c, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    shapes = {
        "bert.embeddings.word_embeddings.weight": (v, c),
        "bert.embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], c),
        "bert.embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], c),
        "bert.embeddings.LayerNorm.weight": (c,), "bert.embeddings.LayerNorm.bias": (c,),
        "bert.pooler.dense.weight": (c, c), "bert.pooler.dense.bias": (c,),
        "cls.predictions.transform.dense.weight": (c, c), "cls.predictions.transform.dense.bias": (c,),
        "cls.predictions.transform.LayerNorm.weight": (c,), "cls.predictions.transform.LayerNorm.bias": (c,),
        "cls.predictions.bias": (v,), "cls.predictions.decoder.weight": (v, c),
        "cls.seq_relationship.weight": (2, c), "cls.seq_relationship.bias": (2,),
    }
    if cfg["rel_pos_bins"] > 0:
        shapes["bert.rel_pos_bias.weight"] = (cfg["num_attention_heads"], cfg["rel_pos_bins"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            shapes[p + f"attention.self.{n}.weight"], shapes[p + f"attention.self.{n}.bias"] = (c, c), (c,)
        shapes.update({p + "attention.output.dense.weight": (c, c), p + "attention.output.dense.bias": (c,),
                       p + "attention.output.LayerNorm.weight": (c,), p + "attention.output.LayerNorm.bias": (c,),
                       p + "intermediate.dense.weight": (f, c), p + "intermediate.dense.bias": (f,),
                       p + "output.dense.weight": (c, f), p + "output.dense.bias": (c,),
                       p + "output.LayerNorm.weight": (c,), p + "output.LayerNorm.bias": (c,)})
    return shapes


@pytest.mark.parametrize("buckets", [0, BUCKETS])
def test_s2sft_export_matches_decode_seq2seq_names_and_shapes(tmp_path: Path, buckets: int):
    """Every parameter s2s-ft's decoder needs is in the export with its shape, except the ones its loader
    leaves at their init by design (pooler, next-sentence head) or ties (decoder.weight = embedding); the
    only extra keys are the two a fine-tuned s2s-ft checkpoint carries; config.json has s2s-ft's fields."""
    torch.manual_seed(0)
    model = PMLMModel(ModelConfig(vocab_size=V, hidden_size=C, num_layers=LAYERS, num_heads=HEADS,
                                  intermediate_size=FFN, max_position=POS, rel_pos_buckets=buckets))
    export_s2sft(model, tmp_path / "out", label_smoothing=0.1)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("source_type_id", "target_type_id", "rel_pos_bins", "max_rel_pos", "label_smoothing",
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "hidden_act"):
        assert key in cfg, key
    assert (cfg["source_type_id"], cfg["target_type_id"], cfg["rel_pos_bins"]) == (0, 1, buckets)
    state = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    need = _s2sft_decoder_param_shapes(cfg)
    by_design = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
                 "cls.seq_relationship.bias", "cls.predictions.decoder.weight"}
    for k, shape in need.items():
        if k not in by_design:
            assert k in state and tuple(state[k].shape) == shape, k
    assert set(state) - set(need) == {"cls.predictions.decoder_weight", "crit_mask_lm_smoothed.one_hot"}
    assert torch.equal(state["cls.predictions.decoder_weight"], state["bert.embeddings.word_embeddings.weight"])
    one_hot = state["crit_mask_lm_smoothed.one_hot"]
    assert one_hot.shape == (1, V) and one_hot[0, 0] == 0
    assert torch.allclose(one_hot[0, 1:], torch.tensor(0.1 / (V - 2)))


def test_both_decoder_names_or_both_tables_are_refused():
    """A checkpoint with the decoder (or the bias table) under two names is ambiguous: an error."""
    state = _layout("finetuned")
    with pytest.raises(ValueError, match="both"):
        normalize_state_dict({**state, "cls.predictions.decoder.weight": state["cls.predictions.decoder_weight"]})
    with pytest.raises(ValueError, match="both map to"):
        normalize_state_dict({**state, "bert.encoder.rel_pos_bias.weight": state["bert.rel_pos_bias.weight"]})
    bad = dict(state)
    bad["cls.predictions.decoder_weight"] = torch.zeros(V, C)
    with pytest.raises(ValueError, match="decoder_weight differs"):
        normalize_state_dict(bad)
