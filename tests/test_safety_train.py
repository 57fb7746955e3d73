"""Faults injected into real training runs (tiny preset, a few steps, torch engine): each ends in
the promised outcome and exit code, and nothing the user had is removed or overwritten.

Proves: a flipped byte in any file of the checkpoint a resume would use (weights, optimizer
state, RNG state) is refused before anything is loaded, naming the file and the newest checkpoint
that verifies with the flag to resume from it, and resuming from that one reproduces the
uninterrupted run bit for bit; a missing ``latest`` resumes from the newest checkpoint that
verifies and a torn last line of ``metrics.jsonl`` is cut back, so the curve continues exactly;
``--resume never`` over an existing job is refused unless ``--overwrite``; a second run on a
locked output folder fails at once naming the holder; a non-finite gradient norm skips the update
(metrics stay valid JSON), too many in a row stop the run naming the step and the last good
checkpoint (with a hint that fits the precision) and nothing non-finite is ever saved or exported;
a loss spike is a warning; a disk that fills up during a save leaves no partial checkpoint and
``latest`` on a complete one; a checkpoint folder without a manifest is refused unless
``--trust-checkpoint``; NaN/inf optimizer settings are refused; DeepSpeed's checkpoint files are
read with the restricted unpickler, so an injected pickle payload does not run.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pmlm_engine.errors import EXIT_DIVERGED, EXIT_INPUT_DAMAGED, EXIT_OS_WRITE, EXIT_OUTPUT_REFUSED, EXIT_USAGE
from pmlm_engine.lock import LOCK_NAME, FolderLock

from .test_train_fixtures import paragraphs, tiny_config, write_config, write_txt, write_vocab

CKPT = "checkpoints"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    docs = paragraphs(120)
    return write_txt(tmp / "corpus.txt", docs), write_vocab(tmp / "vocab.txt", docs)


def _job(tmp: Path, files, steps: int = 4, every: int = 2, keep: int = 5) -> Path:
    cfg = tiny_config(tmp, [files[0]], files[1], steps=steps)
    cfg["checkpoint"] = {"every": every, "keep": keep}
    cfg["data"]["cache_dir"] = str(tmp.parent / "cache")  # shared by the tests of this file
    return write_config(tmp / "job.json", cfg)


def _train(job: Path, *flags: str) -> int:
    from pmlm_engine.train import main

    return main(["--config", str(job), *flags])


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file the user has under ``folder`` (the lock file aside: it records who ran last)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    return lines[-1]


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i:i + 64] = bytes(b ^ 0xA5 for b in data[i:i + 64])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, files):
    """An uninterrupted 6-step run with checkpoints at 2, 4 and 6 (copied by the tests that damage it)."""
    tmp = tmp_path_factory.mktemp("ref")
    job = _job(tmp, files, steps=6)
    assert _train(job) == 0
    return tmp


def _copy_run(reference: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(reference, dest)
    cfg = json.loads((dest / "job.json").read_text())
    cfg["out"] = str(dest / "run")
    job = write_config(dest / "job.json", cfg)
    return job, dest / "run"


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "rng-rank00000.safetensors"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_good_one(reference, tmp_path, capsys, victim):
    job, out = _copy_run(reference, tmp_path / "job")
    ckpts = out / CKPT
    shutil.rmtree(out / "final")
    (ckpts / "latest").write_text("step00000004")  # as if killed after saving step 4 ...
    shutil.rmtree(ckpts / "step00000006")
    full = _rows(out)
    lines = (out / "metrics.jsonl").read_text().splitlines()[:5]  # ... having logged step 5
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _flip(ckpts / "step00000004" / victim)
    before = _snapshot(out)
    assert _train(job) == EXIT_INPUT_DAMAGED
    err = _err(capsys)
    assert f"step00000004/{victim} does not match its checksum" in err
    assert f"--resume {ckpts / 'step00000002'}" in err
    assert _snapshot(out) == before  # nothing removed, rotated or truncated
    # the flag the message names continues the run exactly as if nothing had happened
    assert _train(job, "--resume", str(ckpts / "step00000002")) == 0
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in full]


def test_missing_latest_and_a_torn_metrics_line_resume_from_the_newest_verified(reference, tmp_path, caplog):
    job, out = _copy_run(reference, tmp_path / "job")
    full = _rows(out)
    ckpts = out / CKPT
    shutil.rmtree(out / "final")
    shutil.rmtree(ckpts / "step00000006")
    (ckpts / "latest").unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()[:5]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 6, "loss": 3.1')  # killed mid-write
    with caplog.at_level("WARNING"):
        assert _train(job) == 0
    assert f"{ckpts / 'latest'} is missing; resuming from the newest checkpoint that verifies: " \
           f"{ckpts / 'step00000004'}" in caplog.text
    assert f"{out / 'metrics.jsonl'}: the last line (6) is incomplete" in caplog.text
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in full]
    assert [r["step"] for r in _rows(out)] == list(range(1, 7))


def test_resume_never_over_an_existing_job_needs_overwrite(reference, tmp_path, capsys):
    job, out = _copy_run(reference, tmp_path / "job")
    before = _snapshot(out)
    assert _train(job, "--resume", "never") == EXIT_OUTPUT_REFUSED
    assert "--resume never --overwrite" in _err(capsys)
    assert _snapshot(out) == before
    assert _train(job, "--resume", "never", "--overwrite") == 0
    assert [r["step"] for r in _rows(out)] == list(range(1, 7))


def test_a_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(reference, tmp_path, capsys):
    job, out = _copy_run(reference, tmp_path / "job")
    shutil.rmtree(out / "final")
    before = _snapshot(out)
    with FolderLock(out):  # another run holds the folder
        assert _train(job) == EXIT_OUTPUT_REFUSED
    err = _err(capsys)
    assert f"is in use by another run (pid {os.getpid()} on host {os.uname().nodename}" in err
    assert _snapshot(out) == before


def _poison_grads(monkeypatch, bad_steps, spike_step=None):
    """Make the embedding gradient inf (the loss stays finite) at the given 1-based steps, and
    multiply one step's loss by 1000 (a spike)."""
    from pmlm_engine import engine as engine_mod

    original_init = engine_mod.TorchEngine.__init__
    original_forward = engine_mod.TorchEngine.forward
    calls = {"n": 0}

    def init(self, model, *args, **kwargs):
        original_init(self, model, *args, **kwargs)

        def hook(grad):
            return grad * math.inf if calls["n"] in bad_steps else grad

        model.embeddings.word_embeddings.weight.register_hook(hook)

    def forward(self, batch):
        calls["n"] += 1
        ae, par = original_forward(self, batch)
        return (ae * 1000, par * 1000) if calls["n"] == spike_step else (ae, par)

    monkeypatch.setattr(engine_mod.TorchEngine, "__init__", init)
    monkeypatch.setattr(engine_mod.TorchEngine, "forward", forward)


