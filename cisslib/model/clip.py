"""CLIP loading: OpenAI ``.pt`` (TorchScript or state dict), open_clip tags and files, random init
and cisslib's self-describing files (SPEC 1.1)."""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from cisslib.config.tree import ConfigError
from cisslib.constants import CLIP_FILE_FORMAT
from cisslib.files import atomic_torch_save
from cisslib.model.weights import WeightsError

OPENAI_VIT_B16_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"
)
# Keys present in OpenAI's archives that are not parameters of open_clip's CLIP.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_VIT_SIZE_NAMES = {192: "Ti", 384: "S", 512: "M", 768: "B", 1024: "L", 1280: "H", 1408: "g"}


# --------------------------------------------------------------------------------------------
# Configs and loading
# --------------------------------------------------------------------------------------------


def tiny_clip_config(
    embed_dim: int = 64,
    width: int = 64,
    layers: int = 3,
    heads: int = 4,
    patch_size: int = 8,
    image_size: int = 64,
    text_width: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    context_length: int = 16,
    vocab_size: int = 49408,
    quick_gelu: bool = True,
) -> dict:
    """A small valid ``model_cfg`` for ``open_clip.model.CLIP(**cfg)`` (builds in milliseconds).

    ``vocab_size`` stays at the BPE tokenizer's 49408 so open_clip's tokenizer can be used.
    """
    if width % heads or text_width % text_heads:
        raise ValueError(
            f"tiny_clip_config: width {width} / text_width {text_width} must be divisible by "
            f"heads {heads} / text_heads {text_heads}"
        )
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": width // heads,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
        },
        "quick_gelu": quick_gelu,
    }


def _describe_vit(width: int, layers: int, patch: int) -> str:
    size = _VIT_SIZE_NAMES.get(width, "?")
    return f"ViT-{size}/{patch} (width {width}, {layers} layers, patch {patch})"


def _arch_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Vision/text architecture read from an OpenAI/open_clip-style CLIP state dict."""
    if "visual.conv1.weight" not in sd or "visual.proj" not in sd:
        raise KeyError("visual.conv1.weight / visual.proj")
    conv = sd["visual.conv1.weight"]
    layers = len(
        [
            k
            for k in sd
            if k.startswith("visual.transformer.") and k.endswith(".attn.in_proj_weight")
        ]
    )
    return {
        "width": int(conv.shape[0]),
        "patch": int(conv.shape[-1]),
        "layers": layers,
        "embed_dim": int(sd["visual.proj"].shape[1]),
        "text_width": int(sd["ln_final.weight"].shape[0]) if "ln_final.weight" in sd else -1,
        "pos_tokens": int(sd["visual.positional_embedding"].shape[0]),
    }


def _arch_from_cfg(cfg: dict) -> dict[str, int]:
    v = cfg["vision_cfg"]
    patch = v.get("patch_size", 16)
    return {
        "width": int(v.get("width", 768)),
        "patch": int(patch if isinstance(patch, int) else patch[0]),
        "layers": int(v.get("layers", 12)),
        "embed_dim": int(cfg["embed_dim"]),
        "text_width": int(cfg.get("text_cfg", {}).get("width", 512)),
    }


_CLIP_FIX = (
    "give model.clip.pretrained OpenAI's ViT-B-16.pt, an open_clip checkpoint or a file written "
    "by cisslib.model.save_clip"
)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict (OpenAI key names) and, for cisslib-clip files, the stored ``model_cfg``.

    A file that is no CLIP checkpoint (truncated, text, another pickle) raises one
    :class:`WeightsError` line naming it.
    """
    try:  # OpenAI's release is a TorchScript archive (SPEC 1.1).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(str(path), map_location="cpu")
        return dict(archive.state_dict().items()), None
    except Exception:  # not TorchScript: a pickled state dict (or not a checkpoint at all)
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WeightsError(
            f"{path}: truncated or not a torch checkpoint ({type(e).__name__}); {_CLIP_FIX}"
        ) from None
    if not isinstance(obj, dict):
        raise WeightsError(
            f"{path}: holds a {type(obj).__name__}, not a CLIP state dict; {_CLIP_FIX}"
        )
    if obj.get("format") == CLIP_FILE_FORMAT:
        return dict(obj["state_dict"]), dict(obj["model_cfg"])
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # open_clip training checkpoint
        obj = obj["state_dict"]
    sd = {}
    for k, v in obj.items():
        sd[k[len("module.") :] if k.startswith("module.") else k] = v
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors; {_CLIP_FIX}")
    return sd, None


