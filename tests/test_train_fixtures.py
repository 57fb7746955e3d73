"""Shared builders for the training-engine tests (no tests here).

* a small real-text corpus: paragraphs of Python's own documentation (``pydoc_data.topics``,
  ~62k words of English prose shipped with every CPython), written as ``.txt`` / ``.jsonl``;
* a WordPiece ``vocab.txt`` built from it (BERT specials, characters, ``##`` continuations
  and the most frequent words), read by :class:`pmlm_engine.tokenizer.WordPieceTokenizer`;
* a tiny job configuration (2 layers, hidden 32) and a way to run ``pmlm_engine/train.py``
  in a subprocess.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "pmlm_engine" / "train.py"


def paragraphs(n: int = 400) -> list[str]:
    """The first ``n`` paragraphs (over 8 words) of Python's pydoc topics, whitespace collapsed."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) > 8]
    return paras[:n]


def write_txt(path: Path, docs: Sequence[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: Sequence[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def write_vocab(path: Path, docs: Sequence[str], words: int = 200) -> Path:
    """A lowercase WordPiece vocabulary covering every character of ``docs``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    counts = collections.Counter(w for d in docs for w in re.findall(r"[a-z]+", d.lower()))
    top = [w for w, _ in counts.most_common(words) if len(w) > 1]
    vocab = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + top
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return path


def tiny_config(tmp: Path, corpus: Sequence[str | Path], vocab: Path, **top: Any) -> dict[str, Any]:
    """A JSON job config for a 2-layer, hidden-32 model on ``corpus``; ``top`` replaces top-level keys."""
    cfg: dict[str, Any] = {
        "engine": "torch",
        "precision": "fp32",
        "threads": 1,
        "steps": 6,
        "out": str(tmp / "run"),
        "model": {"preset": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                  "max_position": 64, "hidden_dropout": 0.0, "attention_backend": "sdpa"},
        "data": {"corpus": [str(c) for c in corpus], "tokenizer": str(vocab), "max_len": 32, "batch_size": 4,
                 "seed": 1, "cache_dir": str(tmp / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "logging": {"every": 1, "progress": False, "tensorboard": False, "plot": False},
    }
    cfg.update(top)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cfg, indent=2))
    return path


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("TRITON_INTERPRET", None)
    return env


def run_train(args: Sequence[str], timeout: float = 240, launcher: Sequence[str] = (sys.executable,),
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``pmlm_engine/train.py`` (as a script path, the DeepSpeed launcher's form) in a subprocess."""
    proc = subprocess.run([*launcher, str(TRAIN_SCRIPT), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc
