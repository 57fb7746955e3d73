"""Tokenizers: the real bert-base-uncased WordPiece vocabulary and sentencepiece trained on real prose."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest
import torch

from pmlm_engine import corpus
from pmlm_engine.layout import SpecialIds
from pmlm_engine.tokenizer import (
    SentencePieceTokenizer,
    WordPieceTokenizer,
    load_tokenizer,
    main,
    split_sentences,
    train_sentencepiece,
)


@pytest.fixture(scope="session")
def minilm() -> Path:
    # No skip on failure: CI installs the package, so a failed fetch is a real error.
    return corpus.minilm_dir()


@pytest.fixture(scope="session")
def wordpiece(minilm: Path) -> WordPieceTokenizer:
    tok = load_tokenizer(minilm / "vocab.txt")
    assert isinstance(tok, WordPieceTokenizer)
    return tok


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python's own pydoc topics (~65k words of English prose) as a .txt corpus."""
    path = tmp_path_factory.mktemp("prose") / "topics.txt"
    corpus.write_corpus_txt(pydoc_data.topics.topics.values(), path)
    return path


@pytest.fixture(scope="session")
def spm(prose_file: Path) -> SentencePieceTokenizer:
    path = train_sentencepiece([prose_file], prose_file.parent / "spm" / "topics", 2000, num_threads=1)
    tok = load_tokenizer(path)
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


def _ascii_sentences(n: int) -> list[str]:
    """Real sentences of plain ASCII prose from pydoc topics, whitespace collapsed."""
    out = []
    for text in pydoc_data.topics.topics.values():
        for sent in split_sentences(text):
            sent = " ".join(sent.split())
            if 40 < len(sent) < 300 and re.fullmatch(r"[A-Za-z0-9 .,;:()'\"!?-]+", sent):
                out.append(sent)
    return out[:n]


# --------------------------------------------------------------------------- WordPiece


def test_wordpiece_gives_bert_base_uncased_ids(wordpiece: WordPieceTokenizer) -> None:
    """The real vocab.txt yields bert-base-uncased's special ids, word ids and random range."""
    assert wordpiece.vocab_size == 30522
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id) == \
        (0, 100, 101, 102, 103)
    assert wordpiece.pseudo_id is None
    assert wordpiece.encode("hello world") == [7592, 2088]
    assert wordpiece.encode("Hello, WORLD!") == [7592, 1010, 2088, 999]  # uncased, punctuation split
    assert wordpiece.tokenize("unaffable naïve") == ["una", "##ffa", "##ble", "naive"]  # accents stripped
    assert wordpiece.special_ids() == SpecialIds(cls=101, sep=102, mask=103, pad=0, pseudo=None,
                                                 random_lo=999, random_hi=30522)
    assert wordpiece.id_to_token(999) == "!" and wordpiece.id_to_token(998) == "[unused993]"
    assert wordpiece.token_to_id("world") == 2088
    with pytest.raises(ValueError, match="not in the vocabulary"):
        wordpiece.token_to_id("notatoken!!")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        wordpiece.id_to_token(30522)


def test_wordpiece_vocab_and_tokenizer_json_agree_on_real_news(wordpiece: WordPieceTokenizer, minilm: Path) -> None:
    """vocab.txt through our pipeline equals MiniLM's own tokenizer.json on 300 real news articles."""
    from_json = load_tokenizer(minilm / "tokenizer.json")
    docs = [d for _, d in zip(range(300), corpus.news_articles())]
    ids = wordpiece.encode_batch(docs)
    assert ids == from_json.encode_batch(docs)  # padding/truncation of tokenizer.json are turned off
    assert ids[:5] == [wordpiece.encode(d) for d in docs[:5]]
    assert sum(map(len, ids)) > 100_000
    assert load_tokenizer(minilm).source.endswith("vocab.txt")  # a folder resolves to its vocab.txt


