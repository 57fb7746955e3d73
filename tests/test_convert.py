"""Checkpoint interop: the real MiniLM checkpoint against transformers, UniLMv2 and HF round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pmlm_engine.config import ModelConfig
from pmlm_engine.convert import export_hf, import_checkpoint, load_any, normalize_state_dict, to_hf_state_dict, \
    to_unilm_state_dict
from pmlm_engine.model import PMLMModel, extend_positions


def _tiny(rel_pos_buckets: int = 32, seed: int = 0) -> PMLMModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position=64, rel_pos_buckets=rel_pos_buckets, attention_backend="reference")
    model = PMLMModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "rel_pos_bias" in name:
                p.normal_(0, 0.5)  # non-trivial biases and norms, so a swapped tensor shows
    return model


def _inputs(batch: int = 2, length: int = 11, vocab: int = 97) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    seg = (torch.arange(length) >= length // 2).long().expand(batch, -1).contiguous()
    return dict(input_ids=ids, position_ids=torch.arange(length).expand(batch, -1).contiguous(), segment_ids=seg,
                step=torch.zeros(batch, length, dtype=torch.long))


def test_minilm_hidden_states_equal_transformers():
    """Imported real MiniLM (relative bias off): our hidden states equal transformers' BertModel to 1e-5 in fp32."""
    import transformers  # a requirement of the test suite: a broken install fails, never skips
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.tokenizer import load_tokenizer

    folder = minilm_dir()
    ours, report = import_checkpoint(folder, attention_backend="reference")
    assert ours.config.rel_pos_buckets == 0 and ours.config.num_layers == 6 and ours.config.num_heads == 12
    assert report.format == "hf-bert" and "pooler.dense.weight" in report.ignored
    assert all(k.startswith("lm_head.") for k in report.initialized)
    ours.eval()
    hf = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True).eval()

    tok = load_tokenizer(folder / "vocab.txt")
    a = tok.encode("The quick brown fox jumps over the lazy dog.")
    b = tok.encode("Headlines are short.")
    rows = [[tok.cls_id, *a, tok.sep_id, *b, tok.sep_id], [tok.cls_id, *b, tok.sep_id]]
    seg_rows = [[0] * (len(a) + 2) + [1] * (len(b) + 1), [0] * (len(b) + 2)]
    n = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (n - len(r)) for r in rows])
    seg = torch.tensor([s + [0] * (n - len(s)) for s in seg_rows])
    valid = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    pos = torch.arange(n).expand(2, -1).contiguous()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid, token_type_ids=seg, position_ids=pos).last_hidden_state
        for backend in ("reference", "auto"):
            ours.set_attention_backend(backend)
            h = ours(ids, pos, seg, torch.zeros_like(ids), doc_ids=torch.where(valid.bool(), 0, -1))
            keep = valid.bool()
            torch.testing.assert_close(h[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_hf_export_loads_in_transformers_with_equal_logits(tmp_path: Path):
    """export_hf writes a folder transformers' BertForMaskedLM loads, with our MLM logits to 1e-5."""
    import transformers  # a requirement of the test suite: a broken install fails, never skips
    model = _tiny(rel_pos_buckets=0)
    export_hf(model, tmp_path / "hf")
    hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager",
                                                      local_files_only=True).eval()
    x = _inputs()
    with torch.no_grad():
        h = model(**x)
        ours = model.lm_head(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:2], -1)
        ref = hf(input_ids=x["input_ids"], token_type_ids=x["segment_ids"], position_ids=x["position_ids"]).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    back, report = import_checkpoint(tmp_path / "hf", attention_backend="reference")  # and our importer reads it back, head included
    assert report.initialized == []
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(**x), h, rtol=0, atol=0)


@pytest.mark.parametrize("with_config", [True, False])
def test_unilmv2_fused_qkv_round_trip(tmp_path: Path, with_config: bool):
    """A UniLMv2-format state dict (fused qkv, q_bias/v_bias, bert.rel_pos_bias) built from our model imports to
    a model with bit-identical outputs; without config.json the heads come from the bias table."""
    model = _tiny(rel_pos_buckets=32)
    with torch.no_grad():
        for layer in model.encoder["layer"]:
            layer.attention["self"].key.bias.zero_()  # the fused format has no key bias
    state = to_unilm_state_dict(model)
    assert "bert.encoder.layer.0.attention.self.qkv_linear.weight" in state
    assert state["bert.encoder.layer.0.attention.self.qkv_linear.weight"].shape == (96, 32)
    assert "bert.rel_pos_bias.weight" in state and not any(".query." in k or ".key." in k for k in state)
    state["bert.pooler.dense.weight"] = torch.zeros(32, 32)  # ignored, and reported
    save_file(state, str(tmp_path / "model.safetensors"))
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "layer_norm_eps": 1e-12,
                                                          "rel_pos_bins": 32, "max_rel_pos": 128}))
    back, report = import_checkpoint(tmp_path, attention_backend="reference")
    assert report.format == "unilmv2" and report.initialized == [] and "pooler.dense.weight" in report.ignored
    assert back.config == model.config
    x = _inputs()
    x["step"][:, -3:] = torch.tensor([1, -1, -1])  # a pseudo-masked tail, so the mask matters too
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(**x), model(**x), rtol=0, atol=0)


def test_unilm_export_refuses_nonzero_key_bias():
    """to_unilm_state_dict refuses a model whose key bias the fused format cannot hold."""
    with pytest.raises(ValueError, match="non-zero key bias"):
        to_unilm_state_dict(_tiny())


def test_import_errors_name_the_problem(tmp_path: Path):
    """Unknown keys, an untied decoder and unknowable head counts are clear errors."""
    model = _tiny(rel_pos_buckets=0)
    state = to_hf_state_dict(model)
    with pytest.raises(ValueError, match="unknown checkpoint key"):
        normalize_state_dict({**state, "classifier.weight": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="untied decoder"):
        normalize_state_dict({**state, "cls.predictions.decoder.weight": torch.zeros(97, 32)})
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="num_heads"):
        import_checkpoint(tmp_path)
    back, _ = import_checkpoint(tmp_path, num_heads=4)
    assert back.config.num_heads == 4
    with pytest.raises(FileNotFoundError):
        load_any(tmp_path / "missing")


def test_extend_positions_copies_rows_cyclically():
    """extend_positions grows the table by repeating the old rows cyclically and updates the config."""
    model = _tiny()
    old = model.embeddings.position_embeddings.weight.detach().clone()
    extend_positions(model, 150)
    new = model.embeddings.position_embeddings.weight
    assert new.shape == (150, 32) and model.config.max_position == 150
    torch.testing.assert_close(new[:64], old, rtol=0, atol=0)
    torch.testing.assert_close(new[64:128], old, rtol=0, atol=0)
    torch.testing.assert_close(new[128:], old[:22], rtol=0, atol=0)
    with pytest.raises(ValueError, match="new_max"):
        extend_positions(model, 10)
