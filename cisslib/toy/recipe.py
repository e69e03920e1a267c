"""The tiny CLIP's recipe: model sizes and pretraining schedule, hashed into its cache key.

A frozen recipe rather than a section of the experiment config: a run names the tiny CLIP with
``model.clip.pretrained: toy`` and gets the one cached model of :class:`ToyClipConfig`'s defaults;
a study of the toy CLIP itself passes another ``ToyClipConfig`` to
:func:`cisslib.toy.clip.pretrain_tiny_clip` and gets its own cache entry.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from cisslib import files
from cisslib.data.toyworld import GENERATOR_VERSION

#: Bumped whenever the pretraining code changes the weights a config produces (cache key).
RECIPE_VERSION = "toyclip-v3"


@dataclass
class ToyClipConfig:
    """Model sizes and the pretraining recipe of the tiny CLIP (hashed into the cache key)."""

    embed_dim: int = 64
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 3
    vision_head_width: int = 32
    vision_pool: str = "tok"  # open_clip pool_type: tok (CLS, as ViT-B/16) | avg (mean of patches)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 16
    steps: int = 9000  # ~21 min on 1 CPU core (README, "The embedded toy world")
    batch_size: int = 32  # small batches, many steps: learned shape faster than 128 x 600
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    logit_scale_init: float = 30.0  # initial exp(logit_scale) (learnable, clamped to 100)
    seed: int = 0
    threads: int = 1  # fixed torch thread count (results depend on it)
    pool_size: int = 16384  # images rendered once per run; every batch samples from them
    curriculum_steps: int = 0  # single objects' difficulty ramps up (see render_pool)
    curriculum_levels: int = 5  # difficulty levels of the single-object images
    single_fraction: float = 1.0  # share of single-object images in the pool and in a batch
    single_anywhere: float = 1.0  # share of those whose centre is redrawn anywhere (render_pool)
    crop_fraction: float = 0.0  # share of image_size crops of scene_size scenes; the rest: scenes
    scene_size: int = 64
    min_crop_pixels: int = 6  # a class is named in a crop's caption if it covers this many pixels
    eval_n: int = 1000  # zero-shot images evaluated after training (recorded in meta)
    log_every: int = 200  # one log line per this many steps (not part of the cache key)

    def __post_init__(self) -> None:
        ints = (
            "embed_dim",
            "image_size",
            "patch_size",
            "steps",
            "batch_size",
            "threads",
            "pool_size",
        )
        for key in ints:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"ToyClipConfig.{key}={getattr(self, key)!r} must be an int >= 1")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ToyClipConfig.image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.vision_width % self.vision_head_width or self.text_width % self.text_heads:
            raise ValueError(
                "ToyClipConfig: vision_width must be a multiple of vision_head_width and "
                "text_width a multiple of text_heads"
            )
        if not 0 <= self.single_fraction + self.crop_fraction <= 1:
            raise ValueError(
                f"ToyClipConfig: single_fraction + crop_fraction = "
                f"{self.single_fraction + self.crop_fraction} must lie in [0, 1]"
            )
        if not 0 <= self.single_anywhere <= 1:
            raise ValueError(
                f"ToyClipConfig.single_anywhere={self.single_anywhere} must lie in [0, 1]"
            )
        if self.curriculum_levels < 1 or self.curriculum_steps < 0:
            raise ValueError("ToyClipConfig: curriculum_levels must be >= 1, curriculum_steps >= 0")
        if self.scene_size < self.image_size:
            raise ValueError(
                f"ToyClipConfig.scene_size={self.scene_size} must be >= "
                f"image_size={self.image_size}"
            )

    def key(self) -> str:
        """Hex hash (16 chars) of everything that changes the trained weights."""
        d = dataclasses.asdict(self)
        d.pop("log_every")
        d["recipe"], d["world"] = RECIPE_VERSION, GENERATOR_VERSION
        return files.sha256_text(json.dumps(d, sort_keys=True))[:16]


def model_cfg(cfg: ToyClipConfig) -> dict:
    """Keyword arguments of ``open_clip.model.CLIP`` for ``cfg`` (plain JSON-able dict)."""
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.vision_width,
            "layers": cfg.vision_layers,
            "head_width": cfg.vision_head_width,
            "pool_type": cfg.vision_pool,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }
