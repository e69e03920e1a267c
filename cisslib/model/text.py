"""Class names -> CLIP text embeddings, their on-disk cache, and the authors' ``.npy`` files
(SPEC 1.2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cisslib.files import atomic_path, cache_dir, sha256_text

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
        return load_text_embeddings(path, num_classes=len(names))
    emb = encode_class_names(model, tokenizer, names, templates, device=device)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, emb.numpy().astype(np.float32))
    return emb


def _default_cache() -> Path:
    return cache_dir() / "text"


def load_text_embeddings(path: str | os.PathLike, num_classes: int | None = None) -> torch.Tensor:
    """Load class text embeddings from an ``(N, D)`` ``.npy`` (authors: 150 x 512 float16).

    Returns ``(N, D)`` float32, or the first ``num_classes`` rows when ``num_classes`` is given
    (the authors cut ``T[:C_t]``, SPEC 1.2). Missing file, wrong ndim or too few rows raise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"text embeddings not found: {path}; create them with "
            "cisslib.model.text.class_text_embeddings"
        )
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2:
        raise ValueError(
            f"{path}: text embeddings must be 2-D (classes, dim), got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: text embeddings must be floating point, got {arr.dtype}")
    if num_classes is not None:
        if arr.shape[0] < num_classes:
            raise ValueError(
                f"{path}: has {arr.shape[0]} rows but {num_classes} classes are needed"
            )
        arr = arr[:num_classes]
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
