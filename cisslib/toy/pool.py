"""The tiny CLIP's pretraining images: a fixed pool rendered once per run, sampled every step.

The pool holds single objects, whole scenes and crops of larger scenes of the toy world's
``"pretrain"`` stream (disjoint from the segmentation ``train`` / ``val`` images), in the shares
``single_fraction`` / ``crop_fraction`` of :class:`~cisslib.toy.recipe.ToyClipConfig`. A batch
draws from it with a random flip / 90-degree rotation per image and a random caption.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer

from cisslib.data.toyworld import _SHAPE_SCALE, TOY_CLASSES, ToyObject, ToyWorld, render_scene
from cisslib.toy.captions import label_set_id, random_caption
from cisslib.toy.recipe import ToyClipConfig

#: An "anywhere" single object's centre lies in [margin, 1 - margin] of the image side.
ANYWHERE_MARGIN = 0.05


def normalize_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` normalised with OpenAI CLIP mean/std."""
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class PretrainPool:
    """The fixed pretraining image set of one run, rendered once and sampled every step.

    ``images``: ``(N, S, S, 3)`` uint8; ``label_sets[i]``: sorted raw labels named by image ``i``'s
    captions; sections ``[0, n_single)`` single objects, ``[n_single, n_single + n_scene)`` whole
    scenes, the rest crops of ``scene_size`` scenes.
    """

    images: torch.Tensor
    label_sets: list[list[int]]
    n_single: int
    n_scene: int
    levels: np.ndarray  # (n_single,) curriculum level of each single-object image

    @property
    def n_crop(self) -> int:
        return len(self.label_sets) - self.n_single - self.n_scene


def section_sizes(total: int, cfg: ToyClipConfig) -> tuple[int, int, int]:
    n_single = round(total * cfg.single_fraction)
    n_crop = round(total * cfg.crop_fraction)
    return n_single, total - n_single - n_crop, n_crop


def render_pool(cfg: ToyClipConfig) -> PretrainPool:
    """Render ``cfg.pool_size`` images of the toy world's ``"pretrain"`` stream (deterministic).

    Single objects and whole scenes are items ``0 ..`` of their ``image_size`` streams; crops are
    ``image_size`` windows (position from a Philox generator seeded with ``cfg.seed``) of
    ``scene_size`` scenes, naming every class that covers ``min_crop_pixels`` pixels. The first
    ``single_anywhere`` share of the single objects get a centre drawn uniformly over
    ``[ANYWHERE_MARGIN, 1 - ANYWHERE_MARGIN]`` of the image (often cut by the border, as the
    objects a segmenter's window sees) instead of the generator's near-centre draw.
    """
    s = cfg.image_size
    n_single, n_scene, n_crop = section_sizes(cfg.pool_size, cfg)
    single = ToyWorld("pretrain", size=s, length=n_single, seed=cfg.seed, single_object=True)
    scenes = ToyWorld("pretrain", size=s, length=n_scene, seed=cfg.seed)
    big = ToyWorld("pretrain", size=cfg.scene_size, length=n_crop, seed=cfg.seed + 1)
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([cfg.seed, 7919])))
    images = np.empty((cfg.pool_size, s, s, 3), dtype=np.uint8)
    label_sets: list[list[int]] = []
    n_levels = cfg.curriculum_levels if cfg.curriculum_steps else 1
    levels = np.arange(n_single) % n_levels
    n_anywhere = round(n_single * cfg.single_anywhere)
    for k in range(n_single):
        difficulty = levels[k] / (n_levels - 1) if n_levels > 1 else 1.0
        obj = _easier(single.objects(k)[0], difficulty, s)
        if k < n_anywhere:
            where = np.random.Generator(np.random.Philox(np.random.SeedSequence([cfg.seed, 37, k])))
            cx, cy = where.uniform(ANYWHERE_MARGIN, 1 - ANYWHERE_MARGIN, size=2) * s
            obj = dataclasses.replace(obj, cx=float(cx), cy=float(cy))
        tex = np.random.Generator(np.random.Philox(np.random.SeedSequence([cfg.seed, 31, k])))
        images[k], lab = render_scene([obj], s, tex)
        label_sets.append([int(v) for v in np.unique(lab) if v != 0])
    for k in range(n_scene):
        images[n_single + k], lab = scenes.load(k)
        label_sets.append([int(v) for v in np.unique(lab) if v != 0])
    for k in range(n_crop):
        img, lab = big.load(k)
        y, x = rng.integers(0, cfg.scene_size - s + 1, size=2)
        images[n_single + n_scene + k] = img[y : y + s, x : x + s]
        counts = np.bincount(lab[y : y + s, x : x + s].ravel(), minlength=len(TOY_CLASSES) + 1)
        label_sets.append([int(v) for v in np.flatnonzero(counts[1:] >= cfg.min_crop_pixels) + 1])
    return PretrainPool(torch.from_numpy(images), label_sets, n_single, n_scene, levels)


