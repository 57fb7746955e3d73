"""Consolidated model files: ``model.safetensors`` + ``config.json``, written atomically.

This is the exchange format between pre-training, fine-tuning and decoding. Nothing
here unpickles: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .model import PMLMModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def atomic_dir(target: str | os.PathLike) -> "_AtomicDir":
    """Context manager: write into a temporary sibling folder, then rename it over ``target``.

    A crash mid-write leaves the previous ``target`` untouched (the temporary folder is
    removed on error; a leftover ``.tmp-*`` sibling from a killed process is harmless).
    """
    return _AtomicDir(Path(target))


class _AtomicDir:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.target.name}-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if self.target.exists():
            old = self.target.with_name(f".old-{self.target.name}-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_model(model: PMLMModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (fp32, tied weights stored once) and ``config.json``."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()
             if k != "lm_head.embedding.weight"}  # tied to embeddings.word_embeddings.weight
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pmlm-engine"})
        (tmp / CONFIG).write_text(json.dumps({"model": to_dict(model.config), **(extra or {})}, indent=2))
    return Path(path)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected a model folder written by "
                                "pmlm_engine (model.safetensors + config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file} is not valid JSON ({exc}): re-export the model") from exc


def load_model(path: str | os.PathLike, **overrides: Any) -> PMLMModel:
    """Load a model folder written by :func:`save_model`; ``overrides`` change config fields
    that do not affect parameter shapes (e.g. ``attention_backend``, dropout)."""
    meta = read_config(path)
    cfg = from_dict(ModelConfig, {**meta["model"], **overrides}, where=f"{path}/{CONFIG}")
    model = PMLMModel(cfg)
    state = load_file(str(Path(path) / WEIGHTS))
    state["lm_head.embedding.weight"] = state["embeddings.word_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return model
