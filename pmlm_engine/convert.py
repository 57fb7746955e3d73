"""Checkpoint interop: Hugging Face BERT and UniLMv2 (s2s-ft) weights in, Hugging Face BERT and s2s-ft out.

Our parameter names are Hugging Face ``BertModel``'s without the ``bert.`` prefix, plus
``rel_pos_bias.weight`` ``(heads, buckets)`` and the tied MLM head ``lm_head.*``
(:mod:`pmlm_engine.model`). Importing maps, in order:

* ``bert.`` / ``module.`` prefixes are stripped; TF-era ``LayerNorm.gamma/beta`` become ``weight/bias``;
* ``cls.predictions.transform.*`` -> ``lm_head.transform.*``, ``cls.predictions.bias`` ->
  ``lm_head.bias``; ``cls.predictions.decoder.weight`` (Hugging Face) and
  ``cls.predictions.decoder_weight`` (s2s-ft's fine-tuned checkpoints, whose LM head holds the
  embedding as a plain attribute) must equal the word embedding (our head is tied; an untied
  decoder is refused, not dropped), ``cls.predictions.decoder.bias`` must equal
  ``cls.predictions.bias``;
* s2s-ft layouts: the pre-trained UniLMv2 table ``bert.rel_pos_bias.weight`` and the name s2s-ft's
  own converter gives it, ``bert.encoder.rel_pos_bias.weight``, both become ``rel_pos_bias.weight``;
  a fine-tuned checkpoint's ``crit_mask_lm_smoothed.one_hot`` (the label-smoothing loss's constant
  target row, a buffer, no weight) is ignored and listed;
* UniLMv2 fused attention (PMLM.md section 5): ``attention.self.qkv_linear.weight`` ``(3C, C)``
  is split into query / key / value rows in that order; ``q_bias`` and ``v_bias`` are the
  query and value biases; the key bias is zero;
* ignored, and listed in the :class:`ImportReport`: ``pooler.*``, ``cls.seq_relationship.*``
  (next-sentence head), the ``embeddings.position_ids`` buffer and s2s-ft's
  ``crit_mask_lm_smoothed.one_hot``. Any other unknown key is an error.

The configuration comes from tensor shapes (vocabulary, width, layers, FFN width, positions,
segments, relative-bias buckets and heads) and, for what shapes cannot tell, from a
``config.json`` beside the weights: ``num_attention_heads`` (or the bias table's rows),
``layer_norm_eps``, ``hidden_act`` (only ``gelu`` is supported) and UniLMv2's ``rel_pos_bins`` /
``max_rel_pos``. Parameters the checkpoint lacks (an MLM head for a plain ``BertModel``,
a relative bias table asked for with ``rel_pos_buckets``) are initialized fresh and listed
in the report: the MLM head with the model's normal init, an added bias table with zeros
(so the imported encoder computes exactly what the checkpoint computed).

Exporting writes Hugging Face ``BertForMaskedLM`` weights (``bert.*`` + ``cls.predictions.*``,
the tied decoder left out as ``save_pretrained`` does) and a ``config.json`` in ``BertConfig``'s
schema. A relative bias table has no place in ``BertModel``: it is written as
``bert.rel_pos_bias.weight`` (with ``rel_pos_bins`` / ``max_rel_pos`` in the config), which
:func:`import_checkpoint` reads back and ``transformers`` ignores -- with a warning logged here,
because such a model then computes something else under ``transformers``.

:func:`export_s2sft` writes s2s-ft's *fine-tuned* layout instead, the one its
``decode_seq2seq.py`` loads: ``pytorch_model.bin`` with separate query/key/value, the bias table
as ``bert.rel_pos_bias.weight``, ``cls.predictions.decoder_weight`` (the tied embedding, stored
as s2s-ft's ``save_pretrained`` stores it), the label-smoothing buffer when ``label_smoothing > 0``,
and a ``config.json`` in s2s-ft's ``BertForSeq2SeqConfig`` schema (``source_type_id`` 0,
``target_type_id`` 1, ``rel_pos_bins``, ``max_rel_pos``, ``label_smoothing``); the tokenizer's
``vocab.txt`` is copied beside it when the model folder has one.

Nothing here unpickles arbitrary objects: ``.bin`` files are read with ``torch.load(weights_only=True)``.

CLI::

    python -m pmlm_engine.convert import minilm runs/minilm            # HF BERT -> model folder
    python -m pmlm_engine.convert import unilm2.bin runs/unilm2 --num-heads 12
    python -m pmlm_engine.convert export-hf runs/news-ft runs/news-ft-hf   # model folder -> HF BERT
    python -m pmlm_engine.convert export-s2s-ft runs/news-ft/final runs/news-ft-s2sft  # -> s2s-ft fine-tuned
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import CONFIG as OUR_CONFIG
from .checkpoint import atomic_dir, check_finite, load_model, model_tokenizer, read_config, read_safetensors, save_model
from .config import ModelConfig
from .errors import run_cli
from .model import PMLMModel
from .outputs import check_output_dir

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_IGNORED = (re.compile(r"^pooler\."), re.compile(r"^cls\.seq_relationship\."),
            re.compile(r"^embeddings\.position_ids$"), re.compile(r"^crit_mask_lm_smoothed\.one_hot$"))
S2SFT_SMOOTHING_KEY = "crit_mask_lm_smoothed.one_hot"
"""s2s-ft's ``LabelSmoothingLoss`` buffer, saved in every fine-tuned checkpoint trained with smoothing."""
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.")


