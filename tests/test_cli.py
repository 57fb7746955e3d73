"""The command line of train, finetune and decode: one flag vocabulary, light --help, configs that round-trip.

Proves: every entry point's ``--help`` runs in a fresh interpreter without importing torch (hence neither
torch.distributed nor DeepSpeed), is short plain text, and names each shared flag with the same config
field; the usage line names the launcher in use; transformers spellings and earlier names set the same
field; ``--print-config`` output fed back through ``--config -`` gives the same configuration for all
three jobs, and it runs the checks of a real run (an unknown attention backend, a missing --init fail);
the configs in examples/ parse and validate (the 8-GPU ones for a world of 8); warmup is clamped to the
step count with a log line; a fine-tune whose inputs are bad creates no output folder.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pmlm_engine import cli

from .test_train_fixtures import ROOT, paragraphs, subprocess_env, write_vocab

KINDS = ("train", "finetune", "decode")
PROBE = """
import json, runpy, sys
sys.argv = ["{module}", "--help"]
try:
    runpy.run_module("{module}", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deepspeed", "numpy", "triton"))
print("HEAVY=" + json.dumps(heavy))
"""


@pytest.mark.parametrize("kind", KINDS)
def test_help_is_short_plain_and_imports_nothing_heavy(kind: str):
    """--help in a fresh interpreter: no torch / DeepSpeed / numpy imported, < 60 lines, no reST markup."""
    module = cli.ENTRY_POINTS[kind].module
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text, heavy = proc.stdout.rsplit("HEAVY=", 1)
    assert json.loads(heavy) == []
    assert text.startswith(f"usage: python -m {module} ") and len(text.splitlines()) < 60
    assert not re.search(r":class:|:mod:|:func:|``", text)


def _flag_fields(kind: str) -> dict[str, str]:
    """flag -> the config field its help line names, read off the --help text."""
    text = cli.build_parser(kind).format_help()
    out = {}
    for m in re.finditer(r"^  (--[a-z-]+)[^\n]*(?:\n {20,}[^\n]*)*", text, re.M):
        field = re.search(r"\[([a-z_.]+)\]", m.group(0))
        if field:
            out[m.group(1)] = field.group(1)
    return out


def test_shared_flags_have_one_name_and_one_field_everywhere():
    """The flags the entry points share are listed under the same names and set the same config field."""
    fields = {kind: _flag_fields(kind) for kind in KINDS}
    shared = {"--init", "--out", "--corpus", "--tokenizer", "--batch-size", "--attention-backend", "--threads"}
    training = {"--steps", "--warmup", "--lr", "--grad-accum", "--precision", "--engine", "--zero-stage",
                "--ds-config", "--seed", "--resume", "--save-every", "--log-every"}
    for kind in KINDS:
        assert shared <= fields[kind].keys(), kind
    for kind in ("train", "finetune"):
        assert training <= fields[kind].keys(), kind
    assert {"--max-src-len", "--max-tgt-len"} <= fields["finetune"].keys() & fields["decode"].keys()
    for flag in set().union(*fields.values()):
        assert len({fields[k][flag] for k in KINDS if flag in fields[k]}) == 1, flag


def test_aliases_and_earlier_names_set_the_same_field():
    cfg, _ = cli.parse("finetune", ["--model_name_or_path", "m", "--output_dir", "o", "--max_steps", "7",
                                    "--warmup_steps", "3", "--gradient_accumulation_steps", "2", "--data", "x.jsonl",
                                    "--dtype", "bf16"])
    assert (cfg.init, cfg.out, cfg.steps, cfg.optim.warmup_steps, cfg.grad_accum) == ("m", "o", 7, 3, 2)
    assert (cfg.data.corpus, cfg.precision) == ("x.jsonl", "bf16")
    cfg, _ = cli.parse("train", ["--init-from", "minilm", "--init", "x"])  # the later one wins, as for one flag
    assert cfg.init == "x"
    cfg, _ = cli.parse("decode", ["--model", "m", "--input", "news:test", "--output", "p.jsonl", "--num_beams", "4"])
    assert (cfg.init, cfg.data.corpus, cfg.out, cfg.search.beam_size) == ("m", "news:test", "p.jsonl", 4)


def test_usage_names_the_launcher(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert cli.launcher_prog("pmlm_engine.train").startswith("torchrun ")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert cli.build_parser("finetune").format_usage().startswith("usage: deepspeed --num_gpus N "
                                                                  "pmlm_engine/finetune.py")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny model folder (with a fine-tuning record, as decode reads) and a pairs file."""
    import torch

    from pmlm_engine.checkpoint import save_model
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.model import PMLMModel
    from pmlm_engine.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("cli")
    docs = paragraphs(20)
    vocab = write_vocab(tmp / "vocab.txt", docs)
    torch.manual_seed(0)
    model = PMLMModel(ModelConfig(vocab_size=load_tokenizer(vocab).vocab_size, hidden_size=32, num_layers=1,
                                  num_heads=2, intermediate_size=64, max_position=64))
    folder = save_model(model, tmp / "model", extra={"tokenizer": str(vocab),
                                                     "finetune": {"data": {"max_src_len": 30, "max_tgt_len": 9}}})
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"src": d, "tgt": " ".join(d.split()[:4])}) + "\n" for d in docs))
    return tmp, folder, pairs


