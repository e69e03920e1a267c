"""Checks on a dataset's files before a run touches them: missing, unreadable, mismatched, or
out-of-range items, each reported in one line that names the file."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cisslib.data.sources import DatasetError, SegSource, read_image, read_label


def _where(source: SegSource, i: int, which: int) -> str:
    """The label (which=1) or image (which=0) file of item i, or its id for non-file sources."""
    if hasattr(source, "paths"):
        return str(source.paths(i)[which])
    return f"{source.name}/{source.split} item {source.item_id(i)}"


def _corrupt_file(source: SegSource, i: int) -> str:
    """Which file of item ``i`` fails to decode (for file sources), else the item's id."""
    if hasattr(source, "paths"):
        img_path, lab_path = source.paths(i)
        for path, reader in ((img_path, read_image), (lab_path, read_label)):
            try:
                reader(path)
            except DatasetError:
                continue
            except Exception:
                return str(path)
    return _where(source, i, 0)


def _check_item(source: SegSource, i: int, k: int) -> tuple[str, str] | None:
    """``(kind, detail)`` of the first problem of item ``i``, or None."""
    if hasattr(source, "paths"):
        missing = [str(p) for p in source.paths(i) if not Path(p).is_file()]
        if missing:
            return "missing", "\n".join(missing)
    try:
        image, label = source.load(i)
    except FileNotFoundError as e:
        return "missing", str(getattr(e, "filename", None) or _where(source, i, 0))
    except DatasetError as e:
        return "format", str(e)
    except Exception as e:  # PIL raises UnidentifiedImageError / OSError / SyntaxError
        return "corrupt", f"{_corrupt_file(source, i)} ({type(e).__name__}: {e})"
    image, label = np.asarray(image), np.asarray(label)
    if image.ndim != 3 or image.shape[2] != 3 or label.ndim != 2:
        return "format", (
            f"{_where(source, i, 0)}: image shape {image.shape}, label shape {label.shape}; "
            "expected (H, W, 3) and (H, W)"
        )
    if image.shape[:2] != label.shape:
        return "size", (
            f"{_where(source, i, 1)}: label {label.shape[1]}x{label.shape[0]} vs image "
            f"{image.shape[1]}x{image.shape[0]} (WxH); the pair does not match, fix or drop it"
        )
    values = np.flatnonzero(np.bincount(label.ravel().astype(np.int64), minlength=256))
    bad = values[(values > k) & (values != source.ignore_index)]
    if bad.size:
        return "range", (
            f"{_where(source, i, 1)} has label values {bad.tolist()[:10]} outside 0..{k} and "
            f"{source.ignore_index}; fix the annotation or check that it belongs to "
            f"{source.name!r}"
        )
    return None


def validate_source(
    source: SegSource,
    check_all: bool = True,
    sample: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    seed: int = 0,
) -> int:
    """Check a source's files; raise one :class:`DatasetError` on the first kind of problem.

    Checks every item (``check_all``) or a seeded random ``sample`` of items for: missing files
    (count and first 3 paths), unreadable or corrupt files, image/label size mismatch, and label
    values outside ``0..K`` and ``ignore_index``. Items are read by a thread pool with a tqdm
    bar (``progress=False`` under papermill or when nobody watches). Returns the number of items
    checked.
    """
    n = len(source)
    k = len(source.class_names)
    if n == 0:
        raise DatasetError(
            f"{source.name}/{source.split} has no items; check the data root and split lists"
        )
    if sample is not None:
        if sample < 1:
            raise ValueError(f"sample={sample} must be >= 1")
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=min(sample, n), replace=False)).tolist()
    elif check_all:
        idx = list(range(n))
    else:
        raise ValueError("validate_source: give check_all=True or sample=N")

    problems: dict[str, list[str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        results = pool.map(lambda i: _check_item(source, i, k), idx)
        for res in tqdm(
            results,
            total=len(idx),
            desc=f"check {source.name}/{source.split}",
            disable=not progress,
        ):
            if res is not None:
                problems.setdefault(res[0], []).append(res[1])

    tag = f"{source.name}/{source.split}"
    if "missing" in problems:
        files = [f for item in problems["missing"] for f in item.split("\n")]
        raise DatasetError(
            f"{tag}: {len(files)} file(s) missing in {len(problems['missing'])} of {len(idx)} "
            f"checked items, e.g. {', '.join(files[:3])}; download/extract them or fix the "
            "data root and split lists"
        )
    if "corrupt" in problems:
        bad = problems["corrupt"]
        raise DatasetError(
            f"{tag}: {len(bad)} unreadable item(s), first: {bad[0]}; re-download or remove it"
        )
    for kind in ("format", "size", "range"):
        if kind in problems:
            bad = problems[kind]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DatasetError(f"{tag}: {bad[0]}{more}")
    return len(idx)
