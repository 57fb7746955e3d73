"""Fine-tuning in real processes: two DeepSpeed ranks (ZeRO-2, gloo) against one torch process, and a SIGTERM
to both ranks followed by the same command.

``deepspeed --num_gpus 2 pmlm_engine/finetune.py --batch-size 2`` (2 pairs per rank) gives the per-step
losses of ``python pmlm_engine/finetune.py --engine torch --batch-size 4`` (both as script paths): the
global batch is the same 4 pairs, and the loss is the summed target cross-entropy over the global count
of target tokens, so the split does not change it mathematically. Dropout is off (it could not agree
across a different split of random streams); the target corruption is seeded per pair. What differs is
fp32 summation order only (two half-batch gradient sums all-reduced instead of one, padding to a
different row length): ~1e-7 relative per step, carried through Adam -- hence rtol 1e-5, as in
tests/test_train_distributed.py for pre-training. Rank 0 alone writes metrics and the model folder.

Then the same 2-rank job is stopped: SIGTERM to both ranks (what a cluster scheduler does) after a few
steps; they agree on the step to stop at, checkpoint, exit 0; the same command resumes, and the
metrics.jsonl loss sequence equals the uninterrupted 2-rank run's bit for bit.

About 60 s on the 2-core machine (three 2-rank launches of ~15 s, one process of ~6 s).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
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
STEPS = 12


def _run(args: list[str], launcher: list[str]) -> None:
    proc = subprocess.run([*launcher, str(FINETUNE_SCRIPT), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"finetune.py exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")


def _ranks(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children(recursive=True) if "finetune.py" in " ".join(p.cmdline())
            and "--local_rank" in " ".join(p.cmdline())]


def test_two_ranks_zero2_match_one_process_and_resume_after_sigterm(tmp_path: Path):
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
    common = ["--init", str(init), "--corpus", str(data), "--max-src-len", "24", "--max-tgt-len", "10",
              "--steps", str(STEPS), "--lr", "3e-3", "--warmup", "2", "--log-every", "1",
              "--attention-backend", "sdpa", "--threads", "1", "--set", "logging.progress=false"]
    ds = [str(BIN / "deepspeed"), "--num_gpus", "2"]
    _run([*common, "--engine", "torch", "--batch-size", "4", "--out", str(tmp_path / "single")], [sys.executable])
    z2 = [*common, "--zero-stage", "2", "--batch-size", "2"]  # engine auto: deepspeed under the launcher
    _run([*z2, "--out", str(tmp_path / "z2")], [*ds, "--master_port", str(_free_port())])

    ref, got = metrics(tmp_path / "single"), metrics(tmp_path / "z2")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one writer: rank 0
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5, atol=0)
    np.testing.assert_allclose([r["lr"] for r in got], [r["lr"] for r in ref], rtol=1e-12)
    assert ref[-1]["loss"] < ref[0]["loss"]
    cfg = json.loads((tmp_path / "z2" / "final" / "config.json").read_text())
    assert cfg["finetune"]["deepspeed"]["zero_stage"] == 2 and cfg["tokenizer"] == "vocab.txt"
    want = dict(load_model(tmp_path / "single" / "final").named_parameters())
    have = dict(load_model(tmp_path / "z2" / "final").named_parameters())
    assert have.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(have[k], want[k], rtol=0, atol=1e-5, msg=k)

    # the same 2-rank job, SIGTERM to both ranks after >= 3 logged steps, then the same command again
    cut = [*z2, "--out", str(tmp_path / "cut")]
    port = str(_free_port())
    proc = subprocess.Popen([*ds, "--master_port", port, str(FINETUNE_SCRIPT), *cut], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.005)
    ranks = _ranks(psutil.Process(proc.pid))
    assert len(ranks) == 2
    for r in ranks:
        r.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    stopped = metrics(tmp_path / "cut")[-1]["step"]
    assert 3 <= stopped < STEPS, "the job ended before the signal arrived: make it longer"
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == f"step{stopped:08d}"
    _run(cut, [*ds, "--master_port", str(_free_port())])
    resumed = metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in got]  # bit for bit
