"""Fine-tuning in real processes: two DeepSpeed ranks (ZeRO-2, gloo) against one torch process.

``deepspeed --num_gpus 2 pmlm_engine/finetune.py`` with ``--batch-size 4`` (2 examples per rank) gives the
per-step losses of ``python pmlm_engine/finetune.py --engine torch --batch-size 4`` (both as script paths).
Every rank draws the same global batch and trains on its half; the loss is the summed target
cross-entropy over the global count of target tokens, so the split does not change it mathematically.
Dropout is off (it could not agree across a different split of random streams); the target corruption
is seeded per example, so it is the same on either side. What differs is fp32 summation order only
(two half-batch gradient sums all-reduced instead of one, padding to a different row length, the loss
summed over two ranks): ~1e-7 relative per step, carried through Adam for 6 steps -- hence rtol 1e-5,
as in tests/test_train_distributed.py for pre-training. Rank 0 alone writes metrics (one row per step)
and the model folder, whose gathered fp32 weights agree with the single process to 1e-5.

About 20 s on the 2-core machine (~8 s of it the launcher).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pmlm_engine.checkpoint import load_model, save_model
from pmlm_engine.config import ModelConfig
from pmlm_engine.model import PMLMModel
from pmlm_engine.tokenizer import load_tokenizer

from .test_train_distributed import _free_port
from .test_train_fixtures import ROOT, metrics, paragraphs, subprocess_env, write_vocab

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
FINETUNE_SCRIPT = ROOT / "pmlm_engine" / "finetune.py"
STEPS = 6


def _run(args: list[str], launcher: list[str]) -> None:
    proc = subprocess.run([*launcher, str(FINETUNE_SCRIPT), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"finetune.py exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")


def test_two_ranks_zero2_match_one_process(tmp_path: Path):
    docs = paragraphs(40)
    vocab = write_vocab(tmp_path / "vocab.txt", docs)
    tok = load_tokenizer(vocab)
    torch.manual_seed(0)
    init = save_model(PMLMModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                                            intermediate_size=64, max_position=64, hidden_dropout=0.0)),
                      tmp_path / "init", extra={"tokenizer": str(vocab)})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"src": d, "tgt": " ".join(d.split()[:3 + i % 5])}) + "\n"
                            for i, d in enumerate(docs[:12])))
    common = ["--init", str(init), "--data", str(data), "--max-src-len", "24", "--max-tgt-len", "10",
              "--steps", str(STEPS), "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--log-every", "1",
              "--attention-backend", "sdpa", "--threads", "1"]
    _run([*common, "--engine", "torch", "--out", str(tmp_path / "single")], [sys.executable])
    _run([*common, "--zero-stage", "2", "--out", str(tmp_path / "z2")],  # engine auto: deepspeed under the launcher
         [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port())])

    ref, got = metrics(tmp_path / "single"), metrics(tmp_path / "z2")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one writer: rank 0
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5, atol=0)
    np.testing.assert_allclose([r["lr"] for r in got], [r["lr"] for r in ref], rtol=1e-12)
    assert ref[-1]["loss"] < ref[0]["loss"]
    cfg = json.loads((tmp_path / "z2" / "final" / "config.json").read_text())
    assert cfg["finetune"]["zero_stage"] == 2 and cfg["tokenizer"] == str(vocab)
    want = dict(load_model(tmp_path / "single" / "final").named_parameters())
    have = dict(load_model(tmp_path / "z2" / "final").named_parameters())
    assert have.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(have[k], want[k], rtol=0, atol=1e-5, msg=k)
