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

  Every rank writes into ``<root>/.tmp-stepNNNNNNNN``; once all are done rank 0 writes the
  manifest (:mod:`pmlm_engine.manifest`: per-file sizes and CRC-32s), syncs the files, renames
  the folder to its final tag and replaces ``latest`` (write a temporary file, fsync,
  ``os.replace``). A crash at any point leaves ``latest`` naming a complete checkpoint. The
  newest ``keep`` checkpoints are kept, and never the one just written (the newest verified).

Every folder carries ``manifest.json``, written last inside the atomic rename and verified before
any resume or load: a flipped byte, a truncated, missing or added file is an error naming the
file and the newest checkpoint that verifies (with the flag to resume from it). A missing or
unreadable ``latest`` falls back to the newest checkpoint that verifies, with one log line.
A checkpoint folder without a manifest is refused unless ``trust=True`` (``--trust-checkpoint``):
DeepSpeed's own files are pickles, so a folder whose content is not vouched for by a manifest
written by this program is never handed to it. Nothing in this module unpickles: weights are
safetensors, metadata is JSON.
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

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import ModelConfig, from_dict, to_dict
from .errors import DamagedInputError, NonFiniteError
from .manifest import MANIFEST, find_damage, has_manifest, read_manifest, verify_folder, write_manifest
from .model import PMLMModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def atomic_dir(target: str | os.PathLike, manifest: bool = True) -> "_AtomicDir":
    """Context manager: write into a temporary sibling folder, then rename it over ``target``.

    A crash mid-write leaves the previous ``target`` untouched (the temporary folder is
    removed on error; a leftover ``.tmp-*`` sibling from a killed process is harmless).
    With ``manifest`` the folder's ``manifest.json`` is written last, before the rename.
    Entries of an existing ``target`` that this write does not produce and that its old
    manifest does not list (files the program did not write there) are moved into the new
    folder, never deleted.
    """
    return _AtomicDir(Path(target), manifest)


class _AtomicDir:
    def __init__(self, target: Path, manifest: bool = True) -> None:
        self.target = target
        self.manifest = manifest

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.target.name}-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.manifest:
                write_manifest(self.tmp)
            _fsync_tree(self.tmp)  # flush file contents before the rename makes them visible
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        old = None
        if self.target.exists():
            ours = set(read_manifest(self.target)["files"]) | {MANIFEST} if has_manifest(self.target) else set()
            old = self.target.with_name(f".old-{self.target.name}-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            for entry in old.iterdir():  # what the program did not write there stays
                if entry.name not in ours and not (self.target / entry.name).exists():
                    os.replace(entry, self.target / entry.name)
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
    check_finite(tensors, f"the model to be written to {path}")
    extra = dict(extra or {})
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pmlm-engine"})
        if extra.get("tokenizer"):
            extra["tokenizer"] = bundle_tokenizer(extra["tokenizer"], tmp)
        (tmp / CONFIG).write_text(json.dumps({"model": to_dict(config), **extra}, indent=2))
    return Path(path)


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor of ``tensors`` holding NaN or inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{what} holds non-finite values ({bad} of {t.numel()} in {name}): refusing to use "
                                 f"it; take an earlier checkpoint or export")


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with a damaged or truncated file reported by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError (header, truncation) and OSError (mmap)
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise DamagedInputError(f"{path} is not a readable .safetensors file ({' '.join(str(exc).split())}): "
                                f"it is damaged or truncated; re-export or re-copy it") from None


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedInputError(f"{cfg_file} is not valid JSON ({exc}): re-export the model") from None


