"""An exclusive lock on an output folder, so that two runs cannot write into the same one.

``<folder>/.pmlm.lock`` is locked with ``fcntl.flock`` (released by the kernel when the process
exits, however it exits) and holds who took it: pid, host, start time and command. A second
run fails at once with one line naming the holder. A lock file left by a process that is gone
(the flock is free) is stale: it is taken over, with one log line naming the old holder (pid
and host; "not running" is checked with the pid when the host is this one).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Self

from .errors import OutputRefusedError

log = logging.getLogger(__name__)

LOCK_NAME = ".pmlm.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    cmd = " ".join(holder.get("argv", []))[:120]
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}" + (f" ({cmd})" if cmd else "")


class FolderLock:
    """``with FolderLock(out):`` holds ``out`` exclusively (or raises :class:`OutputRefusedError`)."""

    def __init__(self, folder: str | os.PathLike, what: str = "out") -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise OutputRefusedError(f"{self.what}={self.folder} is in use by another run ({_describe(holder)}): wait "
                                     f"for it to finish, stop it, or choose another output folder") from None
        previous = self._read(fd)
        if previous.get("pid") is not None:
            here = previous.get("host") == socket.gethostname()
            status = "not running" if here and not _pid_alive(int(previous["pid"])) else "lock released"
            log.info("%s: taking over a stale lock of %s (%s)", self.path, _describe(previous), status)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
            return data if isinstance(data, dict) else {}
        except (ValueError, UnicodeDecodeError):
            return {}

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file is not stale: nobody to report
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
