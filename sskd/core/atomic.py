"""Write files so that nothing half-written ever looks complete.

Everything the project writes that a later step trusts (shards, indexes, manifests, caches,
checkpoints) goes through these helpers: the bytes land under a temporary name in the same folder
and are renamed into place only once complete and flushed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".partial"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (no thread of ours creates files meanwhile)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0666 less the umask.

    Some writers (safetensors, ``tempfile``) create files 0600 whatever the umask, which leaves a
    teammate unable to read a shared model or cache; every file written here gets this mode instead.
    """
    return 0o666 & ~_umask()


def tmp_name(path: str | os.PathLike) -> Path:
    """The temporary name used while ``path`` is being written (same folder, so rename is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    # A name left at the temporary path (a killed writer's file, or a symbolic link planted there) is
    # removed first: writers open the temporary path by name and would otherwise write through a link.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), file_mode())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail before any work if ``path`` could not be written: make its folder and a scratch file in it.

    (A permission check alone is not enough: root passes every check, yet not on a read-only mount.)
    """
    from sskd.core.errors import SSKDError

    p = Path(path)
    if p.is_dir():
        raise SSKDError(f"{p}: is a folder, expected a file name for the {what}")
    _probe(p.parent, p, what)
    return p


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail before any work if files could not be written in ``folder`` (made if missing), as above."""
    folder = Path(folder)
    _probe(folder, folder, what)
    return folder


def _probe(folder: Path, named: Path, what: str) -> None:
    import tempfile

    from sskd.core.errors import SSKDError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise SSKDError(f"{named}: cannot write the {what} here ({exc.strerror or exc})") from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` (the temporary file is created anew, never through a link).

    A failed write (disk full, ENOSPC; file-size limit, EFBIG) raises the :class:`OSError` with its errno
    and leaves ``path`` as it was; :func:`write_error` words it for the user."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:  # os.write names no file: name the one being written (the CLI's line shows it)
            if exc.filename is None:
                exc.filename = str(path)
            raise
        finally:
            os.close(fd)


# What an errno of a failed write means for the user: the one table the writers and the CLI word it from.
WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file-size limit (ulimit -f) is reached",
    errno.EROFS: "write somewhere else",
    errno.EACCES: "check the permissions",
}


def os_error_reason(exc: OSError) -> str:
    """``strerror: advice`` for an OSError (``No space left on device: the disk is full``)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = WRITE_ADVICE.get(exc.errno)
    return f"{reason}: {advice}" if advice else reason


def write_error(path: str | os.PathLike, exc: OSError, what: str = "file", kept: str = "") -> str:
    """One line for a failed write of ``path``: the reason (disk full, file-size limit, ...) and what is kept."""
    text = f"{path}: cannot write the {what} ({os_error_reason(exc)})"
    return f"{text}; {kept}" if kept else text


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (sorted keys, trailing newline)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_stale_partials(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete temporary files an interrupted writer left in ``folder`` (and below); returns how many.

    Only call this while holding the folder (:mod:`sskd.core.lock`): a live writer's partial file is
    indistinguishable from a dead one's.
    """
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in (folder.rglob if recursive else folder.glob)(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def private_tempdir(prefix: str) -> Path:
    """A new private temporary folder ``<tmp>/<prefix><host>-<pid>-XXXX``, after removing the folders of
    that prefix that processes of this host left when they died without cleaning up (SIGKILL, a crash):
    their pid no longer runs. A folder whose pid runs (or of another host) is left alone."""
    import shutil
    import socket
    import tempfile

    host = socket.gethostname().replace("-", "_")
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{prefix}{host}-*-*"):
        try:
            pid = int(old.name[len(prefix) + len(host) + 1 :].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{host}-{os.getpid()}-"))