def _easier(obj: ToyObject, difficulty: float, size: int) -> ToyObject:
    """``obj`` (a single-object draw) pulled towards an easy template by ``1 - difficulty``.

    ``difficulty=0``: centred, upright (angle 0) and of the middle size; ``1``: ``obj`` itself.
    Centre offset and angle scale linearly, the radius geometrically around the middle size.
    """
    mid = 0.255 * size * _SHAPE_SCALE[obj.shape]
    c = size / 2
    return dataclasses.replace(
        obj,
        cx=c + difficulty * (obj.cx - c),
        cy=c + difficulty * (obj.cy - c),
        angle=difficulty * obj.angle,
        radius=mid * (obj.radius / mid) ** difficulty,
    )


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` (0..7) of the square's symmetry group on the last two dims."""
    if k & 4:
        x = x.flip(-1)
    return torch.rot90(x, k & 3, dims=(-2, -1))


def make_batch(
    cfg: ToyClipConfig, pool: PretrainPool, step: int, tokenizer: SimpleTokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch ``step``: images ``(B, 3, S, S)``, tokens ``(B, L)``, class-set ids ``(B,)``.

    Deterministic in ``(cfg, pool, step)``: a Philox generator seeded with ``(cfg.seed, step)``
    draws ``single_fraction`` / ``crop_fraction`` of the batch without replacement from the
    pool's sections (single objects only from the curriculum levels reached by ``step``, see
    ``curriculum_steps``), a random flip / 90-degree rotation per image (every class is invariant
    to them) and the captions.
    """
    b = cfg.batch_size
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([cfg.seed, 7919, step])))
    level = cfg.curriculum_levels - 1
    if step < cfg.curriculum_steps:
        level = cfg.curriculum_levels * step // cfg.curriculum_steps
    singles = np.flatnonzero(pool.levels <= level)
    n_single, n_scene, n_crop = section_sizes(b, cfg)
    parts = [singles[rng.choice(len(singles), size=n_single, replace=n_single > len(singles))]]
    for n, start, size in (
        (n_scene, pool.n_single, pool.n_scene),
        (n_crop, pool.n_single + pool.n_scene, pool.n_crop),
    ):
        parts.append(start + rng.choice(size, size=n, replace=n > size))
    idx = np.concatenate(parts)
    images = normalize_images(pool.images[torch.from_numpy(idx)])
    aug = rng.integers(0, 8, size=b)
    for k in range(1, 8):
        sel = torch.from_numpy(np.flatnonzero(aug == k))
        if len(sel):
            images[sel] = _dihedral(images[sel], k)
    label_sets = [pool.label_sets[i] for i in idx]
    captions = [random_caption(ls, rng, tokenizer) for ls in label_sets]
    ids = torch.tensor([label_set_id(ls) for ls in label_sets], dtype=torch.int64)
    return images, tokenizer(captions), ids
