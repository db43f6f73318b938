"""One writer per folder: an exclusive lock held for the life of a run, a cache build or a shard job.

``FolderLock(folder).acquire()`` takes ``folder/.lock`` with ``flock``: the kernel drops the lock when
its process dies, however it dies, so a lock left by a killed job is recognised as stale and taken
over. The file also records who holds it (pid, host, command, start time) for the error a second
writer gets. Where the filesystem has no ``flock`` (some NFS and Lustre mounts answer ENOLCK or
ENOSYS), the lock falls back to creating the file exclusively; a lock file whose pid is dead on this
host is then stale, one from another host is refused with the command that clears it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from sskd.core.errors import SSKDError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_NO_FLOCK = {
    errno.ENOLCK,
    errno.ENOSYS,
    errno.EINVAL,
    errno.EOPNOTSUPP,
    getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
}


def _holder_text(path: Path) -> tuple[str, dict]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        holder = {}
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) if "time" in holder else "?"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"
    if holder.get("command"):
        text += f" ({holder['command'][:120]})"
    return text, holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive, process-lifetime lock on ``folder`` (``folder/.lock``)."""

    def __init__(self, folder: str | os.PathLike, what: str = "run folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None
        self._owns_file = False  # fallback mode: the lock is the file itself

    @property
    def held(self) -> bool:
        return self._fd is not None or self._owns_file

    def _record(self) -> bytes:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "time": round(time.time(), 1),
                "command": " ".join(sys.argv),
            }
        ).encode()

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`SSKDError` naming its holder."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        try:  # never through a symbolic link: the holder record would be written to the link's target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP or self.path.is_symlink():
                raise SSKDError(
                    f"{self.path}: is a symbolic link; sskd writes its lock file itself, never through "
                    "a link: remove the link"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who, _ = _holder_text(self.path)
            raise SSKDError(
                f"{self.folder}: this {self.what} is in use by {who}; wait for that job to end or "
                "stop it (two writers would corrupt it)"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_FLOCK:
                raise SSKDError(f"{self.path}: cannot lock ({exc.strerror})") from exc
            return self._acquire_without_flock()
        _, old = _holder_text(self.path)
        if old.get("pid") and old.get("pid") != os.getpid():
            log.debug("%s: taking over the lock of pid %s (no longer running)", self.folder, old["pid"])
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        self._fd = fd
        return self

    def _acquire_without_flock(self) -> FolderLock:
        for _ in range(2):
            try:
                fd = os.open(self.path.with_suffix(".excl"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                who, holder = _holder_text(self.path.with_suffix(".excl"))
                same_host = holder.get("host") == socket.gethostname()
                if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                    self.path.with_suffix(".excl").unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise SSKDError(
                    f"{self.folder}: this {self.what} is in use by {who} (no flock on this "
                    f"filesystem; if that job is gone, delete {self.path.with_suffix('.excl')})"
                ) from None
            os.write(fd, self._record())
            os.close(fd)
            self._owns_file = True
            return self
        raise SSKDError(f"{self.folder}: could not take the lock")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused next time)
            self._fd = None
        if self._owns_file:
            self.path.with_suffix(".excl").unlink(missing_ok=True)
            self._owns_file = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