def _missing_file_error(path: Path) -> Exception:
    if path.is_dir():
        return WeightsError(f"model.clip.pretrained {path} is a folder; {_CLIP_FIX}")
    return FileNotFoundError(
        f"CLIP checkpoint not found: {path}. Get OpenAI's ViT-B-16.pt from {OPENAI_VIT_B16_URL} "
        '(or run open_clip.create_model("ViT-B-16", pretrained="openai") on a machine with '
        "internet) and pass its path as pretrained="
    )


def _tokenizer_for(name: str, cfg: dict) -> Any:
    ctx = int(cfg.get("text_cfg", {}).get("context_length", 77))
    if open_clip.get_model_config(name) is not None:
        return open_clip.get_tokenizer(name, context_length=ctx)
    return SimpleTokenizer(context_length=ctx)


def load_clip(
    name: str = "ViT-B-16",
    pretrained: str | os.PathLike | None = None,
    model_cfg: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CLIP, Any]:
    """Build an open_clip ``CLIP`` and its tokenizer (float32, eval mode).

    Args:
        name: an open_clip architecture name (``"ViT-B-16"``); it gives the config when neither
            ``model_cfg`` nor a cisslib-clip file gives one.
        pretrained: ``None`` (random init), a file (OpenAI TorchScript archive or state dict,
            open_clip checkpoint, or a cisslib-clip file written by :func:`save_clip`), or an
            open_clip pretrained tag such as ``"openai"`` or ``"laion2b_s34b_b88k"`` (downloads).
        model_cfg: kwargs of ``open_clip.model.CLIP`` (``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ``quick_gelu``) for a model of any size.
        device: where the model goes.

    Returns:
        ``(model, tokenizer)``; the tokenizer's context length is the config's.

    Files whose config has no ``quick_gelu`` entry are built with QuickGELU (OpenAI's weights
    were trained with it, SPEC 1.1).
    """
    stored_cfg: dict | None = None
    sd: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    if pretrained is not None:
        p = Path(pretrained)
        if not (p.suffix != "" or os.sep in str(pretrained) or p.exists()):
            return _from_open_clip_tag(name, str(pretrained), model_cfg, device)
        if not p.is_file():
            raise _missing_file_error(p)
        path = p
        sd, stored_cfg = _read_checkpoint(p)
    cfg = _clip_config(name, model_cfg, stored_cfg)
    try:
        model = CLIP(**copy.deepcopy(cfg))
    except Exception as e:  # missing or inconsistent sizes
        raise ConfigError(
            f"model.clip.model_cfg {model_cfg if model_cfg is not None else cfg} does not build a "
            f"CLIP ({type(e).__name__}: {e}); give embed_dim, vision_cfg and text_cfg as in "
            "params/smoke.yaml"
        ) from None
    if sd is not None:
        assert path is not None
        source = name if model_cfg is None else "model_cfg"
        _check_architecture(sd, cfg, path, source)
        _load_state(model, sd, path)
    return model.to(device).float().eval(), _tokenizer_for(name, cfg)


def _from_open_clip_tag(
    name: str, tag: str, model_cfg: dict | None, device: str | torch.device
) -> tuple[CLIP, Any]:
    """An open_clip pretrained tag: open_clip's own download and config."""
    if model_cfg is not None:
        raise ConfigError(
            f"model.clip.pretrained tag {tag!r} uses open_clip's config for "
            f"{name!r}; drop model.clip.model_cfg or pass a checkpoint file"
        )
    known = open_clip.list_pretrained_tags_by_model(name)
    if tag not in known:
        raise ConfigError(
            f"model.clip.pretrained {tag!r} is neither an existing file nor an "
            f"open_clip tag of {name!r} (tags: {', '.join(known) or 'none'})"
        )
    try:
        model = open_clip.create_model(name, pretrained=tag, device=device)
    except Exception as e:  # the download (no network) or the cache
        raise WeightsError(
            f"model.clip.pretrained {tag!r}: open_clip could not load it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); without "
            "network, pass a local checkpoint file"
        ) from None
    cfg = open_clip.get_model_config(name) or {}
    return model.float().eval(), _tokenizer_for(name, cfg)