@dataclass
class ImportReport:
    """What :func:`import_checkpoint` did besides copying tensors one to one."""

    source: str
    """The weights file read."""
    format: str
    """``"hf-bert"`` (separate query/key/value) or ``"unilmv2"`` (fused ``qkv_linear``)."""
    ignored: list[str] = field(default_factory=list)
    """Checkpoint keys left out on purpose (pooler, next-sentence head, position-id buffer)."""
    initialized: list[str] = field(default_factory=list)
    """Our parameters the checkpoint lacks, initialized fresh."""


# --------------------------------------------------------------------------- reading


def _resolve_weights(path: Path) -> tuple[Path, Optional[Path]]:
    """The weights file and the ``config.json`` beside it (None if absent)."""
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                weights = path / name
                break
        else:
            raise FileNotFoundError(f"{path} holds none of {HF_WEIGHT_FILES}: pass a Hugging Face BERT folder, "
                                    "a .safetensors / .bin file, or a model folder written by pmlm_engine")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    cfg = weights.parent / "config.json"
    return weights, (cfg if cfg.is_file() else None)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], Optional[dict[str, Any]], Path]:
    """Tensors and (if present) the JSON config of a checkpoint file or folder.

    Returns:
        ``(state, config_or_None, weights_file)``.
    """
    weights, cfg_file = _resolve_weights(Path(path))
    if weights.suffix == ".safetensors":
        state = read_safetensors(weights)
    elif weights.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors of every kind; re-raised with the fix
            raise ValueError(f"{weights} could not be read as a tensor-only checkpoint ({type(exc).__name__}: "
                             f"{exc}); convert it to safetensors with the code that wrote it") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    else:
        raise ValueError(f"{weights}: unknown weights suffix {weights.suffix!r}; expected .safetensors or .bin")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{weights} does not hold a flat name -> tensor state dict")
    check_finite(state, f"checkpoint {weights}")
    config = None
    if cfg_file is not None:
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file} is not valid JSON ({exc}); fix or remove it") from None
    return dict(state), config, weights


