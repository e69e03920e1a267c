"""The models the benchmarks time: random-weight CLIPs of the real architectures (no download)."""

from __future__ import annotations

import torch

from cisslib.model.clip import load_clip, tiny_clip_config
from cisslib.model.segmenter import build_segmenter

#: name -> (open_clip name, model_cfg or None, crop, out_indices, decoder kwargs)
ARCHS: dict[str, tuple] = {
    # ViT-B/16 at 512 px, the paper's model (positional table trained at 32 x 32, SPEC 1.1)
    "vit-b16": ("ViT-B-16", None, 512, (5, 7, 11), {}),
    # the toy CLIP's architecture (patch 4, width 128, 3 blocks) at the demo's 32 px crops
    "toy": (
        "toy-random",
        tiny_clip_config(embed_dim=64, width=128, layers=3, heads=4, patch_size=4, image_size=32),
        32,
        (0, 1, 2),
        {"num_heads": 4, "ffn_dim": 256},
    ),
    # the test suite's tiny CLIP: for --dry runs (seconds)
    "tiny": ("tiny-random", tiny_clip_config(), 32, (0, 1, 2), {"num_heads": 4, "ffn_dim": 128}),
}


def build(arch: str, device: torch.device, seed: int = 0, **encoder_kw) -> tuple:
    """``(segmenter (train mode), crop)`` of ``arch`` on ``device`` with random weights."""
    name, cfg, crop, out_indices, dec = ARCHS[arch]
    torch.manual_seed(seed)
    clip, _ = load_clip(name, pretrained=None, model_cfg=cfg)
    patch = int(clip.visual.conv1.kernel_size[0])
    model = build_segmenter(
        clip, out_indices=out_indices, pos_embed_grid=(crop // patch,) * 2, **dec, **encoder_kw
    )
    return model.to(device).train(), crop
