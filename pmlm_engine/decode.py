"""Batched greedy and beam-search decoding with the model's key/value cache (docs/decoding.md).

    python -m pmlm_engine.decode --model runs/news-ft/final --input news:test --output runs/news-ft/pred.jsonl --beam 5

One model definition: decoding calls :class:`pmlm_engine.model.PMLMModel` as it is, with a
:class:`~pmlm_engine.model.KVCache`. The first call feeds ``[CLS] src [SEP]`` (right-padded,
``doc_id -1`` on padding) plus ``[P]_1`` at position ``|main|``; every later step ``t`` feeds
two tokens, the previous output ``y_{t-1}`` (``step t-1``, position ``|main| + t - 2``) and
``[P]_t`` (``step -t``, position ``|main| + t - 1``), both in segment 1, and reads the
distribution of ``y_t`` off the ``[P]``. This is fine-tuning's layout (docs/finetuning.md), so
the pseudo-mask rule lets ``y_{t-1}`` see the source and ``y_{<t-1}``, and ``[P]_t`` see the
source and ``y_{<t}``. Each token's keys and values are projected once and kept in the cache;
``[P]`` tokens are never cached.

Rules (shared by greedy and beam search, and restated by the no-cache reference in the tests):

* ``[SEP]`` ends a hypothesis; ``[PAD]``, ``[CLS]``, ``[MASK]`` and ``[P]`` are never generated.
* ``max_len`` counts generated tokens *including* ``[SEP]``; a hypothesis that reaches it
  without ``[SEP]`` ends there. ``min_len``: ``[SEP]`` is forbidden until ``min_len`` tokens
  were generated.
* n-gram blocking (``no_repeat_ngram_size = n > 0``): a token is forbidden if it would repeat
  an n-gram already in the hypothesis, unless that n-gram contains a token of the ignore
  list (s2s-ft's ``forbid_ignore_word``, e.g. ``.``). The source is not considered.
* Forbidden tokens get ``-inf`` after the log-softmax: scores stay the model's log-probabilities.
* Score of a hypothesis: sum of its tokens' log-probabilities (``[SEP]`` included); ranking
  uses the GNMT length penalty, ``score / ((5 + len) / 6) ** alpha`` with ``len`` the number of
  generated tokens (``[SEP]`` included).
* Beam search (``K`` beams): each step takes the top ``2K`` continuations of all beams of a
  sentence by summed score; a ``[SEP]`` among the first ``K`` of them finishes a hypothesis,
  the first ``K`` others continue. A sentence is done once it has ``K`` finished hypotheses
  (fairseq's rule) or at ``max_len`` (alive beams are then finished too); the best finished
  hypothesis by length-penalized score wins. ``K = 1`` is greedy search.

``rules="s2s-ft"`` (``--beam-rules s2s-ft``) runs s2s-ft's own search instead
(:func:`s2sft_beam_search`, :func:`s2sft_greedy_search`). The rules above differ from it on
purpose: top ``2K`` so that a ``[SEP]`` does not cost a live beam, stopping once ``K``
hypotheses finished (fairseq's rule) instead of running every step, ``-inf`` instead of
``-10000`` penalties, the length penalty for every ``alpha`` (s2s-ft skips it unless
``alpha > 0``), minimum length 0, and the special-token ban (s2s-ft's outputs can hold ``[MASK]``).

Device-agnostic: every tensor is created on the model's device; nothing calls ``.cuda()``.
Finished sentences are dropped from the batch (``KVCache.reorder``) so the cost follows the
sentences still running.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Protocol, Sequence

if __name__ == "__main__":  # answer --help and usage errors before the heavy imports below
    from pmlm_engine.cli import build_parser

    build_parser("decode").parse_args()

import torch
from torch import Tensor
from tqdm import tqdm

from .errors import EnvironmentUnavailableError
from .layout import SpecialIds
from .model import KVCache, PMLMModel
from .outputs import check_output_file, json_safe

log = logging.getLogger("pmlm_engine.decode")


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings (see the module docstring for the exact rules)."""

    beam_size: int = 1
    """Beams per sentence; 1 = greedy."""
    max_len: int = 48
    """Most tokens generated per sentence, the final ``[SEP]`` included."""
    min_len: int = 0
    """``[SEP]`` is forbidden before this many tokens were generated."""
    length_penalty: float = 0.0
    """GNMT ``alpha``: hypotheses are ranked by ``score / ((5 + len) / 6) ** alpha``."""
    no_repeat_ngram_size: int = 0
    """Block repeated n-grams of this size (0 = off)."""
    ngram_ignore: tuple[int, ...] = ()
    """Token ids whose n-grams are never blocked."""
    rules: str = "pmlm"
    """``pmlm`` (this module's rules) or ``s2s-ft`` (s2s-ft's beam search, :func:`s2sft_beam_search`)."""
    ban_special: bool = True
    """Never generate ``[PAD] [CLS] [MASK] [P]``. Always on for ``pmlm`` rules; ``s2s-ft`` rules
    without it reproduce s2s-ft exactly (which then may output ``[MASK]``)."""
    max_seq_length: int = 0
    """``s2s-ft`` rules: s2s-ft's ``--max_seq_length``; a batch runs
    ``min(max_len, max_seq_length - longest source - 2)`` steps (0: ``max_len`` steps)."""
    repetition_penalty: float = 1.0
    """CTRL's repetition penalty on log-probabilities: a token already in the hypothesis has its
    log-probability multiplied by this (``> 1`` discourages repeats; 1 = off)."""
    coverage_penalty: float = 0.0
    """Source-coverage penalty ``beta``: the ``k``-th use of token ``w`` costs
    ``beta * max(0, k - max(1, count of w in the source))`` (each source copy of a token may be
    used once, a token absent from the source once; 0 = off)."""

    def __post_init__(self) -> None:
        checks = [
            (self.beam_size >= 1, "beam_size", ">= 1"),
            (self.max_len >= 1, "max_len", ">= 1"),
            (0 <= self.min_len < self.max_len, "min_len", f"in [0, max_len={self.max_len})"),
            (math.isfinite(self.length_penalty), "length_penalty", "a finite number"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", ">= 0 (0 = off)"),
            (self.rules in ("pmlm", "s2s-ft"), "rules", "pmlm or s2s-ft"),
            (self.rules == "s2s-ft" or self.ban_special, "ban_special", "True under pmlm rules"),
            (self.max_seq_length >= 0, "max_seq_length", ">= 0 (0 = off)"),
            (self.repetition_penalty >= 1.0, "repetition_penalty", ">= 1 (1 = off)"),
            (self.coverage_penalty >= 0.0, "coverage_penalty", ">= 0 (0 = off)"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {want}")


@dataclass
class Hypothesis:
    """One decoded output."""

    tokens: list[int]
    """Generated ids without the final ``[SEP]``."""
    logprob: float
    """Sum of the log-probabilities of the generated tokens, ``[SEP]`` included."""
    length: int
    """Generated tokens, ``[SEP]`` included (the ``len`` of the length penalty)."""
    score: float
    """``logprob / ((5 + length) / 6) ** alpha``: the ranking score."""
    ended: bool
    """True if it ended with ``[SEP]``, False if cut at ``max_len``."""


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ``((5 + length) / 6) ** alpha``."""
    return ((5.0 + length) / 6.0) ** alpha


def _hyp(tokens: list[int], logprob: float, length: int, ended: bool, alpha: float) -> Hypothesis:
    return Hypothesis(list(tokens), logprob, length, logprob / length_penalty(length, alpha), ended)


# --------------------------------------------------------------------------- scoring


class Scorer(Protocol):
    """What the search needs: the next-token log-probabilities of every live row (fresh tensors: the
    search edits them in place)."""

    def start(self, sources: Sequence[Sequence[int]]) -> Tensor:
        """Encode the sources; ``(B, V)`` log-probabilities of the first token."""

    def step(self, prev: Tensor, t: int) -> Tensor:
        """``prev`` ``(N,)`` token ``t - 1`` of every row; ``(N, V)`` log-probabilities of token ``t``."""

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` ``(N',)`` (beam selection and dropping finished sentences)."""


def source_batch(sources: Sequence[Sequence[int]], special: SpecialIds, device: torch.device) -> dict[str, Tensor]:
    """First decoding input: ``[CLS] src [SEP]`` right-padded, then ``[P]_1`` in the last column.

    Returns ``(B, M + 1)`` tensors (``input_ids, position_ids, segment_ids, step, doc_ids``)
    and ``main_len`` ``(B,)``.
    """
    if not sources:
        raise ValueError("no sources to decode")
    mains = [[special.cls, *s, special.sep] for s in sources]
    m = max(map(len, mains))
    b = len(mains)
    ids = torch.full((b, m + 1), special.pad, dtype=torch.long)
    pos = torch.zeros((b, m + 1), dtype=torch.long)
    seg = torch.zeros((b, m + 1), dtype=torch.long)
    step = torch.zeros((b, m + 1), dtype=torch.long)
    doc = torch.full((b, m + 1), -1, dtype=torch.long)
    for r, row in enumerate(mains):
        n = len(row)
        ids[r, :n] = torch.tensor(row)
        pos[r, :n] = torch.arange(n)
        doc[r, :n] = 0
        pos[r, m] = n  # [P]_1 stands for the first target token
    ids[:, m], seg[:, m], step[:, m], doc[:, m] = special.p, 1, -1, 0
    main_len = torch.tensor([len(r) for r in mains])
    out = dict(input_ids=ids, position_ids=pos, segment_ids=seg, step=step, doc_ids=doc, main_len=main_len)
    return {k: v.to(device) for k, v in out.items()}


def _log_softmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class CachedScorer:
    """Incremental scoring with :class:`KVCache`: each token's keys and values are computed once."""

    def __init__(self, model: PMLMModel, special: SpecialIds) -> None:
        self.model, self.special = model, special
        self.device = next(model.parameters()).device
        self.cache = KVCache()
        self.main_len: Optional[Tensor] = None

    def _new_cache(self, sources: Sequence[Sequence[int]]) -> KVCache:
        return KVCache()

    def start(self, sources: Sequence[Sequence[int]]) -> Tensor:
        batch = source_batch(sources, self.special, self.device)
        self.main_len = batch.pop("main_len")
        self.cache = self._new_cache(sources)
        hidden = self.model(**batch, cache=self.cache)  # (B, M + 1, C)
        n = len(sources)
        self._two = torch.arange(2, device=self.device)
        self._seg = torch.ones((n, 2), dtype=torch.long, device=self.device)
        return _log_softmax(self.model.lm_head(hidden[:, -1]))  # (B, V)

    def _step_inputs(self, prev: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(ids, positions, segments, steps)`` ``(N, 2)`` of ``[y_{t-1}, [P]_t]``."""
        assert self.main_len is not None
        n = prev.shape[0]
        pos = (self.main_len + (t - 2)).unsqueeze(1) + self._two
        ids = torch.stack([prev, torch.full_like(prev, self.special.p)], dim=1)
        step = torch.tensor([t - 1, -t], device=self.device).expand(n, 2)
        return ids, pos, self._seg[:n], step

    def step(self, prev: Tensor, t: int) -> Tensor:
        if self.main_len is None:
            raise RuntimeError("CachedScorer.step() before start()")
        ids, pos, seg, step = self._step_inputs(prev, t)
        hidden = self.model(ids, pos, seg, step, doc_ids=seg - 1, cache=self.cache)  # (N, 2, C)
        return _log_softmax(self.model.lm_head(hidden[:, 1]))  # (N, V)

    def reorder(self, index: Tensor) -> None:
        if self.main_len is None:
            raise RuntimeError("CachedScorer.reorder() before start()")
        self.cache.reorder(index)
        self.main_len = self.main_len.index_select(0, index)
        if index.shape[0] > self._seg.shape[0]:
            self._seg = torch.ones((index.shape[0], 2), dtype=torch.long, device=self.device)


class StaticCachedScorer(CachedScorer):
    """:class:`CachedScorer` on a static-capacity :class:`KVCache`: every step has the same shapes
    and reads nothing back to the host.

    The cache holds ``|main| + 1 + max_len`` columns from the start; each step writes its two
    tokens at a device-side cursor and attends the whole buffer (unwritten columns are masked
    out by ``doc_id -1``); the step counter is a device tensor advanced in place. So
    :meth:`step` for a fixed batch is a fixed sequence of kernels on fixed buffers: on a GPU it
    can be captured once with ``torch.cuda.CUDAGraph`` and replayed (inputs copied into the
    captured ``prev`` tensor), provided the attention backend itself does not synchronise.
    Steps must come in order ``t = 2, 3, ...``; :meth:`reorder` changes the batch shape, so a
    captured graph is only valid until the next reorder (greedy search without dropping rows,
    or beam search with a fixed ``B * K``). On the CPU it computes the same tokens and scores
    as :class:`CachedScorer` (tested), at the cost of attending the whole capacity.
    """

    def __init__(self, model: PMLMModel, special: SpecialIds, max_len: int) -> None:
        super().__init__(model, special)
        self.max_len = max_len

    def _new_cache(self, sources: Sequence[Sequence[int]]) -> KVCache:
        main = max(len(s) for s in sources) + 2
        return KVCache(capacity=main + 1 + self.max_len)

    def start(self, sources: Sequence[Sequence[int]]) -> Tensor:
        out = super().start(sources)
        self._t = torch.full((1,), 2, dtype=torch.long, device=self.device)  # the next step's t
        self._signs = torch.tensor([1, -1], device=self.device)
        self._shift = torch.tensor([-1, 0], device=self.device)
        return out

    def _step_inputs(self, prev: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert self.main_len is not None
        n = prev.shape[0]
        pos = (self.main_len.unsqueeze(1) + (self._t - 2)) + self._two  # (N, 2), from the device counter
        ids = torch.stack([prev, torch.full_like(prev, self.special.p)], dim=1)
        step = ((self._t + self._shift) * self._signs).expand(n, 2)  # [t - 1, -t]
        self._t += 1
        return ids, pos, self._seg[:n], step


def _static_step(scorer: StaticCachedScorer, prev: Tensor) -> Tensor:
    return StaticCachedScorer.step(scorer, prev, 0)  # t is read from the scorer's device counter


_compiled_step: Optional[Any] = None

COMPILED_BACKEND = "sdpa"
"""The attention backend ``auto`` resolves to for a compiled decoding step: no host reads, so the step is one
graph (the structured ``torch`` backend plans each forward on the host: a graph break per step)."""


class CompiledStaticScorer(StaticCachedScorer):
    """:class:`StaticCachedScorer` whose step (the layers on the two new tokens, the head and the
    log-softmax) runs through ``torch.compile``: decoding's ``model.compile=true``.

    One compiled function serves every batch: the first call compiles for its shapes, the first
    call with other shapes (another batch size, a row dropped, a longer source) recompiles once
    with those dimensions dynamic. Compiling costs tens of seconds on a CPU; it pays off on long
    decoding jobs where per-step overhead matters (small models, small batches). Same tokens and
    scores as the eager step (tested). The step is one graph with a backend that reads nothing back
    to the host (``sdpa``, ``reference``: :data:`COMPILED_BACKEND` is what ``auto`` becomes).
    """

    def step(self, prev: Tensor, t: int) -> Tensor:
        global _compiled_step
        if _compiled_step is None:
            _compiled_step = torch.compile(_static_step)
        return _compiled_step(self, prev)


# --------------------------------------------------------------------------- constraints


def banned_ids(special: SpecialIds) -> list[int]:
    """Ids never generated: ``[PAD] [CLS] [MASK] [P]``."""
    return sorted({special.pad, special.cls, special.mask, special.p})


def blocked_ngrams(hist: Tensor, n: int, ignore: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, tokens)``: per row of ``hist`` ``(N, T)``, the tokens that would complete an n-gram
    already in that row (an n-gram holding a token of ``ignore`` is never blocked). Pairs may repeat."""
    length = hist.shape[1]
    if n <= 0 or length < n:
        empty = hist.new_empty(0)
        return empty, empty
    grams = hist.unfold(1, n, 1)  # (N, T - n + 1, n)
    match = (grams[..., :-1] == hist[:, length - n + 1:].unsqueeze(1)).all(-1)  # the n - 1 token prefix recurs
    if ignore.numel():
        match &= ~torch.isin(grams, ignore).any(-1)
    rows, at = match.nonzero(as_tuple=True)
    return rows, grams[rows, at, -1]


def penalize_repeats(logp: Tensor, hist: Tensor, cfg: DecodeConfig, sources: Optional[Tensor] = None) -> Tensor:
    """The repetition and coverage penalties (see :class:`DecodeConfig`) on ``(N, V)`` log-probabilities, in place.

    ``hist`` ``(N, T)``: each row's generated tokens; ``sources`` ``(N, S)``: each row's source
    tokens, padded with -1 (needed for the coverage penalty).
    """
    if (cfg.repetition_penalty == 1.0 and cfg.coverage_penalty == 0) or hist.shape[1] == 0:
        return logp
    uses = (hist.unsqueeze(2) == hist.unsqueeze(1)).sum(2)  # (N, T): how often hist[r, i] was generated
    picked = logp.gather(1, hist) * cfg.repetition_penalty
    if cfg.coverage_penalty and sources is not None:
        in_source = (hist.unsqueeze(2) == sources.unsqueeze(1)).sum(2)  # (N, T)
        over = (uses + 1 - in_source.clamp(min=1)).clamp(min=0)
        picked -= (cfg.coverage_penalty * over.double()).to(logp.dtype)  # float64 product, as the rule states it
    return logp.scatter_(1, hist, picked)  # a token generated twice gets the same value twice


class Rules:
    """The generation rules of ``cfg`` for one batch of sources, applied to ``(N, V)`` log-probabilities
    of token ``t`` in place: banned ids, ``min_len``, n-gram blocking, then the repetition and coverage
    penalties. Batched: one set of tensor ops per step, whatever the number of rows."""

    def __init__(self, cfg: DecodeConfig, special: SpecialIds, sources: Sequence[Sequence[int]],
                 device: torch.device) -> None:
        self.cfg, self.sep = cfg, special.sep
        self.banned = torch.tensor(banned_ids(special), device=device)
        self.ignore = torch.tensor(sorted(set(cfg.ngram_ignore)), dtype=torch.long, device=device)
        self.sources: Optional[Tensor] = None  # (B, S) padded with -1: only the coverage penalty reads it
        if cfg.coverage_penalty:
            width = max(1, max(map(len, sources)))
            self.sources = torch.tensor([list(s) + [-1] * (width - len(s)) for s in sources], device=device)

    def __call__(self, logp: Tensor, hist: Tensor, t: int, source_of: Tensor) -> Tensor:
        """``hist`` ``(N, t - 1)`` the rows' tokens so far; ``source_of`` ``(N,)`` each row's source index."""
        cfg = self.cfg
        logp.index_fill_(1, self.banned, float("-inf"))
        if t - 1 < cfg.min_len:
            logp[:, self.sep] = float("-inf")
        if cfg.no_repeat_ngram_size:
            rows, tokens = blocked_ngrams(hist, cfg.no_repeat_ngram_size, self.ignore)
            logp[rows, tokens] = float("-inf")
        src = None if self.sources is None else self.sources.index_select(0, source_of)
        return penalize_repeats(logp, hist, cfg, src)


# --------------------------------------------------------------------------- search


@torch.no_grad()
def greedy_search(scorer: Scorer, sources: Sequence[Sequence[int]], cfg: DecodeConfig,
                  special: SpecialIds) -> list[Hypothesis]:
    """Greedy decoding of a batch; one :class:`Hypothesis` per source, in input order.

    Bookkeeping is batched: the live rows' tokens go into one ``(B, max_len)`` tensor and the
    host reads one flag per step (did a row end?) instead of every row's token.
    """
    logp = scorer.start(sources)  # (B, V)
    device = logp.device
    b = len(sources)
    rules = Rules(cfg, special, sources, device)
    rows = torch.arange(b, device=device)  # (N,) source index of each live row
    tokens = torch.full((b, cfg.max_len), special.pad, dtype=torch.long, device=device)
    sums = torch.zeros(b, dtype=logp.dtype, device=device)  # (N,) live rows' summed log-probs
    total = torch.zeros(b, dtype=logp.dtype, device=device)  # per source, once finished
    length = torch.zeros(b, dtype=torch.long, device=device)
    for t in range(1, cfg.max_len + 1):
        logp = rules(logp, tokens[rows, :t - 1], t, rows)
        best_lp, best = logp.max(dim=-1)  # (N,)
        sums = sums + best_lp
        tokens[rows, t - 1] = best
        ended = best == special.sep
        if t == cfg.max_len:
            ended = torch.ones_like(ended)
        if bool(ended.any()):  # the one host read per step
            done = rows[ended]
            total[done], length[done] = sums[ended], t
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            scorer.reorder(keep)
            rows, best, sums = rows[keep], best[keep], sums[keep]
        logp = scorer.step(best, t + 1)
    out = []
    for toks, lp, n in zip(tokens.tolist(), total.tolist(), length.tolist()):
        ended = toks[n - 1] == special.sep
        out.append(_hyp(toks[:n - 1] if ended else toks[:n], lp, n, ended, cfg.length_penalty))
    return out


@torch.no_grad()
def beam_search(scorer: Scorer, sources: Sequence[Sequence[int]], cfg: DecodeConfig,
                special: SpecialIds) -> list[list[Hypothesis]]:
    """Beam search of a batch; per source, its finished hypotheses best first (``[0]`` is the output).

    Per live sentence and step, the ``2K`` best (beam, token) candidates are read in rank order:
    a ``[SEP]`` among the first ``K`` finishes a hypothesis (until the sentence has ``K``), the
    first ``K`` other candidates continue (padded with dead, ``-inf`` beams when fewer). A sentence stops
    with ``K`` finished hypotheses or no continuation; at ``max_len`` the continuations finish
    unended. The bookkeeping is batched: every rule above is a tensor op over all sentences, the
    beams' tokens live in one ``(n, K, t)`` tensor, and the host reads three flags per step plus
    the few hypotheses that finish.
    """
    k = cfg.beam_size
    first = scorer.start(sources)  # (B, V)
    device, vocab = first.device, first.shape[-1]
    b = len(sources)
    rules = Rules(cfg, special, sources, device)
    scorer.reorder(torch.arange(b, device=device).repeat_interleave(k))  # every sentence's K beams
    logp = first.repeat_interleave(k, dim=0)  # (n*K, V)
    beam_scores = torch.full((b, k), float("-inf"), dtype=logp.dtype, device=device)
    beam_scores[:, 0] = 0.0  # one live beam at first, so the K beams start distinct
    alive = torch.arange(b, device=device)  # (n,) source index of each live sentence
    hist = torch.empty((b, k, 0), dtype=torch.long, device=device)  # (n, K, t - 1) each beam's tokens
    n_done = torch.zeros(b, dtype=torch.long, device=device)  # per source: finished hypotheses
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    width = min(2 * k, k * vocab)
    rank = torch.arange(width, device=device)

    def finish(mask: Tensor, scores: Tensor, beam: Tensor, word: Tensor, t: int, ended: bool) -> None:
        s, c = mask.nonzero(as_tuple=True)  # row-major: each sentence's in rank order
        prefixes = hist[s, beam[s, c]]
        if not ended:
            prefixes = torch.cat([prefixes, word[s, c].unsqueeze(1)], dim=1)
        for i, toks, score in zip(alive[s].tolist(), prefixes.tolist(), scores[s, c].tolist()):
            finished[i].append(_hyp(toks, score, t, ended, cfg.length_penalty))

    for t in range(1, cfg.max_len + 1):
        n = alive.shape[0]
        logp = rules(logp, hist.reshape(n * k, t - 1), t, alive.repeat_interleave(k))
        cand = (beam_scores.reshape(-1, 1) + logp).reshape(n, k * vocab)
        scores, idx = cand.topk(width, dim=1)  # (n, 2K), best first
        beam, word = idx // vocab, idx % vocab
        live = scores > float("-inf")  # sorted: the first -inf ends a sentence's candidates
        sep = word == special.sep
        ends = live & sep & (rank < k)
        ends &= ends.cumsum(1) <= (k - n_done[alive]).unsqueeze(1)  # until the sentence has K
        cont = live & ~sep
        cont &= cont.cumsum(1) <= k
        done = n_done[alive] + ends.sum(1)  # (n,) finished hypotheses after this step
        n_done[alive] = done
        n_cont = cont.sum(1)
        keep = (done < k) & (n_cont > 0)
        stuck = (n_cont == 0) & (done == 0)
        any_end, any_stuck, any_keep = torch.stack([ends.any(), stuck.any(), keep.any()]).tolist()  # host reads
        if any_end:
            finish(ends, scores, beam, word, t, ended=True)
        if t == cfg.max_len:
            finish(cont, scores, beam, word, t, ended=False)
            break
        if any_stuck:
            i = int(alive[stuck.nonzero()[0, 0]])
            raise ValueError(f"source {i}: every token is forbidden at step {t} (banned ids, min_len and "
                             "n-gram blocking leave nothing); relax no_repeat_ngram_size or min_len")
        if not any_keep:
            break
        pick = torch.where(cont, rank, rank + width).argsort(dim=1)[keep, :k]  # continuations first, in rank
        real = torch.arange(k, device=device) < n_cont[keep].unsqueeze(1)  # (n', K); the rest: dead (-inf) beams
        kept = keep.nonzero().squeeze(1)
        parent = beam[kept].gather(1, pick)  # (n', K)
        new_word = word[kept].gather(1, pick)
        beam_scores = torch.where(real, scores[kept].gather(1, pick), float("-inf"))
        rows = (kept.unsqueeze(1) * k + parent).reshape(-1)  # (n' * K,) rows of the current batch
        scorer.reorder(rows)
        hist = torch.cat([hist.reshape(n * k, t - 1)[rows], new_word.reshape(-1, 1)], dim=1).reshape(-1, k, t)
        alive = alive[kept]
        logp = scorer.step(new_word.reshape(-1), t + 1)
    return [sorted(f, key=lambda h: -h.score) for f in finished]


S2SFT_NEG = -10000.0
"""s2s-ft's additive penalty (forbidden n-grams, [SEP] before min_len, children of finished beams)."""


def s2sft_steps(cfg: DecodeConfig, sources: Sequence[Sequence[int]]) -> int:
    """Steps s2s-ft runs for a batch: ``min(max_len, max_seq_length - longest source - 2)``."""
    if not cfg.max_seq_length:
        return cfg.max_len
    steps = min(cfg.max_len, cfg.max_seq_length - max(len(s) for s in sources) - 2)
    if steps < 1:
        raise ValueError(f"max_seq_length={cfg.max_seq_length} leaves no target step for a source of "
                         f"{max(len(s) for s in sources)} tokens; truncate sources to max_seq_length - 2 - max_len")
    return steps


def _trim(tokens: list[int], special: SpecialIds) -> list[int]:
    """s2s-ft's output: the tokens before the first ``[SEP]`` or ``[PAD]``."""
    for i, w in enumerate(tokens):
        if w in (special.sep, special.pad):
            return tokens[:i]
    return tokens


@torch.no_grad()
def s2sft_greedy_search(scorer: Scorer, sources: Sequence[Sequence[int]], cfg: DecodeConfig,
                        special: SpecialIds) -> list[Hypothesis]:
    """s2s-ft's greedy decoding (``beam_size 1``): the arg-max token every step, no minimum length and
    no n-gram blocking (s2s-ft applies neither in greedy mode), output cut at the first ``[SEP]`` or
    ``[PAD]``; optional special-token ban. A row stops at that token (later tokens are cut anyway)."""
    logp = scorer.start(sources)
    device = logp.device
    banned = torch.tensor(banned_ids(special), device=device)
    steps = s2sft_steps(cfg, sources)
    alive = list(range(len(sources)))
    hist: list[list[int]] = [[] for _ in sources]
    sums = torch.zeros(len(sources), dtype=logp.dtype, device=device)
    out: list[Optional[Hypothesis]] = [None] * len(sources)
    for t in range(1, steps + 1):
        if cfg.ban_special:
            logp = logp.index_fill(1, banned, float("-inf"))
        best_lp, best = logp.max(dim=-1)
        sums = sums + best_lp
        best_l, sums_l = best.tolist(), sums.tolist()
        keep: list[int] = []
        for r, i in enumerate(alive):
            w = best_l[r]
            end = w in (special.sep, special.pad)
            if not end:
                hist[i].append(w)
            if end or t == steps:
                out[i] = _hyp(hist[i], sums_l[r], t, w == special.sep, cfg.length_penalty)
            else:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device)
            scorer.reorder(index)
            best, sums = best.index_select(0, index), sums.index_select(0, index)
            alive = [alive[r] for r in keep]
        logp = scorer.step(best, t + 1)
    return [h for h in out if h is not None]


@torch.no_grad()
def s2sft_beam_search(scorer: Scorer, sources: Sequence[Sequence[int]], cfg: DecodeConfig,
                      special: SpecialIds) -> list[Hypothesis]:
    """s2s-ft's beam search (``BertForSeq2SeqDecoder.beam_search``), rule for rule; one output per source.

    * Step 1 takes the top ``K`` tokens; every later step takes the top ``K`` tokens of each beam
      and keeps the top ``K`` of those ``K * K`` by summed log-probability. A ``[SEP]`` among them
      uses up a beam slot; that beam's children get ``-10000`` added at the next step (it stays a
      slot holder but is never extended in practice).
    * Penalties are additive ``-10000`` as in s2s-ft: repeated n-grams (its rule: nothing is
      blocked when the last ``n - 1`` tokens hold an ignored token, and an ignored token is never
      blocked) and, filled rather than added, ``[SEP]`` at steps ``<= min_len``.
    * It runs every step (:func:`s2sft_steps`), keeping every ``[SEP]`` hypothesis that enters the
      top ``K``; the output is chosen among all of them plus the last frame's beams, frames up to
      the first one whose ``K`` tokens are all ``[SEP]``. Ranking: the summed log-probability,
      divided by ``((5 + len) / 6) ** alpha`` only when ``alpha > 0``; the first best wins ties.
    * The output is cut at the first ``[SEP]`` or ``[PAD]``; ``cfg.ban_special`` optionally sets
      ``[PAD] [CLS] [MASK] [P]`` to ``-inf`` first (s2s-ft has no such ban).
    """
    k = cfg.beam_size
    logp = scorer.start(sources)  # (B, V)
    device, dtype = logp.device, logp.dtype
    b = len(sources)
    steps = s2sft_steps(cfg, sources)
    banned = torch.tensor(banned_ids(special), device=device)
    ignore = frozenset(cfg.ngram_ignore)
    frame_scores: list[Tensor] = []  # per step (B, K)
    frame_ids: list[Tensor] = []
    frame_ptrs: list[Tensor] = []
    seqs: list[list[int]] = []  # per row (B*K) the partial sequence, [SEP]s included
    offsets = (torch.arange(b, device=device) * k).unsqueeze(1)  # (B, 1)
    for t in range(1, steps + 1):
        if t > 1:
            logp = scorer.step(frame_ids[-1].reshape(-1), t)  # (B*K, V)
        if cfg.no_repeat_ngram_size and seqs and len(seqs[0]) >= cfg.no_repeat_ngram_size:
            rows, cols = [], []
            for r, seq in enumerate(seqs):
                for w in _s2sft_dup_ngram(seq, cfg.no_repeat_ngram_size, ignore):
                    rows.append(r)
                    cols.append(w)
            if rows:
                forbid = torch.zeros_like(logp)
                forbid[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = 1.0
                logp = logp + forbid * S2SFT_NEG
        if cfg.min_len and t <= cfg.min_len:
            logp = logp.clone()
            logp[:, special.sep] = S2SFT_NEG
        if cfg.ban_special:
            logp = logp.index_fill(1, banned, float("-inf"))
        kk_scores, kk_ids = logp.topk(k, dim=-1)  # (B or B*K, K)
        if t == 1:
            scores, ids = kk_scores, kk_ids
            ptrs = torch.zeros((b, k), dtype=torch.long, device=device)
            scorer.reorder(torch.arange(b, device=device).repeat_interleave(k))
            seqs = [[w] for w in ids.reshape(-1).tolist()]
        else:
            last_eos = (frame_ids[-1] == special.sep).to(dtype).reshape(-1, 1)
            kk_scores = kk_scores + last_eos * S2SFT_NEG + frame_scores[-1].reshape(-1, 1)
            scores, idx = kk_scores.reshape(b, k * k).topk(k, dim=-1)  # (B, K)
            ptrs = torch.div(idx, k, rounding_mode="floor")
            ids = kk_ids.reshape(b, k * k).gather(1, idx)
            rows = (offsets + ptrs).reshape(-1)
            scorer.reorder(rows)
            seqs = [seqs[r] + [w] for r, w in zip(rows.tolist(), ids.reshape(-1).tolist())]
        frame_scores.append(scores)
        frame_ids.append(ids)
        frame_ptrs.append(ptrs)
    return _s2sft_select(frame_scores, frame_ids, frame_ptrs, cfg, special)


def _s2sft_dup_ngram(seq: list[int], n: int, ignore: frozenset[int]) -> list[int]:
    """s2s-ft's ``get_dup_ngram_candidates``: tokens that would repeat an n-gram of ``seq``."""
    if len(seq) < n:
        return []
    tail = seq[len(seq) - n + 1:] if n > 1 else []
    if ignore.intersection(tail):
        return []
    out = set()
    for i in range(len(seq) - n + 1):
        if seq[i:i + n - 1] == tail and seq[i + n - 1] not in ignore:
            out.add(seq[i + n - 1])
    return sorted(out)


def _s2sft_select(frame_scores: list[Tensor], frame_ids: list[Tensor], frame_ptrs: list[Tensor], cfg: DecodeConfig,
                  special: SpecialIds) -> list[Hypothesis]:
    """s2s-ft's final choice and back-tracking (see :func:`s2sft_beam_search`)."""
    scores = [f.tolist() for f in frame_scores]
    ids = [f.tolist() for f in frame_ids]
    ptrs = [f.tolist() for f in frame_ptrs]
    out: list[Hypothesis] = []
    for b in range(len(ids[0])):
        last = len(ids) - 1
        for fid in range(len(ids)):
            if all(w == special.sep for w in ids[fid][b]):
                last = fid
                break
        best, best_f, best_i = -math.inf, -1, -1
        for fid in range(last + 1):
            for i, w in enumerate(ids[fid][b]):
                if w == special.sep or fid == last:
                    s = scores[fid][b][i]
                    if cfg.length_penalty > 0:
                        s /= length_penalty(fid + 1, cfg.length_penalty)
                    if s > best:
                        best, best_f, best_i = s, fid, i
        if best_f == -1:  # every score -inf (only possible with the ban): s2s-ft outputs [PAD], i.e. nothing
            out.append(Hypothesis([], -math.inf, len(ids), -math.inf, False))
            continue
        seq = [ids[best_f][b][best_i]]
        i = best_i
        for fid in range(best_f, 0, -1):
            i = ptrs[fid][b][i]
            seq.append(ids[fid - 1][b][i])
        seq.reverse()
        ended = seq[-1] == special.sep
        out.append(Hypothesis(_trim(seq, special), scores[best_f][b][best_i], best_f + 1, best, ended))
    return out


def generate(model: PMLMModel, sources: Sequence[Sequence[int]], special: SpecialIds,
             cfg: DecodeConfig, static: bool = False, compile: bool = False) -> list[Hypothesis]:
    """Best hypothesis per source: greedy for ``beam_size == 1``, else beam search.

    ``static``: the fixed-shape step (:class:`StaticCachedScorer`); ``compile``: that step through
    ``torch.compile`` (:class:`CompiledStaticScorer`).

    Raises:
        ValueError: a source plus ``max_len`` needs more positions than the model has.
    """
    longest = max(len(s) for s in sources) + 2 + cfg.max_len
    if longest > model.config.max_position:
        raise ValueError(f"source of {longest - 2 - cfg.max_len} tokens + [CLS] [SEP] + max_len={cfg.max_len} needs "
                         f"{longest} positions but the model has {model.config.max_position}: lower --max-src-len or "
                         "--max-len")
    if compile:
        scorer: Scorer = CompiledStaticScorer(model, special, cfg.max_len)
    elif static:
        scorer = StaticCachedScorer(model, special, cfg.max_len)
    else:
        scorer = CachedScorer(model, special)
    with torch.no_grad():
        if cfg.rules == "s2s-ft":
            search = s2sft_greedy_search if cfg.beam_size == 1 else s2sft_beam_search
            return search(scorer, sources, cfg, special)
        if cfg.beam_size == 1:
            return greedy_search(scorer, sources, cfg, special)
        return [hyps[0] for hyps in beam_search(scorer, sources, cfg, special)]


# --------------------------------------------------------------------------- CLI


DETOK_MODES = ("surface", "rules", "tokenizer")


def decode_records(model: PMLMModel, tokenizer: Any, records: Sequence[Any], cfg: DecodeConfig, max_src_len: int,
                   batch_size: int, progress: bool = True, detok: str = "surface",
                   compile: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decode pair records (sources only), in batches of similar source length; output in input order.

    ``detok`` (:mod:`pmlm_engine.detok`): ``surface`` (default: punctuation rules, then the
    source's own casing and spacing where the prediction copies it), ``rules`` (no source), or
    ``tokenizer`` (the tokenizer's plain decode).
    """
    from .detok import detokenize
    from .s2s_data import encode_pairs

    if detok not in DETOK_MODES:
        raise ValueError(f"detok={detok!r}: expected one of {DETOK_MODES}")

    sources_only = [dataclasses.replace(r, tgt=None) for r in records]  # references play no part in decoding
    enc = encode_pairs(sources_only, tokenizer, max_src_len, max_tgt_len=2)
    enc.stats.log("decoding inputs", targets=False)
    special = tokenizer.special_ids()
    order = sorted(range(len(enc.src)), key=lambda i: -len(enc.src[i]))
    results: list[Optional[dict[str, Any]]] = [None] * len(order)
    bar = tqdm(total=len(order), desc=f"decode ({'greedy' if cfg.beam_size == 1 else f'beam {cfg.beam_size}'})",
               unit="ex", disable=not progress)
    t0 = time.perf_counter()
    generated = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        hyps = generate(model, [enc.src[i] for i in idx], special, cfg, compile=compile)
        for i, h in zip(idx, hyps):
            generated += h.length
            if detok == "tokenizer":
                text = tokenizer.decode(h.tokens)
            else:
                src = records[i].src if detok == "surface" and isinstance(records[i].src, str) else None
                text = detokenize(tokenizer, h.tokens, src)
            results[i] = {"id": enc.ids[i], "prediction": text, "score": h.score, "length": h.length}
        bar.update(len(idx))
    bar.close()
    dt = time.perf_counter() - t0
    stats = {"examples": len(order), "seconds": dt, "generated_tokens": generated,
             "tokens_per_s": generated / dt if dt > 0 else float("nan"),
             "src_truncated": enc.stats.src_truncated}
    return [r for r in results if r is not None], stats


def token_ids(tokenizer: Any, tokens: Iterable[str]) -> tuple[int, ...]:
    """Vocabulary ids of the ignore-list tokens (``ValueError`` naming an unknown one)."""
    return tuple(tokenizer.token_to_id(t) for t in tokens)


def check_device(spec: str) -> torch.device:
    """``device`` as a torch device; a CUDA device on a torch without CUDA is refused by name."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={spec!r} is not a torch device: use cpu or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentUnavailableError(f"device={spec}: this torch ({torch.__version__}) sees no CUDA device; "
                                          f"use --device cpu")
    return device


def _resolve_job(job: Any) -> tuple[Any, Any, DecodeConfig, int]:
    """``(model folder meta, tokenizer, search config, max_src_len)`` of a
    :class:`pmlm_engine.train_config.DecodeJobConfig`; lengths left at 0 come from the model's
    fine-tuning configuration (or, with ``search.max_seq_length``, s2s-ft's cut). Every check of a
    decoding run that needs no model weights."""
    from .checkpoint import model_tokenizer, read_config
    from .tokenizer import load_tokenizer, resolve_tokenizer

    if not job.init:
        raise ValueError("init is not set: name the model folder to decode with (--init runs/ft/final)")
    check_device(job.device)
    check_output_file(job.out, inputs=[job.data.corpus, job.init], what="out")  # before any work
    meta = read_config(job.init)
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{job.init}/config.json has no 'model' section: {job.init} is not a model folder written "
                         f"by pmlm_engine (import a Hugging Face folder first: python -m pmlm_engine.convert import)")
    ft = meta.get("finetune", {})
    ft_data = ft.get("data", ft)  # nested since the config family, flat before
    tokenizer = load_tokenizer(resolve_tokenizer(job.data.tokenizer, model_tokenizer(job.init)))
    if tokenizer.vocab_size != meta["model"]["vocab_size"]:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model {meta['model']['vocab_size']}: "
                         "set data.tokenizer (--tokenizer) to the tokenizer the model was fine-tuned with")
    if job.search.beam_size > tokenizer.vocab_size:
        raise ValueError(f"search.beam_size={job.search.beam_size} exceeds the vocabulary ({tokenizer.vocab_size} "
                         f"tokens): a beam holds at most one hypothesis per token; use a smaller --beam (4-10 is "
                         f"usual)")
    s = job.search
    min_len = s.min_len if s.min_len is not None else int(s.rules == "s2s-ft")
    try:
        cfg = DecodeConfig(beam_size=s.beam_size, max_len=job.data.max_tgt_len or ft_data.get("max_tgt_len", 48),
                           min_len=min_len, length_penalty=s.length_penalty, rules=s.rules,
                           ban_special=s.ban_special, max_seq_length=s.max_seq_length,
                           no_repeat_ngram_size=s.no_repeat_ngram_size,
                           ngram_ignore=token_ids(tokenizer, s.ngram_ignore),
                           repetition_penalty=s.repetition_penalty, coverage_penalty=s.coverage_penalty)
    except ValueError as exc:
        raise ValueError(f"search.{exc}") from None
    max_src = job.data.max_src_len or (cfg.max_seq_length - 2 - cfg.max_len if cfg.max_seq_length  # s2s-ft's cut
                                       else ft_data.get("max_src_len", 464))
    if not (job.data.max_tgt_len and job.data.max_src_len):  # 0 = the model's: say which value that is
        log.info("lengths not set (0) come from the model: max_src_len=%d, max_tgt_len=%d", max_src, cfg.max_len)
    return meta, tokenizer, cfg, max_src


def check(job: Any) -> None:
    """The checks of a decoding run, without decoding (``--print-config``)."""
    from .s2s_data import load_pair_spec

    _resolve_job(job)
    load_pair_spec(job.data.corpus, default_split="test", require_tgt=False)


def run(job: Any) -> dict[str, Any]:
    """Decode ``job.data.corpus`` with the model ``job.init`` into ``job.out``; return the statistics."""
    from .checkpoint import load_model
    from .s2s_data import load_pair_spec, write_jsonl

    if job.threads:
        torch.set_num_threads(job.threads)
    _, tokenizer, cfg, max_src = _resolve_job(job)
    records = load_pair_spec(job.data.corpus, default_split="test", require_tgt=False)
    backend = job.model.attention_backend
    if job.model.compile:
        backend = COMPILED_BACKEND if backend == "auto" else backend
        log.info("model.compile: each decoding step runs through torch.compile (the first batches compile), "
                 "attention backend %s (auto means %s: one graph; the torch backend plans each forward on the host)",
                 backend, COMPILED_BACKEND)
    model = load_model(job.init, attention_backend=backend).to(job.device).eval()
    log.info("decoding %d inputs with %s (max_src_len %d)", len(records), cfg, max_src)
    rows, stats = decode_records(model, tokenizer, records, cfg, max_src, job.data.batch_size, detok=job.detok,
                                 compile=job.model.compile)
    write_jsonl(rows, job.out)
    return {"output": job.out, **stats, "config": dataclasses.asdict(cfg)}


def report(job: Any, summary: dict[str, Any]) -> None:
    print(json.dumps(json_safe(summary), indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pmlm_engine.decode``: flags and config of :mod:`pmlm_engine.cli`."""
    from .cli import main as cli_main

    return cli_main("decode", run, check, report, argv)


if __name__ == "__main__":
    sys.exit(main())