def _clip_config(name: str, model_cfg: dict | None, stored_cfg: dict | None) -> dict:
    """The ``CLIP(**cfg)`` kwargs: ``model_cfg``, else the file's, else open_clip's for ``name``."""
    if model_cfg is not None:
        cfg = copy.deepcopy(model_cfg)
    elif stored_cfg is not None:
        cfg = stored_cfg
    else:
        base = open_clip.get_model_config(name)
        if base is None:
            raise ConfigError(
                f"model.clip.name {name!r} is not an open_clip model (e.g. ViT-B-16); give "
                "model.clip.model_cfg for a custom size"
            )
        cfg = dict(base)
        cfg.setdefault("quick_gelu", True)  # the authors' CLIP blocks use QuickGELU (SPEC 1.1)
    cfg = {
        k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")
    }
    cfg.setdefault("quick_gelu", True)
    return cfg


def _check_architecture(sd: dict[str, torch.Tensor], cfg: dict, path: Path, source: str) -> None:
    """One line naming the file when its ViT is not the config's (``source``: what set it)."""
    try:
        got = _arch_from_state_dict(sd)
    except KeyError as err:
        raise WeightsError(
            f"{path}: not a ViT CLIP checkpoint (missing key {err}); expected OpenAI key names "
            "such as visual.conv1.weight"
        ) from None
    want = _arch_from_cfg(cfg)
    for key in ("width", "layers", "patch", "embed_dim", "text_width"):
        if got[key] != want[key]:
            have = _describe_vit(got["width"], got["layers"], got["patch"])
            expect = _describe_vit(want["width"], want["layers"], want["patch"])
            raise WeightsError(
                f"{path}: checkpoint is {have} with embed_dim {got['embed_dim']}, config "
                f"{source} expects {expect} with embed_dim {want['embed_dim']} ({key} "
                "differs); pass the matching name/model_cfg"
            )


def _load_state(model: CLIP, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Load an OpenAI-named state dict into ``model`` (float32; positions resized if needed)."""
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRA_KEYS}
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    open_clip.model.resize_pos_embed(sd, model)  # only if the config's image size differs
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # tensors of other shapes
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise WeightsError(
            f"{path}: tensors of other shapes than the CLIP config ({first}); pass the "
            "matching model.clip.name / model_cfg"
        ) from None
    if missing or unexpected:
        raise WeightsError(
            f"{path}: state dict does not fit the CLIP config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def save_clip(
    model: CLIP, model_cfg: dict, path: str | os.PathLike, meta: dict | None = None
) -> None:
    """Write ``model`` in cisslib's self-describing format, atomically.

    The file holds ``{"format": "cisslib-clip", "model_cfg": model_cfg, "state_dict": ...}``
    (and ``"meta"``: how it was made, when given) and loads back with
    ``load_clip(pretrained=path)``; :func:`clip_file_meta` reads the meta.
    """
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    obj = {"format": CLIP_FILE_FORMAT, "model_cfg": copy.deepcopy(model_cfg), "state_dict": sd}
    if meta is not None:
        obj["meta"] = meta
    atomic_torch_save(obj, path)


def clip_file_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` dict of a cisslib-clip file (``{}`` when it has none)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != CLIP_FILE_FORMAT:
        raise WeightsError(f"{path}: not a {CLIP_FILE_FORMAT} file; write it with save_clip")
    return dict(obj.get("meta") or {})


def clip_geometry(model: nn.Module) -> dict[str, int]:
    """``layers`` (image-tower blocks), ``patch`` (pixels per token side) and ``embed_dim`` (the
    joint space) of an open_clip CLIP, what the segmenter keys are checked against."""
    visual = model.visual
    return {
        "layers": len(visual.transformer.resblocks),
        "patch": int(visual.conv1.kernel_size[0]),
        "embed_dim": int(visual.output_dim),
    }


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap, stable hash of a state dict: names, shapes, dtypes and a few value statistics.

    Two models with the same weights give the same string; changing any tensor changes the
    sums with overwhelming probability (used to key text-embedding caches).
    """
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().float().cpu().reshape(-1)
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
        if t.numel():
            idx = torch.arange(t.numel(), dtype=torch.float64)
            stats = (t.double().sum(), (t.double() * (idx % 97 + 1)).sum(), t.double().abs().max())
            h.update(",".join(f"{s.item():.10e}" for s in stats).encode())
    return h.hexdigest()[:16]
