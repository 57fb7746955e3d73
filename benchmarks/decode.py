"""Decoding speed: the model's key/value cache against s2s-ft's scheme (hidden states cached, keys and
values re-projected every step), greedy and beam 5, at target length 64.

    python benchmarks/decode.py [--quick] [--sizes h64,small,base] [--threads 1] [--compile]

Both schemes run the same :class:`pmlm_engine.model.PMLMModel` weights, the same attention
function and the same search code (:func:`pmlm_engine.decode.greedy_search` /
:func:`~pmlm_engine.decode.beam_search`); only the scorer differs:

* ``kv_cache`` (:class:`pmlm_engine.decode.CachedScorer`): each token's keys and values are
  projected once and kept per layer; a step runs the layers on its two new tokens.
* ``kv_static`` (:class:`pmlm_engine.decode.StaticCachedScorer`): the same on a fixed-capacity
  cache, fixed shapes and no host reads per step (the CUDA-graph-capturable path); on the CPU it
  pays for attending the whole capacity.
* ``kv_compiled`` (``--compile``, :class:`pmlm_engine.decode.CompiledStaticScorer`): the static
  step through ``torch.compile`` (decoding's ``model.compile=true``) with the ``sdpa`` attention
  backend, as ``decode --compile`` picks for ``auto``; its compile time is in the warm-up round,
  reported as ``warmup_s``.
* ``s2s_ft`` (:class:`HiddenStateScorer` below, as microsoft/unilm s2s-ft's ``BertModelIncr``):
  each layer's *input hidden states* are kept; a step projects keys and values of the whole
  history again (``key(cat(history, new))``), so its cost grows with source + target length.

Setup: model sizes (``--sizes``) ``h64`` (4 layers, hidden 64, 4 heads, FFN 256), ``small``
(MiniLM-L6 shape: 6 layers, hidden 384, 12 heads, FFN 1536) and ``base`` (BERT-base shape), all
with vocabulary 30,522 and UniLMv2's relative position bias, random weights, fp32, eval mode
(default: ``small`` only); source of ``SRC_LEN``
tokens; exactly 64 target tokens (``[SEP]`` forbidden before, ``max_len`` 64). Both schemes
produce the same tokens (checked, ``same_tokens`` column). Throughput is target tokens per
second (beam search: output tokens, each sentence's 64 counted once), for the decoding steps
alone (``decode``: what the cache changes; the source encoding is the same call in both
schemes) and end to end (``e2e``: source encoding included). Times are medians over repeats;
the two schemes run round-robin so that load from other users hits both alike, and speedups
are medians of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from common import environment, markdown_table
from torch import Tensor

from pmlm_engine.attention import RelativePositionBias, pseudo_mask_attention
from pmlm_engine.config import PRESETS, ModelConfig
from pmlm_engine.decode import (
    COMPILED_BACKEND,
    CachedScorer,
    CompiledStaticScorer,
    DecodeConfig,
    StaticCachedScorer,
    beam_search,
    greedy_search,
    source_batch,
)
from pmlm_engine.layout import SpecialIds
from pmlm_engine.model import PMLMModel

SPECIAL = SpecialIds(cls=101, sep=102, mask=103, pad=0, random_lo=999, random_hi=30522)
TGT_LEN = 64
SRC_LEN = 440  # + [CLS] [SEP] + 64 target positions fit MiniLM's 512


class HiddenStateScorer:
    """s2s-ft's incremental decoding: per-layer input hidden states are cached and every step
    re-projects keys and values of the whole history (``BertModelIncr`` in s2s-ft)."""

    def __init__(self, model: PMLMModel, special: SpecialIds) -> None:
        self.model, self.special = model, special
        self.hist: list[Tensor] = []  # per layer (N, Lc, C): the layer's input for the context tokens
        self.meta: dict[str, Tensor] = {}  # (N, Lc) step, doc_ids, position_ids of the context tokens
        self.main_len: Optional[Tensor] = None

    def _run(self, ids: Tensor, pos: Tensor, seg: Tensor, step: Tensor, doc: Tensor) -> Tensor:
        m = self.model
        first = not self.hist
        k_step = step if first else torch.cat([self.meta["step"], step], 1)
        k_doc = doc if first else torch.cat([self.meta["doc_ids"], doc], 1)
        k_pos = pos if first else torch.cat([self.meta["position_ids"], pos], 1)
        bias = None
        if m.rel_pos_bias is not None:
            bias = RelativePositionBias(m.rel_pos_bias.weight, k_pos, q_position_ids=None if first else pos,
                                        max_distance=m.config.rel_pos_max_distance)
        keep = (step[0] >= 0).nonzero().squeeze(1)  # context columns (same in every row)
        x = m.embeddings(ids, pos, seg)  # (N, L, C)
        new_hist = []
        for i, layer in enumerate(m.encoder["layer"]):
            new_hist.append(x.index_select(1, keep))
            sa = layer.attention["self"]
            x_all = x if first else torch.cat([self.hist[i], x], 1)  # (N, Lc + L, C)
            q, k, v = sa._heads(sa.query(x)), sa._heads(sa.key(x_all)), sa._heads(sa.value(x_all))  # re-projection
            a = pseudo_mask_attention(q, k, v, k_step, k_doc, bias, m.attention_backend,
                                      q_step=None if first else step, q_doc_ids=None if first else doc)
            a = a.transpose(1, 2).reshape(x.shape)
            out = layer.attention["output"]
            x = out["LayerNorm"](x + out["dense"](a))
            h = torch.nn.functional.gelu(layer.intermediate["dense"](x))
            x = layer.output["LayerNorm"](x + layer.output["dense"](h))
        self.hist = new_hist if first else [torch.cat([h0, h1], 1) for h0, h1 in zip(self.hist, new_hist)]
        for name, t in (("step", step), ("doc_ids", doc), ("position_ids", pos)):
            t = t.index_select(1, keep)
            self.meta[name] = t if first else torch.cat([self.meta[name], t], 1)
        return x

    def start(self, sources: Sequence[Sequence[int]]) -> Tensor:
        batch = source_batch(sources, self.special, next(self.model.parameters()).device)
        self.main_len = batch.pop("main_len")
        self.hist, self.meta = [], {}
        x = self._run(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"],
                      batch["doc_ids"])
        return torch.log_softmax(self.model.lm_head(x[:, -1]), -1)

    def step(self, prev: Tensor, t: int) -> Tensor:
        n = prev.shape[0]
        pos = (self.main_len + t - 2).unsqueeze(1) + torch.arange(2)
        ids = torch.stack([prev, torch.full_like(prev, self.special.p)], 1)
        step = torch.tensor([t - 1, -t]).expand(n, 2)
        ones = torch.ones((n, 2), dtype=torch.long)
        x = self._run(ids, pos, ones, step, ones - 1)
        return torch.log_softmax(self.model.lm_head(x[:, 1]), -1)

    def reorder(self, index: Tensor) -> None:
        self.hist = [h.index_select(0, index) for h in self.hist]
        self.meta = {k: v.index_select(0, index) for k, v in self.meta.items()}
        self.main_len = self.main_len.index_select(0, index)


@dataclass(frozen=True)
class DecodeResult:
    """One table row: a scheme at one search setting (times are medians over repeats)."""

    scheme: str
    size: str
    search: str
    batch: int
    src_len: int
    tgt_len: int
    repeats: int
    total_s: float
    """Source encoding + 64 decoding steps."""
    encode_s: float
    """The first call (source + ``[P]_1``): the same work in both schemes."""
    decode_s: float
    """Steps 2..64: the part the cache changes (median over repeats of total - encode)."""
    tokens_per_s: float
    """Decoding steps only: ``batch * tgt_len / decode_s``."""
    e2e_tokens_per_s: float
    """``batch * tgt_len / total_s``."""
    decode_speedup: float
    """s2s-ft's ``decode_s`` over this scheme's (median of per-repeat ratios)."""
    e2e_speedup: float
    """s2s-ft's ``total_s`` over this scheme's (median of per-repeat ratios)."""
    warmup_s: float
    """The warm-up round's total (``kv_compiled``: includes compiling)."""
    same_tokens: bool


class _Timed:
    """Wraps a scorer and records how long ``start`` (source encoding) took."""

    def __init__(self, inner, log: list[float]) -> None:
        self.inner, self.log = inner, log

    def start(self, sources):
        t0 = time.perf_counter()
        out = self.inner.start(sources)
        self.log.append(time.perf_counter() - t0)
        return out

    def step(self, prev, t):
        return self.inner.step(prev, t)

    def reorder(self, index):
        self.inner.reorder(index)


SIZES = {"h64": dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256, max_position=512),
         "small": PRESETS["small"], "base": PRESETS["base"]}


def build_model(seed: int = 0, size: str = "small") -> PMLMModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**SIZES[size], "vocab_size": 30522, "rel_pos_buckets": 32})
    model = PMLMModel(cfg).eval()
    with torch.no_grad():  # a trained-looking bias table instead of the 0.02-std init
        model.rel_pos_bias.weight.normal_(0, 1.0)
    return model


def run_decode_suite(quick: bool, smoke: bool = False, sizes: Sequence[str] = ("small",),
                     searches: Sequence[str] = ("greedy", "beam5"), compile: bool = False) -> list[dict]:
    """Cached (growing and static) vs s2s-ft-style decoding at target length 64: greedy and beam 5 at batch 1
    (quick), plus greedy at batch 8 and beam 5 at batch 4 (full), per model size. ``smoke``: greedy and beam 5
    at source 32, target 8, one repeat (that the suite runs and reports, for CI; not how fast). ``compile``: add
    the ``kv_compiled`` scheme. Rows as dicts (:class:`DecodeResult`)."""
    rows: list[dict] = []
    for size in sizes:
        rows += _suite_at(size, quick, smoke, searches, compile)
    return rows


