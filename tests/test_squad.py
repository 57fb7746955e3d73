"""SQuAD -> question-generation pairs, on the real SQuAD fixture of allennlp 0.9.0 and on malformed inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pmlm_engine.squad import fixture_path, squad_qg_pairs


@pytest.fixture(scope="module")
def fixture() -> Path:
    return fixture_path()


def test_real_fixture_parses_into_five_pairs(fixture: Path):
    """The real fixture (two Notre Dame paragraphs, five questions) gives five pairs 'answer [SEP] passage' ->
    question; the [SEP] text becomes the [SEP] id when tokenized."""
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.tokenizer import load_tokenizer

    pairs, stats = squad_qg_pairs(fixture)
    assert (stats.articles, stats.paragraphs, stats.questions, stats.pairs) == (1, 2, 5, 5)
    assert stats.multi_answer == 1 and stats.unanswerable_skipped == 0
    first = pairs[0]
    assert first["id"] == "5733be284776f41900661182"
    assert first["tgt"] == "To whom did the Virgin Mary allegedly appear in 1858 in Lourdes France?"
    assert first["src"].startswith("Saint Bernadette Soubirous [SEP] Architecturally, the school has a Catholic")
    assert [p["answer"] for p in pairs[2:]] == ["1882", "Father Julius Nieuwl", "an early wind tunnel"]
    tok = load_tokenizer(minilm_dir() / "vocab.txt")
    ids = tok.encode(first["src"])
    assert ids[:ids.index(tok.sep_id)] == tok.encode("Saint Bernadette Soubirous")


def test_malformed_squad_is_an_error_with_its_json_path(fixture: Path, tmp_path: Path):
    """A wrong answer_start, a missing context or a repeated id raise ValueError naming the JSON path;
    SQuAD 2.0 unanswerable questions are skipped and counted."""
    data = json.loads(fixture.read_text())

    def write(d) -> Path:
        f = tmp_path / "s.json"
        f.write_text(json.dumps(d))
        return f

    bad = copy.deepcopy(data)
    bad["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] = 5
    with pytest.raises(ValueError, match=r"data\[0\]\.paragraphs\[1\]\.qas\[0\]\.answers\[0\]: answer_start=5"):
        squad_qg_pairs(write(bad))
    bad = copy.deepcopy(data)
    del bad["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(ValueError, match=r"data\[0\]\.paragraphs\[0\]: missing field 'context'"):
        squad_qg_pairs(write(bad))
    bad = copy.deepcopy(data)
    bad["data"][0]["paragraphs"][1]["qas"][1]["id"] = bad["data"][0]["paragraphs"][1]["qas"][0]["id"]
    with pytest.raises(ValueError, match="repeats"):
        squad_qg_pairs(write(bad))
    v2 = copy.deepcopy(data)
    v2["data"][0]["paragraphs"][0]["qas"][0].update(is_impossible=True, answers=[])
    pairs, stats = squad_qg_pairs(write(v2))
    assert stats.pairs == 4 and stats.unanswerable_skipped == 1
