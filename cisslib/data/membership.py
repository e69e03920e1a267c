"""Which training images hold which classes: one parallel scan per dataset, cached on disk.

Every step and setting of a run reads the same matrix (SPEC 3 ``_filter_images``). The cache is
keyed by what the matrix is computed from: the source's identity and, for file sources, the
dataset root and every label file's path, size and modification time, so a relabelled copy or an
edited label never reuses a stale matrix; a sample of rows is recomputed on every load as a
further check. A damaged cache file is recomputed and an unwritable cache folder only costs the
scan (both with a warning); an unreadable label during the scan is one error naming the file.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cisslib.data.sources import DatasetError
from cisslib.files import WriteError, atomic_path, cache_dir, sha256_text

log = logging.getLogger("cisslib")

#: Rows recomputed from the labels each time a cached matrix is read.
CHECK_SAMPLE = 16


def _label_file(source: Any, i: int) -> str:
    if hasattr(source, "paths"):
        return str(source.paths(i)[1])
    return f"{source.name}/{source.split} item {source.item_id(i)}"


def _present_labels(source: Any, i: int) -> np.ndarray:
    """Raw labels in item ``i``; any failure is a :class:`DatasetError` naming the file."""
    try:
        if hasattr(source, "present_labels"):
            return np.asarray(source.present_labels(i))
        _, label = source.load(i)
        return np.flatnonzero(np.bincount(np.asarray(label).ravel(), minlength=256))
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(
            f"{_label_file(source, i)} is missing; restore it or remove the item from the split "
            "list (scenario.validate: full finds every such file)"
        ) from None
    except Exception as e:  # PIL: UnidentifiedImageError, OSError, SyntaxError, ...
        raise DatasetError(
            f"{_label_file(source, i)}: unreadable label ({type(e).__name__}: {e}); re-download "
            "or remove it (scenario.validate: full finds every such file)"
        ) from None


def _files_fingerprint(source: Any) -> str:
    """Root, and path/size/mtime of every label file of a file source ('' otherwise)."""
    if not hasattr(source, "paths"):
        return ""
    parts = [str(Path(getattr(source, "root", "")).resolve())]
    for i in range(len(source)):
        path = source.paths(i)[1]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            parts.append(f"{path}|missing")
            continue
        parts.append(f"{path}|{st.st_size}|{st.st_mtime_ns}")
    return sha256_text(*parts)


def membership_cache_path(source: Any, folder: str | os.PathLike) -> Path:
    """The ``.npy`` file that caches the membership matrix of ``source``."""
    k = len(source.class_names)
    key = sha256_text(
        "membership-v2", source.name, source.split, str(k), source.cache_key(),
        _files_fingerprint(source),
    )  # fmt: skip
    return Path(folder) / f"membership-{source.name}-{source.split}-{key[:16]}.npy"


def _row(source: Any, i: int, k: int) -> np.ndarray:
    row = np.zeros(k + 1, dtype=bool)
    present = _present_labels(source, i).astype(np.int64)
    row[present[(present >= 0) & (present <= k)]] = True
    return row


def _read_cache(path: Path, source: Any, k: int) -> np.ndarray | None:
    """The cached matrix if it is readable, of the right shape and agrees with a sample."""
    n = len(source)
    try:
        cached = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, garbage
        log.warning("warning: membership cache %s is unreadable (%s); recomputing", path, e)
        return None
    if cached.shape != (n, k + 1) or cached.dtype != bool:
        log.warning("warning: membership cache %s has another shape; recomputing", path)
        return None
    rng = np.random.default_rng(n)
    sample = rng.choice(n, size=min(CHECK_SAMPLE, n), replace=False)
    for i in sample.tolist():
        if not np.array_equal(cached[i], _row(source, i, k)):
            log.warning(
                "warning: membership cache %s disagrees with %s; recomputing",
                path,
                _label_file(source, i),
            )
            return None
    return cached


def class_membership(
    source: Any,
    cache_folder: str | os.PathLike | None = None,
    num_workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """``(N, K + 1)`` bool: ``[i, c]`` = image ``i`` of ``source`` contains raw label ``c``.

    Column 0 is background / other; void (255) and values above K are not recorded. Computed
    once by a parallel scan (``source.present_labels(i)`` when the source has it, else
    ``source.load(i)``) and cached as an ``.npy`` (:func:`membership_cache_path`) under
    ``cache_folder`` (default: ``cisslib.files.cache_dir()``). Every step and setting reuses it.
    """
    k = len(source.class_names)
    n = len(source)
    path = membership_cache_path(source, cache_folder if cache_folder is not None else cache_dir())
    if path.is_file():
        cached = _read_cache(path, source, k)
        if cached is not None:
            return cached
    out = np.zeros((n, k + 1), dtype=bool)

    def scan(i: int) -> None:
        out[i] = _row(source, i, k)

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        bar = tqdm(
            pool.map(scan, range(n)),
            total=n,
            desc=f"membership {source.name}/{source.split}",
            disable=not progress,
        )
        for _ in bar:
            pass
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, out)
    except WriteError as e:
        log.warning("warning: membership not cached (%s)", e)
    return out
