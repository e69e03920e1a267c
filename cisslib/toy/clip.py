"""A tiny open_clip CLIP pretrained contrastively on the toy world (the toy stand-in for ViT-B/16).

:func:`pretrain_tiny_clip` trains ``open_clip.model.CLIP(**model_cfg(cfg))`` with a symmetric
InfoNCE loss (learnable logit scale) on the fixed image pool of :mod:`cisslib.toy.pool`, paired
with the captions of :mod:`cisslib.toy.captions`. Captions that describe the same set of classes
are all positives of each other (multi-positive soft targets). Pixels are normalised with OpenAI
CLIP's mean/std. The model is cached under ``cache_dir()/toyclip/<recipe hash>.pt`` in the one
CLIP file format of :func:`cisslib.model.clip.save_clip` (plus a ``meta`` entry: the recipe, the
zero-shot accuracy, the seconds it took) and loads with :func:`cisslib.model.clip.load_clip`.
The default recipe's weights ship in ``cisslib/toy/weights/`` (compact, :mod:`cisslib.toy.shipped`)
and fill an empty cache in seconds; ``cisslib toy-clip --force`` retrains them and says whether
they reproduced.
The recipe, its measured accuracy and time are in the README ("The embedded toy world").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from tqdm.auto import tqdm

from cisslib import files
from cisslib.data.toyworld import GENERATOR_VERSION, TOY_CLASSES, ToyWorld
from cisslib.model.clip import save_clip
from cisslib.toy.captions import ZERO_SHOT_TEMPLATE
from cisslib.toy.pool import make_batch, normalize_images, render_pool
from cisslib.toy.recipe import ToyClipConfig, model_cfg
from cisslib.toy.shipped import expand, read_shipped, state_digest, write_shipped

log = logging.getLogger("cisslib")


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
    """Fixed thread count and deterministic kernels inside, the caller's settings after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def new_tiny_clip(cfg: ToyClipConfig) -> open_clip.model.CLIP:
    """A freshly initialised tiny CLIP (torch's global seed decides the weights)."""
    model = open_clip.model.CLIP(**model_cfg(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.logit_scale_init))
    return model


