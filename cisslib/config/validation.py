"""Checks on a loaded config beyond types: enumerated values, ranges, and (once the CLIP is known)
the fit of the model keys to it. Everything here runs before any data, model or folder is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
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
    "eval.tau_from": ("fixed", "train"),
    "model.decoder": ("atm", "none"),
    "model.attention": ("auto", "fast_path", "plain"),  # speed (issue 13)
    "train.augment_dtype": ("auto", "float32", "uint8"),
}

#: ``run.device``: auto, cpu, mps, cuda or cuda:N.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

#: Integer keys and their smallest allowed value.
MIN_INT: dict[str, int] = {
    "run.num_workers": 0,
    "run.log_every": 1,
    "run.checkpoint_every": 0,
    "scenario.toy.size": 8,  # the toy world draws shapes of at least a few pixels
    "scenario.toy.train_length": 1,
    "scenario.toy.val_length": 1,
    "scenario.toy.max_objects": 1,
    "scenario.toy.seed": 0,
    "model.num_stages": 1,
    "model.layers_per_stage": 1,
    "model.num_heads": 1,
    "model.ffn_dim": 1,
    "train.batch_size": 1,
    "train.crop": 1,
    "train.max_long": 1,
    "train.base.iters": 1,
    "train.incremental.iters": 1,
    "train.base.warmup_iters": 0,
    "train.incremental.warmup_iters": 0,
    "train.eval_every": 0,
    "eval.short_side": 1,
    "eval.max_long": 1,
    "eval.window": 1,
    "eval.stride": 1,
    "eval.window_batch": 1,
    "eval.max_images": 0,
    "eval.tau_images": 1,
}

#: Float keys: (low, high, low allowed, high allowed); every float must also be finite.
FLOAT_RANGE: dict[str, tuple[float, float, bool, bool]] = {
    "train.base.lr": (0.0, math.inf, False, False),
    "train.incremental.lr": (0.0, math.inf, False, False),
    "train.grad_clip": (0.0, math.inf, False, False),
    "train.head_lr_mult": (0.0, math.inf, False, False),
    "train.poly_power": (0.0, math.inf, True, False),
    "train.weight_decay": (0.0, math.inf, True, False),
    "train.warmup_factor": (0.0, 1.0, True, True),
    "model.dropout": (0.0, 1.0, True, False),
    "loss.ce": (0.0, math.inf, True, False),
    "loss.mask": (0.0, math.inf, True, False),
    "loss.dice": (0.0, math.inf, True, False),
    "loss.gpd": (0.0, math.inf, True, False),
    "loss.qd": (0.0, math.inf, True, False),
    "loss.focal_alpha": (0.0, 1.0, True, True),
    "loss.focal_gamma": (0.0, math.inf, True, False),
    "loss.pseudo_threshold": (0.0, 1.0, True, True),
    "eval.tau": (0.0, 1.0, True, True),
}


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of the config tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _range_text(lo: float, hi: float, lo_ok: bool, hi_ok: bool) -> str:
    if hi == math.inf:
        return f"{'>=' if lo_ok else '>'} {lo:g}"
    return f"in {'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}"


def _check_ranges(values: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: key '{key}' is {value}; give a finite number")
    for key, low in MIN_INT.items():
        if values[key] < low:
            want = "positive" if low == 1 else f">= {low}"
            raise ConfigError(f"{where}: key '{key}' must be {want}, got {values[key]}")
    for key, (lo, hi, lo_ok, hi_ok) in FLOAT_RANGE.items():
        v = values[key]
        inside = (v >= lo if lo_ok else v > lo) and (v <= hi if hi_ok else v < hi)
        if not inside:
            raise ConfigError(
                f"{where}: key '{key}' must be {_range_text(lo, hi, lo_ok, hi_ok)}, got {v}"
            )


def _check_scenario(cfg: Config, where: str) -> None:
    from cisslib.protocol import NUM_CLASSES, Scenario, parse_setting, scenario_setting

    sc = cfg.scenario
    try:
        k, base, inc = parse_setting(sc.dataset, scenario_setting(sc))
    except ValueError as e:
        raise ConfigError(f"{where}: key 'scenario.setting': {e}") from None
    try:
        Scenario(num_classes=k, base=base, increment=inc, order=tuple(sc.order or ()), mode=sc.mode)
    except ValueError as e:
        raise ConfigError(f"{where}: key 'scenario.order': {e}") from None
    names = cfg.model.text.class_names
    if names is not None and len(names) != NUM_CLASSES[sc.dataset]:
        raise ConfigError(
            f"{where}: key 'model.text.class_names' lists {len(names)} names; the "
            f"{sc.dataset} dataset has {NUM_CLASSES[sc.dataset]} classes"
        )


def validate(cfg: Config, where: str = "config") -> None:
    """Check enumerated string values, ranges (no NaN or infinite floats) and the scenario."""
    for dotted, allowed in CHOICES.items():
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        if node not in allowed:
            raise ConfigError(
                f"{where}: key '{dotted}' is {node!r}; allowed values: {', '.join(allowed)}"
            )
    if not DEVICE_PATTERN.match(cfg.run.device):
        raise ConfigError(
            f"{where}: key 'run.device' is {cfg.run.device!r}; use auto, cpu, cuda or cuda:N"
        )
    _check_ranges(dict(leaves(cfg)), where)
    if cfg.eval.stride > cfg.eval.window:
        raise ConfigError(
            f"{where}: eval.stride ({cfg.eval.stride}) exceeds eval.window ({cfg.eval.window}): "
            "pixels would be skipped; use a stride <= window"
        )
    if cfg.scenario.random_order < 0:
        raise ConfigError(
            f"{where}: key 'scenario.random_order' must be 0 (off) or a positive seed, got "
            f"{cfg.scenario.random_order}"
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
    sides = cfg.train.short_sides
    if not sides:
        raise ConfigError(f"{where}: key 'train.short_sides' must list at least one size")
    if any(s < 1 for s in sides):
        raise ConfigError(f"{where}: key 'train.short_sides' must be positive sizes, got {sides}")
    radius = cfg.scenario.toy.radius
    if len(radius) != 2 or not 0.0 < radius[0] <= radius[1] <= 0.5:
        raise ConfigError(
            f"{where}: key 'scenario.toy.radius' is {radius}; give [low, high] with "
            "0 < low <= high <= 0.5 (fractions of scenario.toy.size)"
        )
    if len(cfg.model.out_indices) != cfg.model.num_stages:
        raise ConfigError(
            f"{where}: key 'model.out_indices' {cfg.model.out_indices} gives "
            f"{len(cfg.model.out_indices)} encoder levels for model.num_stages "
            f"{cfg.model.num_stages}; list one block per stage"
        )
    _check_scenario(cfg, where)


def validate_device(cfg: Config, where: str = "config") -> None:
    """``run.device`` names a device this machine has (checked before anything is built)."""
    import torch

    name = cfg.run.device
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(
                f"{where}: key 'run.device' is {name!r} but this machine has {have}; use "
                "run.device=auto or cpu" + (f" or cuda:0..{count - 1}" if count else "")
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: key 'run.device' is 'mps' but MPS is not available; use cpu")


def validate_model(cfg: Config, layers: int, patch: int, embed_dim: int, where: str) -> None:
    """The model keys against the CLIP they build on: ``layers`` transformer blocks, ``patch``
    pixels per token side, ``embed_dim`` (joint space, the decoder width)."""
    m = cfg.model
    idx = [i if i >= 0 else layers + i for i in m.out_indices]
    bad = [raw for raw, i in zip(m.out_indices, idx, strict=True) if not 0 <= i < layers]
    if bad:
        raise ConfigError(
            f"{where}: key 'model.out_indices' {m.out_indices} has {bad[0]}, but the CLIP image "
            f"tower has {layers} blocks (0..{layers - 1}); pick blocks that exist"
        )
    if any(b <= a for a, b in zip(idx, idx[1:], strict=False)):
        raise ConfigError(
            f"{where}: key 'model.out_indices' {m.out_indices} must be increasing blocks"
        )
    if embed_dim % m.num_heads:
        raise ConfigError(
            f"{where}: key 'model.num_heads' {m.num_heads} does not divide the decoder width "
            f"{embed_dim} (the CLIP joint dimension); pick a divisor"
        )
    crop = cfg.train.crop
    if crop % patch:
        lower = max(patch, crop // patch * patch)
        raise ConfigError(
            f"{where}: key 'train.crop' {crop} is not a multiple of the CLIP patch size {patch}; "
            f"use a multiple such as {lower} or {lower + patch}"
        )
