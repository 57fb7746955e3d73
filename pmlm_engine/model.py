"""The PMLM model: a BERT-style post-LayerNorm encoder with a shared T5 relative position bias.

One definition serves pre-training, fine-tuning and cached decoding (docs/model.md).
Parameter names follow Hugging Face's ``BertModel`` (minus the ``bert.`` prefix) so BERT
checkpoints map one to one; the relative bias table is ``rel_pos_bias.weight``
``(heads, buckets)`` as in the released UniLMv2 checkpoints.

All attention goes through :mod:`pmlm_engine.attention`: :meth:`PMLMModel.forward` builds one
:class:`~pmlm_engine.attention_api.AttentionLayout` per forward (metadata validated, backend
resolved, the backend's shared work done once) and every layer attends with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend, build_layout
from .attention_api import AttentionLayout
from .position_bias import RelativePositionBias
from .config import ModelConfig


@dataclass
class KVCache:
    """Per-layer keys and values of the tokens seen so far, with their mask metadata.

    Used by incremental decoding: each token's keys and values are projected once.
    Only context tokens (``step >= 0``: source and emitted targets) are kept; the
    ``[P]`` of a step is only ever visible to itself, so it is never cached.

    Keys and values live in per-layer buffers with room to grow (``_kbuf``/``_vbuf``,
    ``(B, H, capacity, D)``): a forward writes its new tokens' keys and values after the
    cached ones (:meth:`extend`) and attends a view of the buffer, so the cache is never
    copied to append to it; :meth:`commit` then keeps the context columns. ``keys`` and
    ``values`` are views of the valid part. Inference only (``torch.no_grad``): the buffers
    are written in place.
    """

    keys: list[Tensor] = field(default_factory=list)  # per layer (B, H, Lc, D), views of the buffers
    values: list[Tensor] = field(default_factory=list)  # per layer (B, H, Lc, D)
    step: Optional[Tensor] = None  # (B, Lc)
    doc_ids: Optional[Tensor] = None  # (B, Lc)
    position_ids: Optional[Tensor] = None  # (B, Lc)
    _kbuf: list[Tensor] = field(default_factory=list, repr=False)  # per layer (B, H, capacity, D)
    _vbuf: list[Tensor] = field(default_factory=list, repr=False)

    GROW = 128
    """Spare columns allocated beyond the current need; the buffer doubles when full."""

    def __len__(self) -> int:
        return 0 if self.step is None else self.step.shape[1]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ``(B, H, L, D)`` of the new tokens after the cached ones of ``layer``.

        Returns ``(B, H, Lc + L, D)`` views of cached + new keys and values. Nothing is kept
        until :meth:`commit`.
        """
        lc, n = len(self), k.shape[2]
        if layer == len(self._kbuf):  # first forward through this layer
            if lc:
                raise ValueError(f"KVCache holds {lc} tokens but no buffer for layer {layer}")
            shape = (k.shape[0], k.shape[1], n + self.GROW, k.shape[3])
            self._kbuf.append(k.new_empty(shape))
            self._vbuf.append(v.new_empty(shape))
        elif layer > len(self._kbuf):
            raise ValueError(f"KVCache.extend: layer {layer} before layer {len(self._kbuf)}")
        kb, vb = self._kbuf[layer], self._vbuf[layer]
        if kb.shape[0] != k.shape[0]:
            raise ValueError(f"KVCache holds {kb.shape[0]} rows but the new tokens have {k.shape[0]}: reorder() "
                             "the cache to the batch first")
        if lc + n > kb.shape[2]:  # full: double
            shape = (kb.shape[0], kb.shape[1], 2 * (lc + n), kb.shape[3])
            kb, vb = self._grow(kb, shape, lc), self._grow(vb, shape, lc)
            self._kbuf[layer], self._vbuf[layer] = kb, vb
        kb[:, :, lc:lc + n] = k
        vb[:, :, lc:lc + n] = v
        return kb[:, :, :lc + n], vb[:, :, :lc + n]

    @staticmethod
    def _grow(buf: Tensor, shape: tuple[int, ...], valid: int) -> Tensor:
        new = buf.new_empty(shape)
        new[:, :, :valid] = buf[:, :, :valid]
        return new

    def commit(self, cols: Tensor, step: Tensor, doc_ids: Tensor, position_ids: Tensor) -> None:
        """Keep the new tokens at columns ``cols`` ``(n,)`` (of the last forward's ``L``) in the cache."""
        lc, n = len(self), cols.numel()
        prefix = bool((cols == torch.arange(n, device=cols.device)).all())
        for bufs in (self._kbuf, self._vbuf):
            for i, buf in enumerate(bufs):
                if not prefix:  # move the kept columns to the front of the new ones
                    buf[:, :, lc:lc + n] = buf[:, :, lc:].index_select(2, cols)
        self.keys = [kb[:, :, :lc + n] for kb in self._kbuf]
        self.values = [vb[:, :, :lc + n] for vb in self._vbuf]
        new = dict(step=step, doc_ids=doc_ids, position_ids=position_ids)
        for name, t in new.items():
            t = t.index_select(1, cols)
            setattr(self, name, t if lc == 0 else torch.cat([getattr(self, name), t], dim=1))

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): ``index`` is ``(B',)`` into the current batch."""
        lc = len(self)
        self._kbuf = [k.index_select(0, index) for k in self._kbuf]
        self._vbuf = [v.index_select(0, index) for v in self._vbuf]
        self.keys = [kb[:, :, :lc] for kb in self._kbuf]
        self.values = [vb[:, :, :lc] for vb in self._vbuf]
        for name in ("step", "doc_ids", "position_ids"):
            setattr(self, name, getattr(self, name).index_select(0, index))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor) -> Tensor:
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(segment_ids))  # (B, L, C)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def forward(self, x: Tensor, layout: AttentionLayout, layer: int, cache: Optional[KVCache]) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, H, Lc + L, D): cached, then new (no copy of the cache)
        out = attend(q, k, v, layout)  # (B, H, L, D)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)