def _optimizer(model: torch.nn.Module, cfg: ToyClipConfig) -> torch.optim.AdamW:
    """AdamW (CLIP's betas and eps), weight decay on matrices other than embeddings."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": other, "weight_decay": 0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def _train(
    cfg: ToyClipConfig, progress: bool, stop_after: int | None = None
) -> tuple[open_clip.model.CLIP, float, float]:
    """Train a tiny CLIP from scratch: ``(model in eval mode, final loss, seconds)``.
    ``stop_after``: leave the loop after that many steps of the ``cfg.steps`` schedule."""
    t0 = time.perf_counter()
    tokenizer = SimpleTokenizer(context_length=cfg.context_length)
    torch.manual_seed(cfg.seed)
    model = new_tiny_clip(cfg)
    model.train()
    opt = _optimizer(model, cfg)
    pool = render_pool(cfg)
    log.info("tiny CLIP: rendered %d images (%.0f s)", cfg.pool_size, time.perf_counter() - t0)
    steps = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(steps), desc="tiny CLIP", disable=not progress, leave=False)
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
            scale = float(model.logit_scale.detach().exp())
            log.info("tiny CLIP step %d/%d loss %.4f logit_scale %.2f (%.0f s)", step + 1,
                     cfg.steps, loss_value, scale, time.perf_counter() - t0)  # fmt: skip
    bar.close()
    model.eval()
    return model, loss_value, time.perf_counter() - t0


def _meta(cfg: ToyClipConfig, accuracy: float, final_loss: float, seconds: float) -> dict:
    """What the cached file records besides the weights."""
    return {
        "config": dataclasses.asdict(cfg),
        "config_key": cfg.key(),
        "zero_shot_accuracy": accuracy,
        "zero_shot": {"n": cfg.eval_n, "split": "val", "seed": 1, "prompt": ZERO_SHOT_TEMPLATE},
        "final_loss": final_loss,
        "seconds": seconds,
        "pixel_mean": list(OPENAI_DATASET_MEAN),
        "pixel_std": list(OPENAI_DATASET_STD),
        "pixel_norm": "clip",
        "class_names": list(TOY_CLASSES),
        "world": GENERATOR_VERSION,
        "open_clip": str(open_clip.__version__),
        "torch": str(torch.__version__),
    }


#: The default recipe's weights ship with cisslib (:mod:`cisslib.toy.shipped`), named by its config
#: key, so that a run or the demo need not pretrain: the first use rebuilds them into the cache.
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
#: Steps of the default recipe whose weights' digest the shipped file records
#: (:func:`prefix_digest`): the test suite retrains that far (under a minute), not the whole recipe.
PREFIX_STEPS = 200


def checkpoint_path(cfg: ToyClipConfig, cache_dir: str | Path | None = None) -> Path:
    """Where ``pretrain_tiny_clip(cfg)`` caches: ``<cache root>/toyclip/<cfg.key()>.pt``."""
    root = Path(cache_dir) if cache_dir is not None else files.cache_dir()
    return root / "toyclip" / f"{cfg.key()}.pt"


def shipped_path(cfg: ToyClipConfig) -> Path | None:
    """The shipped weights of ``cfg`` (``SHIPPED_DIR/<cfg.key()>.pt``), or None when none ship."""
    path = SHIPPED_DIR / f"{cfg.key()}.pt"
    return path if path.is_file() else None


def initial_state(cfg: ToyClipConfig) -> dict:
    """The state dict pretraining starts from (the recipe's seed; the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]), _deterministic(cfg.threads):
        torch.manual_seed(cfg.seed)
        return new_tiny_clip(cfg).state_dict()


def shipped_state(cfg: ToyClipConfig) -> tuple[dict, dict] | None:
    """``(full state dict, meta)`` of the shipped weights of ``cfg``; None when none ship or
    they do not rebuild here (logged)."""
    path = shipped_path(cfg)
    if path is None:
        return None
    obj = read_shipped(path)
    state = expand(obj, initial_state(cfg))
    if state is None:
        log.warning("tiny CLIP: the shipped weights %s do not rebuild with torch %s (other "
                    "initial values); pretraining instead", path, torch.__version__)  # fmt: skip
        return None
    return state, obj["meta"]


def pretrain_tiny_clip(
    cfg: ToyClipConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Path of the tiny CLIP of ``cfg`` in the cache: the cached file; else the shipped weights
    rebuilt into it (seconds); else trained now. ``force``: train now and replace the entry."""
    cfg = cfg or ToyClipConfig()
    path = checkpoint_path(cfg, cache_dir)
    if not force and path.exists():
        log.info("tiny CLIP: cached %s", path)
        return path
    shipped = None if force else shipped_state(cfg)
    if shipped is not None:
        with torch.random.fork_rng(devices=[]):  # its initial values are overwritten
            model = new_tiny_clip(cfg)
        model.load_state_dict(shipped[0])
        save_clip(model, model_cfg(cfg), path, meta={**shipped[1], "shipped": True})
        log.info("tiny CLIP: the shipped weights -> %s", path)
        return path
    log.info("tiny CLIP: pretraining %d steps of %d -> %s", cfg.steps, cfg.batch_size, path)
    with _deterministic(cfg.threads):
        model, final_loss, seconds = _train(cfg, progress)
        tokenizer = SimpleTokenizer(context_length=cfg.context_length)
        acc = zero_shot_accuracy(model, tokenizer, n=cfg.eval_n) if cfg.eval_n else float("nan")
    save_clip(model, model_cfg(cfg), path, meta=_meta(cfg, acc, final_loss, seconds))
    log.info("tiny CLIP: %.0f s, zero-shot accuracy %.3f, saved %s", seconds, acc, path)
    return path


def write_shipped_weights(path: str | Path, cfg: ToyClipConfig | None = None) -> Path:
    """Write the shipped file of ``cfg`` (default recipe) from its trained cisslib-clip file
    ``path`` (maintainers, after a recipe change: ``cisslib toy-clip --force --write-shipped``)."""
    cfg = cfg or ToyClipConfig()
    out = SHIPPED_DIR / f"{cfg.key()}.pt"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    meta = {**obj.get("meta", {}), "prefix": {"steps": PREFIX_STEPS, "digest": prefix_digest(cfg)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shipped(out, obj["state_dict"], initial_state(cfg), obj["model_cfg"], meta)
    return out


def prefix_digest(cfg: ToyClipConfig, steps: int = PREFIX_STEPS) -> str:
    """:func:`~cisslib.toy.shipped.state_digest` of the weights after the first ``steps`` steps of
    pretraining ``cfg`` (its schedule unchanged): what the shipped file records so that a short
    run checks the recipe still reproduces here (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]), _deterministic(cfg.threads):
        model = _train(cfg, progress=False, stop_after=steps)[0]
    return state_digest(model.state_dict())


def shipped_difference(path: str | Path, cfg: ToyClipConfig | None = None) -> float | None:
    """How far the cisslib-clip file ``path`` is from the shipped weights of ``cfg`` (default
    recipe): :func:`weights_difference`; None when none ship (or they do not rebuild here)."""
    shipped = shipped_state(cfg or ToyClipConfig())
    if shipped is None:
        return None
    trained = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return weights_difference(trained, shipped[0])


def weights_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts (0.0: equal; ``inf`` when their
    tensors differ in names or shapes)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return math.inf
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


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
