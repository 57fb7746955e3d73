"""Readable predictions: WordPiece joining, punctuation spacing, the source's surface form; self-contained folders."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

from pmlm_engine.detok import detokenize, join_words


@pytest.fixture(scope="module")
def tok():
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.tokenizer import load_tokenizer

    return load_tokenizer(minilm_dir() / "vocab.txt")


SOURCE = ("libfoo-dev: C++ library for python-openid (development files). It costs $3.5 million, about 1,000 "
          "users at 10:30 -- Betsy DeVos's plan (U.S.) isn't new.")


@pytest.mark.parametrize("pred, rules, surface", [
    ("c++ library", "c++ library", "C++ library"),
    ("python-openid", "python-openid", "python-openid"),
    ("(development files)", "(development files)", "(development files)"),
    ("betsy devos's plan", "betsy devos's plan", "Betsy DeVos's plan"),
    ("the u.s. plan isn't new", "the u.s. plan isn't new", "the U.S. plan isn't new"),
    ("costs $3.5 million, about 1,000 users at 10:30", "costs $3.5 million, about 1,000 users at 10:30",
     "costs $3.5 million, about 1,000 users at 10:30"),
    ("a c++ library for perl (development files)", "a c++ library for perl (development files)",
     "a C++ library for perl (development files)"),
    ('mexico voices "irritation" as envoys visit', 'mexico voices "irritation" as envoys visit',
     'mexico voices "irritation" as envoys visit'),
    ("residents' feedback pinpoints the polluters", "residents' feedback pinpoints the polluters",
     "residents' feedback pinpoints the polluters"),
    ("memo found 'ample legal justification' to halt", "memo found 'ample legal justification' to halt",
     "memo found 'ample legal justification' to halt"),
])
def test_detokenize_examples(tok, pred: str, rules: str, surface: str):
    """The issue's examples and the rules' edge cases; the plain decode is what the rules fix."""
    ids = tok.encode(pred)
    assert detokenize(tok, ids) == rules
    assert detokenize(tok, ids, SOURCE) == surface
    assert detokenize(tok, [tok.cls_id, *ids, tok.sep_id, tok.pad_id], SOURCE) == surface  # specials dropped


def test_plain_decode_was_unreadable(tok):
    """The starting point: the tokenizer's own decode spaces punctuation inside words."""
    assert tok.decode(tok.encode("c++ library")) == "c + + library"


def _strip_accents_lower(text: str) -> str:
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if unicodedata.category(c) != "Mn")


def test_real_news_examples():
    """Real text of the news corpus (test split): every 12-word source span, encoded (lowercased, split into
    pieces) and detokenized with its source, comes back exactly (592 of 592); the references, detokenized with
    the rules alone, equal the lowercased text in >= 90% (183 of 200; the plain decode: 128)."""
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.s2s_data import builtin_pairs
    from pmlm_engine.tokenizer import load_tokenizer

    tok = load_tokenizer(minilm_dir() / "vocab.txt")
    pairs = builtin_pairs("news", "test")
    spans = [(p.src, " ".join(p.src.split()[o:o + 12])) for p in pairs for o in (0, 40, 90)]
    spans = [(s, x) for s, x in spans if x]
    assert len(spans) > 500
    assert all(detokenize(tok, tok.encode(x), s) == x for s, x in spans)
    rules_ok = sum(detokenize(tok, tok.encode(p.tgt)) == _strip_accents_lower(p.tgt) for p in pairs)
    plain_ok = sum(tok.decode(tok.encode(p.tgt)) == _strip_accents_lower(p.tgt) for p in pairs)
    assert rules_ok >= 0.9 * len(pairs) and rules_ok > plain_ok


def test_join_words_rules():
    """Spacing rules on words directly: closers, openers, joiners, numbers, abbreviations, quotes."""
    assert join_words(["end", ".", "next"]) == "end. next"
    assert join_words(["3", ".", "5", "%"]) == "3.5%"
    assert join_words(["u", ".", "s", ".", "plan"]) == "u.s. plan"
    assert join_words(["said", '"', "no", '"', ",", "he"]) == 'said "no", he'
    assert join_words(["new", "-", "york"]) == "new-york"


def test_model_folder_is_self_contained(tmp_path: Path, tok):
    """save_state copies the tokenizer in and records it relative to the folder; the folder works after a move."""
    from pmlm_engine.checkpoint import load_model, model_tokenizer, read_config, save_model
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.model import PMLMModel
    from pmlm_engine.tokenizer import load_tokenizer

    model = PMLMModel(ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                                  intermediate_size=32, max_position=16))
    save_model(model, tmp_path / "a" / "m", extra={"tokenizer": tok.source})
    assert read_config(tmp_path / "a" / "m")["tokenizer"] == "vocab.txt"
    (tmp_path / "a").rename(tmp_path / "b")
    moved = tmp_path / "b" / "m"
    assert Path(model_tokenizer(moved)) == moved / "vocab.txt"
    assert load_tokenizer(model_tokenizer(moved)).vocab_size == tok.vocab_size
    assert torch.equal(load_model(moved).embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)
    config = json.loads((moved / "config.json").read_text())
    assert not Path(config["tokenizer"]).is_absolute()


def test_most_frequent_surface_form_wins(tok):
    """A run found several times takes its most frequent form: a sentence-initial "The" does not capitalise
    "the" elsewhere, while a name keeps its capitals."""
    source = "The cat saw the dog and the bird. Apple sold apple juice to Apple stores."
    assert detokenize(tok, tok.encode("dog and the apple"), source) == "dog and the Apple"
    assert detokenize(tok, tok.encode("the bird saw apple"), source) == "the bird saw Apple"
    assert detokenize(tok, tok.encode("the"), source) == "the"