def normalize_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str, list[str]]:
    """Map a BERT / UniLMv2 state dict onto our parameter names (see the module docstring).

    Returns:
        ``(ours, format, ignored_keys)``; ``format`` is ``"unilmv2"`` if any fused ``qkv_linear`` was split.

    Raises:
        ValueError: an unknown key, an untied decoder, or a fused layer missing a piece.
    """
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "bert."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        if k == "encoder.rel_pos_bias.weight":  # s2s-ft's converter's name for the bias table
            k = "rel_pos_bias.weight"
        if k in renamed:
            raise ValueError(f"checkpoint keys {key!r} and another key both map to {k!r}: mixed prefixes?")
        renamed[k] = value

    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    fused: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    decoder_w = decoder_b = None
    decoder_key = ""
    for k, v in renamed.items():
        if any(p.search(k) for p in _IGNORED):
            ignored.append(k)
        elif k.startswith("cls.predictions.transform."):
            out["lm_head.transform." + k[len("cls.predictions.transform."):]] = v
        elif k == "cls.predictions.bias":
            out["lm_head.bias"] = v
        elif k in ("cls.predictions.decoder.weight", "cls.predictions.decoder_weight"):
            if decoder_w is not None:
                raise ValueError("checkpoint holds both cls.predictions.decoder.weight and "
                                 "cls.predictions.decoder_weight; expected one LM decoder")
            decoder_w, decoder_key = v, k
        elif k == "cls.predictions.decoder.bias":
            decoder_b = v
        elif (m := re.match(r"^(encoder\.layer\.\d+\.attention\.self)\.(qkv_linear\.weight|q_bias|v_bias)$", k)):
            fused.setdefault(m.group(1), {})[m.group(2)] = v
        elif k.startswith(("embeddings.", "encoder.layer.")) or k == "rel_pos_bias.weight":
            out[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"unknown checkpoint key(s) {unknown[:8]}{' ...' if len(unknown) > 8 else ''}: expected "
                         "Hugging Face BERT or UniLMv2 names (embeddings.*, encoder.layer.*, rel_pos_bias.weight, "
                         "cls.predictions.*, pooler.*)")
    for prefix, parts in fused.items():
        missing = {"qkv_linear.weight", "q_bias", "v_bias"} - set(parts)
        if missing:
            raise ValueError(f"fused attention {prefix} lacks {sorted(missing)}: a UniLMv2 layer stores "
                             "qkv_linear.weight (3C, C), q_bias (C) and v_bias (C)")
        w = parts["qkv_linear.weight"]
        if w.dim() != 2 or w.shape[0] != 3 * w.shape[1]:
            raise ValueError(f"{prefix}.qkv_linear.weight has shape {tuple(w.shape)}; expected (3C, C)")
        c = w.shape[1]
        q, k_, v_ = w[:c], w[c:2 * c], w[2 * c:]
        out[f"{prefix}.query.weight"], out[f"{prefix}.key.weight"], out[f"{prefix}.value.weight"] = q, k_, v_
        out[f"{prefix}.query.bias"] = parts["q_bias"]
        out[f"{prefix}.key.bias"] = torch.zeros_like(parts["q_bias"])
        out[f"{prefix}.value.bias"] = parts["v_bias"]
    emb = out.get("embeddings.word_embeddings.weight")
    if decoder_w is not None:
        if emb is None or decoder_w.shape != emb.shape or not torch.equal(decoder_w, emb):
            raise ValueError(f"{decoder_key} differs from embeddings.word_embeddings.weight: our LM "
                             "head is tied to the input embedding and cannot hold an untied decoder")
        ignored.append(f"{decoder_key} (tied)")
    if decoder_b is not None:
        bias = out.get("lm_head.bias")
        if bias is None:
            out["lm_head.bias"] = decoder_b
        elif not torch.equal(bias, decoder_b):
            raise ValueError("cls.predictions.decoder.bias differs from cls.predictions.bias; expected one tied bias")
        ignored.append("cls.predictions.decoder.bias (tied)")
    return out, ("unilmv2" if fused else "hf-bert"), ignored


def infer_config(
    state: dict[str, Tensor],
    hf_config: Optional[dict[str, Any]] = None,
    num_heads: Optional[int] = None,
    rel_pos_buckets: Optional[int] = None,
    **overrides: Any,
) -> ModelConfig:
    """Our :class:`ModelConfig` for a normalized state dict (see :func:`normalize_state_dict`).

    Shapes give vocabulary, width, layers, FFN width, positions and segments; heads come from
    ``num_heads``, else ``hf_config["num_attention_heads"]``, else the relative bias table's rows.
    ``rel_pos_buckets=None`` keeps the checkpoint's table (0 when it has none); a positive
    value on a checkpoint without a table adds a zero one.
    """
    hf_config = hf_config or {}
    need = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "encoder.layer.0.intermediate.dense.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}: not a BERT-style encoder")
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := _LAYER_RE.match(k)))
    table = state.get("rel_pos_bias.weight")
    heads = num_heads or hf_config.get("num_attention_heads") or (table.shape[0] if table is not None else None)
    if heads is None:
        raise ValueError("cannot tell the number of attention heads from tensor shapes: pass num_heads "
                         "(--num-heads) or put a config.json with num_attention_heads beside the weights")
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} in the checkpoint config: only exact (erf) 'gelu' is implemented")
    pos_type = hf_config.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ValueError(f"position_embedding_type={pos_type!r}: only 'absolute' (plus our relative bias) is supported")
    if table is not None:
        buckets = table.shape[1]
        if rel_pos_buckets not in (None, buckets):
            raise ValueError(f"rel_pos_buckets={rel_pos_buckets} but the checkpoint's table has {buckets} buckets")
        if table.shape[0] != heads:
            raise ValueError(f"rel_pos_bias.weight has {table.shape[0]} rows but the model has {heads} heads")
    else:
        buckets = rel_pos_buckets or 0
    if "layer_norm_eps" not in hf_config:
        log.info("no layer_norm_eps in the checkpoint config: using BERT's 1e-12")
    cfg = dict(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=int(heads),
        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        rel_pos_buckets=buckets,
        rel_pos_max_distance=int(hf_config.get("max_rel_pos", hf_config.get("rel_pos_max_distance", 128))),
        initializer_range=float(hf_config.get("initializer_range", 0.02)),
    )
    if "hidden_dropout_prob" in hf_config:
        cfg["hidden_dropout"] = float(hf_config["hidden_dropout_prob"])
    cfg.update(overrides)
    return ModelConfig(**cfg)


