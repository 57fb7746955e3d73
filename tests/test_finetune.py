"""Fine-tuning: the one-pass seq2seq loss equals its per-position definition; inputs fail loudly or are cut
as documented; a run writes a model folder that decode loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pmlm_engine.engine import PMLMTrainStep, target_counts
from pmlm_engine.finetune import FinetuneTask, build_examples, finetune
from pmlm_engine.layout import collate_padded
from pmlm_engine.runner import objective
from pmlm_engine.s2s_data import EncodedPairs, PairRecord, encode_pairs, read_jsonl_pairs
from pmlm_engine.train_config import FinetuneConfig, from_dict

from .helpers import SPECIAL, explicit_mask, tiny_model


def _naive_token_losses(model, src: list[int], teacher: list[int], tgt: list[int], smoothing: float) -> torch.Tensor:
    """One forward per target position i: [CLS] src [SEP] (bidirectional), the teacher copies t_<i (causal, seeing
    the source), and one [P] at position |main| + i - 1 that sees everything; cross-entropy of its output."""
    main = [SPECIAL.cls, *src, SPECIAL.sep]
    m = len(main)
    losses = []
    for i in range(1, len(tgt) + 1):
        ids = main + teacher[:i - 1] + [SPECIAL.p]
        n = len(ids)
        pos = list(range(n))  # t_j sits at m + j - 1 and [P]_i at m + i - 1: consecutive
        seg = [0] * m + [1] * (n - m)
        mask = torch.zeros(1, n, n, dtype=torch.bool)
        mask[0, :, :m] = True
        for a in range(m, n - 1):
            mask[0, a, m:a + 1] = True  # causal target copies
        mask[0, n - 1, :] = True  # the [P] sees the source, t_<i and itself
        t = lambda x: torch.tensor([x])  # noqa: E731
        with explicit_mask(model, mask):
            h = model(t(ids), t(pos), t(seg), t([0] * n))[0]
        logits = model.lm_head(h[-1:])
        losses.append(F.cross_entropy(logits, torch.tensor([tgt[i - 1]]), label_smoothing=smoothing))
    return torch.stack(losses)


def _train_loss(model, batch: dict, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the runner trains fine-tuning with: PMLMTrainStep's (AE, PAR) sums of one micro-batch, then the
    runner's objective with FinetuneTask's loss weights and this batch as the whole global batch."""
    ae_sum, par_sum = PMLMTrainStep(model, smoothing)(*(batch[k] for k in (
        "input_ids", "position_ids", "segment_ids", "step", "doc_ids", "labels")))
    n_ae, n_par = target_counts(batch)
    loss = objective(ae_sum, par_sum, max(n_ae, 1), max(n_par, 1), FinetuneTask.loss_weights)
    return loss, ae_sum