def test_wordpiece_special_text_and_decode(wordpiece: WordPieceTokenizer) -> None:
    """[MASK] text maps to 103; decode drops [CLS]/[SEP]/[MASK]/[PAD], keeps [UNK], accepts arrays, rejects -100."""
    assert wordpiece.encode("the [MASK] sat [SEP]") == [1996, 103, 2938, 102]
    text = "the cat sat on the mat, didn't it?"
    ids = wordpiece.encode(text)
    assert wordpiece.decode([101, *ids, 102, 0, 0]) == text
    assert wordpiece.decode(np.array([7592, 103, 2088])) == "hello world"
    assert wordpiece.decode(torch.tensor([7592, 100])) == "hello [UNK]"
    with pytest.raises(ValueError, match="-100"):
        wordpiece.decode([7592, -100])
    assert pickle.loads(pickle.dumps(wordpiece)).encode("hello world") == [7592, 2088]


def test_wordpiece_pseudo_token_option(minilm: Path) -> None:
    """An existing vocabulary entry can serve as [P]; a missing one is a clear error."""
    tok = WordPieceTokenizer.from_vocab(minilm / "vocab.txt", pseudo_token="[unused0]")
    assert tok.pseudo_id == 1 and tok.special_ids().p == 1
    assert tok.decode([7592, 1, 2088]) == "hello world"
    with pytest.raises(ValueError, match=r"no \[P\] entry"):
        WordPieceTokenizer.from_vocab(minilm / "vocab.txt", pseudo_token="[P]")