def import_checkpoint(
    path: str | os.PathLike,
    num_heads: Optional[int] = None,
    rel_pos_buckets: Optional[int] = None,
    **overrides: Any,
) -> tuple[PMLMModel, ImportReport]:
    """Build a :class:`PMLMModel` from a Hugging Face BERT or UniLMv2 checkpoint.

    Args:
        path: a folder holding ``model.safetensors`` or ``pytorch_model.bin`` (and usually
            ``config.json``), or the weights file itself.
        num_heads: attention heads, when no ``config.json`` says and there is no bias table.
        rel_pos_buckets: None keeps the checkpoint's relative bias (none for plain BERT);
            an even positive number adds a zero-initialized table of that many buckets.
        overrides: other :class:`ModelConfig` fields (dropout, ``attention_backend``).
    Returns:
        The model (fp32, train mode as built) and an :class:`ImportReport`.
    """
    raw, hf_config, weights = read_state_dict(path)
    state, fmt, ignored = normalize_state_dict(raw)
    cfg = infer_config(state, hf_config, num_heads, rel_pos_buckets, **overrides)
    model = PMLMModel(cfg)
    ours = {k for k in model.state_dict() if k != "lm_head.embedding.weight"}
    unexpected = sorted(set(state) - ours)
    if unexpected:
        raise ValueError(f"{weights}: tensors {unexpected[:8]} have no place in a model of this shape")
    initialized = sorted(ours - set(state))
    if cfg.rel_pos_buckets and "rel_pos_bias.weight" in initialized:
        with torch.no_grad():
            model.rel_pos_bias.weight.zero_()  # an added bias starts as a no-op
    allowed_fresh = {"rel_pos_bias.weight"} | {k for k in ours if k.startswith("lm_head.")}
    not_allowed = [k for k in initialized if k not in allowed_fresh]
    if not_allowed:
        raise ValueError(f"{weights} lacks encoder tensors {not_allowed[:8]}: the checkpoint is incomplete")
    for k, v in state.items():
        target = model.state_dict()[k]
        if target.shape != v.shape:
            raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, expected {tuple(target.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    report = ImportReport(source=str(weights), format=fmt, ignored=ignored, initialized=initialized)
    log.info("imported %s (%s, %d layers, hidden %d, %d heads, rel. bias buckets %d); ignored %s; "
             "initialized fresh %s", weights, fmt, cfg.num_layers, cfg.hidden_size, cfg.num_heads,
             cfg.rel_pos_buckets, ignored or "nothing", initialized or "nothing")
    return model, report


# --------------------------------------------------------------------------- writing


def to_hf_state_dict(model: PMLMModel, prefix: str = "bert.", lm_head: bool = True) -> dict[str, Tensor]:
    """Hugging Face BERT names: ``{prefix}embeddings...`` and (``lm_head``) ``cls.predictions.*``.

    The tied decoder weight is left out, as ``save_pretrained`` does. A relative bias table
    is kept as ``{prefix}rel_pos_bias.weight``.
    """
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        v = v.detach().float().contiguous().cpu()
        if k == "lm_head.embedding.weight":
            continue
        if k.startswith("lm_head."):
            if lm_head:
                rest = k[len("lm_head."):]
                out["cls.predictions." + rest] = v  # transform.* and bias
        else:
            out[prefix + k] = v
    return out


def to_unilm_state_dict(model: PMLMModel) -> dict[str, Tensor]:
    """UniLMv2 / s2s-ft names: fused ``qkv_linear.weight`` ``(3C, C)`` with ``q_bias`` and ``v_bias``.

    Raises:
        ValueError: a key bias is non-zero (the fused format has none).
    """
    state = to_hf_state_dict(model)
    for i in range(model.config.num_layers):
        p = f"bert.encoder.layer.{i}.attention.self"
        kb = state.pop(f"{p}.key.bias")
        if bool(kb.ne(0).any()):
            raise ValueError(f"layer {i} has a non-zero key bias (max |b| {float(kb.abs().max()):.3g}); the UniLMv2 "
                             "fused format has no key bias. (A key bias adds a per-query constant to every score "
                             "and does not change attention, so it can be zeroed first.)")
        state[f"{p}.qkv_linear.weight"] = torch.cat(
            [state.pop(f"{p}.query.weight"), state.pop(f"{p}.key.weight"), state.pop(f"{p}.value.weight")], 0)
        state[f"{p}.q_bias"] = state.pop(f"{p}.query.bias")
        state[f"{p}.v_bias"] = state.pop(f"{p}.value.bias")
    return state


def hf_config_dict(cfg: ModelConfig, architecture: str = "BertForMaskedLM") -> dict[str, Any]:
    """``config.json`` in Hugging Face ``BertConfig``'s schema (plus UniLMv2's bias keys if used)."""
    d: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    if cfg.rel_pos_buckets:
        d["rel_pos_bins"] = cfg.rel_pos_buckets
        d["max_rel_pos"] = cfg.rel_pos_max_distance
    return d


def export_hf(model: PMLMModel, out_dir: str | os.PathLike, lm_head: bool = True) -> Path:
    """Write ``model.safetensors`` + ``config.json`` loadable by ``transformers.BertForMaskedLM``
    (``lm_head=False``: ``BertModel`` names, no prefix). Written atomically."""
    if model.config.rel_pos_buckets:
        log.warning("the model has a relative position bias (%d buckets): it is exported as "
                    "bert.rel_pos_bias.weight, which transformers' BertModel ignores, so under transformers the "
                    "exported model does not compute what it computes here", model.config.rel_pos_buckets)
    state = to_hf_state_dict(model, prefix="bert." if lm_head else "", lm_head=lm_head)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        arch = "BertForMaskedLM" if lm_head else "BertModel"
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.config, arch), indent=2))
    return Path(out_dir)


