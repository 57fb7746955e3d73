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

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend, build_layout
from .attention_api import AttentionLayout
from .position_bias import RelativePositionBias
from .config import ModelConfig


class KVCache:
    """Per-layer keys and values of the tokens seen so far, with their mask metadata.

    Used by incremental decoding: each token's keys and values are projected once. Only
    context tokens (``step >= 0``: source and emitted targets) are kept; the ``[P]`` of a step
    is only ever visible to itself, so it is never kept.

    Everything lives in preallocated buffers: per layer ``(B, H, capacity, D)`` keys and values,
    and ``(B, capacity)`` step / doc id / position metadata. A forward writes its new tokens
    after the cached ones (:meth:`extend_meta`, :meth:`extend`) and attends views of the
    buffers, so nothing is concatenated per step; :meth:`commit` then keeps the context
    columns. :meth:`reorder` selects rows in place (beam search, dropped sentences) and only
    reallocates when the batch grows. Inference only (``torch.no_grad``).

    Two modes:

    * dynamic (default): attends the valid columns only; the capacity grows by doubling.
    * static (``capacity=N``): the buffers never change shape, every forward attends all ``N``
      columns (unwritten ones carry ``doc_id -1`` and are masked out), new tokens are written at
      a device-side cursor with ``index_copy_``, and nothing reads a value back to the host. A
      decoding step then has fixed shapes and no host synchronisation, which is what capturing
      it in a CUDA graph requires (see :class:`pmlm_engine.decode.StaticCachedScorer`).
    """

    GROW = 128
    """Spare columns allocated beyond the current need (dynamic mode); the buffer doubles when full."""

    def __init__(self, capacity: Optional[int] = None) -> None:
        self.static = capacity is not None
        self._capacity = capacity
        self._len = 0  # committed columns (dynamic mode)
        self._rows = 0  # live batch rows (a prefix of the buffers' rows)
        self._new = 0  # columns written by the forward in progress
        self._kbuf: list[Tensor] = []  # per layer (R, H, capacity, D)
        self._vbuf: list[Tensor] = []
        self._meta: dict[str, Tensor] = {}  # step, doc_ids, position_ids: (R, capacity)
        self._cursor: Optional[Tensor] = None  # static mode: (1,) first free column, on the device

    # ----------------------------------------------------------------- views

    def __len__(self) -> int:
        """Columns a forward attends besides its own new tokens (static mode: the capacity)."""
        if self.static:
            return 0 if not self._meta else int(self._capacity)  # type: ignore[arg-type]
        return self._len

    def _view(self, name: str) -> Optional[Tensor]:
        if not self._meta:
            return None
        return self._meta[name][:self._rows, :self._len] if not self.static else self._meta[name][:self._rows]

    @property
    def step(self) -> Optional[Tensor]:
        """``(B, Lc)`` steps of the cached tokens."""
        return self._view("step")

    @property
    def doc_ids(self) -> Optional[Tensor]:
        return self._view("doc_ids")

    @property
    def position_ids(self) -> Optional[Tensor]:
        return self._view("position_ids")

    @property
    def keys(self) -> list[Tensor]:
        """Per layer ``(B, H, Lc, D)`` views of the cached keys."""
        return [kb[:self._rows, :, :self._len] if not self.static else kb[:self._rows] for kb in self._kbuf]

    @property
    def values(self) -> list[Tensor]:
        return [vb[:self._rows, :, :self._len] if not self.static else vb[:self._rows] for vb in self._vbuf]

    # ----------------------------------------------------------------- writing

    def _allocate_meta(self, like: Tensor, rows: int, cols: int) -> None:
        self._meta = {"step": like.new_zeros((rows, cols)), "doc_ids": like.new_full((rows, cols), -1),
                      "position_ids": like.new_zeros((rows, cols))}
        self._rows = rows
        if self.static:
            self._cursor = like.new_zeros((1,))

    def _columns(self, n: int, device: torch.device) -> Tensor:
        """Static mode: the ``n`` columns the new tokens go to, ``cursor + arange(n)`` (on the device)."""
        assert self._cursor is not None
        return self._cursor + torch.arange(n, device=device)

    def extend_meta(self, step: Tensor, doc_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write the new tokens' metadata after the cached tokens'; returns the key-side
        ``(step, doc_ids, position_ids)`` a forward attends (cached + new, or the whole static buffer)."""
        b, n = step.shape
        new = {"step": step, "doc_ids": doc_ids, "position_ids": position_ids}
        if not self._meta:
            cols = self._capacity if self.static else n + self.GROW
            if cols is not None and n > cols:
                raise ValueError(f"KVCache capacity {cols} is smaller than the {n} tokens of the first call")
            self._allocate_meta(step, b, cols)  # type: ignore[arg-type]
        if b != self._rows:
            raise ValueError(f"KVCache holds {self._rows} rows but the new tokens have {b}: reorder() the cache "
                             "to the batch first")
        if self.static:
            idx = self._columns(n, step.device)
            for name, t in new.items():
                self._meta[name][:b].index_copy_(1, idx, t)
            self._new = n
            return self._meta["step"][:b], self._meta["doc_ids"][:b], self._meta["position_ids"][:b]
        lc = self._len
        if lc + n > self._meta["step"].shape[1]:
            cols = 2 * (lc + n)
            for name, buf in self._meta.items():
                grown = buf.new_full((buf.shape[0], cols), -1 if name == "doc_ids" else 0)
                grown[:, :lc] = buf[:, :lc]
                self._meta[name] = grown
        for name, t in new.items():
            self._meta[name][:b, lc:lc + n] = t
        self._new = n
        return tuple(self._meta[name][:b, :lc + n] for name in ("step", "doc_ids", "position_ids"))  # type: ignore

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ``(B, H, L, D)`` of the new tokens after the cached ones of ``layer``.

        Returns the keys and values the forward attends: ``(B, H, Lc + L, D)`` views (dynamic) or
        the whole ``(B, H, capacity, D)`` buffers (static). Nothing is kept until :meth:`commit`.
        """
        b, n = k.shape[0], k.shape[2]
        if layer == len(self._kbuf):  # first forward through this layer
            if self._len:
                raise ValueError(f"KVCache holds {self._len} tokens but no buffer for layer {layer}")
            cols = self._meta["step"].shape[1] if self._meta else n + self.GROW
            shape = (b, k.shape[1], cols, k.shape[3])
            self._kbuf.append(k.new_zeros(shape))
            self._vbuf.append(v.new_zeros(shape))
        elif layer > len(self._kbuf):
            raise ValueError(f"KVCache.extend: layer {layer} before layer {len(self._kbuf)}")
        kb, vb = self._kbuf[layer], self._vbuf[layer]
        if b != self._rows:
            raise ValueError(f"KVCache holds {self._rows} rows but the new tokens have {b}: reorder() the cache "
                             "to the batch first")
        if self.static:
            idx = self._columns(n, k.device)
            kb[:b].index_copy_(2, idx, k)
            vb[:b].index_copy_(2, idx, v)
            return kb[:b], vb[:b]
        lc = self._len
        if lc + n > kb.shape[2]:  # full: grow to the metadata's width
            shape = (kb.shape[0], kb.shape[1], self._meta["step"].shape[1], kb.shape[3])
            kb, vb = self._grow(kb, shape, lc), self._grow(vb, shape, lc)
            self._kbuf[layer], self._vbuf[layer] = kb, vb
        kb[:b, :, lc:lc + n] = k
        vb[:b, :, lc:lc + n] = v
        return kb[:b, :, :lc + n], vb[:b, :, :lc + n]

    @staticmethod
    def _grow(buf: Tensor, shape: tuple[int, ...], valid: int) -> Tensor:
        new = buf.new_zeros(shape)
        new[:, :, :valid] = buf[:, :, :valid]
        return new

    def commit(self, keep: Tensor) -> None:
        """Keep the new tokens whose ``keep`` flag is set (``(L,)`` bool, the same in every row).

        Dynamic mode moves the kept columns to the front of the new ones when they are not a
        prefix already. Static mode requires the kept columns to be a prefix (decoding's layouts:
        the context tokens come before the ``[P]``) and only advances its device-side cursor.
        """
        n = self._new
        if self.static:
            assert self._cursor is not None
            self._cursor += keep.sum()  # no host read: the kept columns are a prefix
            self._new = 0
            return
        cols = keep.nonzero().squeeze(1)
        kept = cols.numel()
        lc = self._len
        if not bool((cols == torch.arange(kept, device=cols.device)).all()):
            idx = lc + cols
            for buf in (*self._kbuf, *self._vbuf):
                buf[:self._rows, :, lc:lc + kept] = buf[:self._rows, :, lc:lc + n].index_select(2, cols)
            for name, buf in self._meta.items():
                buf[:self._rows, lc:lc + kept] = buf[:self._rows].index_select(1, idx)
        self._len = lc + kept
        self._new = 0

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search, dropped sentences): ``index`` ``(B',)`` into the current rows.

        In place when ``B'`` fits the buffers' rows (only the valid columns are moved), otherwise
        (the batch grows, e.g. to ``B * K`` beams) into new buffers of ``B'`` rows.
        """
        rows = index.shape[0]
        cols = self._capacity if self.static else self._len
        grow = rows > self._kbuf[0].shape[0] if self._kbuf else rows > self._meta["step"].shape[0]
        for bufs in (self._kbuf, self._vbuf):
            for i, buf in enumerate(bufs):
                picked = buf[:self._rows, :, :cols].index_select(0, index)
                if grow:
                    new = buf.new_zeros((rows, *buf.shape[1:]))
                    new[:, :, :cols] = picked
                    bufs[i] = new
                else:
                    buf[:rows, :, :cols] = picked
        for name, buf in self._meta.items():
            picked = buf[:self._rows, :cols].index_select(0, index)
            if grow:
                new = buf.new_full((rows, buf.shape[1]), -1 if name == "doc_ids" else 0)
                new[:, :cols] = picked
                self._meta[name] = new
            else:
                buf[:rows, :cols] = picked
        self._rows = rows


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
        static = cache is not None and cache.static
        if not static and int(position_ids.max()) >= self.config.max_position:  # static: no host reads
            raise ValueError(f"position id {int(position_ids.max())} exceeds the position table "
                             f"(max_position={self.config.max_position}): shorten the input or extend "
                             "the table (pmlm_engine.model.extend_positions)")
        q_step = q_doc = None
        k_step, k_doc, k_pos = step, doc_ids, position_ids
        if cache is not None and torch.is_grad_enabled():
            raise ValueError("cached decoding writes its key/value buffers in place: run it under torch.no_grad() "
                             "or torch.inference_mode()")
        if cache is not None:
            if doc_ids is None:
                raise ValueError("cached decoding needs doc_ids for the new tokens")
            first = len(cache) == 0 and not static
            k_step, k_doc, k_pos = cache.extend_meta(step, doc_ids, position_ids)  # cached + new (no copy)
            if not first:
                q_step, q_doc = step, doc_ids
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
            keep = step[0] >= 0  # (L,) context columns
            if not static and not bool((step >= 0).eq(keep).all()):
                raise ValueError("cached decoding needs the same layout in every row (context columns "
                                 "must line up across the batch)")
            cache.commit(keep)
        return x

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
