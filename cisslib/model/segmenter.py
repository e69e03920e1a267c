"""The CLIP-guided segmenter: dense CLIP encoder + ATM decoder + CACP head, score maps and
sliding-window inference (SPEC 1.3.4-6, 4).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cisslib.constants import PAD_VALUE
from cisslib.metrics.conventions import labels_from_scores
from cisslib.model.decoder import ATMDecoder
from cisslib.model.encoder import IMAGENET_MEAN, IMAGENET_STD, DenseCLIPEncoder

#: ``on_window(y0, y1, x0, x1, presence (B, C))``: called for every window of a sliding pass.
WindowCallback = Callable[[int, int, int, int, torch.Tensor], None]


class SlidingWindowSegmenter(nn.Module):
    """Sliding-window inference (SPEC 4) over a model's :meth:`window_scores`."""

    def window_scores(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scores (B, C, H, W) in 0..1, presence (B, C) or None)`` of one window."""
        raise NotImplementedError

    def sliding_scores(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        window: int = 512,
        stride: int = 341,
        on_window: WindowCallback | None = None,
        window_batch: int = 1,
    ) -> torch.Tensor:
        """Average of the window scores over overlapping ``window`` crops, ``(B, C, H, W)``.

        Windows start every ``stride`` pixels and the last one is shifted back to end at the
        border (mmseg's slide inference, SPEC 4). A side shorter than ``window`` is covered by
        one crop of its full length, so an image that fits one window gives exactly one forward.
        Any size and aspect ratio works (the authors' code breaks for aspect > 4, SPEC 7.8).
        ``on_window`` sees every window's box and presence probabilities (calibration).
        ``window_batch``: windows per forward (all windows of an image have one size); 1 runs
        them one at a time as the authors do. The scores are the same either way up to float
        rounding (bit-identical on the CPUs tested, see README "Speed").
        """
        if window < 1 or stride < 1:
            raise ValueError(f"sliding_scores: window {window} and stride {stride} must be >= 1")
        if stride > window:
            raise ValueError(f"sliding_scores: stride {stride} > window {window} leaves gaps")
        if window_batch < 1:
            raise ValueError(f"sliding_scores: window_batch {window_batch} must be >= 1")
        B, _, H, W = images.shape
        C = text.shape[0]
        ys = _window_starts(H, window, stride)
        xs = _window_starts(W, window, stride)
        if len(ys) == 1 and len(xs) == 1:
            scores, present = self.window_scores(images, text)
            if on_window is not None and present is not None:
                on_window(0, H, 0, W, present)
            return scores
        total = images.new_zeros((B, C, H, W))
        count = images.new_zeros((1, 1, H, W))
        boxes = [(y, min(y + window, H), x, min(x + window, W)) for y in ys for x in xs]
        for k in range(0, len(boxes), window_batch):
            chunk = boxes[k : k + window_batch]
            crops = torch.cat([images[:, :, y:y2, x:x2] for y, y2, x, x2 in chunk])
            scores, present = self.window_scores(crops, text)
            for j, (y, y2, x, x2) in enumerate(chunk):
                total[:, :, y:y2, x:x2] += scores[j * B : (j + 1) * B]
                count[:, :, y:y2, x:x2] += 1
                if on_window is not None and present is not None:
                    on_window(y, y2, x, x2, present[j * B : (j + 1) * B])
        return total / count

    @torch.no_grad()
    def segment(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        window: int = 512,
        stride: int = 341,
        tau: float | None = None,
        window_batch: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Label maps ``(B, H, W)`` (class c <-> label c + 1) and scores ``(B, C, H, W)``.

        ``tau=None``: argmax over the C classes (authors, SPEC 4); a float: pixels whose best
        score is below ``tau`` get label 0 (background).
        """
        scores = self.sliding_scores(
            images, text, window=window, stride=stride, window_batch=window_batch
        )
        return labels_from_scores(scores, tau=tau), scores


class CLIPSegmenter(SlidingWindowSegmenter):
    """CLIP ViT encoder + ATM decoder with CACP head.

    Attributes ``encoder`` (:class:`DenseCLIPEncoder`) and ``decoder`` (:class:`ATMDecoder`);
    the engine gives the parameters under ``decoder`` the head LR multiplier (SPEC 4).

    Args:
        encoder, decoder: the two parts.
        pad_value: value (0..255 scale, before normalisation) used to pad inputs whose size is
            not a multiple of the patch size; the authors pad training crops with 128 (SPEC 4).
    """

    def __init__(
        self, encoder: DenseCLIPEncoder, decoder: ATMDecoder, pad_value: float = PAD_VALUE
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.pad_value = pad_value

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        p = self.encoder.patch_size
        H, W = images.shape[-2:]
        ph, pw = (-H) % p, (-W) % p
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph), value=self.pad_value)
        return images

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        """Segment ``(B, 3, H, W)`` RGB images (0..255) for the classes of ``text (C, D)``.

        Inputs whose size is not a multiple of the patch size are padded bottom/right and the
        masks are cropped back.

        Returns a dict: ``pred_logits (B, C, 2)`` (index 0 = present), ``pred_masks
        (B, C, H, W)`` (M3 bilinearly upsampled to the input size; the authors upsample to a
        fixed 512, SPEC 1.3.4), ``aux_outputs`` ``[{"pred_masks": M1}, {"pred_masks": M2}]`` at
        patch resolution, ``queries (S, B, C, D)``, ``queries0 (B, C, D)``, ``global_embedding
        (B, D)``, ``dense_embedding (B, D, h, w)``, ``text (C, D)``.
        """
        H, W = images.shape[-2:]
        padded = self._pad(images)
        enc = self.encoder(padded)
        dec = self.decoder(enc.features, enc.global_embedding, text)
        masks = dec["masks"]
        pred = F.interpolate(
            masks[-1], size=padded.shape[-2:], mode="bilinear", align_corners=False
        )
        return {
            "pred_logits": dec["pred_logits"],
            "pred_masks": pred[..., :H, :W],
            "aux_outputs": [{"pred_masks": m} for m in masks[:-1]],
            "queries": dec["queries"],
            "queries0": dec["queries0"],
            "global_embedding": enc.global_embedding,
            "dense_embedding": enc.dense_embedding,
            "text": text,
        }

    def window_scores(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``S = softmax(pred_logits)[..., 0] * sigmoid(pred_masks)``, ``(B, C, H, W)``
        (SPEC 1.3.6), and the CACP presence probabilities ``(B, C)``."""
        out = self(images, text)
        present = out["pred_logits"].softmax(dim=-1)[..., 0]
        return present[..., None, None] * out["pred_masks"].sigmoid(), present

    def score_maps(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The scores of :meth:`window_scores`, ``(B, C, H, W)``."""
        return self.window_scores(images, text)[0]


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of sliding windows along one side (mmseg ``slide_inference`` grid)."""
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def build_segmenter(
    clip_model: nn.Module,
    *,
    out_indices: tuple[int, ...] = (5, 7, 11),
    num_stages: int = 3,
    layers_per_stage: int = 3,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    dropout: float = 0.1,
    class_head: str = "cacp",
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
    pixel_std: tuple[float, float, float] = IMAGENET_STD,
    double_cls_embedding: bool = True,
    drop_path_rate: float = 0.1,
    drop_path_active: bool = False,
    pos_embed_grid: tuple[int, int] | None = None,
    pad_value: float = PAD_VALUE,
    grad_checkpointing: bool = False,
    attention: str = "auto",
) -> CLIPSegmenter:
    """Build a :class:`CLIPSegmenter` on a copy of ``clip_model.visual``.

    ``in_channels`` (ViT width) and ``embed_dim`` (CLIP joint dim) are read from the model; the
    text tower is not used (SPEC 1.2). ``out_indices`` must give one level per stage. The other
    keywords are those of :class:`DenseCLIPEncoder` and :class:`ATMDecoder`.
    """
    if len(out_indices) != num_stages:
        raise ValueError(
            f"build_segmenter: out_indices {tuple(out_indices)} gives {len(out_indices)} levels "
            f"for num_stages {num_stages}"
        )
    encoder = DenseCLIPEncoder(
        copy.deepcopy(clip_model.visual),
        out_indices=out_indices,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        double_cls_embedding=double_cls_embedding,
        drop_path_rate=drop_path_rate,
        drop_path_active=drop_path_active,
        pos_embed_grid=pos_embed_grid,
        grad_checkpointing=grad_checkpointing,
        attention=attention,
    )
    decoder = ATMDecoder(
        in_channels=encoder.width,
        embed_dim=encoder.embed_dim,
        num_stages=num_stages,
        layers_per_stage=layers_per_stage,
        num_heads=num_heads,
        ffn_dim=ffn_dim,
        dropout=dropout,
        class_head=class_head,
    )
    model = CLIPSegmenter(encoder, decoder, pad_value=pad_value)
    return model.to(next(clip_model.parameters()).device)


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with ``requires_grad=False`` everywhere; returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def frozen_encoder_copy(encoder: DenseCLIPEncoder) -> DenseCLIPEncoder:
    """A frozen deep copy of ``encoder``: the original CLIP (``ori_clip``) giving the step-0 GPD
    reference (SPEC 1.1)."""
    return freeze(copy.deepcopy(encoder))
