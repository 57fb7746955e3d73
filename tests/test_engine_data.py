"""Data at scale: the memory-mapped token cache and rank-sharded, resumable batches.

Proves: the cache reproduces ``main_sequences`` exactly (chunking, seeded segment splits,
empty documents keeping their index) across shard boundaries; it is keyed by corpus and
tokenizer and reused; ranks and micro-steps partition each global batch; and bad inputs
(missing, empty, non-UTF-8 files, unknown corpora, corpora without text) are errors naming
the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmlm_engine.data import DataConfig, PretrainData, main_sequences
from pmlm_engine.stream import StoreSequences, TokenStore, build_token_store, resolve_sources
from pmlm_engine.tokenizer import load_tokenizer

from .test_train_fixtures import paragraphs, write_jsonl, write_txt, write_vocab


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    docs = paragraphs(120)
    vocab = write_vocab(tmp / "vocab.txt", docs)
    # a .txt and two .jsonl; one document is a control character that tokenizes to no ids at all
    # (an empty document: skipped by main_sequences, but it keeps its index and so its seed)
    txt = write_txt(tmp / "a.txt", docs[:60])
    jsonl = write_jsonl(tmp / "b.jsonl", docs[60:75] + ["\x07"] + docs[75:90])
    write_jsonl(tmp / "c.jsonl", docs[90:])
    return tmp, docs, vocab, [txt, jsonl, tmp / "c.jsonl"]


def test_store_equals_in_memory_sequences_across_shards(corpus):
    """StoreSequences[i] == main_sequences(docs)[i] for every i, with shards of ~500 tokens."""
    tmp, _, vocab, files = corpus
    tok = load_tokenizer(vocab)
    store = build_token_store([str(f) for f in files], tok, tmp / "cache", shard_tokens=500, progress=False)
    assert len(store.meta["shards"]) > 5
    docs = [store.doc(d).tolist() for d in range(store.num_docs)]
    assert store.meta["empty_docs"] == 1 and docs[75] == []
    from pmlm_engine.corpus import read_text_files

    texts = list(read_text_files(files))
    assert docs == tok.encode_batch(texts)  # the cache holds exactly the tokenized documents
    special = tok.special_ids()
    for max_len in (16, 40):
        ref = main_sequences(docs, max_len, special, seed=5)
        seqs = StoreSequences(store, max_len, special, seed=5)
        assert len(seqs) == len(ref)
        for i in range(len(ref)):
            got = seqs[i]
            assert np.array_equal(got.tokens, ref[i].tokens) and np.array_equal(got.segment_ids, ref[i].segment_ids)
            assert np.array_equal(got.maskable, ref[i].maskable)
        cfg = DataConfig(max_len=max_len, batch_size=4, seed=2)
        a, b = PretrainData(ref, special, cfg), PretrainData(seqs, special, cfg)
        for step in (0, 3, 50):
            x, y = a.batch(step), b.batch(step)
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_cache_is_keyed_by_corpus_and_tokenizer_and_reused(corpus, tmp_path, monkeypatch):
    """Same corpus + tokenizer: the cache is opened, not rebuilt. Another tokenizer or a changed file: a new key."""
    tmp, docs, vocab, files = corpus
    tok = load_tokenizer(vocab)
    first = build_token_store([str(files[0])], tok, tmp_path, progress=False)
    from pmlm_engine import stream

    monkeypatch.setattr(stream.Source, "documents", lambda self: (_ for _ in ()).throw(AssertionError("re-read")))
    again = build_token_store([str(files[0])], tok, tmp_path, progress=False)
    assert again.folder == first.folder
    monkeypatch.undo()
    other_vocab = write_vocab(tmp_path / "vocab2.txt", docs, words=50)
    other = build_token_store([str(files[0])], load_tokenizer(other_vocab), tmp_path, progress=False)
    assert other.folder != first.folder and other.num_tokens > first.num_tokens
    copy = write_txt(tmp_path / "copy.txt", docs[:60])
    before = build_token_store([str(copy)], tok, tmp_path, progress=False)
    write_txt(copy, docs[:61])
    after = build_token_store([str(copy)], tok, tmp_path, progress=False)
    assert before.folder != after.folder and after.num_docs == 61
    assert not list(tmp_path.glob(".tmp-*"))  # no half-written cache left behind


def test_ranks_and_micro_steps_partition_the_global_batch(corpus):
    """Over ranks and micro-steps, each step's examples are the single-process global batch's, each read once."""
    tmp, _, vocab, files = corpus
    tok = load_tokenizer(vocab)
    seqs = StoreSequences(build_token_store([str(files[0])], tok, tmp / "cache", progress=False), 32,
                          tok.special_ids(), 0)
    one = PretrainData(seqs, tok.special_ids(), DataConfig(max_len=32, batch_size=12))
    split = PretrainData(seqs, tok.special_ids(), DataConfig(max_len=32, batch_size=3), world_size=2, grad_accum=2)
    assert split.global_batch_size == 12 and split.batches_per_epoch == one.batches_per_epoch
    for step in (0, 1, one.batches_per_epoch + 2):  # also past an epoch boundary
        parts = [split.indices(step, r, m) for m in range(2) for r in range(2)]
        epoch, want = one.indices(step)
        assert {e for e, _ in parts} == {epoch}
        assert [i for _, idx in parts for i in idx] == want
    with pytest.raises(ValueError, match="rank=2 is outside"):
        split.indices(0, rank=2)


def test_bad_corpora_are_named(corpus, tmp_path):
    """Missing, empty, wrongly named, non-UTF-8 and text-free inputs fail with the file's name."""
    _, docs, vocab, _ = corpus
    tok = load_tokenizer(vocab)
    with pytest.raises(FileNotFoundError, match="data.corpus file .*missing.txt does not exist"):
        resolve_sources([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        resolve_sources([str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match="neither a built-in corpus"):
        resolve_sources(["newz"])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_sources([str(tmp_path / "shards-*.jsonl")])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte offset 3"):
        build_token_store([str(bad)], tok, tmp_path / "cache", progress=False)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n{"text": ""}\n')
    with pytest.raises(ValueError, match="blank.jsonl holds no non-empty document"):
        build_token_store([str(blank)], tok, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*/meta.json"))
    with pytest.raises(FileNotFoundError, match="not a token cache"):
        TokenStore(tmp_path)
