"""The command line of the jobs (train, finetune, decode): one flag vocabulary, one config path.

Every flag is a shortcut for exactly one config field, under the same name in every entry
point that has the field (``--init`` is ``init`` in train, finetune and decode; ``--batch-size``
is ``data.batch_size``; ...). The transformers spellings of the common ones are accepted as
aliases (``--model_name_or_path``, ``--output_dir``, ``--max_steps``, ``--warmup_steps``,
``--gradient_accumulation_steps``, ...); the names of earlier versions of this project are
accepted silently. Precedence: defaults < ``--config FILE`` < flags < ``--set KEY=VALUE``.

``--print-config`` prints the resolved configuration exactly as ``--config`` accepts it, after the
checks a real run makes (``... --print-config > job.json`` then ``--config job.json``, or
``--print-config | ... --config -``).

This module imports nothing heavy: ``--help`` answers without loading torch. Quieting of
dependency logs and known upstream warnings happens here, once (:func:`quiet_dependencies`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


@dataclass(frozen=True)
class Flag:
    """One shortcut flag: its name, the config field it sets, and its aliases."""

    name: str
    field: str
    help: str
    type: Callable[[str], Any] = str
    choices: Optional[Sequence[Any]] = None
    nargs: Optional[str] = None
    aliases: tuple[str, ...] = ()
    """Shown in --help (the transformers spellings)."""
    legacy: tuple[str, ...] = ()
    """Accepted but not shown (earlier names of this project's flags)."""
    metavar: Optional[str] = None
    per_kind: tuple[tuple[str, str], ...] = ()
    """``(entry point, help)`` where the field means something more specific there."""


PRECISIONS = ["auto", "fp32", "bf16", "fp16"]

# --------------------------------------------------------------------------- the vocabulary
# One definition per flag; an entry point lists the names it offers.

FLAGS = {f.name: f for f in [
    Flag("--init", "init", "model to start from: minilm, a model folder, or a HF BERT/UniLMv2 checkpoint",
         aliases=("--model_name_or_path",), legacy=("--init-from", "--model"), metavar="MODEL",
         per_kind=(("decode", "the fine-tuned model folder (finetune's out/final)"),)),
    Flag("--out", "out", "output folder", aliases=("--output_dir",), legacy=("--output",), metavar="PATH",
         per_kind=(("decode", "the predictions file (JSONL)"),)),
    Flag("--corpus", "data.corpus", "text: news, wiki, acl, .txt/.jsonl files, folders, globs",
         legacy=("--data", "--input"), metavar="SRC",
         per_kind=(("finetune", "pairs: .jsonl of {src, tgt}, or news | wiki | acl (train split; NAME:SPLIT)"),
                   ("decode", "sources: .jsonl with src (and id), or a split such as news:test"))),
    Flag("--tokenizer", "data.tokenizer", "vocab.txt, tokenizer.json or sentencepiece .model", metavar="FILE"),
    Flag("--steps", "steps", "optimizer steps", int, aliases=("--max_steps",), metavar="N"),
    Flag("--warmup", "optim.warmup_steps", "linear warmup steps (clamped to --steps)", int,
         aliases=("--warmup_steps",), metavar="N"),
    Flag("--lr", "optim.lr", "peak learning rate", float, aliases=("--learning_rate",)),
    Flag("--optimizer", "optim.optimizer", "update rule (fused kernels on a GPU)",
         choices=["adamw", "lamb"], aliases=("--optim",)),
    Flag("--batch-size", "data.batch_size", "examples per rank and micro-step", int,
         aliases=("--per_device_train_batch_size",), metavar="N", per_kind=(("decode", "sources per batch"),)),
    Flag("--grad-accum", "grad_accum", "micro-steps per optimizer step", int,
         aliases=("--gradient_accumulation_steps",), metavar="N"),
    Flag("--precision", "precision", "auto = bf16 where the hardware has it natively, else fp32", choices=PRECISIONS,
         legacy=("--dtype",)),
    Flag("--engine", "engine", "auto = deepspeed under a distributed launcher, else torch",
         choices=["auto", "torch", "deepspeed"]),
    Flag("--zero-stage", "deepspeed.zero_stage", "DeepSpeed ZeRO stage", int, choices=[0, 1, 2, 3]),
    Flag("--ds-config", "deepspeed.overrides", "JSON of extra DeepSpeed keys", aliases=("--deepspeed",),
         metavar="FILE"),
    Flag("--seed", "data.seed", "seed of data order, masking and dropout", int, metavar="N"),
    Flag("--resume", "checkpoint.resume", "auto | never | a checkpoint folder", metavar="WHAT"),
    Flag("--save-every", "checkpoint.every", "checkpoint every N steps (0: at the end and on SIGTERM)", int,
         aliases=("--save_steps",), metavar="N"),
    Flag("--log-every", "logging.every", "steps per metrics row", int, aliases=("--logging_steps",), metavar="N"),
    Flag("--attention-backend", "model.attention_backend", "auto | reference | sdpa | torch | triton",
         metavar="NAME"),
    Flag("--threads", "threads", "torch threads per process (0 = auto)", int, metavar="N"),
    # pre-training
    Flag("--preset", "model.preset", "model size", choices=["tiny", "small", "base"]),
    Flag("--batching", "data.batching", "one example per row, or several packed", choices=["padded", "packed"]),
    Flag("--max-len", "data.max_len", "main-part tokens per example", int, metavar="N"),
    Flag("--max-docs", "data.max_docs", "use only the first N documents (0 = all)", int, metavar="N"),
    # fine-tuning and decoding
    Flag("--max-src-len", "data.max_src_len", "source tokens kept", int, metavar="N",
         per_kind=(("decode", "source tokens kept (0 = the fine-tuning value)"),)),
    Flag("--max-tgt-len", "data.max_tgt_len", "target tokens kept, [SEP] included", int, metavar="N",
         per_kind=(("decode", "most tokens generated, [SEP] included (0 = the fine-tuning value)"),)),
    Flag("--label-smoothing", "label_smoothing", "label smoothing of the cross-entropy", float,
         aliases=("--label_smoothing_factor",)),
    Flag("--target-mask-prob", "data.target_mask_prob", "probability of [MASK]ing a teacher-forced target token",
         float),
    Flag("--max-examples", "data.max_examples", "use only the first N pairs (0 = all)", int, metavar="N"),
    Flag("--recipe", "recipe", "corruption + label smoothing + loss normalisation", choices=["pmlm", "s2s-ft"]),
    Flag("--keep-prob", "data.keep_prob", "s2s-ft recipe: [P] input kept as the label", float),
    Flag("--random-prob", "data.random_prob", "s2s-ft recipe: [P] input replaced by a random token", float),
    # decoding
    Flag("--device", "device", "torch device: cpu, cuda:0, ..."),
    Flag("--beam", "search.beam_size", "beam size (1 = greedy)", int, aliases=("--num_beams",), metavar="K"),
    Flag("--min-len", "search.min_len", "[SEP] forbidden before this many tokens", int, metavar="N"),
    Flag("--length-penalty", "search.length_penalty", "GNMT alpha", float, metavar="A"),
    Flag("--no-repeat-ngram", "search.no_repeat_ngram_size", "block repeated n-grams of this size", int,
         aliases=("--no_repeat_ngram_size",), metavar="N"),
    Flag("--max-nonfinite-steps", "guard.max_nonfinite_steps", "N non-finite steps in a row stop the run",
         int, metavar="N"),
    Flag("--ngram-ignore", "search.ngram_ignore", "tokens whose n-grams are never blocked", nargs="*",
         metavar="TOKEN"),
    Flag("--beam-rules", "search.rules", "search rules: pmlm, or s2s-ft's beam search reproduced",
         choices=["pmlm", "s2s-ft"]),
    Flag("--max-seq-length", "search.max_seq_length", "s2s-ft rules: s2s-ft's --max_seq_length (0 = off)", int,
         metavar="N"),
    Flag("--repetition-penalty", "search.repetition_penalty", "scale log-probs of generated tokens (1 = off)",
         float),
    Flag("--coverage-penalty", "search.coverage_penalty", "per use of a token beyond its source count (0 = off)",
         float),
    Flag("--detok", "detok", "prediction text", choices=["surface", "rules", "tokenizer"]),
]}

SWITCHES = (
    ("--overwrite", "checkpoint.overwrite", "with --resume never: delete earlier outputs"),
    ("--trust-checkpoint", "checkpoint.trust", "resume from a folder without manifest (unpickles)"),
    ("--compile", "model.compile", "run the encoder layers through torch.compile"),
)
"""Training switches that take no value (each sets its boolean field to true)."""

TRAINING = ["--init", "--out", "--steps", "--warmup", "--lr", "--optimizer", "--batch-size", "--grad-accum",
            "--precision", "--engine", "--zero-stage", "--ds-config", "--seed", "--resume", "--save-every",
            "--log-every", "--attention-backend", "--tokenizer", "--threads"]


@dataclass(frozen=True)
class EntryPoint:
    """One command: its module, a short description, its config class and its flags."""

    module: str
    description: str
    config: str
    """Name of the config class in :mod:`pmlm_engine.train_config`."""
    flags: tuple[str, ...]


ENTRY_POINTS = {
    "train": EntryPoint(
        "pmlm_engine.train",
        "Pre-train a PMLM (AE + PAR in one pass), in one process or many under DeepSpeed.\n"
        "Outputs in --out: metrics.jsonl, tb/, loss.png, checkpoints/ (resumable: run the same command\n"
        "again after SIGTERM/Ctrl-C), final/ (the fp32 model). Method: docs/.",
        "TrainConfig", ("--corpus", *TRAINING, "--preset", "--max-len", "--batching", "--max-docs")),
    "finetune": EntryPoint(
        "pmlm_engine.finetune",
        "Fine-tune a PMLM on source/target pairs (seq2seq with pseudo masks), one process or many.\n"
        "Outputs in --out: metrics.jsonl, checkpoints/ (resumable: run the same command again after\n"
        "SIGTERM/Ctrl-C), final/ (the model decode loads). Method: docs/.",
        "FinetuneConfig", ("--corpus", *TRAINING, "--max-src-len", "--max-tgt-len", "--label-smoothing",
                           "--target-mask-prob", "--max-examples", "--recipe", "--keep-prob", "--random-prob")),
    "decode": EntryPoint(
        "pmlm_engine.decode",
        "Decode with a fine-tuned model: batched greedy or beam search with the key/value cache.\n"
        "Writes --out: one JSON line {id, prediction, score, length} per input. Method: docs/.",
        "DecodeJobConfig", ("--init", "--corpus", "--out", "--tokenizer", "--max-src-len", "--max-tgt-len",
                            "--batch-size", "--beam", "--min-len", "--length-penalty", "--no-repeat-ngram",
                            "--ngram-ignore", "--beam-rules", "--max-seq-length", "--repetition-penalty",
                            "--coverage-penalty", "--detok", "--attention-backend", "--device", "--threads")),
}
META = ("config", "set", "print_config", "local_rank")


def launcher_prog(module: str) -> str:
    """How this process was started, for the usage line: deepspeed, torchrun, a script path or ``-m``."""
    script = module.replace(".", "/") + ".py"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun --nproc_per_node N {script}"
    if "CROSS_RANK" in os.environ or "LOCAL_SIZE" in os.environ:  # set by DeepSpeed's launcher
        return f"deepspeed --num_gpus N {script}"
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None and sys.argv[0].endswith(".py"):
        return f"python {script}"
    return f"python -m {module}"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """One line per flag where the terminal allows it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(120, _columns()))


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def build_parser(kind: str) -> argparse.ArgumentParser:
    """The parser of entry point ``kind``; every flag's dest is its dotted config field."""
    ep = ENTRY_POINTS[kind]
    prog = launcher_prog(ep.module)
    p = argparse.ArgumentParser(prog=prog, description=ep.description, formatter_class=_Formatter,
                                usage=f"{prog} [--config FILE] [--set KEY=VALUE ...] [--print-config] [flags]",
                                epilog="Each flag sets the config field in brackets; --set wins over flags. "
                                       "All fields: --print-config.")
    p.add_argument("--config", metavar="FILE", help="JSON config ('-' = stdin), e.g. from --print-config")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. --set optim.lr=3e-4 data.batch_size=8")
    p.add_argument("--print-config", action="store_true",
                   help="check the configuration as a run would, print it as --config accepts it, exit")
    g = p.add_argument_group("flags")
    for name in ep.flags:
        f = FLAGS[name]
        metavar = f.metavar or ("X" if f.type is float else None)
        kwargs: dict[str, Any] = dict(dest=f.field, type=f.type, default=argparse.SUPPRESS, metavar=metavar)
        if f.choices is not None:
            kwargs.update(choices=f.choices, metavar="{" + ",".join(map(str, f.choices)) + "}")
        if f.nargs is not None:
            kwargs["nargs"] = f.nargs
        legacy = f.legacy
        if name == "--corpus" and kind == "train":  # a list of sources in pre-training, one pair file otherwise
            kwargs["nargs"], legacy = "+", ()
        also = f" (or {', '.join(f.aliases)})" if f.aliases else ""
        text = dict(f.per_kind).get(kind, f.help)
        g.add_argument(name, help=f"{text} [{f.field}]{also}", **kwargs)
        if f.aliases or legacy:  # accepted under the other spellings, listed once in the help text
            g.add_argument(*f.aliases, *legacy, help=argparse.SUPPRESS, **kwargs)
    if kind in ("train", "finetune"):  # switches (no value): output safety, compile
        for name, dest, text in SWITCHES:
            g.add_argument(name, dest=dest, action="store_const", const=True, default=argparse.SUPPRESS,
                           help=f"{text} [{dest}]")
        f = FLAGS["--max-nonfinite-steps"]
        g.add_argument(f.name, dest=f.field, type=f.type, default=argparse.SUPPRESS, metavar=f.metavar,
                       help=f"{f.help} [{f.field}]")
    if kind == "decode":
        g.add_argument("--compile", dest="model.compile", action="store_const", const=True, default=argparse.SUPPRESS,
                       help="run each decoding step through torch.compile (compiles first) [model.compile]")
        g.add_argument("--no-ban-special", dest="search.ban_special", action="store_false", default=argparse.SUPPRESS,
                       help="s2s-ft rules: allow [PAD]/[CLS]/[MASK] as s2s-ft does [search.ban_special=false]")
    if kind == "train":
        g.add_argument("--no-deepspeed", dest="engine", action="store_const", const="torch", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    # the DeepSpeed launcher passes --local_rank; the rank is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def quiet_dependencies() -> None:
    """The one place where known dependency chatter is silenced at the default log level:
    absl's "Using default tokenizer." (rouge-score), DeepSpeed's INFO lines, and the FutureWarnings
    that DeepSpeed's ZeRO collectives trigger in torch 2.13 (``torch.distributed.all_gather_into_tensor``
    / ``reduce_scatter_tensor`` "is deprecated", one per call: 64 lines in a 20-step 2-process ZeRO-3
    run). ``--set logging.level=DEBUG`` shows them again."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", category=FutureWarning, message=deprecated)


def setup_logging(level: str = "INFO") -> None:
    """Log lines with time and source; ranks other than 0 log warnings only."""
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level.upper() if rank == 0 else logging.WARNING)
    if level.upper() != "DEBUG":
        quiet_dependencies()


def parse(kind: str, argv: Optional[Sequence[str]] = None,
          args: Optional[argparse.Namespace] = None) -> tuple[Any, argparse.Namespace]:
    """``(config, args)`` for entry point ``kind``: defaults < --config < flags < --set."""
    if args is None:
        args = build_parser(kind).parse_args(argv)
    from . import train_config

    cls = getattr(train_config, ENTRY_POINTS[kind].config)
    extra = {k: v for k, v in vars(args).items() if k not in META}
    return train_config.load_config(args.config, args.set, extra, cls), args


def main(kind: str, run: Callable[[Any], dict[str, Any]], check: Callable[[Any], None],
         report: Callable[[Any, dict[str, Any]], None], argv: Optional[Sequence[str]] = None) -> int:
    """Parse, then ``--print-config`` (``check`` + print) or ``run`` + ``report``, inside the shared
    error boundary (:func:`pmlm_engine.errors.run_cli`): a user-caused error is one ``error: ...``
    line and the exit status of its class; ``--debug`` shows tracebacks."""
    from .errors import run_cli

    return run_cli(lambda args: _main(kind, run, check, report, args), argv)


def _main(kind: str, run: Callable[[Any], dict[str, Any]], check: Callable[[Any], None],
          report: Callable[[Any, dict[str, Any]], None], argv: Optional[Sequence[str]]) -> int:
    args = build_parser(kind).parse_args(argv)  # --help and usage errors end here, before any heavy import
    setup_logging()
    try:
        cfg, args = parse(kind, args=args)
        level = getattr(getattr(cfg, "logging", None), "level", "INFO")
        setup_logging(level)
        if args.print_config:
            check(cfg)
            from .train_config import to_dict

            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        summary = run(cfg)
    finally:
        if "torch" in sys.modules:
            from .engine import shutdown

            shutdown()
    report(cfg, summary)
    return 0
