"""Output safety shared by every command that writes: check outputs before the work starts,
never destroy an input or a folder the program did not write, and leave nothing half-written.

* :func:`check_output_file` / :func:`check_output_dir` run BEFORE any work: an output that is
  an input (compared on resolved paths, so ``./a/../in.jsonl`` is ``in.jsonl``), a folder where
  a file is expected (or the reverse), and a non-empty folder that pmlm_engine did not write
  (no ``manifest.json`` of ours) are refused with one line naming the path and the fix.
  ``--overwrite`` permits writing into a foreign folder; files there that the program does not
  write are still kept (:func:`pmlm_engine.checkpoint.atomic_dir`).
* :func:`atomic_file` writes through a temporary sibling that is renamed over the target only
  when complete, and removed on any failure (disk full, an exception, Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import DamagedInputError, OutputRefusedError
from .manifest import has_manifest

log = logging.getLogger(__name__)

OVERWRITE_HINT = "pass --overwrite to write into it (files there that the program does not write are kept)"


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or folder (symlinks and ``..`` resolved)."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def _refuse_inputs(path: Path, inputs: Sequence[str | os.PathLike | None], what: str) -> None:
    for src in inputs:
        if src is None or str(src) == "":
            continue
        if same_path(path, src):
            raise OutputRefusedError(f"{what}={path} is also the input {src}: writing it would destroy the input; "
                                     f"choose another output path")


def check_output_file(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (),
                      what: str = "--output") -> Path:
    """Refuse, before any work, an output file that is a folder, an input, or cannot be created."""
    p = Path(path)
    if str(path) == "":
        raise OutputRefusedError(f"{what} is empty: name the file to write")
    if p.is_dir():
        raise OutputRefusedError(f"{what}={p} is a folder: name a file to write (e.g. {p / 'out.jsonl'})")
    _refuse_inputs(p, inputs, what)
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputRefusedError(f"{what}={p}: {parent} is a file, so {p} cannot be created; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputRefusedError(f"{what}={p}: {parent} is not writable; choose another path")
    return p


def is_our_folder(path: str | os.PathLike) -> bool:
    """A folder that pmlm_engine wrote (it carries our ``manifest.json``)."""
    return has_manifest(path)


def check_output_dir(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (),
                     overwrite: bool = False, what: str = "out") -> Path:
    """Refuse, before any work, an output folder that is a file, an input, or a foreign non-empty folder."""
    p = Path(path)
    if str(path) == "":
        raise OutputRefusedError(f"{what} is empty: name the folder to write")
    if p.exists() and not p.is_dir():
        raise OutputRefusedError(f"{what}={p} is a file: name a folder to write")
    _refuse_inputs(p, inputs, what)
    if p.is_dir() and not overwrite and not is_our_folder(p):
        entries = sorted(e.name for e in p.iterdir())
        if entries:
            raise OutputRefusedError(f"{what}={p} is a non-empty folder that pmlm_engine did not write ({len(entries)} "
                                     f"entries, e.g. {entries[0]!r}): choose a new folder, or {OVERWRITE_HINT}")
    return p


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` once the block ends.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding,
                       **({} if "b" in mode else {"newline": "\n"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / inf float replaced by None, so ``json.dumps`` writes valid JSON
    (Python's default ``NaN`` / ``Infinity`` tokens are not JSON and break other readers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_jsonl_repairing(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL log this program appends to (``metrics.jsonl``), repairing a torn tail.

    A crash mid-write can leave the last line incomplete: it is cut back to the last complete
    row, with a warning naming the file. A bad line anywhere else is not a torn write but damage:
    :class:`pmlm_engine.errors.DamagedInputError` names the file and line.
    """
    p = Path(path)
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    rows: list[dict[str, Any]] = []
    good_bytes = 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + (1 if i < len(lines) - 1 else 0)
            continue
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise DamagedInputError(f"{p}:{i + 1} is not a JSON object ({exc}): the file is damaged; fix or "
                                        f"remove that line") from None
            log.warning("%s: the last line (%d) is incomplete (a crash mid-write): cut back "
                                                "to the last complete row", p, i + 1)
            with open(p, "r+b") as fh:
                fh.truncate(good_bytes)
                fh.flush()
                os.fsync(fh.fileno())
            return rows
        if not isinstance(row, dict):
            raise DamagedInputError(f"{p}:{i + 1} is not a JSON object: the file is damaged; fix or remove that line")
        rows.append(row)
        good_bytes += len(line) + (1 if i < len(lines) - 1 else 0)
    return rows
