"""The one place that turns the config tree into objects: data, scenario, CLIP, text, model,
losses and schedules."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cisslib.config import Config, ConfigError, StepSchedule
from cisslib.data.membership import class_membership
from cisslib.data.sources import (
    ADE20KSegmentation,
    DatasetError,
    VOCSegmentation,
    resolve_data_root,
)
from cisslib.data.toyworld import ToyWorld
from cisslib.data.transforms import TestTransform, TrainTransform
from cisslib.data.validation import validate_source
from cisslib.engine.evaluator import EvalSettings
from cisslib.losses import CISSCriterion, LossWeights
from cisslib.model import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_segmenter,
    load_clip,
    weights_fingerprint,
)
from cisslib.model.text import (
    ENSEMBLE_TEMPLATES,
    SINGLE_TEMPLATES,
    class_text_embeddings,
    load_text_embeddings,
)
from cisslib.model.zero_shot import ZeroShotSegmenter
from cisslib.protocol import Scenario, parse_setting, random_class_order, scenario_setting
from cisslib.toy.clip import pretrain_tiny_clip

log = logging.getLogger("cisslib")


# --------------------------------------------------------------------------------------------
# data


def build_sources(cfg: Config) -> tuple[Any, Any]:
    """``(train_source, val_source)`` for ``cfg.scenario.dataset``."""
    sc = cfg.scenario
    if sc.dataset == "toy":
        t = sc.toy
        common = dict(size=t.size, seed=t.seed, max_objects=t.max_objects, radius=tuple(t.radius))
        return (
            ToyWorld(split="train", length=t.train_length, **common),
            ToyWorld(split="val", length=t.val_length, **common),
        )
    root = resolve_data_root(sc.data_root)
    cls = VOCSegmentation if sc.dataset == "voc" else ADE20KSegmentation
    return cls(root, split="train"), cls(root, split="val")


#: Items checked by ``scenario.validate: sample`` per split.
VALIDATE_SAMPLE = 200


@dataclass
class RunData:
    """The data of a run: sources, scenario, class names (label order), class membership."""

    train_source: Any
    val_source: Any
    scenario: Scenario
    class_names: list[str]
    membership: np.ndarray


def build_run_data(cfg: Config, progress: bool = False) -> RunData:
    """Sources, scenario, class names, the data checks of ``scenario.validate`` and the
    class-membership matrix (scanned once, cached); every step must have training images."""
    train, val = build_sources(cfg)
    scenario = build_scenario(cfg, len(train.class_names))
    class_names = scenario.label_names(train.class_names)
    for source in (train, val):
        if len(source) == 0:
            raise DatasetError(
                f"{source.name}/{source.split} has no items; check the data root and split lists"
            )
    mode = cfg.scenario.validate
    if mode != "off" and cfg.scenario.dataset != "toy":
        for source in (train, val):
            if mode == "full":
                validate_source(source, check_all=True, progress=progress)
            else:
                validate_source(source, sample=min(VALIDATE_SAMPLE, len(source)), progress=progress)
    membership = class_membership(train, num_workers=max(1, cfg.run.num_workers), progress=progress)
    for t in range(scenario.n_steps):
        if not len(scenario.train_indices(membership, t)):
            names = [train.class_names[c - 1] for c in scenario.step_classes(t)]
            raise DatasetError(
                f"step {t}: no training image of {train.name}/train holds its "
                f"classes {names} ({cfg.scenario.mode} mode); check the data root, the "
                "split list and scenario.setting"
            )
    return RunData(train, val, scenario, class_names, membership)


def build_eval_settings(cfg: Config, num_workers: int) -> EvalSettings:
    """The evaluator's settings from the ``eval`` keys."""
    e = cfg.eval
    return EvalSettings(
        window=e.window, stride=e.stride, window_batch=e.window_batch, tau=e.tau,
        count_pred_only=e.miou_denominator == "gt_or_pred", max_images=e.max_images,
        zero_shot_probe=e.zero_shot_probe, shift_diagnostics=e.shift_diagnostics,
        num_workers=num_workers, calibration_bins=e.calibration_bins,
    )  # fmt: skip


