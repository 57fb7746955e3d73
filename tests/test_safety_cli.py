"""Faults injected into the real command-line tools (decode, convert, evaluate, tokenizer, corpus,
s2s_data) and into the token cache: each gives the expected one-line error and exit code, and
nothing the user had is removed or overwritten.

Proves: outputs are checked before any work (output == input on resolved paths, a folder where a
file is expected, a non-empty folder pmlm_engine did not write) and no temporary file is left;
``--overwrite`` writes into a foreign folder but keeps its other files; model folders carry a
manifest and a flipped byte, a truncated file, NaN weights, a foreign (Hugging Face) folder and
a corrupt tokenizer are refused by name; decode's numeric flags are validated; the token cache
detects a truncated shard or garbage ``meta.json`` and rebuilds itself with a warning; a corpus
path containing ``[`` is a file when it exists; the manifest and lock helpers behave as documented.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pmlm_engine.checkpoint import load_model, save_model
from pmlm_engine.config import ModelConfig
from pmlm_engine.errors import (
    EXIT_DIVERGED,
    EXIT_ENVIRONMENT,
    EXIT_INPUT_DAMAGED,
    EXIT_INPUT_MISSING,
    EXIT_OUTPUT_REFUSED,
    EXIT_USAGE,
    run_cli,
)
from pmlm_engine.lock import FolderLock
from pmlm_engine.manifest import MANIFEST, find_damage
from pmlm_engine.model import PMLMModel

from .test_train_fixtures import paragraphs, write_txt, write_vocab


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder (with its vocab.txt recorded) and a 3-example decode input."""
    tmp = tmp_path_factory.mktemp("safety")
    docs = paragraphs(40)
    vocab = write_vocab(tmp / "vocab.txt", docs)
    n_vocab = len(vocab.read_text().splitlines())
    torch.manual_seed(0)
    model = save_model(PMLMModel(ModelConfig(vocab_size=n_vocab, hidden_size=32, num_layers=2, num_heads=2,
                                             intermediate_size=64, max_position=64)),
                       tmp / "model", extra={"tokenizer": str(vocab)})
    src = tmp / "src.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "src": d[:120]}) + "\n" for i, d in enumerate(docs[:3])))
    corpus = write_txt(tmp / "corpus.txt", docs)
    return {"tmp": tmp, "vocab": vocab, "model": model, "src": src, "corpus": corpus, "n_vocab": n_vocab}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _decode(setup, tmp_path, *extra: str, model=None, output=None) -> int:
    from pmlm_engine.decode import main

    out = output if output is not None else tmp_path / "pred.jsonl"
    return main(["--init", str(model or setup["model"]), "--corpus", str(setup["src"]), "--out", str(out),
                 "--max-tgt-len", "4", "--threads", "1", *extra])


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_model_folders_carry_a_manifest_that_load_verifies(setup, tmp_path):
    folder = Path(setup["model"])
    assert find_damage(folder) is None and json.loads((folder / MANIFEST).read_text())["hash"] == "crc32"
    copy = tmp_path / "copy"
    copy.mkdir()
    for rel, data in _snapshot(folder).items():
        (copy / rel).write_bytes(data)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors does not match its checksum"):
        load_model(copy)


def test_predictions_stay_valid_json(tmp_path):
    from pmlm_engine.s2s_data import write_jsonl

    write_jsonl([{"id": "1", "score": float("-inf")}, {"id": "2", "score": float("nan")}], tmp_path / "p.jsonl")
    text = (tmp_path / "p.jsonl").read_text()
    assert [json.loads(line) for line in text.splitlines()] == [{"id": "1", "score": None}, {"id": "2", "score": None}]
    assert "Infinity" not in text and "NaN" not in text  # Python's json would accept them; other readers do not


def test_decode_output_equal_to_input_is_refused_and_the_input_kept(setup, tmp_path, capsys):
    before = setup["src"].read_bytes()
    same = setup["src"].parent / "." / setup["src"].name  # the same file spelled differently
    assert _decode(setup, tmp_path, output=same) == EXIT_OUTPUT_REFUSED
    assert "is also the input" in _err(capsys) and setup["src"].read_bytes() == before