def to_s2sft_state_dict(model: PMLMModel, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """s2s-ft's fine-tuned names (``BertForSequenceToSequenceWithPseudoMask.state_dict()``).

    ``bert.*`` with separate query/key/value, ``bert.rel_pos_bias.weight``, ``cls.predictions.*``
    plus ``cls.predictions.decoder_weight`` (the word embedding itself: s2s-ft's LM head holds it
    as an attribute, so its state dict lists it twice), and, for ``label_smoothing > 0``,
    ``crit_mask_lm_smoothed.one_hot`` ``(1, V)``: ``eps / (V - 2)`` everywhere except 0 at the
    padding id 0, as s2s-ft's loss builds it.
    """
    state = to_hf_state_dict(model)
    state["cls.predictions.decoder_weight"] = state["bert.embeddings.word_embeddings.weight"]
    if label_smoothing > 0:
        v = model.config.vocab_size
        one_hot = torch.full((1, v), label_smoothing / (v - 2))
        one_hot[0, 0] = 0.0
        state[S2SFT_SMOOTHING_KEY] = one_hot
    return state


def s2sft_config_dict(cfg: ModelConfig, label_smoothing: float = 0.0) -> dict[str, Any]:
    """``config.json`` in s2s-ft's ``BertForSeq2SeqConfig`` schema (read by its ``decode_seq2seq.py``)."""
    d = hf_config_dict(cfg, "BertForSequenceToSequenceWithPseudoMask")
    d.update(label_smoothing=label_smoothing, source_type_id=0, target_type_id=1,
             rel_pos_bins=cfg.rel_pos_buckets, max_rel_pos=cfg.rel_pos_max_distance if cfg.rel_pos_buckets else 0,
             fix_word_embedding=False)
    return d


def export_s2sft(model: PMLMModel, out_dir: str | os.PathLike, label_smoothing: float = 0.0,
                 tokenizer: Optional[str | os.PathLike] = None) -> Path:
    """Write s2s-ft's fine-tuned layout: ``pytorch_model.bin`` + ``config.json`` (+ ``vocab.txt``).

    ``decode_seq2seq.py --model_path OUT --tokenizer_name OUT/vocab.txt`` loads it. Written
    atomically. ``tokenizer``: a ``vocab.txt`` to copy beside the weights (other tokenizer
    files are not s2s-ft's and are not copied).
    """
    state = to_s2sft_state_dict(model, label_smoothing)
    with atomic_dir(out_dir) as tmp:
        torch.save(state, str(tmp / "pytorch_model.bin"))
        (tmp / "config.json").write_text(json.dumps(s2sft_config_dict(model.config, label_smoothing), indent=2))
        if tokenizer is not None and Path(tokenizer).name == "vocab.txt":
            shutil.copyfile(tokenizer, tmp / "vocab.txt")
    return Path(out_dir)


# --------------------------------------------------------------------------- any source


def is_model_folder(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`pmlm_engine.checkpoint.save_model`."""
    p = Path(path)
    if not (p / OUR_CONFIG).is_file():
        return False
    try:
        return "model" in read_config(p) and (p / "model.safetensors").is_file()
    except ValueError:
        return False


def load_any(spec: str | os.PathLike, num_heads: Optional[int] = None,
             rel_pos_buckets: Optional[int] = None, **overrides: Any) -> tuple[PMLMModel, Optional[str]]:
    """A model from ``"minilm"``, one of our model folders, or a HF BERT / UniLMv2 checkpoint.

    Returns:
        ``(model, tokenizer_path_or_None)``: the tokenizer recorded in our folder's config, or
        the ``vocab.txt`` beside an imported checkpoint, if any.
    """
    if str(spec) == "minilm":
        from .corpus import minilm_dir

        spec = minilm_dir()
    path = Path(spec)
    if is_model_folder(path):
        if rel_pos_buckets is not None:
            raise ValueError(f"{path} is a pmlm_engine model folder; rel_pos_buckets applies to imports only")
        model = load_model(path, **overrides)
        return model, model_tokenizer(path)
    model, _ = import_checkpoint(path, num_heads=num_heads, rel_pos_buckets=rel_pos_buckets, **overrides)
    folder = path if path.is_dir() else path.parent
    vocab = folder / "vocab.txt"
    return model, (str(vocab) if vocab.is_file() else None)


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pmlm_engine.convert {import,export-hf}``, inside the shared error boundary."""
    return run_cli(_main, argv)


def _main(argv: Optional[list[str]]) -> int:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    p_imp = sub.add_parser("import", help="HF BERT / UniLMv2 checkpoint -> pmlm_engine model folder")
    p_imp.add_argument("source", help="'minilm', a HF folder, or a .safetensors / .bin file")
    p_imp.add_argument("out", help="model folder to write")
    p_imp.add_argument("--num-heads", type=int, default=None, help="attention heads, if no config.json says")
    p_imp.add_argument("--rel-pos-buckets", type=int, default=None,
                       help="add a zero relative bias table of this many buckets (default: keep the checkpoint's)")
    p_exp = sub.add_parser("export-hf", help="pmlm_engine model folder -> HF BertForMaskedLM folder")
    p_exp.add_argument("model", help="model folder written by pmlm_engine")
    p_exp.add_argument("out", help="folder to write (model.safetensors + config.json)")
    p_exp.add_argument("--no-lm-head", action="store_true", help="write BertModel names (no MLM head)")
    p_s2s = sub.add_parser("export-s2s-ft", help="pmlm_engine model folder -> s2s-ft fine-tuned checkpoint folder")
    p_s2s.add_argument("model", help="model folder written by pmlm_engine")
    p_s2s.add_argument("out", help="folder to write (pytorch_model.bin + config.json + vocab.txt)")
    p_s2s.add_argument("--label-smoothing", type=float, default=None,
                       help="recorded in config.json and the loss buffer (default: the fine-tuning's, else 0)")
    for sp in (p_imp, p_exp, p_s2s):
        sp.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder that pmlm_engine did not write (its other files are kept)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source = args.source if args.cmd == "import" else args.model
    check_output_dir(args.out, inputs=[source], overwrite=args.overwrite)  # before any work
    if args.cmd == "import":
        model, tok = load_any(args.source, num_heads=args.num_heads, rel_pos_buckets=args.rel_pos_buckets)
        save_model(model, args.out, extra={"tokenizer": tok} if tok else None)
        print(f"wrote {args.out} ({model.num_parameters() / 1e6:.1f}M parameters)")
    elif args.cmd == "export-s2s-ft":
        eps = args.label_smoothing
        if eps is None:
            eps = float(read_config(args.model).get("finetune", {}).get("label_smoothing", 0.0))
        export_s2sft(load_model(args.model), args.out, eps, model_tokenizer(args.model))
        print(f"wrote {args.out}")
    else:
        export_hf(load_model(args.model), args.out, lm_head=not args.no_lm_head)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
