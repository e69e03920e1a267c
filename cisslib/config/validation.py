"""Checks on a loaded config beyond types: enumerated values and ranges."""

from __future__ import annotations

from typing import Any

from cisslib.config.presets import PRESETS
from cisslib.config.tree import Config, ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "run.preset": tuple(PRESETS),
    "run.precision": ("auto", "bf16", "fp16", "fp32"),
    "run.progress": ("auto", "bar", "log"),
    "scenario.dataset": ("voc", "ade", "toy"),
    "scenario.mode": ("overlap", "disjoint"),
    "scenario.validate": ("full", "sample", "off"),
    "model.text.templates": ("single", "ensemble"),
    "model.class_head": ("cacp", "query"),
    "model.pixel_norm": ("imagenet", "clip"),
    "loss.gpd_reduction": ("sum", "mean"),
    "loss.gpd_pool_at": ("mask", "feature"),
    "eval.miou_denominator": ("gt_or_pred", "gt"),
    "model.attention": ("auto", "fast_path", "plain"),  # speed (issue 13)
    "train.augment_dtype": ("auto", "float32", "uint8"),
}


def validate(cfg: Config, where: str = "config") -> None:
    """Check enumerated string values and simple ranges."""
    for dotted, allowed in CHOICES.items():
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        if node not in allowed:
            raise ConfigError(
                f"{where}: key '{dotted}' is {node!r}; allowed values: {', '.join(allowed)}"
            )
    positives = {
        "train.batch_size": cfg.train.batch_size,
        "train.crop": cfg.train.crop,
        "train.base.iters": cfg.train.base.iters,
        "train.incremental.iters": cfg.train.incremental.iters,
        "eval.window": cfg.eval.window,
        "eval.stride": cfg.eval.stride,
        "eval.short_side": cfg.eval.short_side,
    }
    for key, value in positives.items():
        if value <= 0:
            raise ConfigError(f"{where}: key '{key}' must be positive, got {value}")
    if cfg.eval.stride > cfg.eval.window:
        raise ConfigError(
            f"{where}: eval.stride ({cfg.eval.stride}) exceeds eval.window ({cfg.eval.window}): "
            "pixels would be skipped; use a stride <= window"
        )
    grid = cfg.model.pos_embed_grid
    if isinstance(grid, str) and grid not in ("crop", "checkpoint"):
        raise ConfigError(
            f"{where}: key 'model.pos_embed_grid' is {grid!r}; use crop, checkpoint or a "
            "positive integer (N x N grid)"
        )
    if isinstance(grid, int) and grid < 1:
        raise ConfigError(f"{where}: key 'model.pos_embed_grid' must be positive, got {grid}")
    threads = cfg.run.threads
    bad_str = isinstance(threads, str) and threads != "auto"
    if bad_str or (isinstance(threads, int) and threads < 1):
        raise ConfigError(
            f"{where}: key 'run.threads' is {threads!r}; use auto or a number of threads >= 1"
        )
    if not cfg.train.short_sides:
        raise ConfigError(f"{where}: key 'train.short_sides' must list at least one size")
