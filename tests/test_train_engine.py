"""The training job in one process (torch engine): outputs, export, resume, early failures, warm start.

Proves: a run leaves metrics (AE and PAR loss, lr, grad norm, tokens/s), TensorBoard events,
the loss plot, a resumable checkpoint and an exported fp32 model that reads back bit for bit;
resuming from a periodic checkpoint (a crash after it) continues the uninterrupted loss curve
exactly, with dropout on; a resume under a different configuration is refused; checkpoints
are atomic and rotated; bad corpora, tokenizers and model/tokenizer mismatches fail before the
first step naming the field or file; warm starts copy a BERT encoder and refuse mismatches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmlm_engine.checkpoint import CheckpointManager, load_model, model_tokenizer, save_model
from pmlm_engine.config import ModelConfig
from pmlm_engine.model import PMLMModel
from pmlm_engine.train import train, warm_start
from pmlm_engine.train_config import from_dict

from .test_train_fixtures import metrics, paragraphs, tiny_config, write_txt, write_vocab


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    docs = paragraphs(300)
    return write_txt(tmp / "corpus.txt", docs), write_vocab(tmp / "vocab.txt", docs)


def _cfg(tmp: Path, files, **top) -> dict:
    corpus, vocab = files
    return tiny_config(tmp, [corpus], vocab, **top)


def _run(cfg: dict) -> dict:
    return train(from_dict(cfg))


def test_run_leaves_metrics_plot_checkpoint_and_bit_identical_export(tmp_path, files):
    cfg = _cfg(tmp_path, files, steps=12)
    cfg["logging"].update(tensorboard=True, plot=True, every=4)
    summary = _run(cfg)
    out = Path(cfg["out"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for key in ("loss", "ae_loss", "par_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
        assert all(isinstance(r[key], float) and r[key] >= 0 for r in rows), key
    assert all(abs(r["loss"] - r["ae_loss"] - r["par_loss"]) < 1e-9 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert list((out / "tb").glob("events.out.tfevents.*")) and (out / "loss.png").stat().st_size > 1000
    # the exported model reads back bit for bit: equal to the checkpoint's fp32 weights
    final = load_model(out / "final")
    ckpt = load_file(str(out / "checkpoints" / "step00000012" / "model.safetensors"))
    params = dict(final.named_parameters())
    assert set(params) == set(ckpt) and all(torch.equal(params[k], ckpt[k]) for k in ckpt)
    assert Path(model_tokenizer(out / "final")).read_bytes() == files[1].read_bytes()  # bundled in the folder
    assert summary["steps"] == 12 and summary["stopped_by"] is None


def test_resume_after_a_crash_continues_the_same_curve(tmp_path, files):
    """A run 'killed' after step 5 resumes from its step-3 checkpoint and reproduces steps 4-9 exactly."""
    cfg = _cfg(tmp_path, files, steps=9)
    cfg["model"]["hidden_dropout"] = 0.1  # the dropout RNG is part of the checkpoint
    cfg["checkpoint"] = {"every": 3, "keep": 5}
    _run(cfg)
    full = metrics(Path(cfg["out"]))
    crashed = tmp_path / "crashed"
    shutil.copytree(cfg["out"], crashed)
    ckpts = crashed / "checkpoints"
    for tag in ("step00000006", "step00000009"):
        shutil.rmtree(ckpts / tag)
    (ckpts / "latest").write_text("step00000003")
    shutil.rmtree(crashed / "final")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()[:5]  # it had logged up to step 5
    (crashed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = _run({**cfg, "out": str(crashed)})
    assert summary["start_step"] == 3
    assert metrics(crashed) == [{**r, **{k: metrics(crashed)[i][k] for k in ("tokens_per_s", "step_time_s")}}
                                for i, r in enumerate(full)]
    assert [r["loss"] for r in metrics(crashed)] == [r["loss"] for r in full]


def test_resume_refuses_a_different_job(tmp_path, files):
    cfg = _cfg(tmp_path, files, steps=3)
    _run(cfg)
    changed = json.loads(json.dumps(cfg))
    changed["optim"]["lr"] = 1e-3
    with pytest.raises(ValueError, match=r"cannot resume from .*step00000003.*optim.lr: checkpoint 0.003 vs now 0.001"):
        _run(changed)
    with pytest.raises(ValueError, match=r"checkpoint.resume=never but .* already holds checkpoints"):
        _run({**cfg, "checkpoint": {"resume": "never"}})


def _other_vocab_model(tmp: Path) -> Path:
    model = PMLMModel(ModelConfig(vocab_size=999, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                  max_position=64))
    return save_model(model, tmp / "other-model")


@pytest.mark.parametrize("case,error,match", [
    ("missing corpus", FileNotFoundError, r"data.corpus file .*nope.txt does not exist"),
    ("empty corpus", ValueError, r"data.corpus file .*empty.txt is empty"),
    ("non-utf8 corpus", ValueError, r"bad.txt: not valid UTF-8 at byte offset 9 \(line 2\)"),
    ("vocab mismatch", ValueError, r"model.vocab_size=500 does not match the tokenizer's vocabulary \(\d+ entries "
                                   r"in .*vocab.txt\)"),
    ("missing tokenizer", FileNotFoundError, r"data.tokenizer=.*nope-vocab.txt.*does not exist"),
    ("empty tokenizer", ValueError, r"data.tokenizer=.*empty-vocab.txt.*is empty"),
    ("warm start vocab", ValueError, r"init=.*other-model.*vocab_size=999.*vocab_size=\d+:.*data.tokenizer"),
    ("max_len", ValueError, r"data.max_len=100 exceeds the model's max_position=64"),
    ("global batch", ValueError, r"global_batch_size=8 != data.batch_size \* grad_accum \* world size = 4 \* 1 \* 1"),
])
def test_bad_inputs_fail_before_the_first_step(tmp_path, files, case, error, match):
    cfg = _cfg(tmp_path, files)
    if case == "missing corpus":
        cfg["data"]["corpus"] = [str(tmp_path / "nope.txt")]
    elif case == "empty corpus":
        (tmp_path / "empty.txt").write_text("")
        cfg["data"]["corpus"].append(str(tmp_path / "empty.txt"))
    elif case == "non-utf8 corpus":
        (tmp_path / "bad.txt").write_bytes(b"hello\ncaf\xe9\n")
        cfg["data"]["corpus"].append(str(tmp_path / "bad.txt"))
    elif case == "vocab mismatch":
        cfg["model"]["vocab_size"] = 500
    elif case == "missing tokenizer":
        cfg["data"]["tokenizer"] = str(tmp_path / "nope-vocab.txt")
    elif case == "empty tokenizer":
        (tmp_path / "empty-vocab.txt").write_text("")
        cfg["data"]["tokenizer"] = str(tmp_path / "empty-vocab.txt")
    elif case == "warm start vocab":
        cfg["init"] = str(_other_vocab_model(tmp_path))
    elif case == "max_len":
        cfg["data"]["max_len"] = 100
    elif case == "global batch":
        cfg["global_batch_size"] = 8
    with pytest.raises(error, match=match):
        _run(cfg)
    assert not Path(cfg["out"]).exists()  # nothing written before the inputs are checked


def test_checkpoints_are_atomic_and_rotated(tmp_path):
    """A save that dies midway leaves `latest` on the previous complete checkpoint; only `keep` are kept."""
    manager = CheckpointManager(tmp_path, keep=2)

    def write(root: Path, tag: str) -> None:
        (root / tag).mkdir()
        (root / tag / "weights.bin").write_bytes(b"x" * 100)

    manager.save(1, write, {"step": 1})

    def dies(root: Path, tag: str) -> None:
        write(root, tag)
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        manager.save(2, dies, {"step": 2})
    assert manager.latest() == tmp_path / "step00000001" and manager.tags() == ["step00000001"]
    for step in (2, 3, 4):
        manager.save(step, write, {"step": step})
    assert manager.tags() == ["step00000003", "step00000004"] and manager.latest().name == "step00000004"
    assert not list(tmp_path.glob(".tmp-*")) and CheckpointManager.read_state(manager.latest()) == {"step": 4}
    (tmp_path / "latest").write_text("step00000002")  # a pointer to a pruned checkpoint: the newest that verifies
    assert CheckpointManager(tmp_path, keep=2).latest() == tmp_path / "step00000004"


def test_warm_start_from_a_hf_bert_checkpoint(tmp_path, files):
    """A HF BertModel folder (bert.* names, pooler, no MLM head, no relative bias) fills the encoder;
    the relative bias starts at zero; shape or vocabulary mismatches are refused."""
    from pmlm_engine.convert import export_hf
    from pmlm_engine.tokenizer import load_tokenizer

    tok = load_tokenizer(files[1])
    shape = dict(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position=64)
    torch.manual_seed(3)
    source = PMLMModel(ModelConfig(**shape, rel_pos_buckets=0))
    hf = export_hf(source, tmp_path / "hf", lm_head=False)
    shutil.copy(files[1], hf / "vocab.txt")
    model = PMLMModel(ModelConfig(**shape))
    warm_start(model, str(hf), tok)
    got = dict(model.named_parameters())
    for name, p in source.named_parameters():
        if not name.startswith("lm_head."):
            assert torch.equal(got[name], p), name
    assert torch.count_nonzero(model.rel_pos_bias.weight) == 0
    with pytest.raises(ValueError, match=r"the checkpoint has num_layers=2 .* the configured model has num_layers=3"):
        warm_start(PMLMModel(ModelConfig(**{**shape, "num_layers": 3})), str(hf), tok)
    (hf / "vocab.txt").write_text((hf / "vocab.txt").read_text().replace("the\n", "thee\n"))
    with pytest.raises(ValueError, match=r"was trained with the vocabulary .*hf/vocab.txt, but data.tokenizer"):
        warm_start(model, str(hf), tok)


@pytest.mark.slow
def test_warm_start_from_real_minilm():
    """--init-from minilm: the real MiniLM-L6 weights land in a small-preset model (~2 s)."""
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.tokenizer import load_tokenizer

    try:
        folder = minilm_dir()
    except RuntimeError as exc:
        pytest.skip(f"MiniLM checkpoint not available offline here: {exc}")
    tok = load_tokenizer(folder / "vocab.txt")
    model = PMLMModel(ModelConfig.preset("small", vocab_size=tok.vocab_size))
    warm_start(model, "minilm", tok)
    ref = load_file(str(folder / "model.safetensors"))
    got = dict(model.named_parameters())
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight",
                "encoder.layer.0.attention.self.query.bias"):
        assert torch.equal(got[key], ref[key].float()), key
    assert torch.count_nonzero(model.rel_pos_bias.weight) == 0
    with pytest.raises(ValueError, match=r"MiniLM is model.preset=small"):
        warm_start(PMLMModel(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)), "minilm", tok)
