"""One training run per output folder: an OS lock on ``<run>/.lock`` that dies with its holder.

``fcntl.flock`` is released by the kernel when the process exits, however it exits (SIGKILL, OOM,
pre-emption), so a stale lock never blocks ``--resume latest``; no pid-liveness guessing is needed.
The file also holds a note (pid, host, start time) so a refused run can say who holds the folder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import RunDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs there are not locked
    fcntl = None

LOCK_NAME = ".lock"


def _describe(note: bytes) -> str:
    """'pid 123 on host h, since 2026-01-01 12:00:00 UTC' from a lock note (or what can be said without one)."""
    try:
        d = json.loads(note.decode())
        return f"pid {d['pid']} on host {d['host']}, since {d['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder still starting, pid not yet written"


class RunLock:
    """Exclusive hold on a run folder. ``acquire()`` raises RunDirError naming the holder if it is taken."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.created_dir = self.created_file = False  # what acquire() made, so a refused run can leave no trace

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        self.created_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # --out names a file, or a folder under one
            raise RunDirError(f"--out {self.run_dir} is a file or lies under one, not a folder; choose another --out") from None
        while True:
            self.created_file = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(os.pread(fd, 4096, 0))
                os.close(fd)
                raise RunDirError(f"{self.run_dir} is in use by another training run ({holder}); wait for it to "
                                  "finish or stop it (a killed run frees the folder at once), or choose another --out") from None
            # A refused run may have unlinked the file between our open and flock: then we locked an orphan inode.
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove=True`` also deletes what acquire() created (the lock file, an empty folder)."""
        if self._fd is None:
            return
        if remove and self.created_file:
            self.path.unlink(missing_ok=True)  # while still locked, so no one can take the file we delete
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if remove and self.created_dir:
            try:
                self.run_dir.rmdir()  # only if empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
