"""Class names -> CLIP text embeddings, their on-disk cache, and the authors' ``.npy`` files
(SPEC 1.2).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cisslib.files import WriteError, atomic_path, cache_dir, sha256_text
from cisslib.model.weights import WeightsError

log = logging.getLogger("cisslib")

# SPEC 1.2: the embeddings the authors use come from one template, without a final period.
SINGLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}",)
# SPEC 1.2: the 15 templates of the "multi" recipe (get_txt_embeddings.py:6-22, as in ZegCLIP).
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
)


@torch.no_grad()
def encode_class_names(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    names: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Text embeddings of class names, ``(N, D)`` float32, L2-normalised.

    One template: ``normalize(encode_text(template.format(name)))``. Several: the mean of the
    per-template normalised embeddings, renormalised (ZegCLIP's multi recipe, SPEC 1.2).
    """
    if not names:
        raise ValueError("encode_class_names: names is empty")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(
            f"encode_class_names: every template needs a '{{}}' slot, got {templates!r}"
        )
    was_training = model.training
    model.eval()
    try:
        per_template = []
        for t in templates:
            tokens = tokenizer([t.format(n) for n in names]).to(device)
            emb = model.encode_text(tokens).float()
            per_template.append(F.normalize(emb, dim=-1))
    finally:
        model.train(was_training)
    if len(per_template) == 1:
        return per_template[0].cpu()
    return F.normalize(torch.stack(per_template).mean(0), dim=-1).cpu()


def text_cache_key(model_key: str, names: Sequence[str], templates: Sequence[str]) -> str:
    """SHA-256 cache key of a model key, class names and templates."""
    return sha256_text(model_key, json.dumps(list(names)), json.dumps(list(templates)))


def class_text_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    names: Sequence[str],
    templates: Sequence[str],
    *,
    model_key: str,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """:func:`encode_class_names` with an on-disk ``.npy`` cache, ``(N, D)`` float32.

    Args:
        model_key: identifies the weights, e.g. ``f"{name}:{weights_fingerprint(model)}"``.
        cache_dir: folder of the cache files (default ``cisslib.files.cache_dir() / "text"``).

    The file is ``<sha256(model_key, names, templates)>.npy``; it is written atomically and a
    later call with the same key reads it without running the text encoder.
    """
    folder = Path(cache_dir) if cache_dir is not None else _default_cache()
    path = folder / f"{text_cache_key(model_key, names, templates)}.npy"
    if path.is_file():
        try:
            return load_text_embeddings(path, num_classes=len(names))
        except WeightsError as e:  # a damaged cache file is recomputed, never fatal
            log.warning("warning: text-embedding cache %s is unusable (%s); recomputing", path, e)
    emb = encode_class_names(model, tokenizer, names, templates, device=device)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb.numpy().astype(np.float32))
    except WriteError as e:
        log.warning("warning: text embeddings not cached (%s)", e)
    return emb


def _default_cache() -> Path:
    return cache_dir() / "text"


def load_text_embeddings(
    path: str | os.PathLike, num_classes: int | None = None, dim: int | None = None
) -> torch.Tensor:
    """Load class text embeddings from an ``(N, D)`` ``.npy`` (authors: 150 x 512 float16).

    Returns ``(N, D)`` float32, or the first ``num_classes`` rows when ``num_classes`` is given
    (the authors cut ``T[:C_t]``, SPEC 1.2); with ``dim``, the rows must have that length. A
    missing file raises ``FileNotFoundError``; a file that is not such an array (text,
    truncated, pickled objects, wrong ndim or dtype, too few rows, NaN, infinite or all-zero
    rows) raises one :class:`~cisslib.model.weights.WeightsError` line naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"text embeddings {path} is a folder; give an (N, D) .npy file")
    if not path.is_file():
        raise FileNotFoundError(
            f"text embeddings not found: {path}; create them with "
            "cisslib.model.text.class_text_embeddings"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # text, truncated, pickled objects
        raise WeightsError(
            f"{path}: not a readable .npy array ({type(e).__name__}: {e}); give the (classes, "
            "dim) float array written by numpy.save"
        ) from None
    return torch.from_numpy(_checked_embeddings(arr, path, num_classes, dim))


def _checked_embeddings(
    arr: np.ndarray, path: Path, num_classes: int | None, dim: int | None
) -> np.ndarray:
    """``arr[:num_classes]`` as float32 after the checks of :func:`load_text_embeddings`."""
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        shape = getattr(arr, "shape", None)
        raise WeightsError(f"{path}: text embeddings must be 2-D (classes, dim), got shape {shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise WeightsError(f"{path}: text embeddings must be floating point, got {arr.dtype}")
    if num_classes is not None:
        if arr.shape[0] < num_classes:
            raise WeightsError(
                f"{path}: has {arr.shape[0]} rows but {num_classes} classes are needed"
            )
        arr = arr[:num_classes]
    if dim is not None and arr.shape[1] != dim:
        raise WeightsError(
            f"{path}: text embeddings have dimension {arr.shape[1]} but the CLIP joint space has "
            f"{dim}; use embeddings made with the same CLIP model"
        )
    out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise WeightsError(
            f"{path}: row {row} (class {row + 1}) holds NaN or infinite values; regenerate the "
            "embeddings"
        )
    zero = ~out.any(axis=1)
    if zero.any():
        row = int(np.flatnonzero(zero)[0])
        raise WeightsError(f"{path}: row {row} (class {row + 1}) is all zeros; regenerate it")
    return out