def _all_finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for f in folder.rglob("*.safetensors") if "rng" not in f.name
               for t in load_file(str(f)).values())


def test_a_non_finite_gradient_skips_the_update_and_a_spike_warns(tmp_path, files, monkeypatch, caplog):
    _poison_grads(monkeypatch, bad_steps={3}, spike_step=9)
    job = _job(tmp_path, files, steps=10, every=5)
    with caplog.at_level("WARNING"):
        assert _train(job) == 0
    assert "step 3: gradient norm inf is not finite: update skipped (1 in a row" in caplog.text
    assert "loss spike at step 9" in caplog.text
    rows = _rows(tmp_path / "run")  # valid JSON throughout: the inf norm is written as null
    assert rows[2]["grad_norm"] is None and all(r["grad_norm"] is not None for i, r in enumerate(rows) if i != 2)
    assert _all_finite(tmp_path / "run")


def test_consecutive_non_finite_steps_stop_the_run_and_nothing_non_finite_is_saved(tmp_path, files, monkeypatch,
                                                                                    capsys):
    _poison_grads(monkeypatch, bad_steps=set(range(3, 100)))
    job = _job(tmp_path, files, steps=10, every=2)
    assert _train(job) == EXIT_DIVERGED
    err = _err(capsys)
    ckpts = tmp_path / "run" / CKPT
    assert "training diverged at step 5: 3 consecutive non-finite steps (gradient norm inf" in err
    assert f"the last good checkpoint is {ckpts / 'step00000004'}" in err
    assert "precision=fp32" not in err  # the run is fp32: that hint would point away from the cause
    assert not (tmp_path / "run" / "final").exists() and _all_finite(tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_disk_full_during_a_save_leaves_latest_on_a_complete_checkpoint(tmp_path, files, monkeypatch, capsys):
    from pmlm_engine import engine as engine_mod

    real = engine_mod.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "step00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(engine_mod, "save_file", save_file)
    job = _job(tmp_path, files, steps=6, every=2)
    assert _train(job) == 8 == EXIT_OS_WRITE
    assert "No space left on device" in _err(capsys)
    ckpts = tmp_path / "run" / CKPT
    assert (ckpts / "latest").read_text() == "step00000002" and not list(ckpts.glob(".tmp-*"))
    monkeypatch.setattr(engine_mod, "save_file", real)
    assert _train(job) == 0  # space freed: the same command resumes from step 2


def test_a_checkpoint_without_a_manifest_needs_trust(reference, tmp_path, capsys):
    job, out = _copy_run(reference, tmp_path / "job")
    shutil.rmtree(out / "final")
    legacy = out / CKPT / "step00000004"
    (legacy / "manifest.json").unlink()
    assert _train(job, "--resume", str(legacy)) == EXIT_INPUT_DAMAGED
    assert "has no manifest.json" in (err := _err(capsys)) and "--trust-checkpoint" in err
    assert _train(job, "--resume", str(legacy), "--trust-checkpoint") == 0


@pytest.mark.parametrize("flags,match", [(["--lr", "nan"], "optim.lr"), (["--set", "optim.eps=Infinity"], "eps"),
                                         (["--set", "optim.betas=[0.9, NaN]"], "betas")])
def test_non_finite_optimizer_settings_are_refused(tmp_path, files, capsys, flags, match):
    assert _train(_job(tmp_path, files), *flags) == EXIT_USAGE
    assert match in _err(capsys) and not (tmp_path / "run").exists()


def test_deepspeed_checkpoint_files_are_read_without_running_pickles(tmp_path):
    from pmlm_engine.errors import DamagedInputError
    from pmlm_engine.safe_load import weights_only_load

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": {"w": torch.ones(2)}, "x": Payload()}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(DamagedInputError, match=r"it names \['posix.system'\].*--trust-checkpoint"):
        weights_only_load(str(tmp_path / "mp_rank_00_model_states.pt"))
    assert not marker.exists()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"loss_scaler": LossScaler(1.0), "w": torch.arange(3)}, tmp_path / "ok.pt")
    loaded = weights_only_load(str(tmp_path / "ok.pt"))
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["loss_scaler"].cur_scale == 1.0


