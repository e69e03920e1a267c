"""Segmenter weights from files: cisslib step checkpoints and the authors' (CLIP-CISS, detectron2)
``model_best.pth`` / ``model_final.pth`` layout, with positional-embedding grids reconciled.

The authors' state dict (SPEC 1) names the image encoder ``backbone.*`` (OpenAI ``visual.*``
names without the prefix) and the decoder ``decode_head.*``: ``input_proj_{s}``, ``proj_norm_{s}``,
``decoder_{s}.layers.{j}.{self_attn, multihead_attn.{q,k,v,proj}, linear1, linear2, norm1..3}``
(stage ``s = 1..3``, stage 1 reading the last encoder block), ``q_proj`` and ``class_embed``.
``ori_clip.*`` (the frozen step-0 reference) and ``multihead_attn.proj_head`` (built, never used,
SPEC 1.3.7) are not weights of the segmenter and are dropped.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cisslib.model.encoder import interpolate_pos_embed

log = logging.getLogger("cisslib")

POS_KEY = "encoder.visual.positional_embedding"
_STAGE = re.compile(r"^decode_head\.(input_proj|proj_norm|decoder)_(\d+)\.(.*)$")
_AUTHORS_DROPPED = (re.compile(r"^ori_clip\."), re.compile(r"\.multihead_attn\.proj_head\."))


class WeightsError(ValueError):
    """A weights file is not a segmenter checkpoint or does not fit the model built."""


def is_authors_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the authors' detectron2 state dict (``backbone.*`` + ``decode_head.*`` keys)."""
    return any(k.startswith("decode_head.") for k in state) and any(
        k.startswith("backbone.") for k in state
    )


def convert_authors_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' segmenter state dict renamed to :class:`CLIPSegmenter` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if any(p.search(key) for p in _AUTHORS_DROPPED):
            continue
        if key.startswith("backbone."):
            out["encoder.visual." + key[len("backbone.") :]] = value
            continue
        m = _STAGE.match(key)
        if m is not None:
            kind, stage, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
            if kind == "decoder":
                rest = rest.replace("multihead_attn.", "cross_attn.", 1)
                out[f"decoder.stages.{stage}.{rest}"] = value
            else:
                out[f"decoder.{kind}.{stage}.{rest}"] = value
            continue
        if key.startswith("decode_head."):
            out["decoder." + key[len("decode_head.") :]] = value
    return out


def _grid(rows: int) -> tuple[int, int]:
    side = int(round((rows - 1) ** 0.5))
    if side * side != rows - 1:
        raise WeightsError(f"a positional embedding of {rows} rows fits no square grid")
    return side, side


def fit_positional_embedding(
    state: dict[str, torch.Tensor], model: nn.Module, where: str
) -> dict[str, torch.Tensor]:
    """Resize the state's positional-embedding table to the model's grid when they differ."""
    if POS_KEY not in state:
        return state
    want = model.state_dict()[POS_KEY].shape[0]
    have = state[POS_KEY].shape[0]
    if have == want:
        return state
    src, dst = _grid(have), tuple(model.encoder.pos_grid)
    log.info("%s: positional embedding %dx%d resized to the model's %dx%d", where, *src, *dst)
    state = dict(state)
    with torch.no_grad():
        state[POS_KEY] = interpolate_pos_embed(state[POS_KEY].float(), src, dst)
    return state


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """``(segmenter state dict in cisslib keys, layout name)`` of a weights file.

    Accepts a cisslib step checkpoint (``{"model": ...}`` with ``encoder.``/``decoder.`` keys), a
    bare cisslib state dict, and the authors' detectron2 checkpoint (``{"model": ...}`` with
    ``backbone.``/``decode_head.`` keys, a ``module.`` prefix from DDP removed).
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder; give a step{{t}}.pt or model_best.pth file")
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; give a step{{t}}.pt or model_best.pth")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or non-torch file
        raise WeightsError(
            f"{path}: not a readable torch checkpoint (truncated or another format: "
            f"{type(e).__name__}); give a step{{t}}.pt or model_best.pth"
        ) from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors (a 'model' entry or the dict)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if is_authors_layout(state):
        return convert_authors_state_dict(state), "authors"
    if any(k.startswith("encoder.") for k in state) and any(
        k.startswith("decoder.") for k in state
    ):
        return state, "cisslib"
    raise WeightsError(
        f"{path}: neither a cisslib segmenter (encoder.*, decoder.*) nor an authors' checkpoint "
        "(backbone.*, decode_head.*)"
    )


def load_segmenter_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Load a weights file into ``model`` (strict); returns its layout (``cisslib``/``authors``)."""
    state, layout = read_state_dict(path)
    state = fit_positional_embedding(state, model, str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise WeightsError(
            f"{path} ({layout} layout) has tensors of other shapes than the model built from the "
            f"config ({first}); check model.clip.name and the decoder sizes"
        ) from None
    if missing or unexpected:
        raise WeightsError(
            f"{path} ({layout} layout) does not fit the model built from the config: missing "
            f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}; check model.clip.name, "
            "model.num_stages, layers_per_stage and class_head"
        )
    return layout
