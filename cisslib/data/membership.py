"""Which training images hold which classes: one parallel scan per dataset, cached on disk.

Every step and setting of a run reads the same matrix (SPEC 3 ``_filter_images``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cisslib.files import atomic_path, cache_dir, sha256_text


def _present_labels(source: Any, i: int) -> np.ndarray:
    if hasattr(source, "present_labels"):
        return np.asarray(source.present_labels(i))
    _, label = source.load(i)
    return np.flatnonzero(np.bincount(np.asarray(label).ravel(), minlength=256))


def membership_cache_path(source: Any, folder: str | os.PathLike) -> Path:
    """The ``.npy`` file that caches the membership matrix of ``source``."""
    k = len(source.class_names)
    key = sha256_text("membership-v1", source.name, source.split, str(k), source.cache_key())
    return Path(folder) / f"membership-{source.name}-{source.split}-{key[:16]}.npy"


def class_membership(
    source: Any,
    cache_folder: str | os.PathLike | None = None,
    num_workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """``(N, K + 1)`` bool: ``[i, c]`` = image ``i`` of ``source`` contains raw label ``c``.

    Column 0 is background / other; void (255) and values above K are not recorded. Computed
    once by a parallel scan (``source.present_labels(i)`` when the source has it, else
    ``source.load(i)``) and cached as an ``.npy`` keyed by ``source.cache_key()`` under
    ``cache_folder`` (default: ``cisslib.files.cache_dir()``). Every step and setting reuses it.
    """
    k = len(source.class_names)
    n = len(source)
    path = membership_cache_path(source, cache_folder if cache_folder is not None else cache_dir())
    if path.exists():
        cached = np.load(path)
        if cached.shape == (n, k + 1) and cached.dtype == bool:
            return cached
    out = np.zeros((n, k + 1), dtype=bool)

    def scan(i: int) -> None:
        present = _present_labels(source, i).astype(np.int64)
        present = present[present <= k]
        out[i, present] = True

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        bar = tqdm(
            pool.map(scan, range(n)),
            total=n,
            desc=f"membership {source.name}/{source.split}",
            disable=not progress,
        )
        for _ in bar:
            pass
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, out)
    return out
