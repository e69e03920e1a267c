"""CLIP loading (OpenAI ``.pt``, open_clip tags and files, random init, cisslib files) and the
dense CLIP image encoder of CLIP-CISS (SPEC 1.1).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from cisslib.io import atomic_torch_save

# SPEC 1.1: the authors normalise with ImageNet statistics (0..255 scale, RGB), not CLIP's.
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
CLIP_MEAN: tuple[float, float, float] = tuple(255.0 * m for m in open_clip.OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(255.0 * s for s in open_clip.OPENAI_DATASET_STD)

CISSLIB_CLIP_FORMAT = "cisslib-clip"
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


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict (OpenAI key names) and, for cisslib-clip files, the stored ``model_cfg``."""
    try:  # OpenAI's release is a TorchScript archive (SPEC 1.1).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(str(path), map_location="cpu")
        return dict(archive.state_dict().items()), None
    except RuntimeError:
        pass
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a CLIP state dict or archive, got {type(obj).__name__}")
    if obj.get("format") == CISSLIB_CLIP_FORMAT:
        return dict(obj["state_dict"]), dict(obj["model_cfg"])
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # open_clip training checkpoint
        obj = obj["state_dict"]
    sd = {}
    for k, v in obj.items():
        sd[k[len("module.") :] if k.startswith("module.") else k] = v
    return sd, None


def _missing_file_error(path: Path) -> FileNotFoundError:
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
        looks_like_file = p.suffix != "" or os.sep in str(pretrained) or p.exists()
        if looks_like_file:
            if not p.is_file():
                raise _missing_file_error(p)
            path = p
            sd, stored_cfg = _read_checkpoint(p)
        else:  # an open_clip pretrained tag: the normal open_clip download path.
            if model_cfg is not None:
                raise ValueError(
                    f"load_clip: pretrained tag {pretrained!r} uses open_clip's config for {name!r}; "
                    "drop model_cfg or pass a checkpoint file"
                )
            known = open_clip.list_pretrained_tags_by_model(name)
            if str(pretrained) not in known:
                raise ValueError(
                    f"load_clip: {pretrained!r} is neither an existing file nor an open_clip tag of "
                    f"{name!r} (tags: {', '.join(known) or 'none'})"
                )
            model = open_clip.create_model(name, pretrained=str(pretrained), device=device)
            cfg = open_clip.get_model_config(name) or {}
            return model.float().eval(), _tokenizer_for(name, cfg)

    if model_cfg is not None:
        cfg = copy.deepcopy(model_cfg)
    elif stored_cfg is not None:
        cfg = stored_cfg
    else:
        base = open_clip.get_model_config(name)
        if base is None:
            raise ValueError(
                f"load_clip: unknown open_clip model {name!r}; pass model_cfg= for a custom size"
            )
        cfg = dict(base)
        cfg.setdefault("quick_gelu", True)  # the authors' CLIP blocks use QuickGELU (SPEC 1.1)
    cfg = {
        k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")
    }
    cfg.setdefault("quick_gelu", True)

    model = CLIP(**copy.deepcopy(cfg))
    if sd is not None:
        assert path is not None
        try:
            got = _arch_from_state_dict(sd)
        except KeyError as err:
            raise ValueError(
                f"{path}: not a ViT CLIP checkpoint (missing key {err}); expected OpenAI key names "
                "such as visual.conv1.weight"
            ) from None
        want = _arch_from_cfg(cfg)
        for key in ("width", "layers", "patch", "embed_dim", "text_width"):
            if got[key] != want[key]:
                raise ValueError(
                    f"{path}: checkpoint is {_describe_vit(got['width'], got['layers'], got['patch'])}"
                    f" with embed_dim {got['embed_dim']}, config {name if model_cfg is None else 'model_cfg'}"
                    f" expects {_describe_vit(want['width'], want['layers'], want['patch'])} with "
                    f"embed_dim {want['embed_dim']} ({key} differs); pass the matching name/model_cfg"
                )
        sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRA_KEYS}
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        open_clip.model.resize_pos_embed(sd, model)  # only if the config's image size differs
        if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
            sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: state dict does not fit the CLIP config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
    return model.to(device).float().eval(), _tokenizer_for(name, cfg)


