"""The shipped tiny CLIP: the default recipe's pretrained weights, small enough to commit.

A full cisslib-clip file of the default tiny CLIP is 15.6 MB, 81% of it the text tower's token
embedding (49408 x 64). Pretraining changes only the rows of the tokens its captions use (25):
embeddings take no weight decay and Adam's step is exactly zero where a gradient is always zero,
so every other row keeps its initial value, which the recipe's seed redraws. The shipped file
holds every other tensor, the changed rows and a digest of the whole embedding; :func:`expand`
rebuilds the full state dict from it and a freshly initialised model, and refuses (returns None)
when the rebuilt embedding does not match the digest (another torch drawing other initial
values).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cisslib.files import atomic_torch_save

SHIPPED_FORMAT = "cisslib-toyclip-shipped"
TOKEN_KEY = "token_embedding.weight"


def _float32_bytes(t: torch.Tensor) -> bytes:
    """A tensor's values as float32, row-major."""
    return t.detach().cpu().float().contiguous().numpy().tobytes()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's float32 bytes, row-major."""
    return hashlib.sha256(_float32_bytes(t)).hexdigest()


def state_digest(state: dict) -> str:
    """sha256 (hex) over a state dict's names, shapes and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(_float32_bytes(t))
    return h.hexdigest()


def compact(state: dict, init: dict) -> dict:
    """``state`` without the token-embedding rows equal to ``init``'s: ``{"state_dict": every
    other tensor, "token_rows": (R,) int64, "token_values": (R, W), "token_digest": str}``."""
    emb, emb0 = state[TOKEN_KEY], init[TOKEN_KEY]
    rows = torch.nonzero((emb != emb0).any(dim=1)).flatten()
    return {
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items() if k != TOKEN_KEY},
        "token_rows": rows.cpu(),
        "token_values": emb[rows].detach().cpu().clone(),
        "token_digest": tensor_digest(emb),
    }


def expand(obj: dict, init: dict) -> dict | None:
    """The full state dict of a :func:`compact` ``obj`` over ``init`` (the freshly initialised
    model's state dict), or None when the rebuilt token embedding does not match the digest."""
    emb = init[TOKEN_KEY].detach().cpu().clone()
    emb[obj["token_rows"]] = obj["token_values"]
    if tensor_digest(emb) != obj["token_digest"]:
        return None
    return {**obj["state_dict"], TOKEN_KEY: emb}


def write_shipped(path: str | Path, state: dict, init: dict, model_cfg: dict, meta: dict) -> None:
    """Write the shipped file of ``state`` (trained) over ``init`` (its initial weights)."""
    obj = {"format": SHIPPED_FORMAT, "model_cfg": model_cfg, "meta": meta, **compact(state, init)}
    atomic_torch_save(obj, path)


def read_shipped(path: str | Path) -> dict:
    """The dict of a shipped file (``format``, ``model_cfg``, ``meta``, compact weights)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != SHIPPED_FORMAT:
        raise ValueError(f"{path}: not a {SHIPPED_FORMAT} file")
    return obj