def test_rotation_never_deletes_the_newest_verified_checkpoint(tmp_path):
    """keep=1 after resuming from an older checkpoint while a newer, damaged one exists: the checkpoint
    just written (the newest that verifies) stays, and so does the damaged one (not ours to judge)."""
    from pmlm_engine.checkpoint import CheckpointManager

    def write(root: Path, tag: str) -> None:
        (root / tag).mkdir()
        (root / tag / "weights.bin").write_bytes(os.urandom(256))

    manager = CheckpointManager(tmp_path, keep=5)
    for step in (1, 3):
        manager.save(step, write, {"step": step})
    _flip(tmp_path / "step00000003" / "weights.bin")
    fresh = CheckpointManager(tmp_path, keep=1)
    assert fresh.newest_verified() == tmp_path / "step00000001"
    with pytest.raises(ValueError, match=r"step00000003/weights.bin does not match.*--resume .*step00000001"):
        fresh.latest()
    fresh.save(2, write, {"step": 2})
    assert fresh.tags() == ["step00000002", "step00000003"] and fresh.latest() == tmp_path / "step00000002"


def test_two_fine_tunes_on_one_folder_and_a_damaged_init(tmp_path, files, capsys):
    """Fine-tuning runs on the same runner: a locked output folder is refused naming the holder, and an
    init model folder whose weights changed after export is refused naming the file."""
    from pmlm_engine.checkpoint import save_model
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.finetune import main as finetune_main
    from pmlm_engine.model import PMLMModel

    vocab = files[1]
    n_vocab = len(vocab.read_text().splitlines())
    torch.manual_seed(0)
    init = save_model(PMLMModel(ModelConfig(vocab_size=n_vocab, hidden_size=32, num_layers=2, num_heads=2,
                                            intermediate_size=64, max_position=64)),
                      tmp_path / "init", extra={"tokenizer": str(vocab)})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"src": f"the city council met on day {i}", "tgt": f"council {i}"}) + "\n"
                            for i in range(6)))
    args = ["--init", str(init), "--corpus", str(data), "--out", str(tmp_path / "ft"), "--steps", "2",
            "--batch-size", "3", "--max-src-len", "16", "--max-tgt-len", "8", "--threads", "1"]
    with FolderLock(tmp_path / "ft"):
        assert finetune_main(args) == EXIT_OUTPUT_REFUSED
    assert "is in use by another run" in _err(capsys)
    _flip(init / "model.safetensors")
    assert finetune_main(args) == EXIT_INPUT_DAMAGED
    assert "init/model.safetensors does not match its checksum" in _err(capsys)
    assert not (tmp_path / "ft" / "checkpoints").exists() and not (tmp_path / "ft" / "metrics.jsonl").exists()


