"""A tiny open_clip CLIP pretrained contrastively on the toy world (the toy stand-in for ViT-B/16).

``pretrain_tiny_clip`` trains ``open_clip.model.CLIP(**model_cfg(cfg))`` with a symmetric InfoNCE
loss (learnable logit scale) on a fixed pool of images of the toy world's ``"pretrain"`` stream
(rendered once per run, ``render_pool``; disjoint from the segmentation ``train``/``val``
images; each batch samples it with random flips / 90-degree rotations), paired with captions
built from the class names under several templates ("a photo of a red circle"). Captions that
describe the same set of classes are all positives of each other (multi-positive soft targets).
Pixels are normalised with OpenAI CLIP's mean/std.

The default recipe uses single-object images only, in batches of 32 for 2400 steps (about 3.7
minutes on 2 CPU cores, zero-shot accuracy 0.94 on 1000 held-out images). Whole scenes and
crops of larger scenes with multi-object captions ("a red circle and a blue bar") are options
(``single_fraction``, ``crop_fraction``); in the measured runs they slowed the learning of shape
(the model matched captions by colour). An optional curriculum (``curriculum_steps``) ramps the
single objects from centred, upright, mid-sized shapes to the full distribution.

The checkpoint is cached under ``cache_dir()/toyclip/<hash>.pt`` in cisslib's self-describing
format ``{"format": "cisslib-clip", "model_cfg", "state_dict", "meta"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from tqdm.auto import tqdm

from cisslib import files
from cisslib.constants import CLIP_FILE_FORMAT
from cisslib.data.toyworld import (
    _SHAPE_SCALE,
    GENERATOR_VERSION,
    TOY_CLASSES,
    ToyObject,
    ToyWorld,
    render_scene,
)

log = logging.getLogger("cisslib")

_RECIPE_VERSION = "toyclip-v3"
ZERO_SHOT_TEMPLATE = "a photo of a {}"
SINGLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a {} on a cluttered background",
    "a small {}",
    "a picture of a {}",
    "a {}",
    "a {} shape",
    "a rendering of a {}",
    "a bright {} in the picture",
)
MULTI_TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "a picture of {}", "{} on a background")
BACKGROUND_CAPTIONS: tuple[str, ...] = (
    "a cluttered background",
    "a photo of a cluttered background",
    "an empty textured background",
)


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
    steps: int = 2400  # ~3.7 min on 2 CPU cores
    batch_size: int = 32  # small batches, many steps: learned shape faster than 128 x 600
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    logit_scale_init: float = 30.0  # initial exp(logit_scale) (learnable, clamped to 100)
    seed: int = 0
    threads: int = 2  # fixed torch thread count (results depend on it)
    pool_size: int = 16384  # images rendered once per run; every batch samples from them
    curriculum_steps: int = 0  # single objects' difficulty ramps up (see render_pool)
    curriculum_levels: int = 5  # difficulty levels of the single-object images
    single_fraction: float = 1.0  # share of single-object images in the pool and in a batch
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
        d["recipe"], d["world"] = _RECIPE_VERSION, GENERATOR_VERSION
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


def normalize_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` normalised with OpenAI CLIP mean/std."""
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def multi_caption(labels: list[int], articles: bool = True) -> str:
    """``[1, 8]`` -> ``"a red circle and a blue bar"`` (raw labels, in the given order).

    ``articles=False`` drops the "a": ``"red circle and blue bar"`` (shorter, for long lists).
    """
    names = [f"a {TOY_CLASSES[lab - 1]}" if articles else TOY_CLASSES[lab - 1] for lab in labels]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _caption(labels: list[int], rng: np.random.Generator, tokenizer: SimpleTokenizer) -> str:
    """A random caption of the class set ``labels`` that fits the context length untruncated."""
    if not labels:
        return BACKGROUND_CAPTIONS[int(rng.integers(len(BACKGROUND_CAPTIONS)))]
    if len(labels) == 1:
        return SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))].format(
            TOY_CLASSES[labels[0] - 1]
        )
    labels = [labels[k] for k in rng.permutation(len(labels))]
    fits = [
        text
        for articles in (True, False)
        for t in MULTI_TEMPLATES
        if len(tokenizer.encode(text := t.format(multi_caption(labels, articles))))
        <= tokenizer.context_length - 2
    ]
    if not fits:
        raise ValueError(
            f"no caption of classes {labels} fits context_length={tokenizer.context_length}"
        )
    return fits[int(rng.integers(len(fits)))]


def _label_mask(labels: list[int]) -> int:
    return sum(1 << lab for lab in labels)


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


def _section_sizes(total: int, cfg: ToyClipConfig) -> tuple[int, int, int]:
    n_single = round(total * cfg.single_fraction)
    n_crop = round(total * cfg.crop_fraction)
    return n_single, total - n_single - n_crop, n_crop


