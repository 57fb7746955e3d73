"""Does pre-training help generation? The small-scale ablation and the peer at equal budget.

    python benchmarks/quality.py --out runs/quality/full             # the full table (hours on 2 cores)
    python benchmarks/quality.py --smoke --out runs/quality/smoke    # CI: the same path, tiny
    python benchmarks/quality.py --rows pmlm ae --tasks news --seeds 0   # a subset

Rows (the same fine-tuning recipe, steps, batch, lengths and decoding for every row):

* ``pmlm``, ``ae``, ``par``: the same model (``--preset``, default ``tiny``) pre-trained *from
  scratch* on the same token budget (steps x batch x length) with three objectives: AE + PAR
  (PMLM, the paper's), AE only (BERT's MLM: ``par_weight=0``), PAR only (``ae_weight=0``);
* ``none``: the same model, randomly initialised, fine-tuned directly (no pre-training);
* ``minilm``: the real MiniLM-L6 checkpoint (``small`` shape, pre-trained by its authors on far
  more text), fine-tuned with our pseudo-mask recipe: what a warm start buys;
* ``bert2bert`` (news only): the peer a user would otherwise pick, transformers'
  ``EncoderDecoderModel`` built from the same MiniLM for encoder and decoder (cross-attention
  initialised as transformers does), trained with the same steps, batch, lengths, optimizer,
  schedule and label smoothing, decoded with the same beam settings (``--peer-lr``: its own
  learning rate, since the project's collapses it).

Tasks: ``news`` (article -> headline) and ``wiki`` (Wikipedia lead -> one-line description);
fixed held-out test splits of :mod:`pmlm_engine.s2s_data`. The pre-training text is the news
articles and Wikipedia leads *minus every test source* of both tasks, so no row has seen a test
input. Every unit of work (a pre-training, a fine-tune + decode) writes its own result file and
is skipped when that file exists: re-running the same command continues an interrupted run.

Outputs in ``--out``: ``report.md`` (tables: ROUGE-1/2/L with 95% bootstrap intervals, steps,
step time, parameters; pre-training losses), ``results.json``, ``quality.png`` (pre-training
loss curves and ROUGE-L per row and task), the pre-trained and fine-tuned models, predictions.
Scores are means over seeds; the interval bootstraps the test set (1,000 resamples by default)
over the seed-averaged per-example scores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmlm_engine import decode as decode_cli
from pmlm_engine import finetune as finetune_cli
from pmlm_engine import train as train_cli
from pmlm_engine.evaluate import BOOTSTRAP_METRICS, bootstrap_ci, bootstrap_indices, rouge_per_example, score
from pmlm_engine.s2s_data import builtin_pairs, write_jsonl

log = logging.getLogger("quality")

OBJECTIVES = {"pmlm": {"ae_weight": 1.0, "par_weight": 1.0}, "ae": {"ae_weight": 1.0, "par_weight": 0.0},
              "par": {"ae_weight": 0.0, "par_weight": 1.0}}
ROWS = ("pmlm", "ae", "par", "none", "minilm", "bert2bert")
TASKS = ("news", "wiki")
ROW_NAMES = {"pmlm": "PMLM (AE + PAR), from scratch", "ae": "AE only (MLM), from scratch",
             "par": "PAR only, from scratch", "none": "no pre-training", "minilm": "MiniLM warm start (ours)",
             "bert2bert": "BERT2BERT (transformers), MiniLM"}


@dataclass
class Plan:
    """Every budget and setting of a run; one for the full table, one for ``--smoke``."""

    preset: str = "tiny"
    pretrain_steps: int = 1200
    pretrain_batch: int = 16
    pretrain_len: int = 128
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 100
    pretrain_docs: int = 0
    """Documents of pre-training text (0 = all)."""
    finetune_steps: int = 500
    finetune_batch: int = 16
    finetune_lr: float = 3e-4
    finetune_warmup: int = 60
    peer_lr: float = 1e-4
    max_src_len: int = 128
    max_tgt_len: int = 24
    target_mask_prob: float = 0.3
    label_smoothing: float = 0.1
    train_pairs: int = 0
    """Fine-tuning pairs per task (0 = the whole train split)."""
    test_pairs: int = 0
    """Test pairs per task (0 = all 200)."""
    beam: int = 5
    length_penalty: float = 0.6
    no_repeat_ngram: int = 3
    min_len: int = 3
    bootstrap: int = 1000
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    rows: list[str] = field(default_factory=lambda: list(ROWS))


SMOKE = {"pretrain_steps": 3, "pretrain_batch": 2, "pretrain_len": 32, "pretrain_warmup": 1, "pretrain_docs": 40,
             "finetune_steps": 3, "finetune_batch": 2, "finetune_warmup": 1, "max_src_len": 24, "max_tgt_len": 8,
             "train_pairs": 16,
             "test_pairs": 6, "beam": 2, "min_len": 1, "bootstrap": 100, "seeds": [0], "tasks": ["news"]}


# --------------------------------------------------------------------------- data


def prepare_data(out: Path, plan: Plan) -> dict[str, Path]:
    """Pre-training text (test sources removed) and each task's train / test pairs, as JSONL files."""
    from pmlm_engine.corpus import news_articles, wiki_summaries

    data = out / "data"
    files = {"pretrain": data / "pretrain.jsonl"}
    for task in plan.tasks:
        files[f"{task}:train"], files[f"{task}:test"] = data / f"{task}_train.jsonl", data / f"{task}_test.jsonl"
    if all(f.is_file() for f in files.values()):
        return files
    held_out: set[str] = set()
    for task in TASKS:  # every task's test sources leave the pre-training text, whichever tasks run
        held_out.update(str(r.src) for r in builtin_pairs(task, "test"))
    docs = [t for corpus in (news_articles(), wiki_summaries()) for t in corpus if t not in held_out]
    if plan.pretrain_docs:
        docs = docs[::max(1, len(docs) // plan.pretrain_docs)][:plan.pretrain_docs]  # both corpora, evenly
    write_jsonl([{"text": t} for t in docs], files["pretrain"])
    for task in plan.tasks:
        for split, limit in (("train", plan.train_pairs), ("test", plan.test_pairs)):
            recs = builtin_pairs(task, split)
            recs = recs[:limit] if limit else recs
            write_jsonl([{"id": r.id, "src": r.src, "tgt": r.tgt} for r in recs], files[f"{task}:{split}"])
    log.info("pre-training text: %d documents (test sources of %s removed)", len(docs), ", ".join(TASKS))
    return files


# --------------------------------------------------------------------------- units


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    t0 = time.perf_counter()
    log.info("[quality] %s ...", what)
    yield
    log.info("[quality] %s done in %.0f s", what, time.perf_counter() - t0)


def _cli(fn: Any, argv: list[str], what: str) -> None:
    """Run a pmlm_engine CLI entry point in this process (the CLI's own flags, no interpreter start-up)."""
    rc = fn(argv)
    if rc:
        raise RuntimeError(f"{what} failed (exit {rc}): {' '.join(argv)}")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def pretrain(out: Path, files: dict[str, Path], plan: Plan, objective: str, seed: int, threads: int) -> Path:
    """Pre-train the ``plan.preset`` model from scratch on ``objective``; returns its model folder."""
    run = out / "pretrain" / f"{objective}-s{seed}"
    if (run / "final").is_dir():
        return run / "final"
    weights = OBJECTIVES[objective]
    argv = ["--preset", plan.preset, "--corpus", str(files["pretrain"]), "--steps", str(plan.pretrain_steps),
            "--batch-size", str(plan.pretrain_batch), "--max-len", str(plan.pretrain_len),
            "--lr", str(plan.pretrain_lr), "--warmup", str(plan.pretrain_warmup), "--seed", str(seed),
            "--out", str(run), "--threads", str(threads), "--precision", "bf16",
            "--set", f"ae_weight={weights['ae_weight']}", f"par_weight={weights['par_weight']}",
            "logging.tensorboard=false", "logging.progress=false"]
    with _step(f"pre-train {objective} seed {seed}"):
        _cli(train_cli.main, argv, f"pre-training {objective}")
    return run / "final"


def random_init(out: Path, plan: Plan, seed: int) -> Path:
    """The ``plan.preset`` model with fresh random weights (the "no pre-training" row)."""
    from pmlm_engine.checkpoint import save_model
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.model import PMLMModel
    from pmlm_engine.tokenizer import load_tokenizer

    folder = out / "pretrain" / f"none-s{seed}" / "final"
    if not folder.is_dir():
        torch.manual_seed(seed)
        vocab = minilm_dir() / "vocab.txt"
        model = PMLMModel(ModelConfig.preset(plan.preset, vocab_size=load_tokenizer(str(vocab)).vocab_size))
        save_model(model, folder, extra={"tokenizer": str(vocab)})
    return folder


def finetune_and_score(out: Path, files: dict[str, Path], plan: Plan, row: str, task: str, seed: int, init: str,
                       threads: int) -> dict[str, Any]:
    """Fine-tune ``init`` on ``task`` with the plan's recipe, decode the test split, score it."""
    run = out / "finetune" / f"{row}-{task}-s{seed}"
    result_file = run / "result.json"
    if result_file.is_file():
        return _read_json(result_file)
    argv = ["--init", init, "--corpus", str(files[f"{task}:train"]), "--out", str(run), "--steps",
            str(plan.finetune_steps), "--batch-size", str(plan.finetune_batch), "--max-src-len", str(plan.max_src_len),
            "--max-tgt-len", str(plan.max_tgt_len), "--lr", str(plan.finetune_lr), "--warmup",
            str(plan.finetune_warmup), "--target-mask-prob", str(plan.target_mask_prob), "--label-smoothing",
            str(plan.label_smoothing), "--precision", "bf16", "--seed", str(seed), "--threads", str(threads)]
    with _step(f"fine-tune {row} on {task}, seed {seed}"):
        _cli(finetune_cli.main, argv, f"fine-tuning {row} on {task}")
    rows = _metrics(run / "metrics.jsonl")
    pred = run / "predictions.jsonl"
    with _step(f"decode {row} on {task}, seed {seed}"):
        _cli(decode_cli.main, ["--init", str(run / "final"), "--corpus", str(files[f"{task}:test"]), "--out",
                               str(pred), "--beam", str(plan.beam), "--length-penalty", str(plan.length_penalty),
                               "--no-repeat-ngram", str(plan.no_repeat_ngram), "--min-len", str(plan.min_len),
                               "--threads", str(threads)], f"decoding {row} on {task}")
    predictions = [json.loads(line)["prediction"] for line in pred.read_text().splitlines() if line.strip()]
    from pmlm_engine.checkpoint import load_model

    params = load_model(run / "final").num_parameters()
    result = {"row": row, "task": task, "seed": seed, "predictions": predictions, "steps": plan.finetune_steps,
              "train_seconds": _train_seconds(rows),
              "params": params, "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}
    result_file.write_text(json.dumps(result))
    return result


def bert2bert(out: Path, files: dict[str, Path], plan: Plan, task: str, seed: int, threads: int) -> dict[str, Any]:
    """The peer: transformers' EncoderDecoderModel from MiniLM (encoder and decoder), the same budget and decoding.

    Inputs are laid out as ours: source ``[CLS] src[:max_src_len] [SEP]``; target the first
    ``max_tgt_len - 1`` tokens plus ``[SEP]``, fed to the decoder after ``[CLS]`` (its start token).
    Optimizer, schedule, clipping, label smoothing and bf16 autocast are the engine's
    (:mod:`pmlm_engine.optim`); the loss is the mean over target tokens, as in our fine-tuning.
    Beam search is transformers' ``generate`` (its length penalty divides by ``length ** alpha``,
    ours by the GNMT term ``((5 + length) / 6) ** alpha``: the one setting that is not identical).
    """
    run = out / "finetune" / f"bert2bert-{task}-s{seed}"
    result_file = run / "result.json"
    if result_file.is_file():
        return _read_json(result_file)
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.finetune import PairStream
    from pmlm_engine.optim import OptimConfig, build_optimizer, build_scheduler
    from pmlm_engine.s2s_data import encode_pairs, read_jsonl_pairs
    from pmlm_engine.tokenizer import load_tokenizer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    run.mkdir(parents=True, exist_ok=True)
    mdir = str(minilm_dir())
    tok = load_tokenizer(str(minilm_dir() / "vocab.txt"))
    sp = tok.special_ids()
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(mdir, mdir)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = sp.cls, sp.pad, sp.sep
    params = sum(p.numel() for p in model.parameters())
    train = encode_pairs(read_jsonl_pairs(files[f"{task}:train"]), tok, plan.max_src_len, plan.max_tgt_len)
    ocfg = OptimConfig(lr=plan.peer_lr, warmup_steps=plan.finetune_warmup)
    opt = build_optimizer(model, ocfg)
    sched = build_scheduler(opt, ocfg, plan.finetune_steps)
    stream = PairStream(len(train.ids), seed)  # our fine-tuning's data order: the same batches

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    model.train()
    losses, step_times = [], []
    with _step(f"fine-tune bert2bert on {task}, seed {seed}"):
        for step in tqdm(range(plan.finetune_steps), desc="fine-tune bert2bert", unit="step"):
            t0 = time.perf_counter()
            first = step * plan.finetune_batch
            picks = [stream.at(q)[1] for q in range(first, first + plan.finetune_batch)]
            src = pad([[sp.cls] + train.src[i] + [sp.sep] for i in picks], sp.pad)
            tgt = [train.tgt[i] for i in picks]  # ends with [SEP]
            dec_in = pad([[sp.cls] + t[:-1] for t in tgt], sp.pad)
            labels = pad(tgt, -100)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=src, attention_mask=(src != sp.pad).long(), decoder_input_ids=dec_in,
                               decoder_attention_mask=(dec_in != sp.pad).long()).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, label_smoothing=plan.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step_times.append(time.perf_counter() - t0)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"bert2bert loss became {losses[-1]}: lower --peer-lr")
    model.eval()
    test = encode_pairs(read_jsonl_pairs(files[f"{task}:test"]), tok, plan.max_src_len, plan.max_tgt_len)
    predictions = []
    with _step(f"decode bert2bert on {task}, seed {seed}"), torch.no_grad():
        for start in range(0, len(test.ids), 16):
            src = pad([[sp.cls] + s + [sp.sep] for s in test.src[start:start + 16]], sp.pad)
            gen = model.generate(input_ids=src, attention_mask=(src != sp.pad).long(), num_beams=plan.beam,
                                 max_new_tokens=plan.max_tgt_len, min_new_tokens=plan.min_len,
                                 no_repeat_ngram_size=plan.no_repeat_ngram, length_penalty=plan.length_penalty,
                                 early_stopping=True, decoder_start_token_id=sp.cls, eos_token_id=sp.sep,
                                 pad_token_id=sp.pad)
            for row in gen.tolist():
                ids = [t for t in row[1:] if t not in (sp.pad, sp.cls)]
                predictions.append(tok.decode(ids[:ids.index(sp.sep)] if sp.sep in ids else ids))
    k = max(1, min(20, len(losses) // 4))
    result = {"row": "bert2bert", "task": task, "seed": seed, "predictions": predictions, "steps": plan.finetune_steps,
                  "train_seconds": sum(step_times), "params": params, "first_loss": sum(losses[:k]) / k,
                  "last_loss": sum(losses[-k:]) / k, "lr": plan.peer_lr}
    result_file.write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------- report


def aggregate(results: Sequence[dict[str, Any]], references: dict[str, list[str]], plan: Plan) -> list[dict[str, Any]]:
    """One line per (row, task): seed means, the bootstrap interval of the seed-averaged per-example scores."""
    lines = []
    for task in plan.tasks:
        refs = references[task]
        idx = bootstrap_indices(len(refs), plan.bootstrap, seed=0)
        for row in plan.rows:
            runs = [r for r in results if r["row"] == row and r["task"] == task]
            if not runs:
                continue
            per_seed = [rouge_per_example(r["predictions"], refs) for r in runs]
            line: dict[str, Any] = {"row": row, "task": task, "seeds": [r["seed"] for r in runs],
                                    "steps": runs[0]["steps"], "params": runs[0]["params"],
                                    "step_s": statistics.mean(r["train_seconds"] / r["steps"] for r in runs),
                                    "last_loss": statistics.mean(r["last_loss"] for r in runs),
                                    "empty": sum(1 for r in runs for p in r["predictions"] if not p.strip())}
            for k in BOOTSTRAP_METRICS:
                per_example = [statistics.mean(s[k][i] for s in per_seed) for i in range(len(refs))]
                line[k] = 100 * statistics.mean(per_example)
                line[f"{k}_ci"] = bootstrap_ci(per_example, idx)
                line[f"{k}_seeds"] = [100 * statistics.mean(s[k]) for s in per_seed]
            lines.append(line)
        lead = score([" ".join(s.split()[:10]) for s in references[f"{task}:src"]], refs, "lead-10")
        lead_per = rouge_per_example([" ".join(s.split()[:10]) for s in references[f"{task}:src"]], refs)
        line = {"row": "lead-10", "task": task, "seeds": [], "steps": 0, "params": 0, "step_s": 0.0,
                "last_loss": float("nan"), "empty": 0}
        for k in BOOTSTRAP_METRICS:
            line[k] = getattr(lead, k)
            line[f"{k}_ci"] = bootstrap_ci(lead_per[k], idx)
        lines.append(line)
    return lines


def _train_seconds(rows: Sequence[dict[str, Any]]) -> float:
    """Training time of a run from its metrics rows (each row is a window of steps)."""
    steps_before = [0] + [r["step"] for r in rows[:-1]]
    return sum(r["step_time_s"] * (r["step"] - b) for r, b in zip(rows, steps_before))


def pretrain_table(out: Path, plan: Plan) -> list[dict[str, Any]]:
    """Final pre-training losses (AE, PAR: the last metrics row) per objective and seed."""
    table = []
    for objective in OBJECTIVES:
        for seed in plan.seeds:
            rows = [r for r in _metrics(out / "pretrain" / f"{objective}-s{seed}" / "metrics.jsonl") if "loss" in r]
            if rows:
                table.append({"objective": objective, "seed": seed, "steps": rows[-1]["step"],
                                  "ae_loss": rows[-1].get("ae_loss"), "par_loss": rows[-1].get("par_loss"),
                                  "tokens_per_s": statistics.mean(r.get("tokens_per_s", 0.0) for r in rows),
                                  "train_seconds": _train_seconds(rows)})
    return table


def plot(out: Path, lines: Sequence[dict[str, Any]], plan: Plan) -> Path:
    """``quality.png``: pre-training AE / PAR loss curves (left), ROUGE-L with intervals per row and task (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"pmlm": "C0", "ae": "C1", "par": "C2"}
    for objective in OBJECTIVES:
        for seed in plan.seeds:
            rows = [r for r in _metrics(out / "pretrain" / f"{objective}-s{seed}" / "metrics.jsonl") if "loss" in r]
            for key, style in (("ae_loss", "-"), ("par_loss", "--")):
                if rows and OBJECTIVES[objective][key.replace("loss", "weight")] > 0:
                    ax1.plot([r["step"] for r in rows], [r[key] for r in rows], style, marker=".",
                             color=colors[objective],
                             alpha=1.0 if seed == plan.seeds[0] else 0.5,
                             label=f"{objective}: {key}" if seed == plan.seeds[0] else None)
    ax1.set_xlabel("pre-training step")
    ax1.set_ylabel("cross-entropy (nats)")
    ax1.set_title("pre-training from scratch (solid AE, dashed PAR)")
    ax1.legend(fontsize=8)
    names = [r for r in (*plan.rows, "lead-10") if any(x["row"] == r for x in lines)]
    width = 0.8 / max(1, len(plan.tasks))
    for t, task in enumerate(plan.tasks):
        ys, errs, xs = [], [[], []], []
        for i, name in enumerate(names):
            line = next((x for x in lines if x["row"] == name and x["task"] == task), None)
            if line is None:
                continue
            xs.append(i + t * width)
            ys.append(line["rougeL"])
            errs[0].append(line["rougeL"] - line["rougeL_ci"][0])
            errs[1].append(line["rougeL_ci"][1] - line["rougeL"])
        ax2.bar(xs, ys, width, yerr=errs, capsize=3, label=task)
    ax2.set_xticks([i + width * (len(plan.tasks) - 1) / 2 for i in range(len(names))])
    ax2.set_xticklabels(names, rotation=20, fontsize=8)
    ax2.set_ylabel("ROUGE-L (95% interval)")
    ax2.set_title("fine-tuned, same budget")
    ax2.legend()
    fig.tight_layout()
    png = out / "quality.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def report(out: Path, lines: Sequence[dict[str, Any]], pre: Sequence[dict[str, Any]], plan: Plan,
           meta: dict[str, Any]) -> str:
    """``report.md``: the settings, the machine, the score table and the pre-training losses."""
    md = [f"# Quality ablation ({'smoke' if meta['smoke'] else 'full'})", "",
          (f"{meta['machine']}; torch {torch.__version__}; {meta['threads']} thread(s). Training time in the units' "
           f"own logs: pre-training {meta['pretrain_seconds'] / 60:.0f} min, fine-tuning "
           f"{meta['finetune_seconds'] / 60:.0f} min (decoding not counted). This invocation: load at start "
           f"{meta['load_start']}, at end {meta['load_end']}, {meta['seconds']:.0f} s (units already done are "
           "reused, not rerun)."), "",
          f"Settings: `{json.dumps(dataclasses.asdict(plan))}`", "",
          "| task | row | ROUGE-1 | ROUGE-2 | ROUGE-L | seeds | steps | step (s) | parameters | empty |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for x in lines:
        cells = " | ".join(f"{x[k]:.2f} [{x[f'{k}_ci'][0]:.2f}, {x[f'{k}_ci'][1]:.2f}]" for k in BOOTSTRAP_METRICS)
        extra = (f"{len(x['seeds'])} | {x['steps']} | {x['step_s']:.3f} | {x['params'] / 1e6:.1f}M | {x['empty']}"
                 if x["row"] != "lead-10" else " | | | | ")
        md.append(f"| {x['task']} | {ROW_NAMES.get(x['row'], x['row'])} | {cells} | {extra} |")
    md += ["", "Pre-training (last 10-step window):", "",
           "| objective | seed | steps | AE loss | PAR loss | tokens/s |",
           "|---|---|---|---|---|---|"]
    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    for p in pre:
        md.append(f"| {p['objective']} | {p['seed']} | {p['steps']} | {fmt(p['ae_loss'])} | {fmt(p['par_loss'])} | "
                  f"{p['tokens_per_s']:.0f} |")
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text


# --------------------------------------------------------------------------- driver


def run(plan: Plan, out: Path, threads: int, smoke: bool) -> dict[str, Any]:
    """Every unit of the plan (skipping finished ones), then the report, the plot and results.json."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    files = prepare_data(out, plan)
    results = []
    for seed in plan.seeds:
        inits: dict[str, str] = {}
        for row in plan.rows:
            if row in OBJECTIVES:
                inits[row] = str(pretrain(out, files, plan, row, seed, threads))
            elif row == "none":
                inits[row] = str(random_init(out, plan, seed))
            elif row == "minilm":
                inits[row] = "minilm"
        for task in plan.tasks:
            for row in plan.rows:
                if row == "bert2bert":
                    if task == "news":
                        results.append(bert2bert(out, files, plan, task, seed, threads))
                else:
                    results.append(finetune_and_score(out, files, plan, row, task, seed, inits[row], threads))
    references: dict[str, list[str]] = {}
    for task in plan.tasks:
        recs = [json.loads(line) for line in files[f"{task}:test"].read_text().splitlines() if line.strip()]
        references[task], references[f"{task}:src"] = [r["tgt"] for r in recs], [r["src"] for r in recs]
    lines = aggregate(results, references, plan)
    pre = pretrain_table(out, plan)
    meta = {"smoke": smoke, "threads": threads, "load_start": f"{load_start:.2f}",
            "load_end": f"{os.getloadavg()[0]:.2f}",
                "seconds": time.perf_counter() - t0, "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, Python {platform.python_version()}",
            "pretrain_seconds": sum(p["train_seconds"] for p in pre),
            "finetune_seconds": sum(r["train_seconds"] for r in results)}
    text = report(out, lines, pre, plan, meta)
    png = plot(out, lines, plan)
    (out / "results.json").write_text(json.dumps({"plan": dataclasses.asdict(plan), "meta": meta, "table": lines,
                                                       "pretrain": pre}, indent=2))
    print(text)
    log.info("report %s, plot %s", out / "report.md", png)
    return {"table": lines, "pretrain": pre, "meta": meta, "report": text}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality/full", help="output folder (a rerun skips finished units)")
    p.add_argument("--smoke", action="store_true", help="the CI run: tiny budgets, one task, one seed (< 1 min)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--rows", nargs="+", choices=ROWS, help=f"rows to run (default all: {' '.join(ROWS)})")
    p.add_argument("--tasks", nargs="+", choices=TASKS, help="tasks (default news wiki)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override Plan fields, e.g. pretrain_steps=800 finetune_steps=300")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs its tokenizer choice per scorer
    if a.threads < 1:
        p.error(f"--threads {a.threads}: expected a positive number")
    kwargs: dict[str, Any] = dict(SMOKE) if a.smoke else {}
    known = {f.name: f for f in dataclasses.fields(Plan)}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            p.error(f"--set {item}: expected FIELD=VALUE with FIELD one of {sorted(known)}")
        kwargs[key] = json.loads(value)
    for name in ("rows", "tasks", "seeds"):
        if getattr(a, name):
            kwargs[name] = getattr(a, name)
    plan = Plan(**kwargs)
    run(plan, Path(a.out), a.threads, a.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