def _suite_at(size: str, quick: bool, smoke: bool, searches: Sequence[str], compile: bool) -> list[dict]:
    model = build_model(size=size)
    backend = model.attention_backend
    g = torch.Generator().manual_seed(1)
    settings = [("greedy", 1, 1), ("beam5", 5, 1)] + ([] if quick or smoke else [("greedy", 1, 8), ("beam5", 5, 4)])
    settings = [s for s in settings if s[0] in searches]
    repeats = 1 if smoke else 3 if quick else 5
    src_len, tgt_len = (32, 8) if smoke else (SRC_LEN, TGT_LEN)
    rows: list[dict] = []
    schemes = {"kv_cache": CachedScorer, "kv_static": lambda m, sp: StaticCachedScorer(m, sp, tgt_len),
               **({"kv_compiled": lambda m, sp: CompiledStaticScorer(m, sp, tgt_len)} if compile else {}),
               "s2s_ft": HiddenStateScorer}
    for search, beam, batch in settings:
        sources = torch.randint(SPECIAL.random_lo, SPECIAL.random_hi, (batch, src_len), generator=g).tolist()
        cfg = DecodeConfig(beam_size=beam, max_len=tgt_len, min_len=tgt_len - 1)
        outputs: dict[str, list[list[int]]] = {}
        totals: dict[str, list[float]] = {k: [] for k in schemes}
        encodes: dict[str, list[float]] = {k: [] for k in schemes}

        def run(name: str, scorer_cls) -> None:
            model.set_attention_backend(COMPILED_BACKEND if name == "kv_compiled" else backend)
            scorer = _Timed(scorer_cls(model, SPECIAL), encodes[name])
            t0 = time.perf_counter()
            if beam == 1:
                hyps = greedy_search(scorer, sources, cfg, SPECIAL)
            else:
                hyps = [h[0] for h in beam_search(scorer, sources, cfg, SPECIAL)]
            totals[name].append(time.perf_counter() - t0)
            outputs[name] = [h.tokens for h in hyps]

        for _ in range(1 + repeats):  # round-robin; the first round is warm-up
            for name, cls in schemes.items():
                run(name, cls)
        same = all(out == outputs["s2s_ft"] for out in outputs.values())
        tot = {k: v[1:] for k, v in totals.items()}
        dec = {k: [a - b for a, b in zip(v[1:], encodes[k][1:])] for k, v in totals.items()}
        for scheme in schemes:
            d, t = statistics.median(dec[scheme]), statistics.median(tot[scheme])
            rows.append(dataclasses.asdict(DecodeResult(
                scheme=scheme, size=size, search=search, batch=batch, src_len=src_len, tgt_len=tgt_len, repeats=repeats,
                total_s=t, encode_s=statistics.median(encodes[scheme][1:]), decode_s=d,
                tokens_per_s=batch * tgt_len / d, e2e_tokens_per_s=batch * tgt_len / t,
                decode_speedup=statistics.median(a / b for a, b in zip(dec["s2s_ft"], dec[scheme])),
                e2e_speedup=statistics.median(a / b for a, b in zip(tot["s2s_ft"], tot[scheme])),
                warmup_s=totals[scheme][0], same_tokens=same)))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    p.add_argument("--search", default="greedy,beam5", help="comma-separated: greedy, beam5 (default both)")
    p.add_argument("--sizes", default="small", help=f"comma-separated model sizes of {sorted(SIZES)} (default small)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile'd static step (kv_compiled)")
    args = p.parse_args(argv)
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print(f"models: {', '.join(sizes)} + relative bias, fp32, random weights; source {SRC_LEN} tokens, "
          f"target {TGT_LEN} tokens; load average before: {os.getloadavg()}\n")
    rows = run_decode_suite(args.quick, sizes=sizes, searches=args.search.split(","), compile=args.compile)
    print(f"load average after: {os.getloadavg()}")
    print(markdown_table(rows, ["size", "search", "batch", "scheme", "total_s", "encode_s", "decode_s", "tokens_per_s",
                                "e2e_tokens_per_s", "decode_speedup", "e2e_speedup", "warmup_s", "same_tokens"]))


if __name__ == "__main__":
    main()