def build_scenario(cfg: Config, num_classes: int) -> Scenario:
    """The class-incremental scenario (``scenario.joint`` = every class in one step)."""
    sc = cfg.scenario
    try:
        k, base, inc = parse_setting(sc.dataset, scenario_setting(sc))
    except ValueError as e:
        raise ConfigError(f"scenario.setting: {e}") from None
    if k != num_classes:
        raise ConfigError(
            f"scenario.setting {sc.setting!r} is for {k} classes but the dataset has {num_classes}"
        )
    order = tuple(sc.order or ())
    if sc.random_order:
        if order:
            raise ConfigError(
                "scenario.random_order and scenario.order are both set; give one of them"
            )
        order = random_class_order(k, sc.random_order)
    try:
        return Scenario(num_classes=k, base=base, increment=inc, order=order, mode=sc.mode)
    except ValueError as e:
        raise ConfigError(f"scenario.order: {e}") from None


def build_transforms(cfg: Config, device_type: str = "cpu") -> tuple[Any, Any]:
    """``(train_transform, test_transform)`` (SPEC 4); ``train.augment_dtype: auto`` is uint8
    when the run trains on CUDA and float32 elsewhere (the numbers of earlier CPU runs)."""
    tr = cfg.train
    dtype = tr.augment_dtype
    if dtype == "auto":
        dtype = "uint8" if device_type == "cuda" else "float32"
    train = TrainTransform(
        crop=tr.crop,
        short_sides=tuple(tr.short_sides),
        max_long=tr.max_long,
        color_jitter=tr.color_jitter,
        hflip=tr.hflip,
        dtype=dtype,
    )
    test = TestTransform(short_side=cfg.eval.short_side, max_long=cfg.eval.max_long)
    return train, test


# --------------------------------------------------------------------------------------------
# model


@dataclass
class ClipBundle:
    model: torch.nn.Module  # the open_clip CLIP (image + text towers)
    tokenizer: Any
    key: str  # identifies the weights, for the text-embedding cache


def build_clip(cfg: Config) -> ClipBundle:
    """Load the CLIP named by ``model.clip`` (``pretrained: toy`` = the embedded tiny CLIP)."""
    c = cfg.model.clip
    pretrained = c.pretrained
    if pretrained == "toy":
        pretrained = str(pretrain_tiny_clip(progress=False))
    model, tokenizer = load_clip(c.name, pretrained=pretrained, model_cfg=c.model_cfg)
    model.eval()
    key = f"{c.name}:{weights_fingerprint(model)}"
    return ClipBundle(model=model, tokenizer=tokenizer, key=key)


def build_text(
    cfg: Config, clip: ClipBundle, class_names: list[str], scenario: Scenario
) -> torch.Tensor:
    """``(K, D)`` float32 text embeddings of every class, in label-space order (SPEC 1.2).

    Row ``c`` belongs to label ``c + 1`` (class ``scenario.order[c]``). Computed once per run from
    the CLIP text tower (disk-cached), or read from an authors'-format ``.npy`` (rows in raw
    label order), never re-read per forward.
    """
    t = cfg.model.text
    names = list(t.class_names) if t.class_names else list(class_names)
    if len(names) != scenario.num_classes:
        raise ConfigError(
            f"model.text.class_names lists {len(names)} names; the dataset has "
            f"{scenario.num_classes} classes"
        )
    dim = int(clip.model.visual.output_dim) if hasattr(clip.model.visual, "output_dim") else None
    if t.embeddings:  # checked against the joint space there: the error names the file
        raw = load_text_embeddings(t.embeddings, num_classes=scenario.num_classes, dim=dim)
    else:
        templates = SINGLE_TEMPLATES if t.templates == "single" else ENSEMBLE_TEMPLATES
        raw = class_text_embeddings(
            clip.model, clip.tokenizer, names, templates, model_key=clip.key
        )
    order = np.asarray(scenario.order) - 1
    text = raw.float()[torch.as_tensor(order)]
    if dim is not None and text.shape[1] != dim:
        raise ConfigError(
            f"text embeddings have dimension {text.shape[1]} but the CLIP joint space has {dim}; "
            "use embeddings made with the same CLIP model"
        )
    return text