def test_decode_output_folder_is_refused_before_any_work(setup, tmp_path, capsys):
    out = tmp_path / "outdir"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert _decode(setup, tmp_path, output=out) == EXIT_OUTPUT_REFUSED
    assert "is a folder" in _err(capsys)
    assert _snapshot(out) == {"mine.txt": b"keep me"} and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("flags,match", [
    (["--max-tgt-len", "-1"], "max_tgt_len=-1 is invalid"),
    (["--max-src-len", "-3"], "max_src_len=-3 is invalid"),
    (["--batch-size", "0"], "batch_size=0 is invalid"),
    (["--batch-size", "-2"], "batch_size=-2 is invalid"),
    (["--beam", "100000"], r"search.beam_size=100000 exceeds the vocabulary"),
])
def test_decode_numeric_flags_are_validated(setup, tmp_path, capsys, flags, match):
    assert _decode(setup, tmp_path, *flags) == EXIT_USAGE
    assert match in _err(capsys) and not (tmp_path / "pred.jsonl").exists()


def test_decode_cuda_device_without_cuda_is_an_environment_error(setup, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA device")
    assert _decode(setup, tmp_path, "--device", "cuda:0") == EXIT_ENVIRONMENT
    assert "sees no CUDA device; use --device cpu" in _err(capsys)


def _copy_model(setup, dest: Path) -> Path:
    dest.mkdir()
    for rel, data in _snapshot(Path(setup["model"])).items():
        (dest / rel).write_bytes(data)
    return dest


def test_decode_refuses_damaged_and_non_finite_and_foreign_models(setup, tmp_path, capsys):
    # a truncated weights file in a folder without a manifest: safetensors' own error, named
    cut = _copy_model(setup, tmp_path / "cut")
    (cut / MANIFEST).unlink()
    w = cut / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert _decode(setup, tmp_path, model=cut) == EXIT_INPUT_DAMAGED
    assert "model.safetensors is not a readable .safetensors file" in _err(capsys)
    # NaN weights, written past save_model's own check: refused on load
    from safetensors.torch import load_file, save_file

    nan = _copy_model(setup, tmp_path / "nan")
    (nan / MANIFEST).unlink()
    state = load_file(str(nan / "model.safetensors"))
    state["embeddings.word_embeddings.weight"][3, 5] = float("nan")
    save_file(state, str(nan / "model.safetensors"))
    assert _decode(setup, tmp_path, model=nan) == EXIT_DIVERGED
    assert "non-finite values (1 of" in _err(capsys)
    # a Hugging Face folder (config.json without our "model" section): was a KeyError traceback
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    assert _decode(setup, tmp_path, model=hf) == EXIT_USAGE
    assert "has no 'model' section" in _err(capsys)
    assert not (tmp_path / "pred.jsonl").exists()


def test_decode_with_a_corrupt_tokenizer_is_one_line(setup, tmp_path, capsys):
    bad = tmp_path / "junk.model"
    bad.write_bytes(b"\x00garbage" * 50)
    assert _decode(setup, tmp_path, "--tokenizer", str(bad)) == EXIT_INPUT_DAMAGED
    assert "junk.model is not a valid sentencepiece model" in _err(capsys)


def test_save_model_refuses_non_finite_weights(tmp_path):
    model = PMLMModel(ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                  max_position=32))
    params = dict(model.named_parameters())
    name = next(n for n in params if n.endswith("dense.weight"))
    with torch.no_grad():
        params[name][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=rf"non-finite values \(1 of \d+ in {name}\)"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_convert_never_deletes_a_foreign_folder_and_refuses_output_equal_input(setup, tmp_path, capsys):
    from pmlm_engine.convert import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    assert main(["import", str(setup["model"]), str(foreign)]) == EXIT_OUTPUT_REFUSED
    assert "non-empty folder that pmlm_engine did not write" in _err(capsys) and _snapshot(foreign) == {
        "notes.txt": b"my notes"}
    assert main(["export-hf", str(setup["model"]), str(foreign)]) == EXIT_OUTPUT_REFUSED
    assert _snapshot(foreign) == {"notes.txt": b"my notes"}
    before = _snapshot(Path(setup["model"]))
    assert main(["export-hf", str(setup["model"]), str(setup["model"])]) == EXIT_OUTPUT_REFUSED
    assert "is also the input" in _err(capsys) and _snapshot(Path(setup["model"])) == before
    # --overwrite writes into it and keeps the files it did not write
    assert main(["export-hf", str(setup["model"]), str(foreign), "--overwrite"]) == 0
    assert (foreign / "notes.txt").read_text() == "my notes" and (foreign / "model.safetensors").is_file()
    # a folder we wrote is replaced without --overwrite, and the user's file added to it stays
    assert main(["export-hf", str(setup["model"]), str(foreign)]) == 0
    assert (foreign / "notes.txt").read_text() == "my notes"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_evaluate_tokenizer_corpus_and_s2s_outputs_are_checked_before_work(setup, tmp_path, capsys):
    from pmlm_engine.corpus import main as corpus_main
    from pmlm_engine.evaluate import main as evaluate_main
    from pmlm_engine.s2s_data import main as s2s_main
    from pmlm_engine.tokenizer import main as tokenizer_main

    folder = tmp_path / "dir"
    folder.mkdir()
    corpus_before = setup["corpus"].read_bytes()
    assert evaluate_main(["--ref", str(setup["src"]), "--lead", "3", "--output", str(folder)]) == EXIT_OUTPUT_REFUSED
    assert "is a folder" in _err(capsys)
    (folder / "x.model").mkdir()  # PREFIX.model is a folder: refused before training, not after
    assert tokenizer_main(["train", "--input", str(setup["corpus"]), "--vocab-size", "60", "--output",
                           str(folder / "x"), "--quiet"]) == EXIT_OUTPUT_REFUSED
    assert "x.model is a folder" in _err(capsys)
    assert corpus_main(["dump", str(setup["corpus"]), "--output", str(setup["corpus"])]) == EXIT_OUTPUT_REFUSED
    assert "is also the input" in _err(capsys) and setup["corpus"].read_bytes() == corpus_before
    assert s2s_main(["export", str(setup["src"]), str(folder)]) == EXIT_OUTPUT_REFUSED
    assert "is a folder" in _err(capsys)
    assert s2s_main(["export", str(setup["src"]), str(setup["src"])]) == EXIT_OUTPUT_REFUSED
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    assert not leftovers and sorted(p.name for p in folder.iterdir()) == ["x.model"]


def test_missing_input_and_debug_traceback(setup, tmp_path, capsys):
    from pmlm_engine.evaluate import main as evaluate_main

    assert evaluate_main(["--ref", str(tmp_path / "nope.jsonl"), "--lead", "3"]) == EXIT_INPUT_MISSING
    assert "nope.jsonl" in _err(capsys)
    assert evaluate_main(["--ref", str(tmp_path / "nope.jsonl"), "--lead", "3", "--debug"]) == EXIT_INPUT_MISSING
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_bug_gets_a_traceback_and_exit_1(capsys):
    def buggy(argv):
        return {}["missing"]

    assert run_cli(buggy, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error: KeyError" in err


def test_token_cache_rebuilds_a_truncated_shard_and_garbage_meta(setup, tmp_path, caplog):
    from pmlm_engine.stream import META, build_token_store
    from pmlm_engine.tokenizer import load_tokenizer

    tok = load_tokenizer(str(setup["vocab"]))
    store = build_token_store([str(setup["corpus"])], tok, tmp_path / "cache", progress=False)
    expected = [list(store.doc(d)) for d in range(store.num_docs)]
    shard = store.folder / store.meta["shards"][0]["ids"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with caplog.at_level("WARNING"):
        again = build_token_store([str(setup["corpus"])], tok, tmp_path / "cache", progress=False)
    assert f"{shard} has" in caplog.text and "rebuilding it" in caplog.text
    assert [list(again.doc(d)) for d in range(again.num_docs)] == expected
    (again.folder / META).write_text("{not json")
    caplog.clear()
    with caplog.at_level("WARNING"):
        third = build_token_store([str(setup["corpus"])], tok, tmp_path / "cache", progress=False)
    assert f"{again.folder / META} is not a readable" in caplog.text
    assert [list(third.doc(d)) for d in range(third.num_docs)] == expected


def test_corpus_path_with_a_bracket_is_a_file(setup, tmp_path):
    from pmlm_engine.stream import resolve_sources

    odd = tmp_path / "news[1].txt"
    odd.write_bytes(setup["corpus"].read_bytes())
    (source,) = resolve_sources([str(odd)])
    assert source.name == str(odd.resolve())


def test_folder_lock_names_the_holder_and_takes_over_stale_locks(tmp_path, caplog):
    with FolderLock(tmp_path / "out"), pytest.raises(ValueError, match=rf"is in use by another run \(pid "
                                                                      rf"{os.getpid()} on host "):
        FolderLock(tmp_path / "out").acquire()
    FolderLock(tmp_path / "out").acquire().release()  # released on exit
    # a lock file left by a process that died (pid 2**22 + 1 is beyond any default pid_max: not running)
    lock_file = tmp_path / "out" / ".pmlm.lock"
    lock_file.write_text(json.dumps({"pid": 2**22 + 1, "host": os.uname().nodename, "time": 0, "argv": ["x"]}))
    with caplog.at_level("INFO"), FolderLock(tmp_path / "out"):
        pass
    assert "taking over a stale lock of pid 4194305" in caplog.text and "not running" in caplog.text
