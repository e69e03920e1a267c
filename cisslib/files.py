"""Small file helpers shared by every module: atomic writes, the cache folder, write errors.

A write that fails because the folder is read-only or the disk is full raises :class:`WriteError`,
whose message is one line naming the path and what to do; nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("cisslib")

_ADVICE = {
    errno.ENOSPC: "the disk is full; free space (or use another folder) and resume",
    errno.EDQUOT: "the disk quota is exhausted; free space (or use another folder) and resume",
    errno.EROFS: "the file system is read-only; use a writable folder",
    errno.EACCES: "permission denied; use a folder you can write to",
    errno.EPERM: "the folder does not allow writing; use a folder you can write to",
}


class WriteError(OSError):
    """A file could not be written (read-only folder, disk full, ...); one-line message."""

    def __init__(self, errno_: int | None, message: str, filename: str):
        super().__init__(errno_, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_error(path: str | os.PathLike, err: OSError) -> WriteError:
    """A :class:`WriteError` naming ``path``, the system's reason and what to do."""
    reason = err.strerror or type(err).__name__
    advice = _ADVICE.get(err.errno or 0, "check the folder and the disk")
    return WriteError(err.errno, f"cannot write {path}: {reason} ({advice})", str(path))


_fallback_warned: set[str] = set()


def _writable_folder(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.remove(probe)
        return True
    except OSError:
        return False


def cache_dir() -> Path:
    """The cisslib cache folder: ``$CISSLIB_CACHE`` if set, else ``~/.cache/cisslib``.

    When that folder cannot be created or written, a per-user folder under the system's temp
    folder is used instead, with one warning (caches only save time; they never block a run).
    """
    root = os.environ.get("CISSLIB_CACHE") or os.path.join(Path.home(), ".cache", "cisslib")
    path = Path(root)
    if _writable_folder(path):
        return path
    fallback = Path(tempfile.gettempdir()) / f"cisslib-cache-{os.getuid()}"
    if not _writable_folder(fallback):
        raise write_error(path, PermissionError(errno.EACCES, "not writable"))
    if root not in _fallback_warned:
        _fallback_warned.add(root)
        log.warning(
            "warning: cache folder %s is not writable; caching in %s instead (set CISSLIB_CACHE "
            "to a writable folder)",
            path,
            fallback,
        )
    return fallback


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Nothing half-written is ever visible at ``path``: if the body raises, the temporary file is
    removed and ``path`` keeps its old content (or stays absent). An ``OSError`` of the file
    system (read-only folder, disk full) becomes a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError) and e.errno in _ADVICE:
            raise write_error(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


#: Free bytes below which a failed write is taken for a full disk (torch reports no errno).
FULL_DISK_BYTES = 1 << 20


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file + rename).

    torch's writer reports a full disk as a ``RuntimeError`` without an errno; it is raised as a
    :class:`WriteError` naming ``path`` (judged by the free space left while the partial file
    still exists).
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if shutil.disk_usage(tmp.parent).free < FULL_DISK_BYTES:
                raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
            if "write" in str(e).lower() or "unexpected pos" in str(e):
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise WriteError(
                    None, f"cannot write {path}: {first} (check the disk and the folder)", str(path)
                ) from None
            raise


def read_torch(
    path: str | os.PathLike,
    *,
    fix: str,
    error: type[Exception] = ValueError,
    mmap: bool = False,
    map_location: str | torch.device = "cpu",
) -> object:
    """``torch.load`` of a checkpoint file; a missing, truncated or foreign file raises ``error``
    with one line naming it and ``fix`` (what to do). ``mmap`` maps the tensors instead of
    reading them (a cheap check of a big file; cisslib's own files only)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a folder, not a checkpoint file; {fix}")
    if not path.is_file():
        raise error(f"{path} does not exist; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, pickle of something else, text...
        raise error(
            f"{path} is truncated or not a torch checkpoint ({type(e).__name__}); {fix}"
        ) from None


def sha256_text(*parts: str) -> str:
    """Hex SHA-256 of the given strings joined by NUL bytes (stable cache keys)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