def render_pool(cfg: ToyClipConfig) -> PretrainPool:
    """Render ``cfg.pool_size`` images of the toy world's ``"pretrain"`` stream (deterministic).

    Single objects and whole scenes are items ``0 ..`` of their ``image_size`` streams; crops are
    ``image_size`` windows (position from a Philox generator seeded with ``cfg.seed``) of
    ``scene_size`` scenes, naming every class that covers ``min_crop_pixels`` pixels.
    """
    s = cfg.image_size
    n_single, n_scene, n_crop = _section_sizes(cfg.pool_size, cfg)
    single = ToyWorld("pretrain", size=s, length=n_single, seed=cfg.seed, single_object=True)
    scenes = ToyWorld("pretrain", size=s, length=n_scene, seed=cfg.seed)
    big = ToyWorld("pretrain", size=cfg.scene_size, length=n_crop, seed=cfg.seed + 1)
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([cfg.seed, 7919])))
    images = np.empty((cfg.pool_size, s, s, 3), dtype=np.uint8)
    label_sets: list[list[int]] = []
    n_levels = cfg.curriculum_levels if cfg.curriculum_steps else 1
    levels = np.arange(n_single) % n_levels
    for k in range(n_single):
        difficulty = levels[k] / (n_levels - 1) if n_levels > 1 else 1.0
        obj = _easier(single.objects(k)[0], difficulty, s)
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
    n_single, n_scene, n_crop = _section_sizes(b, cfg)
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
    captions = [_caption(ls, rng, tokenizer) for ls in label_sets]
    ids = torch.tensor([_label_mask(ls) for ls in label_sets], dtype=torch.int64)
    return images, tokenizer(captions), ids


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive soft targets.

    ``image_emb``, ``text_emb``: ``(B, D)`` L2-normalised; ``ids``: ``(B,)`` class-set ids. Pair
    ``(i, j)`` is positive when ``ids[i] == ids[j]``; each row's target spreads evenly over its
    positives. Returns the mean of the image->text and text->image cross-entropies.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    pos = (ids[:, None] == ids[None, :]).float()
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def build_model(cfg: ToyClipConfig) -> open_clip.model.CLIP:
    """A freshly initialised tiny CLIP (torch's global seed decides the weights)."""
    model = open_clip.model.CLIP(**model_cfg(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.logit_scale_init))
    return model