def build_model(cfg: Config, clip: ClipBundle) -> torch.nn.Module:
    """The CLIP-CISS segmenter on the CLIP image tower (SPEC 1).

    ``model.decoder: none`` gives the zero-shot baseline (no decoder, nothing trains);
    ``model.freeze_encoder`` keeps the CLIP encoder's weights fixed (the decoder still trains).
    """
    m = cfg.model
    mean, std = (
        (IMAGENET_MEAN, IMAGENET_STD) if m.pixel_norm == "imagenet" else (CLIP_MEAN, CLIP_STD)
    )
    zero_shot = m.decoder == "none"
    model = build_segmenter(
        clip.model,
        out_indices=tuple(m.out_indices),
        num_stages=m.num_stages,
        layers_per_stage=m.layers_per_stage,
        num_heads=m.num_heads,
        ffn_dim=m.ffn_dim,
        dropout=m.dropout,
        class_head=m.class_head,
        pixel_mean=mean,
        pixel_std=std,
        double_cls_embedding=m.double_cls_embedding,
        drop_path_active=m.drop_path_active,
        # zero_shot: the checkpoint's table, interpolated once to each window's grid
        pos_embed_grid=None if zero_shot else pos_embed_grid(cfg, clip.model),
        grad_checkpointing=m.grad_checkpointing,
        attention=m.attention,
    )
    if zero_shot:
        return ZeroShotSegmenter(model.encoder)
    if m.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


def pos_embed_grid(cfg: Config, clip_model: torch.nn.Module) -> tuple[int, int] | None:
    """The trained positional-embedding grid of ``model.pos_embed_grid`` (None: the checkpoint's).

    ``crop`` = the training crop's token grid (authors, SPEC 1.1), e.g. 512 / 16 = 32.
    """
    choice = cfg.model.pos_embed_grid
    if choice == "checkpoint":
        return None
    if choice == "crop":
        patch = int(clip_model.visual.conv1.kernel_size[0])
        if cfg.train.crop % patch:
            raise ConfigError(
                f"train.crop {cfg.train.crop} is not a multiple of the CLIP patch size {patch}; "
                f"use a multiple such as {patch * max(1, cfg.train.crop // patch)}"
            )
        return (cfg.train.crop // patch,) * 2
    return (int(choice), int(choice))


def build_criterion(cfg: Config) -> CISSCriterion:
    lo = cfg.loss
    return CISSCriterion(
        LossWeights(ce=lo.ce, mask=lo.mask, dice=lo.dice, gpd=lo.gpd, qd=lo.qd),
        focal_alpha=lo.focal_alpha,
        focal_gamma=lo.focal_gamma,
        gpd_reduction=lo.gpd_reduction,
        gpd_pool_at=lo.gpd_pool_at,
        pseudo_threshold=lo.pseudo_threshold,
        use_pseudolabels=lo.use_pseudolabels,
        ignore_void_in_masks=lo.ignore_void_in_masks,
        use_gpd=lo.use_gpd,
        use_qd=lo.use_qd,
    )


def step_schedule(cfg: Config, step: int) -> StepSchedule:
    """Iterations, LR and warmup of ``step``: ``train.base`` at 0, then ``train.incremental``.

    The ``joint`` preset (one step over every class) trains at the base LR and warmup for
    :func:`joint_iterations`, the iterations of the whole incremental run it bounds.
    """
    if cfg.scenario.joint:
        base = cfg.train.base
        return StepSchedule(iters=joint_iterations(cfg), lr=base.lr, warmup_iters=base.warmup_iters)
    return cfg.train.base if step == 0 else cfg.train.incremental


def run_iterations(cfg: Config) -> int:
    """Training iterations of a whole run: every step's schedule, summed."""
    k, base, inc = parse_setting(cfg.scenario.dataset, scenario_setting(cfg.scenario))
    n_steps = Scenario(num_classes=k, base=base, increment=inc).n_steps
    return sum(step_schedule(cfg, step).iters for step in range(n_steps))


def joint_iterations(cfg: Config) -> int:
    """``train.base.iters + n_incremental_steps * train.incremental.iters`` of the setting.

    The upper bound sees as many iterations as every incremental preset; with the base schedule
    alone a short schedule would rank it below the incremental runs.
    """
    try:
        k, base, inc = parse_setting(cfg.scenario.dataset, cfg.scenario.setting)
    except ValueError as e:
        raise ConfigError(f"scenario.setting: {e}") from None
    steps = (k - base) // inc if inc else 0
    return cfg.train.base.iters + steps * cfg.train.incremental.iters
