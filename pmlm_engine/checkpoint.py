"""Model folders and resumable training checkpoints, both written atomically.

* Model folders (:func:`save_model`, :func:`save_state`, :func:`load_model`): ``model.safetensors``
  (fp32, the tied decoder stored once) + ``config.json``. The exchange format between
  pre-training, fine-tuning and decoding. A folder is self-contained: the tokenizer file named
  in ``extra["tokenizer"]`` is copied in and recorded by its name, relative to the folder
  (:func:`model_tokenizer` resolves it), so a copied folder works on another machine.
* Training checkpoints (:class:`CheckpointManager`): one folder per saved step under a root::

      <root>/step00000200/    # engine files (DeepSpeed's or the torch engine's), rng-rank*.safetensors,
      <root>/step00000300/    # trainer_state.json (step, tokens, config)
      <root>/latest           # the tag of the newest complete checkpoint ("step00000300")

  Every rank writes into ``<root>/.tmp-stepNNNNNNNN``; once all are done rank 0 syncs the files,
  renames the folder to its final tag and replaces ``latest`` (write a temporary file, fsync,
  ``os.replace``). A crash at any point leaves ``latest`` naming a complete checkpoint. The
  newest ``keep`` checkpoints are kept.

Nothing here unpickles: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

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


TIED = "lm_head.embedding.weight"  # the decoder, tied to embeddings.word_embeddings.weight


def save_model(model: PMLMModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (fp32, tied weights stored once) and ``config.json``."""
    return save_state(model.state_dict(), model.config, path, extra)


def save_state(state: Mapping[str, Tensor], config: ModelConfig, path: str | os.PathLike,
               extra: dict[str, Any] | None = None) -> Path:
    """:func:`save_model` from a state dict (e.g. fp32 master weights gathered from DeepSpeed).

    ``extra["tokenizer"]``, when it names an existing file or folder, is copied into the model
    folder and recorded as its relative name (:func:`bundle_tokenizer`).
    """
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items() if k != TIED}
    extra = dict(extra or {})
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pmlm-engine"})
        if extra.get("tokenizer"):
            extra["tokenizer"] = bundle_tokenizer(extra["tokenizer"], tmp)
        (tmp / CONFIG).write_text(json.dumps({"model": to_dict(config), **extra}, indent=2))
    return Path(path)


def bundle_tokenizer(tokenizer: str | os.PathLike, folder: Path) -> str:
    """Copy a tokenizer file (or folder) into ``folder``; returns the name to record.

    A path that does not exist (e.g. a name resolved elsewhere) is recorded unchanged. A
    tokenizer already inside ``folder`` keeps its relative name.
    """
    src = Path(tokenizer)
    if not src.exists():
        return str(tokenizer)
    name = src.name if src.name not in (WEIGHTS, CONFIG) else f"tokenizer-{src.name}"
    dst = folder / name
    if src.resolve() != dst.resolve():
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    return name


def model_tokenizer(path: str | os.PathLike) -> Optional[str]:
    """The tokenizer recorded in a model folder's config, as a usable path (None if none is recorded).

    Relative names (what :func:`save_state` writes) are resolved against the folder; absolute
    paths written by older versions are returned as they are.
    """
    recorded = read_config(path).get("tokenizer")
    if not recorded:
        return None
    p = Path(recorded)
    return str(p if p.is_absolute() else Path(path) / p)


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


# --------------------------------------------------------------------------- training checkpoints

log = logging.getLogger(__name__)

LATEST = "latest"
STATE = "trainer_state.json"
_TAG_RE = re.compile(r"^step(\d{8,})$")


def step_tag(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"step{step:08d}"


def _fsync_tree(folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Atomic, rotating checkpoints under one root folder shared by all ranks.

    Args:
        root: the checkpoint folder.
        keep: newest complete checkpoints to keep.
        is_main: this process is rank 0 (renames, pointer updates and deletions happen there).
        barrier: a function that waits for all ranks (a no-op in one process).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} is invalid: keep at least 1 checkpoint")
        self.root = Path(root)
        self.keep = keep
        self.is_main = is_main
        self.barrier = barrier

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
        return sorted(found, key=lambda t: int(_TAG_RE.match(t).group(1)))

    def latest(self) -> Optional[Path]:
        """The checkpoint ``latest`` names, or None when there is none."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        folder = self.root / tag
        if not _TAG_RE.match(tag) or not (folder / STATE).is_file():
            raise ValueError(f"{pointer} names {tag!r}, which is not a complete checkpoint in {self.root}: "
                             f"point it at one of {self.tags()} or delete it to start afresh")
        return folder

    def save(self, step: int, write: Callable[[Path, str], None], state: Mapping[str, Any]) -> Path:
        """Write the checkpoint of ``step`` on every rank; return its final folder.

        Args:
            write: ``write(root, tmp_tag)`` writes this rank's files into ``root / tmp_tag``
                (e.g. ``DeepSpeedEngine.save``); every rank calls it.
            state: the trainer state (JSON), written by rank 0 into ``trainer_state.json``.
        """
        tmp_tag, tag = f".tmp-{step_tag(step)}", step_tag(step)
        tmp, final = self.root / tmp_tag, self.root / tag
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        self.barrier()
        write(self.root, tmp_tag)
        self.barrier()
        if self.is_main:
            (tmp / STATE).write_text(json.dumps(dict(state), indent=2))
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
                old = self.root / f".old-{tag}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            pointer_tmp = self.root / f".{LATEST}.tmp-{os.getpid()}"
            pointer_tmp.write_text(tag)
            with open(pointer_tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(pointer_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            self._prune(tag)
        self.barrier()
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self, current: str) -> None:
        tags = self.tags()
        for tag in tags[:-self.keep]:
            if tag != current:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        for stale in self.root.glob(".tmp-step*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def read_state(folder: str | os.PathLike) -> dict[str, Any]:
        """``trainer_state.json`` of a checkpoint folder."""
        path = Path(folder) / STATE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE})")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}): the checkpoint is damaged; resume from "
                             f"another one (checkpoint.resume=PATH)") from None