def save_clip(model: CLIP, model_cfg: dict, path: str | os.PathLike) -> None:
    """Write ``model`` in cisslib's self-describing format, atomically.

    The file holds ``{"format": "cisslib-clip", "model_cfg": model_cfg, "state_dict": ...}``
    and loads back with ``load_clip(pretrained=path)``.
    """
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {"format": CISSLIB_CLIP_FORMAT, "model_cfg": copy.deepcopy(model_cfg), "state_dict": sd},
        path,
    )


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


# --------------------------------------------------------------------------------------------
# Dense encoder
# --------------------------------------------------------------------------------------------


class EncoderOutput(NamedTuple):
    """Outputs of :class:`DenseCLIPEncoder` (SPEC 1.1 ``outs``).

    features: list of ``(B, W, h, w)`` raw tokens after each ``out_indices`` block, block order.
    global_embedding: ``(B, D)`` normalised ``ln_post(cls) @ proj``.
    dense_embedding: ``(B, D, h, w)`` per-pixel normalised ``ln_post(patches) @ proj``.
    """

    features: list[torch.Tensor]
    global_embedding: torch.Tensor
    dense_embedding: torch.Tensor


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch ``x`` of shape ``(B, ...)``: zero whole samples."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def interpolate_pos_embed(
    pos: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Resize a ``(1 + gh*gw, W)`` positional embedding to ``(1 + h*w, W)``.

    The CLS row is kept; the spatial rows are resized bilinearly, ``align_corners=False``
    (SPEC 1.1, img_encoder.py:149-153). ``grid`` = ``(gh, gw)``, ``size`` = ``(h, w)``.
    """
    gh, gw = grid
    if pos.shape[0] != gh * gw + 1:
        raise ValueError(
            f"positional embedding has {pos.shape[0]} rows, grid {gh}x{gw} needs {gh * gw + 1}"
        )
    if (gh, gw) == tuple(size):
        return pos
    width = pos.shape[1]
    spatial = pos[1:].reshape(1, gh, gw, width).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)
    spatial = spatial.reshape(width, size[0] * size[1]).t()
    return torch.cat([pos[:1], spatial], dim=0)


class DenseCLIPEncoder(nn.Module):
    """CLIP ViT image encoder giving multi-level tokens, the global and the dense embedding.

    Wraps an open_clip ``VisionTransformer`` (any size) and runs its blocks itself (SPEC 1.1).

    Args:
        visual: ``clip_model.visual``; it is used in place (not copied).
        out_indices: blocks whose output tokens are returned (0-based; negative counts from the
            end). Authors: ``(5, 7, 11)``.
        pixel_mean, pixel_std: normalisation on the 0..255 scale. Authors: ImageNet statistics.
        double_cls_embedding: add ``class_embedding`` to the CLS position as well (the authors'
            ZegCLIP quirk, SPEC 1.1/7.5). ``False`` = standard CLIP.
        drop_path_rate: stochastic depth rate, linearly increasing over blocks (``DropPath`` is
            built by the authors but never called).
        drop_path_active: apply it (``False`` = authors: inert).
        pos_embed_grid: ``(h, w)`` token grid of the trained positional-embedding table. The
            checkpoint's table is resized to it once, here (bilinear, ``align_corners=False``,
            CLS row kept), and that table is the parameter that trains: the authors resize
            OpenAI's 14x14 to 32x32 for 512 crops at load (SPEC 1.1). ``None`` keeps the
            checkpoint's grid as the parameter. Either way ``forward`` interpolates the table
            only when the input's token grid differs from it (e.g. windows of another size).
    """

    def __init__(
        self,
        visual: nn.Module,
        out_indices: tuple[int, ...] | list[int] = (5, 7, 11),
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
        double_cls_embedding: bool = True,
        drop_path_rate: float = 0.1,
        drop_path_active: bool = False,
        pos_embed_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        for attr in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post"):
            if not hasattr(visual, attr):
                raise TypeError(f"DenseCLIPEncoder: visual has no {attr!r}; pass an open_clip ViT")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "proj", None) is None:
            raise TypeError("DenseCLIPEncoder: needs a ViT with token pooling and a projection")
        self.visual = visual
        blocks = visual.transformer.resblocks
        n = len(blocks)
        idx = []
        for i in out_indices:
            if not -n <= int(i) < n:
                raise ValueError(
                    f"DenseCLIPEncoder: out_indices {tuple(out_indices)} has {i}, but the ViT has "
                    f"{n} blocks (valid: {-n}..{n - 1})"
                )
            idx.append(int(i) % n)
        if len(set(idx)) != len(idx) or idx != sorted(idx):
            raise ValueError(
                f"DenseCLIPEncoder: out_indices {tuple(out_indices)} must be increasing"
            )
        self.out_indices = tuple(idx)
        self.double_cls_embedding = double_cls_embedding
        self.drop_path_active = drop_path_active
        self.drop_path_rates = [float(r) for r in torch.linspace(0, drop_path_rate, n)]
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False
        )
        ps = visual.conv1.kernel_size
        self.patch_size: int = int(ps[0])
        if ps[0] != ps[1]:
            raise ValueError(f"DenseCLIPEncoder: non-square patches {ps} are not supported")
        self.width: int = int(visual.conv1.out_channels)
        self.embed_dim: int = int(visual.proj.shape[1])
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        rows = visual.positional_embedding.shape[0] - 1
        grid = tuple(getattr(visual, "grid_size", (math.isqrt(rows),) * 2))
        if grid[0] * grid[1] != rows:
            raise ValueError(
                f"DenseCLIPEncoder: positional embedding of {rows + 1} rows fits no grid"
            )
        if pos_embed_grid is not None and tuple(pos_embed_grid) != tuple(grid):
            target = (int(pos_embed_grid[0]), int(pos_embed_grid[1]))
            if min(target) < 1:
                raise ValueError(f"DenseCLIPEncoder: pos_embed_grid {target} must be positive")
            with torch.no_grad():
                new = interpolate_pos_embed(visual.positional_embedding.data, grid, target)
            visual.positional_embedding = nn.Parameter(new.clone())
            grid = target
        self.pos_grid: tuple[int, int] = (int(grid[0]), int(grid[1]))

    def _block(self, i: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (self.drop_path_active and self.training and self.drop_path_rates[i] > 0):
            return blk(x)
        # Pre-LN CLIP block with stochastic depth on both residual branches.
        p = self.drop_path_rates[i]
        h = blk.ln_1(x)
        h = blk.attn(h, h, h, need_weights=False)[0]
        x = x + drop_path(blk.ls_1(h), p, True)
        return x + drop_path(blk.ls_2(blk.mlp(blk.ln_2(x))), p, True)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """Encode ``(B, 3, H, W)`` RGB images on the 0..255 scale; H, W multiples of the patch."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DenseCLIPEncoder: expected (B, 3, H, W) images, got {tuple(images.shape)}"
            )
        B, _, H, W = images.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"DenseCLIPEncoder: image size {H}x{W} is not a multiple of the patch size "
                f"{self.patch_size}; pad the input (CLIPSegmenter does)"
            )
        v = self.visual
        x = (images - self.pixel_mean) / self.pixel_std
        x = v.conv1(x.to(v.conv1.weight.dtype))
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = v.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = interpolate_pos_embed(v.positional_embedding.to(x.dtype), self.pos_grid, (h, w))
        if self.double_cls_embedding:  # SPEC 1.1: cls_pos = pos[0] + class_embedding
            pos = torch.cat([pos[:1] + v.class_embedding.to(x.dtype), pos[1:]], dim=0)
        x = v.ln_pre(x + pos.unsqueeze(0))
        if not self.batch_first:
            x = x.transpose(0, 1)
        features = []
        for i, blk in enumerate(v.transformer.resblocks):
            x = self._block(i, blk, x)
            if i in self.out_indices:
                t = x if self.batch_first else x.transpose(0, 1)
                features.append(t[:, 1:].transpose(1, 2).reshape(B, self.width, h, w).contiguous())
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = v.ln_post(x) @ v.proj  # (B, 1 + h*w, D)
        g = F.normalize(x[:, 0], dim=-1)
        dense = x[:, 1:].transpose(1, 2).reshape(B, self.embed_dim, h, w)
        dense = dense / dense.norm(dim=1, keepdim=True)
        return EncoderOutput(features, g, dense)
