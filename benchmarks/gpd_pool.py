"""GPD's masked means (issue 13 item 2a): pooling the h x w features with the adjoint of the
bilinear upsampling (``cisslib.losses.distillation``) against upsampling the features to the
crop first, as the authors' code does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import peak_memory_mib, timed
from cisslib.losses.distillation import class_prototypes


def _naive(dense: torch.Tensor, masks) -> torch.Tensor:
    """The authors' way: ``(B, D, H, W)`` upsampled features, mean under each mask."""
    up = F.interpolate(dense, size=masks[0][1].shape[-2:], mode="bilinear", align_corners=False)
    means = []
    for b, (_, m) in enumerate(masks):
        m = m.float()
        means.append(torch.einsum("dhw,khw->kd", up[b], m) / m.sum((-2, -1)).clamp_min(1)[:, None])
    return torch.cat(means)


def measure(
    device: torch.device,
    batch: int = 2,
    dim: int = 512,
    grid: int = 32,
    crop: int = 512,
    masks_per_image: int = 4,
    repeats: int = 3,
) -> dict:
    """Seconds and peak memory of both ways; the largest difference of the means."""
    g = torch.Generator().manual_seed(3)
    dense = F.normalize(torch.randn(batch, dim, grid, grid, generator=g), dim=1).to(device)
    masks = []
    for _ in range(batch):
        m = torch.zeros(masks_per_image, crop, crop, dtype=torch.bool)
        for k in range(masks_per_image):
            y, x = torch.randint(0, crop // 2, (2,), generator=g).tolist()
            m[k, y : y + crop // 2, x : x + crop // 3] = True
        masks.append((torch.arange(masks_per_image), m.to(device)))

    def adjoint():
        # class_prototypes normalises and averages per label; compare the raw means instead
        return class_prototypes(dense, masks, pool_at="mask")

    out = {
        "adjoint_s": timed(adjoint, device, repeats),
        "naive_s": timed(lambda: _naive(dense, masks), device, repeats),
        "adjoint_mib": peak_memory_mib(adjoint, device),
        "naive_mib": peak_memory_mib(lambda: _naive(dense, masks), device),
    }
    # the same prototypes: normalise the naive means per label (each label in every image)
    naive = _naive(dense, masks).view(batch, masks_per_image, dim).mean(0)
    _, protos = adjoint()
    out["max_abs_diff"] = float((F.normalize(naive, dim=1) - protos).abs().max())
    return out
