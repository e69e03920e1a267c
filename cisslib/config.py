"""The experiment config: one tree of dataclasses, loaded from ``params/*.yaml`` plus ``--set`` overrides.

Every leaf has a default that reproduces the authors' code (SPEC sections cited beside each group).
Unknown keys and wrong types are errors naming the key and the file. Presets (``run.preset``) set the
switches that turn the full method into a baseline or an ablation; they apply after the YAML file and
before the command-line overrides, so ``--set`` always wins.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cisslib.io import atomic_write_text


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = ""  # run folder name under out_root; "" = "<params stem>_<preset>"
    preset: str = "full"  # full | finetune | joint | no_gpd | no_qd | no_cacp
    seed: int = 42  # SPEC 4: SEED 42; drives Python, NumPy, torch and data order
    out_root: str = "outputs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    num_workers: int = 2  # SPEC 4: 2 dataloader workers
    log_every: int = 20  # one log line per this many iterations
    checkpoint_every: int = 200  # resumable checkpoint inside a step every N iterations (0 = off)
    progress: str = "auto"  # auto (tqdm when stderr is a terminal) | bar | log


@dataclass
class ToyWorldConfig:
    size: int = 128  # image side in pixels
    train_length: int = 2000
    val_length: int = 200
    seed: int = 0
    max_objects: int = 4


@dataclass
class ScenarioConfig:
    dataset: str = "toy"  # voc | ade | toy
    setting: str = "15-1"  # a named setting (cisslib settings) or custom "BASE-INC"
    mode: str = "overlap"  # overlap | disjoint (SPEC 3)
    order: list[int] | None = None  # class order (raw labels); None = identity (SPEC 3)
    data_root: str | None = None  # dataset root; None = $CISS_DATA
    validate: str = "sample"  # full | sample | off: checks on the data files at start
    joint: bool = False  # all classes in a single step (the `joint` upper bound)
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)


@dataclass
class ClipConfig:
    name: str = "ViT-B-16"  # open_clip model name
    pretrained: str | None = None  # path to ViT-B-16.pt / open_clip file, an open_clip tag, "toy", or None
    model_cfg: dict | None = None  # explicit open_clip CLIP(**model_cfg), for custom sizes


@dataclass
class TextConfig:
    templates: str = "single"  # single ("a photo of a {}", SPEC 1.2) | ensemble (15 templates)
    embeddings: str | None = None  # an authors'-format .npy (N x D float16) instead of the text encoder
    class_names: list[str] | None = None  # override the dataset's names used in prompts


@dataclass
class ModelConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    text: TextConfig = field(default_factory=TextConfig)
    out_indices: list[int] = field(default_factory=lambda: [5, 7, 11])  # SPEC 1.1
    num_stages: int = 3  # SPEC 1.3
    layers_per_stage: int = 3
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    class_head: str = "cacp"  # cacp (SPEC 1.3.5) | query (ZegCLIP 2-logit head: the no_cacp ablation)
    pixel_norm: str = "imagenet"  # imagenet (authors, SPEC 1.1) | clip
    double_cls_embedding: bool = True  # authors' quirk (SPEC 1.1)
    drop_path_active: bool = False  # authors build drop path 0.1 but never call it (SPEC 1.1)
    # trained positional-embedding grid: "crop" (authors, SPEC 1.1: the checkpoint's table resized
    # once to train.crop / patch, e.g. 14x14 -> 32x32), "checkpoint" (keep the checkpoint's grid,
    # interpolate in every forward), or an int N (an N x N table)
    pos_embed_grid: int | str = "crop"
    # step-0 segmenter weights (a cisslib step{t}.pt or the authors' model_best.pth) loaded over
    # the CLIP weights before training; the GPD reference stays the original CLIP
    init_weights: str | None = None


@dataclass
class LossConfig:
    ce: float = 5.0  # SPEC 2 weights
    mask: float = 50.0
    dice: float = 1.0
    gpd: float = 1.0  # train.sh value (config default 0.5)
    qd: float = 0.15  # train.sh value (config default 0.2)
    use_gpd: bool = True
    use_qd: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    gpd_reduction: str = "sum"  # sum (authors, SPEC 7.6) | mean
    gpd_pool_at: str = "mask"  # mask (authors: features upsampled to the crop) | feature
    pseudo_threshold: float = 0.0  # SPEC 2/7.7: threshold 0 = the whole image is the denominator
    use_pseudolabels: bool = True
    ignore_void_in_masks: bool = False  # authors: void pixels are negatives of every mask


@dataclass
class StepSchedule:
    iters: int = 25000
    lr: float = 2e-5
    warmup_iters: int = 1500  # SPEC 4 WarmupPolyLR: linear warmup, also at short steps


@dataclass
class TrainConfig:
    batch_size: int = 16  # total over all processes (SPEC 4: 8 GPUs x 2)
    crop: int = 512
    short_sides: list[int] = field(
        default_factory=lambda: [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870,
                                 921, 972, 1024]
    )
    max_long: int = 2048
    color_jitter: bool = True
    hflip: bool = True
    base: StepSchedule = field(default_factory=StepSchedule)  # step 0
    incremental: StepSchedule = field(default_factory=StepSchedule)  # steps >= 1
    warmup_factor: float = 1e-6
    poly_power: float = 0.9
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0  # decoder LR x10 (SPEC 4)
    grad_clip: float = 35.0  # full-model L2 norm clipping
    select_best_on_val: bool = False  # authors carry the val-selected model_best (SPEC 7.2)
    eval_every: int = 0  # evaluations inside a step (only used with select_best_on_val); 0 = end only


@dataclass
class EvalConfig:
    short_side: int = 512  # SPEC 4 test resize
    max_long: int = 2048
    window: int = 512  # sliding window (SPEC 4)
    stride: int = 341
    tau: float = 0.5  # with_bg convention: background where max score < tau
    max_images: int = 0  # evaluate on the first N val images only (0 = all)
    # mIoU denominator: gt_or_pred (authors / detectron2: classes with GT or predicted pixels;
    # a predicted-only class counts as IoU 0) | gt (classes with GT pixels only)
    miou_denominator: str = "gt_or_pred"
    zero_shot_probe: bool = True  # IoU of future classes before they are learned
    shift_diagnostics: bool = True  # prototype-text cosine and drift per class


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Presets: baselines and ablations share the engine (issue 4)
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "finetune": {"loss.use_gpd": False, "loss.use_qd": False},
    "joint": {"scenario.joint": True, "loss.use_qd": False},  # the upper bound
    "no_gpd": {"loss.use_gpd": False},
    "no_qd": {"loss.use_qd": False},
    "no_cacp": {"model.class_head": "query"},
}

PRESET_HELP: dict[str, str] = {
    "full": "the full method: CACP + GPD (step 0: original CLIP reference) + QD",
    "finetune": "no old model, no GPD, no QD: plain fine-tuning step after step",
    "joint": "all classes learned at once in a single step (upper bound); GPD kept",
    "no_gpd": "the full method without Generalization-Preserving Distillation",
    "no_qd": "the full method without Query Distillation",
    "no_cacp": "ZegCLIP's 2-logit classifier on the final query instead of the CACP head",
}

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
}


# --------------------------------------------------------------------------------------------
# Loading, merging, validation
# --------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}' must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: key '{key}' has an unsupported type {tp!r}")  # pragma: no cover


def _merge(node: Any, data: dict, prefix: str, where: str) -> None:
    """Merge a nested dict into a dataclass instance in place, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = _hints(type(node))
    names = {f.name for f in dataclasses.fields(node)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            near = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key '{full}' (valid keys here: {near})")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.", where)
        else:
            setattr(node, key, _coerce(value, hints[key], full, where))


