"""The experiment config tree: one dataclass per section (run, scenario, model, loss, train, eval).

Every leaf has a default that reproduces the authors' code (SPEC sections cited beside each group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cisslib.constants import SHORT_SIDES_512, TOY_SCENE_RADIUS


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = ""  # run folder name under out_root; "" = "<params stem>_<preset>"
    params: str = ""  # the params file the run came from (its stem; recorded by cisslib)
    preset: str = "full"  # full | finetune | joint | no_gpd | no_qd | no_cacp
    seed: int = 42  # SPEC 4: SEED 42; drives Python, NumPy, torch and data order
    out_root: str = "outputs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    num_workers: int = 2  # SPEC 4: 2 dataloader workers
    log_every: int = 20  # one log line per this many iterations
    checkpoint_every: int = 200  # resumable checkpoint inside a step every N iterations (0 = off)
    progress: str = "auto"  # auto (tqdm in a terminal or JupyterLab, lines in batch) | bar | log
    # speed (issue 13): nothing here changes a CPU fp32 run's numbers at its default
    # intra-op CPU threads: auto (OMP_NUM_THREADS if set; 1 for models < 5 M parameters; else
    # the cores the workers leave on CUDA, torch's default on CPU) | N. See README "Speed".
    threads: int | str = "auto"
    compile: bool = False  # torch.compile the student's forward (measured: see benchmarks)


@dataclass
class ToyWorldConfig:
    size: int = 128  # image side in pixels
    train_length: int = 2000
    val_length: int = 200
    seed: int = 0
    max_objects: int = 4
    # a scene object's size draw as [low, high] fractions of `size`
    radius: list[float] = field(default_factory=lambda: list(TOY_SCENE_RADIUS))


@dataclass
class ScenarioConfig:
    dataset: str = "toy"  # voc | ade | toy
    setting: str = "15-1"  # a named setting (cisslib settings) or custom "BASE-INC"
    mode: str = "overlap"  # overlap | disjoint (SPEC 3)
    order: list[int] | None = None  # class order (raw labels); None = identity (SPEC 3)
    data_root: str | None = None  # dataset root; None = $CISS_DATA
    validate: str = "sample"  # full | sample | off: checks on the data files at start
    joint: bool = False  # all classes in a single step (the `joint` upper bound)
    # a seeded random class order (PLOP/MiB robustness studies): 0 = off (scenario.order or the
    # identity), N > 0 = the permutation of the classes drawn with seed N
    random_order: int = 0
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)


@dataclass
class ClipConfig:
    name: str = "ViT-B-16"  # open_clip model name
    # path to ViT-B-16.pt / an open_clip file, an open_clip tag, "toy", or None (random)
    pretrained: str | None = None
    model_cfg: dict | None = None  # explicit open_clip CLIP(**model_cfg), for custom sizes


@dataclass
class TextConfig:
    templates: str = "single"  # single ("a photo of a {}", SPEC 1.2) | ensemble (15 templates)
    # an authors'-format .npy (N x D float16) instead of the text encoder
    embeddings: str | None = None
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
    # cacp (SPEC 1.3.5) | query (ZegCLIP's 2-logit head on the final query: no_cacp ablation)
    class_head: str = "cacp"
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
    # atm (the method's decoder) | none (no decoder: score maps from CLIP's dense features against
    # the class texts, nothing trains: the zero_shot baseline)
    decoder: str = "atm"
    freeze_encoder: bool = False  # the CLIP encoder stays frozen at every step (frozen_encoder)
    # speed (issue 13)
    grad_checkpointing: bool = False  # recompute encoder blocks in backward (less memory)
    # encoder attention kernel in no-grad inference: auto (CPU: PyTorch's MHA fast path, as
    # before; CUDA: plain) | fast_path | plain (the scaled-dot-product kernel training uses)
    attention: str = "auto"


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
    short_sides: list[int] = field(default_factory=lambda: list(SHORT_SIDES_512))  # SPEC 4
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
    eval_every: int = (
        0  # evaluations inside a step (only used with select_best_on_val); 0 = end only
    )
    # speed (issue 13): arithmetic of the image augmentation: auto (uint8 when training on CUDA,
    # float32 on CPU) | float32 (float resize and HSV jitter: the numbers of earlier runs) |
    # uint8 (uint8 resize, OpenCV's uint8 HSV and lookup tables as detectron2's
    # ColorAugSSDTransform; several times faster)
    augment_dtype: str = "auto"


@dataclass
class EvalConfig:
    short_side: int = 512  # SPEC 4 test resize
    max_long: int = 2048
    window: int = 512  # sliding window (SPEC 4)
    stride: int = 341
    # windows of an image per forward (speed, issue 13): the scores equal one window at a time
    # (the authors) up to float rounding; 1 = one at a time. Memory grows with it (ADE: about
    # 0.6 GB of scores per 512 x 512 window of 150 classes on the device).
    window_batch: int = 4
    tau: float = 0.5  # with_bg convention: background where max score < tau
    # where with_bg's tau comes from: fixed (eval.tau) | train (after step 0, the value of
    # TAU_GRID with the best with_bg mIoU on eval.tau_images training images of step 0, then
    # kept for every later step; never the val set). threshold.csv records it per step.
    tau_from: str = "fixed"
    tau_images: int = 100
    max_images: int = 0  # evaluate on the first N val images only (0 = all)
    # mIoU denominator: gt_or_pred (authors / detectron2: classes with GT or predicted pixels;
    # a predicted-only class counts as IoU 0) | gt (classes with GT pixels only)
    miou_denominator: str = "gt_or_pred"
    zero_shot_probe: bool = True  # IoU of future classes before they are learned
    shift_diagnostics: bool = True  # prototype-text cosine and drift per class
    calibration_bins: int = 10  # reliability-diagram bins of the CACP presence probabilities


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
