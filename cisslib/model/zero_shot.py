"""The zero-shot baseline: no decoder and no training; each pixel's class scores come from CLIP's
dense embedding against the class texts (MaskCLIP-style), the floor every CISS method starts from
and the reference of forward transfer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cisslib.constants import PAD_VALUE
from cisslib.model.encoder import DenseCLIPEncoder
from cisslib.model.segmenter import SlidingWindowSegmenter, freeze

#: CLIP's logit scale (``exp(log(100))`` in OpenAI's weights): cosines -> softmax logits.
CLIP_LOGIT_SCALE = 100.0


class ZeroShotSegmenter(SlidingWindowSegmenter):
    """Scores ``softmax_c(s * cos(V[:, h, w], t_c))`` with ``V`` the dense embedding bilinearly
    upsampled (as logits) to the input size; frozen, nothing to train.

    Args:
        encoder: the dense CLIP encoder (frozen here).
        logit_scale: ``s``, the temperature of the softmax over classes.
    """

    def __init__(self, encoder: DenseCLIPEncoder, logit_scale: float = CLIP_LOGIT_SCALE):
        super().__init__()
        self.encoder = freeze(encoder)
        self.logit_scale = float(logit_scale)

    def train(self, mode: bool = True) -> ZeroShotSegmenter:
        return super().train(False)  # always in eval mode: nothing trains

    def window_scores(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(B, C, H, W)`` class probabilities of ``(B, 3, H, W)`` images; no presence head."""
        H, W = images.shape[-2:]
        p = self.encoder.patch_size
        padded = F.pad(images, (0, (-W) % p, 0, (-H) % p), value=PAD_VALUE)
        dense = self.encoder(padded).dense_embedding  # (B, D, h, w), unit vectors
        logits = self.logit_scale * torch.einsum("bdhw,cd->bchw", dense, text.to(dense.dtype))
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :H, :W].softmax(dim=1), None