def load_model(path: str | os.PathLike, **overrides: Any) -> PMLMModel:
    """Load a model folder written by :func:`save_model`; ``overrides`` change config fields
    that do not affect parameter shapes (e.g. ``attention_backend``, dropout).

    The folder's manifest (when it has one) is verified first, and weights holding NaN or inf
    are refused: a model that cannot compute anything finite is never decoded or fine-tuned.
    """
    verify_folder(path, "model folder", "re-export it from a checkpoint that verifies")
    meta = read_config(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        hint = (" (a Hugging Face config: import it first with `python -m pmlm_engine.convert import "
                f"{path} OUT`)") if isinstance(meta, dict) and "model_type" in meta else ""
        raise ValueError(f"{Path(path) / CONFIG} has no 'model' section: {path} is not a model folder written by "
                         f"pmlm_engine{hint}")
    cfg = from_dict(ModelConfig, {**meta["model"], **overrides}, where=f"{path}/{CONFIG}")
    model = PMLMModel(cfg)
    state = read_safetensors(Path(path) / WEIGHTS)
    check_finite(state, f"model folder {path}")
    if "embeddings.word_embeddings.weight" not in state:
        raise DamagedInputError(f"{Path(path) / WEIGHTS} has no embeddings.word_embeddings.weight: not a model "
                                f"written by pmlm_engine")
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
    """Atomic, verified, rotating checkpoints under one root folder shared by all ranks.

    Args:
        root: the checkpoint folder.
        keep: newest complete checkpoints to keep.
        is_main: this process is rank 0 (renames, pointer updates and deletions happen there).
        barrier: a function that waits for all ranks (a no-op in one process).
        trust: accept checkpoint folders without a manifest (``--trust-checkpoint``): only for
            folders you wrote yourself with an older version, since DeepSpeed unpickles them.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None, trust: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} is invalid: keep at least 1 checkpoint")
        self.root = Path(root)
        self.keep = keep
        self.is_main = is_main
        self.barrier = barrier
        self.trust = trust
        self._verified: dict[str, Optional[str]] = {}

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
        return sorted(found, key=lambda t: int(_TAG_RE.match(t).group(1)))

    def damage(self, folder: str | os.PathLike) -> Optional[str]:
        """None when the checkpoint ``folder`` verifies against its manifest; else what is wrong.

        A folder without a manifest verifies only with ``trust``. Results are cached per folder
        for the life of this object (a checkpoint is immutable once written).
        """
        key = str(Path(folder).resolve())
        if key not in self._verified:
            if self.trust and not has_manifest(folder) and (Path(folder) / STATE).is_file():
                self._verified[key] = None
            else:
                damage = find_damage(folder)
                if damage is not None and not has_manifest(folder) and Path(folder).is_dir():
                    damage += (" (written by an older version, or not by pmlm_engine: DeepSpeed would unpickle "
                               "its files, so pass --trust-checkpoint only if you wrote it yourself)")
                self._verified[key] = damage
        return self._verified[key]

    def newest_verified(self, below: Optional[int] = None) -> Optional[Path]:
        """The newest checkpoint that verifies (older than step ``below`` if given), or None."""
        for tag in reversed(self.tags()):
            if below is not None and int(_TAG_RE.match(tag).group(1)) >= below:
                continue
            if self.damage(self.root / tag) is None:
                return self.root / tag
        return None

    def verify(self, folder: str | os.PathLike) -> Path:
        """Return ``folder`` if it verifies; else raise naming the damaged file and the newest
        checkpoint that verifies, with the flag to resume from it."""
        folder = Path(folder)
        damage = self.damage(folder)
        if damage is None:
            return folder
        step = _TAG_RE.match(folder.name)
        good = self.newest_verified(below=int(step.group(1)) if step and folder.parent == self.root else None)
        fix = (f"resume from the newest checkpoint that verifies with --resume {good}" if good is not None else
               "no other checkpoint here verifies: start afresh with --resume never --overwrite")
        raise DamagedInputError(f"checkpoint {folder} does not verify: {damage}: {fix}")

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: the one ``latest`` names, verified.

        When ``latest`` is missing or unreadable but checkpoints exist, the newest one that
        verifies (one log line says so). None when there is no checkpoint at all.
        """
        pointer = self.root / LATEST
        tags = self.tags()
        if not tags:
            return None
        problem = None
        if not pointer.is_file():
            problem = f"{pointer} is missing"
        else:
            try:
                tag = pointer.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                tag, problem = "", f"{pointer} is unreadable ({exc})"
            if problem is None and (not _TAG_RE.match(tag) or not (self.root / tag).is_dir()):
                problem = f"{pointer} names {tag[:40]!r}, which is not a checkpoint here"
        if problem is None:
            return self.verify(self.root / tag)
        good = self.newest_verified()
        if good is None:
            raise DamagedInputError(f"{problem}, and none of the checkpoints {tags} in {self.root} verifies "
                                    f"({self.damage(self.root / tags[-1])}): start afresh with --resume never "
                                    f"--overwrite, or resume from a folder you trust with --resume PATH "
                                    f"--trust-checkpoint")
        log.warning("%s; resuming from the newest checkpoint that verifies: %s", problem, good)
        return good

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
        try:
            write(self.root, tmp_tag)
            self.barrier()
            if self.is_main:
                (tmp / STATE).write_text(json.dumps(dict(state), indent=2))
                write_manifest(tmp)  # last: a folder with a verifying manifest is complete
                _fsync_tree(tmp)
        except BaseException:  # disk full, a kill signal turned exception, a bug: leave no partial folder
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.is_main:
            if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
                old = self.root / f".old-{tag}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            self._verified[str(final.resolve())] = None  # just written from these bytes
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
        """Delete all but the newest ``keep``; never ``current``, the checkpoint just written and
        therefore the newest verified one (a damaged newer one cannot push it out)."""
        tags = self.tags()
        for tag in tags[:-self.keep]:
            if tag != current:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        for stale in self.root.glob(".tmp-step*"):
            shutil.rmtree(stale, ignore_errors=True)

    def clear(self) -> list[str]:
        """Delete every checkpoint and ``latest`` (``--resume never --overwrite``); return the tags removed."""
        tags = self.tags()
        if self.is_main:
            for tag in tags:
                shutil.rmtree(self.root / tag)
            (self.root / LATEST).unlink(missing_ok=True)
        self.barrier()
        return tags

    @staticmethod
    def read_state(folder: str | os.PathLike) -> dict[str, Any]:
        """``trainer_state.json`` of a checkpoint folder."""
        path = Path(folder) / STATE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE})")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DamagedInputError(f"{path} is not valid JSON ({exc}): the checkpoint is damaged; resume from "
                                    f"another one (--resume PATH)") from None