def _train(cfg: ToyClipConfig, progress: bool) -> tuple[open_clip.model.CLIP, dict]:
    """Train a tiny CLIP from scratch; returns the model (eval mode) and its meta dict."""
    t0 = time.perf_counter()
    tokenizer = SimpleTokenizer(context_length=cfg.context_length)
    with _deterministic(cfg.threads):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        other = [
            p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)
        ]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": other, "weight_decay": 0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        pool = render_pool(cfg)
        log.info("tiny CLIP: rendered %d images (%.0f s)", cfg.pool_size, time.perf_counter() - t0)
        bar = tqdm(range(cfg.steps), desc="tiny CLIP", disable=not progress, leave=False)
        loss_value = float("nan")
        for step in bar:
            warm = (step + 1) / max(1, cfg.warmup)
            cosine = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(warm, cosine)
            images, tokens, ids = make_batch(cfg, pool, step, tokenizer)
            img = model.encode_image(images, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            loss = contrastive_loss(img, txt, model.logit_scale, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss_value = float(loss.detach())
            if progress:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                log.info(
                    "tiny CLIP step %d/%d loss %.4f logit_scale %.2f (%.0f s)",
                    step + 1,
                    cfg.steps,
                    loss_value,
                    float(model.logit_scale.detach().exp()),
                    time.perf_counter() - t0,
                )
        bar.close()
        model.eval()
        train_seconds = time.perf_counter() - t0
        acc = zero_shot_accuracy(model, tokenizer, n=cfg.eval_n) if cfg.eval_n else float("nan")
    meta = {
        "config": dataclasses.asdict(cfg),
        "config_key": cfg.key(),
        "zero_shot_accuracy": acc,
        "zero_shot": {"n": cfg.eval_n, "split": "val", "seed": 1, "prompt": ZERO_SHOT_TEMPLATE},
        "final_loss": loss_value,
        "seconds": train_seconds,
        "pixel_mean": list(OPENAI_DATASET_MEAN),
        "pixel_std": list(OPENAI_DATASET_STD),
        "pixel_norm": "clip",
        "class_names": list(TOY_CLASSES),
        "world": GENERATOR_VERSION,
        "open_clip": str(open_clip.__version__),
        "torch": str(torch.__version__),
    }
    return model, meta


def checkpoint_path(cfg: ToyClipConfig, cache_dir: str | Path | None = None) -> Path:
    """Where ``pretrain_tiny_clip(cfg)`` caches: ``<cache root>/toyclip/<cfg.key()>.pt``."""
    root = Path(cache_dir) if cache_dir is not None else files.cache_dir()
    return root / "toyclip" / f"{cfg.key()}.pt"


def pretrain_tiny_clip(
    cfg: ToyClipConfig | None = None, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """Path of the pretrained tiny CLIP for ``cfg``, training and caching it on first use."""
    cfg = cfg or ToyClipConfig()
    path = checkpoint_path(cfg, cache_dir)
    if path.exists():
        log.info("tiny CLIP: cached %s", path)
        return path
    log.info("tiny CLIP: pretraining %d steps of %d -> %s", cfg.steps, cfg.batch_size, path)
    model, meta = _train(cfg, progress)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = {
        "format": CLIP_FILE_FORMAT,
        "model_cfg": model_cfg(cfg),
        "state_dict": state,
        "meta": meta,
    }
    files.atomic_torch_save(ckpt, path)
    log.info(
        "tiny CLIP: %.0f s, zero-shot accuracy %.3f, saved %s",
        meta["seconds"],
        meta["zero_shot_accuracy"],
        path,
    )
    return path


def load_tiny_clip(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[open_clip.model.CLIP, SimpleTokenizer]:
    """Load a ``cisslib-clip`` checkpoint: ``(CLIP in eval mode, its tokenizer)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint; create it with pretrain_tiny_clip()")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CLIP_FILE_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: format={found!r}, expected {CLIP_FILE_FORMAT!r}")
    model = open_clip.model.CLIP(**ckpt["model_cfg"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    tokenizer = SimpleTokenizer(context_length=ckpt["model_cfg"]["text_cfg"]["context_length"])
    return model, tokenizer


def checkpoint_meta(path: str | Path) -> dict:
    """The ``meta`` dict of a ``cisslib-clip`` checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


@torch.no_grad()
def zero_shot_predictions(
    model: open_clip.model.CLIP,
    tokenizer: SimpleTokenizer,
    n: int = 1000,
    seed: int = 1,
    image_size: int | None = None,
    batch_size: int = 250,
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot class of ``n`` held-out single-object images (toy ``val`` split, ``seed``).

    Each image gets the class whose prompt ``"a photo of a {name}"`` is nearest over the 20 toy
    classes. Returns ``(truth, predicted)``, int arrays ``(n,)`` of class indices 0..19 (raw label
    minus 1). ``image_size`` defaults to the model's input size.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 (number of zero-shot images)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = image_size or int(model.visual.image_size[0])
    world = ToyWorld("val", size=size, length=n, seed=seed, single_object=True)
    prompts = tokenizer([ZERO_SHOT_TEMPLATE.format(c) for c in TOY_CLASSES]).to(device)
    text = model.encode_text(prompts, normalize=True)
    truth, pred = [], []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        images = np.stack([world.load(i)[0] for i in idx])
        truth.extend(world.objects(i)[0].label - 1 for i in idx)
        emb = model.encode_image(normalize_images(images).to(device), normalize=True)
        pred.append((emb @ text.t()).argmax(dim=1).cpu().numpy())
    model.train(was_training)
    return np.asarray(truth, dtype=np.int64), np.concatenate(pred).astype(np.int64)


def zero_shot_accuracy(
    model: open_clip.model.CLIP,
    tokenizer: SimpleTokenizer,
    n: int = 1000,
    seed: int = 1,
    image_size: int | None = None,
    batch_size: int = 250,
) -> float:
    """Top-1 zero-shot accuracy on ``n`` held-out single-object images (see
    :func:`zero_shot_predictions`)."""
    truth, pred = zero_shot_predictions(model, tokenizer, n, seed, image_size, batch_size)
    return float((truth == pred).mean())


def main(argv: list[str] | None = None) -> None:
    """Pretrain (or load) the tiny CLIP and print path, time and accuracy."""
    parser = argparse.ArgumentParser(description="Pretrain the tiny CLIP on the toy world.")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: cisslib cache)")
    parser.add_argument("--steps", type=int, default=None, help="override ToyClipConfig.steps")
    parser.add_argument("--seed", type=int, default=None, help="override ToyClipConfig.seed")
    parser.add_argument("--eval-n", type=int, default=None, help="override ToyClipConfig.eval_n")
    parser.add_argument("--batch-size", type=int, default=None, help="override batch_size")
    parser.add_argument("--pool-size", type=int, default=None, help="override pool_size")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    pairs = (
        ("steps", args.steps),
        ("seed", args.seed),
        ("eval_n", args.eval_n),
        ("batch_size", args.batch_size),
        ("pool_size", args.pool_size),
    )
    overrides = {k: v for k, v in pairs if v is not None}
    cfg = ToyClipConfig(**overrides)
    path = pretrain_tiny_clip(cfg, cache_dir=args.cache_dir, progress=not args.no_progress)
    meta = checkpoint_meta(path)
    print(f"path: {path}")
    print(f"seconds: {meta['seconds']:.1f}")
    print(f"zero_shot_accuracy: {meta['zero_shot_accuracy']:.4f}")


if __name__ == "__main__":
    main()
