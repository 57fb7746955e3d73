"""Batched greedy and beam-search decoding with the model's key/value cache (PMLM.md section 7).

    python -m pmlm_engine.decode --model runs/news-ft/final --input news:test --output runs/news-ft/pred.jsonl --beam 5

One model definition: decoding calls :class:`pmlm_engine.model.PMLMModel` as it is, with a
:class:`~pmlm_engine.model.KVCache`. The first call feeds ``[CLS] src [SEP]`` (right-padded,
``doc_id -1`` on padding) plus ``[P]_1`` at position ``|main|``; every later step ``t`` feeds
two tokens, the previous output ``y_{t-1}`` (``step t-1``, position ``|main| + t - 2``) and
``[P]_t`` (``step -t``, position ``|main| + t - 1``), both in segment 1, and reads the
distribution of ``y_t`` off the ``[P]``. This is fine-tuning's layout (PMLM.md section 6), so
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

Device-agnostic: every tensor is created on the model's device; nothing calls ``.cuda()``.
Finished sentences are dropped from the batch (``KVCache.reorder``) so the cost follows the
sentences still running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Protocol, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from .layout import SpecialIds
from .model import KVCache, PMLMModel

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

    def __post_init__(self) -> None:
        checks = [
            (self.beam_size >= 1, "beam_size", ">= 1"),
            (self.max_len >= 1, "max_len", ">= 1"),
            (0 <= self.min_len < self.max_len, "min_len", f"in [0, max_len={self.max_len})"),
            (math.isfinite(self.length_penalty), "length_penalty", "a finite number"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", ">= 0 (0 = off)"),
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
    """What the search needs: the next-token log-probabilities of every live row."""

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

    def start(self, sources: Sequence[Sequence[int]]) -> Tensor:
        batch = source_batch(sources, self.special, self.device)
        self.main_len = batch.pop("main_len")
        self.cache = KVCache()
        hidden = self.model(**batch, cache=self.cache)  # (B, M + 1, C)
        return _log_softmax(self.model.lm_head(hidden[:, -1]))  # (B, V)

    def step(self, prev: Tensor, t: int) -> Tensor:
        if self.main_len is None:
            raise RuntimeError("CachedScorer.step() before start()")
        n = prev.shape[0]
        pos = (self.main_len + t - 2).unsqueeze(1) + torch.arange(2, device=self.device)  # (N, 2)
        ids = torch.stack([prev, torch.full_like(prev, self.special.p)], dim=1)  # (N, 2)
        step = torch.tensor([t - 1, -t], device=self.device).expand(n, 2)
        ones = torch.ones((n, 2), dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, ones, step, doc_ids=ones - 1, cache=self.cache)  # (N, 2, C)
        return _log_softmax(self.model.lm_head(hidden[:, 1]))  # (N, V)

    def reorder(self, index: Tensor) -> None:
        if self.main_len is None:
            raise RuntimeError("CachedScorer.reorder() before start()")
        self.cache.reorder(index)
        self.main_len = self.main_len.index_select(0, index)


# --------------------------------------------------------------------------- constraints


def banned_ids(special: SpecialIds) -> list[int]:
    """Ids never generated: ``[PAD] [CLS] [MASK] [P]``."""
    return sorted({special.pad, special.cls, special.mask, special.p})


def blocked_ngram_tokens(history: Sequence[int], n: int, ignore: frozenset[int]) -> set[int]:
    """Tokens that would complete an n-gram already in ``history`` (n-grams holding an ignored
    token are not blocked)."""
    if n <= 0 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    out: set[int] = set()
    for i in range(len(history) - n + 1):
        gram = history[i:i + n]
        if tuple(gram[:-1]) == prefix and not ignore.intersection(gram):
            out.add(gram[-1])
    return out


def constrain(logp: Tensor, histories: Sequence[Sequence[int]], t: int, cfg: DecodeConfig, special: SpecialIds,
              banned: Tensor) -> Tensor:
    """Apply the generation rules to ``(N, V)`` log-probabilities of token ``t`` (returns a new tensor)."""
    logp = logp.index_fill(1, banned, float("-inf"))
    if t - 1 < cfg.min_len:
        logp[:, special.sep] = float("-inf")
    if cfg.no_repeat_ngram_size:
        ignore = frozenset(cfg.ngram_ignore)
        rows: list[int] = []
        cols: list[int] = []
        for r, hist in enumerate(histories):
            for w in blocked_ngram_tokens(hist, cfg.no_repeat_ngram_size, ignore):
                rows.append(r)
                cols.append(w)
        if rows:
            logp[torch.tensor(rows, device=logp.device), torch.tensor(cols, device=logp.device)] = float("-inf")
    return logp


# --------------------------------------------------------------------------- search


@torch.no_grad()
def greedy_search(scorer: Scorer, sources: Sequence[Sequence[int]], cfg: DecodeConfig,
                  special: SpecialIds) -> list[Hypothesis]:
    """Greedy decoding of a batch; one :class:`Hypothesis` per source, in input order."""
    logp = scorer.start(sources)  # (B, V)
    device = logp.device
    banned = torch.tensor(banned_ids(special), device=device)
    alive = list(range(len(sources)))  # source index of each live row
    hist: list[list[int]] = [[] for _ in sources]
    sums = torch.zeros(len(sources), dtype=logp.dtype, device=device)  # (N,) live rows' summed log-probs
    out: list[Optional[Hypothesis]] = [None] * len(sources)
    for t in range(1, cfg.max_len + 1):
        logp = constrain(logp, [hist[i] for i in alive], t, cfg, special, banned)
        best_lp, best = logp.max(dim=-1)  # (N,)
        sums = sums + best_lp
        best_l, sums_l = best.tolist(), sums.tolist()
        keep: list[int] = []
        for r, i in enumerate(alive):
            w = best_l[r]
            if w == special.sep or t == cfg.max_len:
                if w != special.sep:
                    hist[i].append(w)
                out[i] = _hyp(hist[i], sums_l[r], t, w == special.sep, cfg.length_penalty)
            else:
                hist[i].append(w)
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
def beam_search(scorer: Scorer, sources: Sequence[Sequence[int]], cfg: DecodeConfig,
                special: SpecialIds) -> list[list[Hypothesis]]:
    """Beam search of a batch; per source, its finished hypotheses best first (``[0]`` is the output)."""
    k = cfg.beam_size
    first = scorer.start(sources)  # (B, V)
    device, vocab = first.device, first.shape[-1]
    b = len(sources)
    banned = torch.tensor(banned_ids(special), device=device)
    scorer.reorder(torch.arange(b, device=device).repeat_interleave(k))  # every sentence's K beams
    logp = first.repeat_interleave(k, dim=0)  # (B*K, V)
    beam_scores = torch.full((b, k), float("-inf"), dtype=logp.dtype, device=device)
    beam_scores[:, 0] = 0.0  # one live beam at first, so the K beams start distinct
    alive = list(range(b))  # source index of each live sentence slot
    hist: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]  # per slot, per beam
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    for t in range(1, cfg.max_len + 1):
        n = len(alive)
        logp = constrain(logp, [h for slot in hist for h in slot], t, cfg, special, banned)
        cand = (beam_scores.reshape(-1, 1) + logp).reshape(n, k * vocab)  # (n, K*V)
        top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)  # (n, 2K)
        ts, ti = top_scores.tolist(), top_idx.tolist()
        keep_slots: list[int] = []
        rows: list[int] = []
        new_scores: list[list[float]] = []
        new_tokens: list[int] = []
        new_hist: list[list[list[int]]] = []
        for s, i in enumerate(alive):
            cont: list[tuple[float, int, int]] = []
            for rank, (score, idx) in enumerate(zip(ts[s], ti[s])):
                if score == float("-inf"):
                    break
                beam, w = divmod(idx, vocab)
                if w == special.sep:
                    if rank < k and len(finished[i]) < k:
                        finished[i].append(_hyp(hist[s][beam], score, t, True, cfg.length_penalty))
                elif len(cont) < k:
                    cont.append((score, beam, w))
            if t == cfg.max_len:
                for score, beam, w in cont:
                    finished[i].append(_hyp(hist[s][beam] + [w], score, t, False, cfg.length_penalty))
                continue
            if not cont and not finished[i]:
                raise ValueError(f"source {i}: every token is forbidden at step {t} (banned ids, min_len and "
                                 "n-gram blocking leave nothing); relax no_repeat_ngram_size or min_len")
            if len(finished[i]) >= k or not cont:
                continue
            while len(cont) < k:  # fewer than K live continuations: pad with dead beams
                cont.append((float("-inf"), cont[0][1], cont[0][2]))
            keep_slots.append(s)
            rows += [s * k + beam for _, beam, _ in cont]
            new_scores.append([score for score, _, _ in cont])
            new_tokens += [w for _, _, w in cont]
            new_hist.append([hist[s][beam] + [w] for _, beam, w in cont])
        if not keep_slots:
            break
        scorer.reorder(torch.tensor(rows, device=device))
        alive = [alive[s] for s in keep_slots]
        hist = new_hist
        beam_scores = torch.tensor(new_scores, dtype=logp.dtype, device=device)  # (n', K)
        logp = scorer.step(torch.tensor(new_tokens, device=device), t + 1)
    return [sorted(f, key=lambda h: -h.score) for f in finished]


def generate(model: PMLMModel, sources: Sequence[Sequence[int]], special: SpecialIds,
             cfg: DecodeConfig) -> list[Hypothesis]:
    """Best hypothesis per source: greedy for ``beam_size == 1``, else beam search.

    Raises:
        ValueError: a source plus ``max_len`` needs more positions than the model has.
    """
    longest = max(len(s) for s in sources) + 2 + cfg.max_len
    if longest > model.config.max_position:
        raise ValueError(f"source of {longest - 2 - cfg.max_len} tokens + [CLS] [SEP] + max_len={cfg.max_len} needs "
                         f"{longest} positions but the model has {model.config.max_position}: lower --max-src-len or "
                         "--max-len")
    scorer = CachedScorer(model, special)
    with torch.no_grad():
        if cfg.beam_size == 1:
            return greedy_search(scorer, sources, cfg, special)
        return [hyps[0] for hyps in beam_search(scorer, sources, cfg, special)]


# --------------------------------------------------------------------------- CLI


def decode_records(model: PMLMModel, tokenizer: Any, records: Sequence[Any], cfg: DecodeConfig, max_src_len: int,
                   batch_size: int, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decode pair records (sources only), in batches of similar source length; output in input order."""
    from .s2s_data import encode_pairs

    sources_only = [dataclasses.replace(r, tgt=None) for r in records]  # references play no part in decoding
    enc = encode_pairs(sources_only, tokenizer, max_src_len, max_tgt_len=2)
    enc.stats.log("decoding inputs")
    special = tokenizer.special_ids()
    order = sorted(range(len(enc.src)), key=lambda i: -len(enc.src[i]))
    results: list[Optional[dict[str, Any]]] = [None] * len(order)
    bar = tqdm(total=len(order), desc=f"decode ({'greedy' if cfg.beam_size == 1 else f'beam {cfg.beam_size}'})",
               unit="ex", disable=not progress)
    t0 = time.perf_counter()
    generated = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        hyps = generate(model, [enc.src[i] for i in idx], special, cfg)
        for i, h in zip(idx, hyps):
            generated += h.length
            results[i] = {"id": enc.ids[i], "prediction": tokenizer.decode(h.tokens), "score": h.score,
                          "length": h.length}
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmlm_engine.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (pmlm_engine.finetune's final/)")
    p.add_argument("--input", required=True,
                   help="JSONL with 'src' (and optional 'id'), or a built-in split such as news:test")
    p.add_argument("--output", required=True, help="JSONL to write: {id, prediction, score, length} per input")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one recorded in the model folder)")
    p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy (default 1)")
    p.add_argument("--max-len", type=int, default=None,
                   help="most generated tokens incl. [SEP] (default: the fine-tuning max_tgt_len, else 48)")
    p.add_argument("--min-len", type=int, default=0, help="[SEP] forbidden before this many tokens (default 0)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="GNMT alpha (default 0: none)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="block repeated n-grams of this size (default off)")
    p.add_argument("--ngram-ignore", nargs="*", default=[], metavar="TOKEN",
                   help="vocabulary tokens whose n-grams are never blocked (s2s-ft used '.')")
    p.add_argument("--max-src-len", type=int, default=None,
                   help="source tokens kept (default: the fine-tuning max_src_len, else 464)")
    p.add_argument("--batch-size", type=int, default=16, help="sources per batch (default 16)")
    p.add_argument("--attention-backend", default="auto", help="auto | reference | sdpa | torch | triton")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, all cores; 1 is faster on a shared, busy machine)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads {args.threads}: expected a positive number")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from .checkpoint import load_model, read_config
        from .s2s_data import load_pair_spec, write_jsonl
        from .tokenizer import load_tokenizer, resolve_tokenizer

        meta = read_config(args.model)
        ft = meta.get("finetune", {})
        tokenizer = load_tokenizer(resolve_tokenizer(args.tokenizer, meta.get("tokenizer")))
        model = load_model(args.model, attention_backend=args.attention_backend).to(args.device).eval()
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model {model.config.vocab_size}: "
                             "pass the tokenizer the model was fine-tuned with (--tokenizer)")
        cfg = DecodeConfig(beam_size=args.beam, max_len=args.max_len or ft.get("max_tgt_len", 48),
                           min_len=args.min_len, length_penalty=args.length_penalty,
                           no_repeat_ngram_size=args.no_repeat_ngram,
                           ngram_ignore=token_ids(tokenizer, args.ngram_ignore))
        max_src = args.max_src_len or ft.get("max_src_len", 464)
        records = load_pair_spec(args.input, default_split="test", require_tgt=False)
        log.info("decoding %d inputs with %s (max_src_len %d)", len(records), cfg, max_src)
        rows, stats = decode_records(model, tokenizer, records, cfg, max_src, args.batch_size)
        write_jsonl(rows, args.output)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"output": args.output, **stats, "config": dataclasses.asdict(cfg)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
