"""The dense CLIP image encoder of CLIP-CISS (SPEC 1.1): multi-level tokens, the global and the
dense embedding, positional embeddings on any token grid."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# SPEC 1.1: the authors normalise with ImageNet statistics (0..255 scale, RGB), not CLIP's.
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
CLIP_MEAN: tuple[float, float, float] = tuple(255.0 * m for m in open_clip.OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(255.0 * s for s in open_clip.OPENAI_DATASET_STD)


#: ``attention: auto`` per device type. CPU keeps PyTorch's MHA fast path in inference, as
#: cisslib always did, although the plain kernel measured 1.14x faster there (ViT-B/16, batch 1,
#: ``python -m benchmarks``): switching would change the rounding of every CPU evaluation. CUDA:
#: plain (under autocast PyTorch never takes the fast path, so fp32 inference then uses
#: training's kernel); ``benchmarks/gpu_check.sh`` measures both.
AUTO_ATTENTION: dict[str, str] = {"cpu": "fast_path", "cuda": "plain"}


@contextlib.contextmanager
def _mha_fast_path(enabled: bool):
    """Set ``torch.backends.mha``'s fast-path switch inside the block, restore it after."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


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
        grad_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them (training memory of the blocks ~1/depth, ~one more forward of time;
            the same gradients).
        attention: the attention kernel of the blocks in no-grad inference. Training always runs
            ``nn.MultiheadAttention``'s general path, which calls
            ``F.scaled_dot_product_attention``; in inference PyTorch switches to its fused "fast
            path" kernel, whose rounding differs. ``"plain"`` keeps the general path there too,
            ``"fast_path"`` lets PyTorch take the fast path, ``"auto"`` picks per device type:
            :data:`AUTO_ATTENTION` (measured in ``benchmarks``).
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
        grad_checkpointing: bool = False,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        if attention not in ("auto", "fast_path", "plain"):
            raise ValueError(
                f"DenseCLIPEncoder: attention={attention!r} must be auto, fast_path or plain"
            )
        self.grad_checkpointing = grad_checkpointing
        self.attention = attention
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

    def attention_kernel(self, device: torch.device) -> str:
        """``"fast_path"`` or ``"plain"``: the kernel no-grad inference uses on ``device``."""
        if self.attention != "auto":
            return self.attention
        return AUTO_ATTENTION.get(device.type, "plain")

    def _attention_context(self, x: torch.Tensor):
        """Disable PyTorch's MHA fast path for the blocks when the plain kernel is chosen."""
        grad = torch.is_grad_enabled() and (self.training or x.requires_grad)
        if grad or self.attention_kernel(x.device) == "fast_path":
            return contextlib.nullcontext()
        return _mha_fast_path(False)

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._block, i, blk, x, use_reentrant=False)
        return self._block(i, blk, x)

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
        with self._attention_context(x):
            for i, blk in enumerate(v.transformer.resblocks):
                x = self._run_block(i, blk, x)
                if i in self.out_indices:
                    t = x if self.batch_first else x.transpose(0, 1)
                    t = t[:, 1:].transpose(1, 2).reshape(B, self.width, h, w)
                    features.append(t.contiguous())
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = v.ln_post(x) @ v.proj  # (B, 1 + h*w, D)
        g = F.normalize(x[:, 0], dim=-1)
        dense = x[:, 1:].transpose(1, 2).reshape(B, self.embed_dim, h, w)
        dense = dense / dense.norm(dim=1, keepdim=True)
        return EncoderOutput(features, g, dense)
