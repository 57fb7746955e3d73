"""Which repetition remedy to decode with: ROUGE and repetition rates on the validation split.

    python benchmarks/repetition.py --init runs/news-fit/final [--corpus news:valid] [--beam 5] [--threads 1]

Decodes ``--corpus`` (default ``news:valid``: 200 pairs held out of the training split, never the
test split; fine-tune the model on ``news:fit``) once per setting below, with the same model,
beam size, length penalty and lengths, and prints ROUGE-1/2/L, BLEU-4 and the share of
predictions that repeat a content word / a word bigram (:func:`pmlm_engine.evaluate.repetition_rates`):

* ``none``: no remedy;
* ``ngram3``: trigram blocking (s2s-ft's ``--forbid_duplicate_ngrams``, the demo's setting);
* ``unigram+ignore`` / ``bigram+ignore``: unigram / bigram blocking, n-grams holding punctuation
  or a stopword (:data:`IGNORE`) exempt;
* ``reppen1.2`` / ``reppen1.5``: the repetition penalty;
* ``cov0.5`` / ``cov1.0``: the coverage penalty.

The best setting by mean ROUGE-1/2/L is marked; ``--output`` writes every row as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from pmlm_engine.checkpoint import load_model, model_tokenizer, read_config
from pmlm_engine.decode import DecodeConfig, decode_records
from pmlm_engine.evaluate import repetition_rates, score
from pmlm_engine.s2s_data import load_pair_spec
from pmlm_engine.tokenizer import load_tokenizer

IGNORE = tuple(". , ; : ' \" - ( ) the a an of in on at to for and or s".split())
"""Tokens whose n-grams the blocking settings leave alone (punctuation and function words)."""

SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "ngram3": dict(no_repeat_ngram_size=3),
    "unigram+ignore": dict(no_repeat_ngram_size=1, ignore=True),
    "bigram+ignore": dict(no_repeat_ngram_size=2, ignore=True),
    "reppen1.2": dict(repetition_penalty=1.2),
    "reppen1.5": dict(repetition_penalty=1.5),
    "cov0.5": dict(coverage_penalty=0.5),
    "cov1.0": dict(coverage_penalty=1.0),
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", "--model", dest="model", required=True, help="fine-tuned model folder")
    p.add_argument("--corpus", "--input", dest="input", default="news:valid",
                   help="pairs to decode and score (default news:valid)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--length-penalty", type=float, default=0.6)
    p.add_argument("--max-tgt-len", "--max-len", dest="max_len", type=int, default=None,
                   help="default: the fine-tuning max_tgt_len")
    p.add_argument("--max-src-len", type=int, default=None, help="default: the fine-tuning max_src_len")
    p.add_argument("--limit", type=int, default=0, help="first N pairs only (0 = all)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ft = read_config(args.model).get("finetune", {})
    ft = ft.get("data", ft)  # lengths: nested under "data" since the config family, flat before
    tok = load_tokenizer(model_tokenizer(args.model))
    model = load_model(args.model).eval()
    records = load_pair_spec(args.input, default_split="valid")
    if args.limit:
        records = records[:args.limit]
    refs = [str(r.tgt) for r in records]
    ignore_ids = tuple(tok.token_to_id(t) for t in IGNORE)
    max_len, max_src = args.max_len or ft.get("max_tgt_len", 48), args.max_src_len or ft.get("max_src_len", 464)
    print(f"model {args.model}; {len(records)} pairs of {args.input}; beam {args.beam}, length penalty "
          f"{args.length_penalty}, max_len {max_len}, max_src_len {max_src}; threads {torch.get_num_threads()}; "
          f"load {os.getloadavg()}")
    rows = []
    for name in args.settings.split(","):
        opts = dict(SETTINGS[name])
        ignore = ignore_ids if opts.pop("ignore", False) else ()
        cfg = DecodeConfig(beam_size=args.beam, max_len=max_len, length_penalty=args.length_penalty,
                           ngram_ignore=ignore, **opts)
        t0 = time.perf_counter()
        out, _ = decode_records(model, tok, records, cfg, max_src, batch_size=16, progress=False)
        preds = [r["prediction"] for r in out]
        s = score(preds, refs, name)
        rows.append({**dataclasses.asdict(s), **repetition_rates(preds), "seconds": time.perf_counter() - t0,
                     "mean_rouge": (s.rouge1 + s.rouge2 + s.rougeL) / 3})
    best = max(rows, key=lambda r: r["mean_rouge"])["system"]
    ref_rates = repetition_rates(refs)
    print("| setting | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 | repeat word % | repeat bigram % |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (best)" if r["system"] == best else ""
        print(f"| {r['system']}{mark} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | {r['bleu4']:.2f} | "
              f"{r['repeated_word_pct']:.1f} | {r['repeated_bigram_pct']:.1f} |")
    print(f"| references | | | | | {ref_rates['repeated_word_pct']:.1f} | {ref_rates['repeated_bigram_pct']:.1f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": rows, "best": best, "references": ref_rates}, indent=2))


if __name__ == "__main__":
    main()