def set_key(cfg: Config, dotted: str, value: Any, where: str = "--set") -> None:
    """Set one dotted key (``train.base.lr``) with type checking."""
    parts = dotted.split(".")
    data: Any = value
    for part in reversed(parts):
        data = {part: data}
    _merge(cfg, data, "", where)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set: '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set: '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string; accept it as a number
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            pass
    return key, value


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
    if not cfg.train.short_sides:
        raise ConfigError(f"{where}: key 'train.short_sides' must list at least one size")


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """Defaults <- YAML file <- preset <- ``--set`` overrides; validated.

    Args:
        path: a params YAML file (``None``: defaults only).
        overrides: strings ``key.sub=value``.
    """
    cfg = Config()
    parsed = [parse_override(o) for o in overrides]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file {path} does not exist; list examples with `ls params/`")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            at = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}{at}: not valid YAML: {getattr(e, 'problem', e)}") from None
        _merge(cfg, data, "", str(path))
    preset = cfg.run.preset
    for key, value in parsed:
        if key == "run.preset":
            preset = value
    if preset not in PRESETS:
        raise ConfigError(f"run.preset is {preset!r}; available presets: {', '.join(PRESETS)}")
    for key, value in PRESETS[preset].items():
        set_key(cfg, key, value, where=f"preset {preset}")
    for key, value in parsed:
        set_key(cfg, key, value)
    validate(cfg, str(path) if path is not None else "config")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, where: str = "config") -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. the one saved in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data, "", where)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, dump_yaml(cfg))