# --------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_special_ids(spm: SentencePieceTokenizer) -> None:
    """A trained model has [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 [P]=5 and draws random ids after them."""
    assert (spm.pad_id, spm.unk_id, spm.cls_id, spm.sep_id, spm.mask_id, spm.pseudo_id) == (0, 1, 2, 3, 4, 5)
    assert spm.special_ids() == SpecialIds(cls=2, sep=3, mask=4, pad=0, pseudo=5, random_lo=6,
                                           random_hi=spm.vocab_size)
    assert 1000 < spm.vocab_size <= 2000
    assert [spm.id_to_token(i) for i in range(6)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[P]"]
    vocab_file = Path(spm.source).with_suffix(".vocab").read_text().splitlines()
    assert len(vocab_file) == spm.vocab_size and vocab_file[4] == "[MASK]\t4"


def test_sentencepiece_round_trips_real_prose(spm: SentencePieceTokenizer) -> None:
    """Real sentences decode back to themselves; batch and single encoding agree; pickling keeps the model."""
    sents = _ascii_sentences(200)
    assert len(sents) == 200
    batch = spm.encode_batch(sents)
    assert batch[:20] == [spm.encode(s) for s in sents[:20]]
    assert [spm.decode(ids) for ids in batch] == sents
    assert all(6 <= i < spm.vocab_size for ids in batch for i in ids)  # no special or unknown ids
    assert sum(map(len, batch)) < sum(len(s.split()) for s in sents) * 2  # real subwords, not characters
    assert pickle.loads(pickle.dumps(spm)).encode(sents[0]) == batch[0]


def test_sentencepiece_special_text(spm: SentencePieceTokenizer) -> None:
    """[MASK]/[SEP]/[P] text becomes one special id each, with no stray word-boundary piece before it."""
    ids = spm.encode("the [MASK] sat on the mat")
    assert ids.count(spm.mask_id) == 1
    assert spm.tokenize("the [MASK] sat")[:2] == ["▁the", "[MASK]"]
    assert spm.decode(ids) == "the sat on the mat"
    ids = spm.encode("[CLS] a value [SEP] another value [SEP] [P] [P]")
    assert ids[0] == spm.cls_id and ids.count(spm.sep_id) == 2 and ids[-2:] == [5, 5]
    assert spm.decode(ids) == "a value another value"
    assert spm.encode_batch(["the [MASK] sat on the mat"])[0] == spm.encode("the [MASK] sat on the mat")


def test_sentencepiece_lowercase_and_small_corpus(tmp_path: Path) -> None:
    """lowercase=True folds case; a vocab_size the corpus cannot support still trains (hard_vocab_limit=False)."""
    text = tmp_path / "tiny.jsonl"
    text.write_text('{"text": "The Cat sat on the Mat."}\n{"text": "A dog sat on a log. The end."}\n')
    tok = load_tokenizer(train_sentencepiece(text, tmp_path / "tiny", 1000, lowercase=True, num_threads=1))
    assert tok.vocab_size < 1000
    assert tok.encode("The CAT sat") == tok.encode("the cat sat")
    assert tok.decode(tok.encode("The Cat sat")) == "the cat sat"


def test_split_sentences_bounds_length() -> None:
    """Long single-line documents are cut at sentence ends, then at spaces, under max_chars."""
    doc = "First one. Second one!\n" + " ".join(["word"] * 2000)
    parts = list(split_sentences(doc, max_chars=100))
    assert parts[:2] == ["First one.", "Second one!"]
    assert all(0 < len(p) <= 100 for p in parts)
    assert " ".join(parts[2:]).split() == ["word"] * 2000


def test_train_and_encode_cli(prose_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI trains a model from a file and prints tokens and ids; bad inputs exit 1 with a message."""
    prefix = tmp_path / "cli"
    assert main(["train", "--input", str(prose_file), "--vocab-size", "800", "--output", str(prefix),
                 "--max-sentences", "3000", "--threads", "1", "--quiet"]) == 0
    assert prefix.with_suffix(".model").is_file() and prefix.with_suffix(".vocab").is_file()
    capsys.readouterr()
    assert main(["encode", "--tokenizer", str(prefix.with_suffix(".model")), "The [MASK] of a function"]) == 0
    out = capsys.readouterr().out
    assert "[MASK]" in out and "ids:    [" in out and "mask=4" in out
    assert main(["train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "100",
                 "--output", str(prefix)]) == 3  # an input is missing
    assert "nope.txt does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- load_tokenizer errors


def test_load_tokenizer_errors(tmp_path: Path, spm: SentencePieceTokenizer) -> None:
    """Missing, unknown, empty, corrupt and truncated tokenizer files fail with the file name and a fix."""
    with pytest.raises(FileNotFoundError, match=r"nothere\.model does not exist.*vocab\.txt"):
        load_tokenizer(tmp_path / "nothere.model")
    (tmp_path / "tok.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"tok\.bin: unknown type '\.bin'"):
        load_tokenizer(tmp_path / "tok.bin")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.model is empty"):
        load_tokenizer(tmp_path / "empty.model")
    (tmp_path / "junk.model").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"junk\.model is not a valid sentencepiece model.*train"):
        load_tokenizer(tmp_path / "junk.model")
    good = Path(spm.source).read_bytes()
    (tmp_path / "cut.model").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.model is not a valid sentencepiece model"):
        load_tokenizer(tmp_path / "cut.model")
    (tmp_path / "prose.txt").write_text("just some words\nnot a vocabulary\n")
    with pytest.raises(ValueError, match=r"prose\.txt has no \[PAD\] \[UNK\] \[CLS\] \[SEP\] \[MASK\] lines"):
        load_tokenizer(tmp_path / "prose.txt")
    (tmp_path / "latin1.txt").write_bytes("[PAD]\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        load_tokenizer(tmp_path / "latin1.txt")
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a readable"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="holds no vocab.txt"):
        load_tokenizer(tmp_path / "emptydir")


def test_training_input_errors_pass_through(tmp_path: Path) -> None:
    """A bad input line met during training surfaces as the reader's own error (file:line), not sentencepiece's."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello there world"}\n{"text": "more words"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        train_sentencepiece(bad, tmp_path / "bad", 100, num_threads=1)
    assert not (tmp_path / "bad.model").exists()


def test_sentencepiece_model_without_engine_pieces_is_rejected(tmp_path: Path) -> None:
    """A valid sentencepiece model lacking [CLS]/[SEP]/[MASK]/[PAD] fails with the piece named and the fix."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_ascii_sentences(200)), model_prefix=str(tmp_path / "plain"), vocab_size=200,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with pytest.raises(ValueError, match=r"plain\.model has no \[CLS\] piece.*pmlm_engine\.tokenizer train"):
        load_tokenizer(tmp_path / "plain.model")