class TransformerLayer(nn.Module):
    """Post-LayerNorm BERT layer (names as in HF: attention.self/output, intermediate, output)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = nn.ModuleDict(dict(
            self=SelfAttention(cfg),
            output=nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.hidden_size),
                                      LayerNorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps))),
        ))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.intermediate_size)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(cfg.intermediate_size, cfg.hidden_size),
                                         LayerNorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)))
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, layout: AttentionLayout, layer: int, cache: Optional[KVCache]) -> Tensor:
        attn_out = self.attention["output"]
        a = self.attention["self"](x, layout, layer, cache)
        x = attn_out["LayerNorm"](x + self.dropout(attn_out["dense"](a)))
        h = F.gelu(self.intermediate["dense"](x))
        return self.output["LayerNorm"](x + self.dropout(self.output["dense"](h)))


class LMHead(nn.Module):
    """BERT's MLM head; the decoder weight is tied to the input embedding."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.hidden_size),
                                            LayerNorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)))
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        """``(N, C)`` selected hidden states -> ``(N, V)`` logits."""
        h = self.transform["LayerNorm"](F.gelu(self.transform["dense"](hidden)))
        return F.linear(h, self.embedding.weight, self.bias)


class PMLMModel(nn.Module):
    """Encoder + tied LM head. ``forward`` returns hidden states; ``lm_head`` scores selected rows."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend = cfg.attention_backend
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])))
        self.rel_pos_bias = (nn.Linear(cfg.rel_pos_buckets, cfg.num_heads, bias=False)
                             if cfg.rel_pos_buckets > 0 else None)  # weight: (H, buckets)
        self.lm_head = LMHead(cfg, self.embeddings.word_embeddings)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_attention_backend(self, backend: str) -> None:
        """Select the attention backend of later forwards (``auto`` or a registered name)."""
        self.attention_backend = backend

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype q, k, v will have in the layers: autocast's when on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.embeddings.word_embeddings.weight.dtype

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        segment_ids: Tensor,
        step: Tensor,
        doc_ids: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """Encode a batch of laid-out tokens.

        Args:
            input_ids, position_ids, segment_ids, step: ``(B, L)`` (see ``pmlm_engine.layout``).
            doc_ids: ``(B, L)``, -1 on padding; None when every row is one document without padding.
            cache: for incremental decoding. The new tokens attend the cached ones plus
                themselves; afterwards the context tokens (``step >= 0``) among them are
                appended to the cache.
        Returns:
            ``(B, L, C)`` hidden states of the new tokens.
        """
        if int(position_ids.max()) >= self.config.max_position:
            raise ValueError(f"position id {int(position_ids.max())} exceeds the position table "
                             f"(max_position={self.config.max_position}): shorten the input or extend "
                             "the table (pmlm_engine.model.extend_positions)")
        q_step = q_doc = None
        k_step, k_doc, k_pos = step, doc_ids, position_ids
        if cache is not None and torch.is_grad_enabled():
            raise ValueError("cached decoding writes its key/value buffers in place: run it under torch.no_grad() "
                             "or torch.inference_mode()")
        if cache is not None and len(cache) > 0:
            if doc_ids is None or cache.doc_ids is None:
                raise ValueError("cached decoding needs doc_ids for both the cache and the new tokens")
            q_step, q_doc = step, doc_ids
            k_step = torch.cat([cache.step, step], dim=1)
            k_doc = torch.cat([cache.doc_ids, doc_ids], dim=1)
            k_pos = torch.cat([cache.position_ids, position_ids], dim=1)
        bias = None
        if self.rel_pos_bias is not None:
            bias = RelativePositionBias(
                self.rel_pos_bias.weight, k_pos,
                q_position_ids=None if q_step is None else position_ids,
                max_distance=self.config.rel_pos_max_distance,
            )
        cfg = self.config
        layout = build_layout(k_step, k_doc, bias, self.attention_backend, q_step=q_step, q_doc_ids=q_doc,
                              num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=self._compute_dtype(step.device),
                              dropout_p=cfg.attention_dropout if self.training else 0.0)
        x = self.embeddings(input_ids, position_ids, segment_ids)
        for i, layer in enumerate(self.encoder["layer"]):
            x = layer(x, layout, i, cache)
        if cache is not None:
            self._append_to_cache(cache, step, doc_ids, position_ids)
        return x

    @staticmethod
    def _append_to_cache(cache: KVCache, step: Tensor, doc_ids: Optional[Tensor], position_ids: Tensor) -> None:
        keep_cols = step >= 0  # (B, L)
        if not bool((keep_cols == keep_cols[:1]).all()):
            raise ValueError("cached decoding needs the same layout in every row (context columns "
                             "must line up across the batch)")
        cols = keep_cols[0].nonzero().squeeze(1)
        if doc_ids is None:
            doc_ids = torch.zeros_like(step)
        cache.commit(cols, step, doc_ids, position_ids)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def extend_positions(model: PMLMModel, new_max: int) -> PMLMModel:
    """Grow the absolute position table to ``new_max`` rows, in place, for inputs longer than pre-training's.

    Row ``i`` of the new table is a copy of row ``i % old_max`` of the old one (the old rows
    repeated cyclically), as s2s-ft does with ``reuse_position_embedding``: the copies start
    from trained values instead of noise, and fine-tuning separates them. The relative
    position bias needs no change (it depends on distances, clipped at ``rel_pos_max_distance``).
    ``model.config.max_position`` is updated, so a saved model reloads at the new size.

    Args:
        model: the model to change.
        new_max: rows wanted; must be at least the current ``max_position``.
    Returns:
        ``model`` itself.
    """
    old = model.embeddings.position_embeddings
    old_max = old.num_embeddings
    if not isinstance(new_max, int) or new_max < old_max:
        raise ValueError(f"extend_positions: new_max={new_max!r} must be an int >= the current "
                         f"max_position={old_max} (the table only grows; truncate inputs instead)")
    if new_max == old_max:
        return model
    weight = old.weight.detach()  # (old_max, C)
    index = torch.arange(new_max, device=weight.device) % old_max
    new = nn.Embedding(new_max, weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.index_select(0, index))  # (new_max, C)
    new.weight.requires_grad_(old.weight.requires_grad)
    model.embeddings.position_embeddings = new
    model.config.max_position = new_max
    return model