def test_an_unavailable_attention_backend_is_one_line_and_exit_7(tmp_path, files):
    """Outside the test suite's Triton interpreter, ``triton`` on a CPU is unavailable: one line, exit 7
    (it was a RuntimeError traceback). A subprocess, since this process runs under the interpreter."""
    import subprocess
    import sys

    from pmlm_engine.errors import EXIT_ENVIRONMENT

    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the triton backend available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pmlm_engine.train", "--config", str(_job(tmp_path, files)),
                           "--attention-backend", "triton", "--print-config"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == EXIT_ENVIRONMENT, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: attention backend 'triton' is unavailable") and "Traceback" not in proc.stderr


def test_metrics_of_a_run_that_left_no_checkpoint_are_not_emptied(tmp_path, files, capsys):
    job = _job(tmp_path, files)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.5}\n')  # killed before its first save
    assert _train(job) == EXIT_OUTPUT_REFUSED
    assert "metrics.jsonl holds the metrics of an earlier run" in _err(capsys)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.5}\n'
    assert _train(job, "--resume", "never", "--overwrite") == 0 and len(_rows(tmp_path / "run")) == 4


@pytest.mark.parametrize("precision,hint,not_hint", [("fp32", "raise optim.warmup_steps", "precision="),
                                                     ("bf16", "use precision=fp32", "bf16 or fp32"),
                                                     ("fp16", "use precision=bf16 or fp32", None)])
def test_the_divergence_hint_fits_the_precision(precision, hint, not_hint):
    from pmlm_engine.errors import NonFiniteError
    from pmlm_engine.guard import FiniteGuard, GuardConfig

    guard = FiniteGuard(precision, GuardConfig(max_nonfinite_steps=2))
    guard.after_step(1, 3.0, math.nan, True, None)
    if precision == "fp16":  # the loss scaler's overflow skips are its own business...
        guard.after_step(2, 3.0, math.inf, True, None)
        with pytest.raises(NonFiniteError, match=rf"{hint}"):  # ... but an applied non-finite update stops the run
            guard.after_step(3, math.nan, math.nan, False, "ck")
        return
    with pytest.raises(NonFiniteError, match=rf"step 2: 2 consecutive.*{hint}") as info:
        guard.after_step(2, 3.0, math.inf, True, "ck")
    assert not_hint not in str(info.value)


def test_a_truncated_weights_file_in_a_trusted_checkpoint_is_named(reference, tmp_path, capsys):
    job, out = _copy_run(reference, tmp_path / "job")
    shutil.rmtree(out / "final")
    legacy = out / CKPT / "step00000004"
    (legacy / "manifest.json").unlink()
    weights = legacy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert _train(job, "--resume", str(legacy), "--trust-checkpoint") == EXIT_INPUT_DAMAGED
    assert "step00000004/model.safetensors is not a readable .safetensors file" in _err(capsys)