@pytest.mark.parametrize("target_mask_prob", [0.0, 0.5])
def test_finetune_loss_equals_per_position_forwards(target_mask_prob: float):
    """The loss fine-tuning trains with (padded batch of two pairs, label smoothing 0.1) equals the mean over
    target tokens of one forward per target position with an explicit mask, and each pair alone its own
    per-position losses (float64, 1e-10)."""
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(5, 61, 9).tolist(), rng.integers(5, 61, 5).tolist() + [SPECIAL.sep]),
             (rng.integers(5, 61, 4).tolist(), rng.integers(5, 61, 7).tolist() + [SPECIAL.sep])]
    enc = EncodedPairs(["a", "b"], [s for s, _ in pairs], [t for _, t in pairs])
    examples = build_examples(enc, SPECIAL, target_mask_prob, seed=3, epoch=0, indices=[0, 1])
    model = tiny_model(torch.float64)
    batch = collate_padded(examples, SPECIAL.pad)
    with torch.no_grad():
        loss, ae_sum = _train_loss(model, batch, 0.1)
        naive = []
        for ex, (src, tgt) in zip(examples, pairs):
            teacher = ex.input_ids[ex.step > 0].tolist()
            if target_mask_prob == 0:
                assert teacher == tgt
            naive.append(_naive_token_losses(model, src, teacher, tgt, 0.1))
        for ex, want in zip(examples, naive):  # one pair per batch: its own mean
            alone, _ = _train_loss(model, collate_padded([ex], SPECIAL.pad), 0.1)
            torch.testing.assert_close(alone, want.mean(), rtol=1e-10, atol=0)
    naive = torch.cat(naive)
    if target_mask_prob > 0:
        assert sum((ex.input_ids[ex.step > 0] == SPECIAL.mask).sum() for ex in examples) > 0
    assert target_counts(batch) == (0, len(naive)) and len(naive) == 6 + 8 and float(ae_sum) == 0.0
    torch.testing.assert_close(loss, naive.mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_finetune_gradients_agree_across_attention_backends(backend: str):
    """The fine-tuning loss and its gradients on a padded seq2seq batch (relative bias on) through each CPU
    attention backend equal the reference backend's (float64, 1e-9)."""
    rng = np.random.default_rng(1)
    enc = EncodedPairs(["a", "b"], [rng.integers(5, 61, 17).tolist(), rng.integers(5, 61, 6).tolist()],
                       [rng.integers(5, 61, 4).tolist() + [SPECIAL.sep],
                        rng.integers(5, 61, 9).tolist() + [SPECIAL.sep]])
    batch = collate_padded(build_examples(enc, SPECIAL, 0.3, seed=0, epoch=0, indices=[0, 1]), SPECIAL.pad)
    results = []
    for name in ("reference", backend):
        model = tiny_model(torch.float64, backend=name).train()
        model.config.hidden_dropout = 0.0
        for mod in model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        loss, _ = _train_loss(model, batch, 0.1)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and "rel_pos_bias.weight" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def tokenizer():
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.tokenizer import load_tokenizer

    return load_tokenizer(minilm_dir() / "vocab.txt")


@pytest.mark.parametrize("line,message", [
    ('{"src": "a b", "tgt": "c"', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"src": "a b"}', "lacks \\['tgt'\\]"),
    ('{"src": "   ", "tgt": "c"}', 'empty "src"'),
    ('{"src": "a b", "tgt": ""}', 'empty "tgt"'),
    ('{"src": [], "tgt": "c"}', 'empty "src" token list'),
    ('{"src": [1, "x"], "tgt": "c"}', "non-integer"),
    ('{"src": 5, "tgt": "c"}', "must be a string or a list"),
    ('{"id": "1", "src": "a", "tgt": "c"}', "repeats line 1"),
])
def test_malformed_jsonl_is_an_error_with_file_and_line(tmp_path: Path, line: str, message: str):
    """Each malformed line of a pairs file raises ValueError naming file:line and the problem."""
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"id": "1", "src": "fine", "tgt": "ok"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_jsonl_pairs(f)
    assert f"{f}:3" in str(err.value)


def test_tokenization_problems_name_the_example(tmp_path: Path, tokenizer):
    """A text that tokenizes to nothing, or ids outside the vocabulary, are errors naming file:line."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"src": "fine", "tgt": "ok"}\n{"src": "\\u200b", "tgt": "ok"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: \"src\" tokenizes to nothing"):
        encode_pairs(read_jsonl_pairs(f), tokenizer, 10, 10)
    f.write_text('{"src": [5, 40000], "tgt": "ok"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: \"src\" holds token ids \[40000\]"):
        encode_pairs(read_jsonl_pairs(f), tokenizer, 10, 10)


def test_over_long_inputs_are_truncated_counted_and_logged(tokenizer, caplog):
    """Sources keep their first max_src_len tokens, targets their first max_tgt_len - 1 plus [SEP]; the counts
    are in the stats and the log. Token-id inputs follow the same rules."""
    records = [PairRecord("a", "one two three four five six", "alpha beta gamma delta", "t:1"),
               PairRecord("b", "short", "x", "t:2"),
               PairRecord("c", list(range(2000, 2010)), [3000, 3001, 3002], "t:3")]
    enc = encode_pairs(records, tokenizer, max_src_len=4, max_tgt_len=3)
    assert enc.src[0] == tokenizer.encode("one two three four")
    assert enc.tgt[0] == tokenizer.encode("alpha beta") + [tokenizer.sep_id]
    assert enc.src[1] == tokenizer.encode("short") and enc.tgt[1] == tokenizer.encode("x") + [tokenizer.sep_id]
    assert enc.src[2] == [2000, 2001, 2002, 2003] and enc.tgt[2] == [3000, 3001, tokenizer.sep_id]
    s = enc.stats
    assert (s.examples, s.src_truncated, s.tgt_truncated, s.src_tokens_cut, s.tgt_tokens_cut) == (3, 2, 2, 8, 3)
    with caplog.at_level(logging.INFO):
        s.log("test")
    assert "source truncated in 2" in caplog.text and "target truncated in 2" in caplog.text


def test_news_split_is_fixed_and_disjoint():
    """The news held-out split is 200 pairs chosen by id hash, disjoint from train, identical on every call."""
    from pmlm_engine.s2s_data import builtin_pairs

    test, train = builtin_pairs("news", "test"), builtin_pairs("news", "train")
    assert len(test) == 200 and len(train) + 200 == len(builtin_pairs("news", "all"))
    assert not {r.id for r in test} & {r.id for r in train}
    assert [r.id for r in builtin_pairs("news", "test")] == [r.id for r in test]


# --------------------------------------------------------------------------- end to end


def test_finetune_run_writes_a_model_that_decode_loads(tmp_path: Path, tokenizer):
    """A 4-step fine-tuning run from a tiny model folder (position table extended: 40 + 2 + 30 > 64) writes
    metrics and a model folder; the decode CLI loads it and writes one prediction per input."""
    from pmlm_engine.checkpoint import load_model, save_model
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.decode import main as decode_main
    from pmlm_engine.model import PMLMModel

    torch.manual_seed(0)
    init = save_model(PMLMModel(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2,
                                            num_heads=4, intermediate_size=64, max_position=64)),
                      tmp_path / "init", extra={"tokenizer": str(minilm_dir() / "vocab.txt")})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"src": f"story number {i} about the city council " * 3,
                                        "tgt": f"council story {i}"}) + "\n" for i in range(6)))
    summary = finetune(from_dict({
        "init": str(init), "out": str(tmp_path / "ft"), "steps": 4, "threads": 1,
        "data": {"corpus": str(data), "max_src_len": 40, "max_tgt_len": 30, "batch_size": 3},
        "optim": {"lr": 1e-3, "warmup_steps": 1}, "logging": {"every": 2, "progress": False, "tensorboard": False}},
        FinetuneConfig))
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    model = load_model(summary["model"])
    assert model.config.max_position == 72
    out = tmp_path / "pred.jsonl"
    rc = decode_main(["--init", summary["model"], "--corpus", str(data), "--out", str(out), "--beam", "2",
                      "--max-tgt-len", "5", "--batch-size", "4", "--threads", "1"])
    assert rc == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == [str(i) for i in range(1, 7)] and all("prediction" in p for p in preds)


def _tiny_init(tmp_path: Path, vocab_size: int, vocab: Path, dropout: float) -> Path:
    from pmlm_engine.checkpoint import save_model
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.model import PMLMModel

    torch.manual_seed(0)
    return save_model(PMLMModel(ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                            intermediate_size=64, max_position=64, hidden_dropout=dropout)),
                      tmp_path / "init", extra={"tokenizer": str(vocab)})


def test_sigterm_then_the_same_command_resumes_the_same_loss_sequence(tmp_path: Path, tokenizer, monkeypatch):
    """A fine-tune (torch engine, dropout on, 2 micro-steps per step) that receives SIGTERM during step 5 finishes
    that step, checkpoints and returns; the same configuration run again resumes there and writes the metrics
    rows of an uninterrupted run, losses bit for bit, and the same final weights."""
    import os
    import signal

    from pmlm_engine.checkpoint import load_model
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.runner import Runner

    vocab = minilm_dir() / "vocab.txt"
    init = _tiny_init(tmp_path, tokenizer.vocab_size, vocab, dropout=0.1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"src": f"report {i} on the harbour works and the budget " * (1 + i % 3),
                                        "tgt": f"harbour report {i}"}) + "\n" for i in range(7)))

    def cfg(out: str) -> FinetuneConfig:
        return from_dict({"init": str(init), "out": str(tmp_path / out), "steps": 8, "grad_accum": 2, "threads": 1,
                          "data": {"corpus": str(data), "max_src_len": 24, "max_tgt_len": 8, "batch_size": 2},
                          "optim": {"lr": 3e-3, "warmup_steps": 2}, "checkpoint": {"every": 3, "keep": 1},
                          "model": {"attention_backend": "sdpa"},
                          "logging": {"every": 1, "progress": False, "tensorboard": False}}, FinetuneConfig)

    full = finetune(cfg("full"))
    original = Runner.before_optimizer_step

    def sigterm_at_step_5(self, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, step)

    monkeypatch.setattr(Runner, "before_optimizer_step", sigterm_at_step_5)
    cut = finetune(cfg("cut"))
    assert cut["stopped_by"] == "SIGTERM" and cut["steps"] == 5 and "model" not in cut
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["latest", "step00000005"]
    monkeypatch.setattr(Runner, "before_optimizer_step", original)
    resumed = finetune(cfg("cut"))
    assert resumed["start_step"] == 5 and resumed["steps"] == 8
    want, got = metrics_rows(tmp_path / "full"), metrics_rows(tmp_path / "cut")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in want] == full["losses"]
    assert [(r["lr"], r["epoch"]) for r in got] == [(r["lr"], r["epoch"]) for r in want]
    a, b = load_model(tmp_path / "cut" / "final"), load_model(tmp_path / "full" / "final")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
