"""The pre-training data pipeline: chunking, determinism, batching and its documented handling of bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pmlm_engine.config import MaskingConfig
from pmlm_engine.data import DataConfig, PretrainData, chunk_document, main_sequences
from pmlm_engine.layout import IGNORE, pack_rows

from .helpers import SPECIAL


def _docs(rng, lengths):
    return [rng.integers(SPECIAL.random_lo, SPECIAL.random_hi, n).tolist() for n in lengths]


def test_long_document_is_chunked_into_bert_segments():
    """A document longer than max_len becomes consecutive [CLS] A [SEP] B [SEP] chunks covering every token once."""
    rng = np.random.default_rng(0)
    (doc,) = _docs(rng, [250])
    chunks = list(chunk_document(doc, 64, SPECIAL, seed=1))
    assert len(chunks) == 5 and all(len(c) <= 64 for c in chunks)
    text = []
    for c in chunks:
        assert c.tokens[0] == SPECIAL.cls and c.tokens[-1] == SPECIAL.sep
        assert (c.tokens == SPECIAL.sep).sum() in (1, 2)
        assert set(np.unique(c.segment_ids)) <= {0, 1}
        text += c.tokens[c.maskable].tolist()
    assert text == doc


def test_empty_documents_are_skipped_and_counted(caplog):
    """Empty documents are skipped with a logged count; a corpus of only empty documents is an error."""
    rng = np.random.default_rng(1)
    with caplog.at_level(logging.INFO):
        seqs = main_sequences([[], *_docs(rng, [10]), []], 32, SPECIAL, 0)
    assert len(seqs) == 1
    assert "skipped 2 empty document" in caplog.text
    with pytest.raises(ValueError, match="every document was empty"):
        main_sequences([[], []], 32, SPECIAL, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_len=4), "max_len=4 is too small"),
    (dict(batch_size=0), "batch_size"),
    (dict(batching="ragged"), "batching"),
    (dict(max_len=64, batching="packed", row_len=70), "row_len=70 cannot hold"),
])
def test_bad_data_config(kwargs, match):
    """Configurations that cannot work fail at construction with the field's name and the fix."""
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_batches_are_a_pure_function_of_seed_and_step(batching):
    """The batch of step t is identical across instances (exact resume) and differs between steps."""
    rng = np.random.default_rng(2)
    seqs = main_sequences(_docs(rng, rng.integers(5, 200, 30)), 48, SPECIAL, 0)
    cfg = DataConfig(max_len=48, batch_size=4, batching=batching, seed=3)
    a, b = PretrainData(seqs, SPECIAL, cfg), PretrainData(seqs, SPECIAL, cfg)
    for step in (0, 1, 17):
        x, y = a.batch(step), b.batch(step)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.batch(0)["input_ids"][:1, :10], a.batch(1)["input_ids"][:1, :10])
    batch = a.batch(5)
    assert ((batch["labels"] != IGNORE) & (batch["step"] > 0)).sum() == 0
    epoch, b5 = divmod(5, a.batches_per_epoch)
    order = a.epoch_order(epoch)
    lengths = [len(a.example(epoch, int(order[b5 * 4 + j]))) for j in range(4)]
    assert int((batch["doc_ids"] >= 0).sum()) == sum(lengths)  # every token of the four examples, once
    if batching == "packed":
        assert batch["input_ids"].shape[1] <= cfg.max_example_len


def test_max_example_len_bounds_every_example():
    """No example exceeds DataConfig.max_example_len (the packed row length), even at a high mask ratio."""
    rng = np.random.default_rng(4)
    for ratio in (0.15, 0.5):
        cfg = DataConfig(max_len=40, masking=MaskingConfig(mask_ratio=ratio))
        seqs = main_sequences(_docs(rng, [37] * 50), 40, SPECIAL, 0)
        data = PretrainData(seqs, SPECIAL, cfg)
        assert max(len(data.example(0, i)) for i in range(len(seqs))) <= cfg.max_example_len


def test_pack_rows_refuses_oversized_examples():
    """Packing names the example that cannot fit and the fix."""
    assert sorted(map(sorted, pack_rows([5, 3, 4, 2], 7))) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_rows([3, 9], 8)
