"""Small file helpers shared by every module: atomic writes and the cache folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def cache_dir() -> Path:
    """The cisslib cache folder: ``$CISSLIB_CACHE`` if set, else ``~/.cache/cisslib``."""
    root = os.environ.get("CISSLIB_CACHE") or os.path.join(Path.home(), ".cache", "cisslib")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Nothing half-written is ever visible at ``path``: if the body raises, the temporary file is
    removed and ``path`` keeps its old content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_text(*parts: str) -> str:
    """Hex SHA-256 of the given strings joined by NUL bytes (stable cache keys)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