def _main(kind: str):
    from pmlm_engine import decode, finetune, train

    return {"train": train.main, "finetune": finetune.main, "decode": decode.main}[kind]


def _print_config(kind: str, argv: list[str], capsys, monkeypatch, stdin: str | None = None) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert _main(kind)([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", KINDS)
def test_print_config_round_trips_through_config_stdin(kind: str, tiny_folder, tmp_path, capsys, monkeypatch):
    """--print-config prints exactly what --config accepts: fed back through --config - it prints the same."""
    from pmlm_engine import train_config

    tmp, folder, pairs = tiny_folder
    argv = {
        "train": ["--corpus", str(pairs), "--tokenizer", str(tmp / "vocab.txt"), "--steps", "5", "--threads", "1",
                  "--out", str(tmp_path / "t"), "--set", "model.num_layers=1", "data.max_len=32"],
        "finetune": ["--init", str(folder), "--corpus", str(pairs), "--steps", "3", "--warmup", "10",
                     "--out", str(tmp_path / "f"), "--set", "optim.lr=3e-4"],
        "decode": ["--init", str(folder), "--corpus", str(pairs), "--beam", "3", "--ngram-ignore", ".",
                   "--out", str(tmp_path / "p.jsonl")],
    }[kind]
    first = _print_config(kind, argv, capsys, monkeypatch)
    shown = json.loads(first)
    cls = getattr(train_config, cli.ENTRY_POINTS[kind].config)
    assert shown == train_config.to_dict(train_config.from_dict(shown, cls))  # complete, no wrapper key
    assert _print_config(kind, ["--config", "-"], capsys, monkeypatch, stdin=first) == first
    if kind == "finetune":
        assert shown["optim"]["warmup_steps"] == 3  # clamped to steps
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()  # --print-config writes nothing


@pytest.mark.parametrize("kind,argv,match,code", [
    ("train", ["--attention-backend", "foo"], r"foo", 2),  # exit codes: pmlm_engine/errors.py
    ("finetune", ["--corpus", "x.jsonl"], r"init is not set", 2),
    ("decode", ["--init", "nowhere"], r"nowhere.*config.json not found", 3),
])
def test_print_config_runs_the_checks_of_a_real_run(kind, argv, match, code, capsys):
    assert _main(kind)([*argv, "--print-config"]) == code
    assert re.search(match, capsys.readouterr().err)


def test_warmup_longer_than_the_run_is_clamped_with_a_log_line(caplog):
    from pmlm_engine.train_config import load_config

    cfg = load_config(None, ["steps=5"])  # the default warmup is 20
    assert cfg.optim.warmup_steps == 5 and "warming up over all 5 steps" in caplog.text and "--warmup" in caplog.text


def test_a_finetune_with_bad_inputs_creates_no_output_folder(tiny_folder, tmp_path, capsys):
    """Missing init, a malformed pairs file: the error names the problem; --out does not exist afterwards."""
    _, folder, _ = tiny_folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a b c"}\n')
    from pmlm_engine.finetune import main

    assert main(["--init", str(tmp_path / "missing"), "--out", str(tmp_path / "o1"), "--threads", "1"]) == 3
    assert "missing" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert main(["--init", str(folder), "--corpus", str(bad), "--out", str(tmp_path / "o2"), "--threads", "1"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err and not (tmp_path / "o2").exists()


EXAMPLES = sorted((ROOT / "examples").glob("*-*.json"))


@pytest.mark.parametrize("path", [p for p in EXAMPLES if not p.name.startswith("ds-")], ids=lambda p: p.name)
def test_example_configs_parse_and_validate(path: Path):
    """Every examples/ job config parses as its job's config; the DeepSpeed ones generate a DeepSpeed config that
    DeepSpeed's parser accepts, for the world size their name gives (8 GPUs, or 2 CPU processes)."""
    from pmlm_engine import train_config
    from pmlm_engine.engine import DistEnv, build_deepspeed_config, check_world

    kind = path.name.split("-")[0].replace("pretrain", "train")
    cls = getattr(train_config, cli.ENTRY_POINTS[kind].config)
    raw = json.loads(path.read_text())
    cfg = train_config.load_config(path, cls=cls)
    assert train_config.to_dict(cfg) == train_config.to_dict(train_config.from_dict(raw, cls))
    if kind == "decode" or cfg.engine != "deepspeed":
        return
    world = 8 if "8gpu" in path.name else 2
    overrides = cfg.deepspeed.overrides
    if overrides:
        cfg.deepspeed.overrides = str(ROOT / overrides)  # relative to the repository root, where jobs start
    check_world(cfg, DistEnv(0, world, 0))
    ds = build_deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.grad_accum * world
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
