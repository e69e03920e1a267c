"""The cases of :mod:`hostile`, by class: config, data, weights, embeddings, faults, folders,
caches. Each returns a verdict (``clean`` / ``traceback`` / ``wrong`` / ``lost``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hostile import (
    LIMIT_S,
    SMOKE,
    Unavailable,
    World,
    accepted,
    case,
    changed,
    cli,
    enospc,
    forked,
    read_only,
    refused,
    resumed,
    run_forked,
    same_tables,
    smoke,
    snapshot,
    truncate,
    voc_sets,
    write_label,
)

HOST = socket.gethostname()


@contextlib.contextmanager
def patched(obj: object, name: str, value: object):
    missing = object()
    old = getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def _first_unclean(*verdicts: str) -> str:
    return next((v for v in verdicts if v != "clean"), "clean")


# ============================================================================ config
# (overrides, words the one error line must hold)
CONFIG_REFUSED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lr_nan": (("train.base.lr=nan",), ("train.base.lr",)),
    "lr_negative": (("train.base.lr=-1e-4",), ("train.base.lr",)),
    "lr_zero": (("train.base.lr=0",), ("train.base.lr",)),
    "lr_inf_incremental": (("train.incremental.lr=.inf",), ("train.incremental.lr",)),
    "log_every_zero": (("run.log_every=0",), ("run.log_every",)),
    "log_every_negative": (("run.log_every=-5",), ("run.log_every",)),
    "num_workers_negative": (("run.num_workers=-1",), ("run.num_workers",)),
    "checkpoint_every_negative": (("run.checkpoint_every=-1",), ("run.checkpoint_every",)),
    "warmup_negative": (("train.base.warmup_iters=-1",), ("train.base.warmup_iters",)),
    "warmup_negative_incremental": (
        ("train.incremental.warmup_iters=-3",),
        ("train.incremental.warmup_iters",),
    ),
    "eval_every_negative": (("train.eval_every=-1",), ("train.eval_every",)),
    "tau_nan": (("eval.tau=nan",), ("eval.tau",)),
    "tau_above_one": (("eval.tau=1.5",), ("eval.tau",)),
    "max_images_negative": (("eval.max_images=-1",), ("eval.max_images",)),
    "out_indices_beyond_depth": (("model.out_indices=[0, 1, 9]",), ("model.out_indices", "9")),
    "out_indices_decreasing": (("model.out_indices=[2, 1, 0]",), ("model.out_indices",)),
    "out_indices_fewer_than_stages": (("model.out_indices=[0, 1]",), ("model.out_indices",)),
    "out_indices_negative_beyond": (("model.out_indices=[-5, 1, 2]",), ("model.out_indices",)),
    "short_sides_zero": (("train.short_sides=[0, 48]",), ("train.short_sides",)),
    "short_sides_negative": (("train.short_sides=[-48]",), ("train.short_sides",)),
    "short_sides_empty": (("train.short_sides=[]",), ("train.short_sides",)),
    "toy_radius_reversed": (("scenario.toy.radius=[0.3, 0.1]",), ("scenario.toy.radius",)),
    "toy_radius_one_value": (("scenario.toy.radius=[0.2]",), ("scenario.toy.radius",)),
    "toy_radius_too_big": (("scenario.toy.radius=[0.1, 0.9]",), ("scenario.toy.radius",)),
    "device_typo": (("run.device=gpu",), ("run.device", "gpu")),
    "device_bad_index": (("run.device=cuda:x",), ("run.device",)),
    "device_absent_gpu": (("run.device=cuda:99",), ("run.device", "cuda:99")),
    "toy_size_zero": (("scenario.toy.size=0",), ("scenario.toy.size",)),
    "toy_size_too_small": (("scenario.toy.size=4",), ("scenario.toy.size",)),
    "toy_train_length_zero": (("scenario.toy.train_length=0",), ("scenario.toy.train_length",)),
    "toy_val_length_zero": (("scenario.toy.val_length=0",), ("scenario.toy.val_length",)),
    "toy_max_objects_zero": (("scenario.toy.max_objects=0",), ("scenario.toy.max_objects",)),
    "toy_seed_negative": (("scenario.toy.seed=-1",), ("scenario.toy.seed",)),
    "crop_not_patch_multiple": (("train.crop=50",), ("train.crop", "8")),
    "crop_not_patch_multiple_checkpoint_grid": (
        ("train.crop=50", "model.pos_embed_grid=checkpoint"),
        ("train.crop", "8"),
    ),
    "batch_size_zero": (("train.batch_size=0",), ("train.batch_size",)),
    "max_long_zero": (("train.max_long=0",), ("train.max_long",)),
    "eval_max_long_zero": (("eval.max_long=0",), ("eval.max_long",)),
    "stride_zero": (("eval.stride=0",), ("eval.stride",)),
    "stride_above_window": (("eval.stride=600",), ("eval.stride",)),
    "loss_weight_negative": (("loss.ce=-1",), ("loss.ce",)),
    "loss_weight_nan": (("loss.gpd=nan",), ("loss.gpd",)),
    "focal_gamma_nan": (("loss.focal_gamma=nan",), ("loss.focal_gamma",)),
    "pseudo_threshold_nan": (("loss.pseudo_threshold=nan",), ("loss.pseudo_threshold",)),
    "grad_clip_nan": (("train.grad_clip=nan",), ("train.grad_clip",)),
    "grad_clip_zero": (("train.grad_clip=0",), ("train.grad_clip",)),
    "poly_power_nan": (("train.poly_power=nan",), ("train.poly_power",)),
    "warmup_factor_negative": (("train.warmup_factor=-1",), ("train.warmup_factor",)),
    "weight_decay_negative": (("train.weight_decay=-0.01",), ("train.weight_decay",)),
    "head_lr_mult_zero": (("train.head_lr_mult=0",), ("train.head_lr_mult",)),
    "dropout_above_one": (("model.dropout=1.5",), ("model.dropout",)),
    "num_heads_not_dividing": (("model.num_heads=3",), ("model.num_heads",)),
    "num_stages_zero": (("model.num_stages=0", "model.out_indices=[]"), ("model.num_stages",)),
    "layers_per_stage_zero": (("model.layers_per_stage=0",), ("model.layers_per_stage",)),
    "ffn_dim_zero": (("model.ffn_dim=0",), ("model.ffn_dim",)),
    "pos_embed_grid_zero": (("model.pos_embed_grid=0",), ("model.pos_embed_grid",)),
    "setting_garbage": (("scenario.setting=15-x",), ("scenario.setting",)),
    "setting_too_many_classes": (("scenario.setting=30-1",), ("scenario.setting",)),
    "order_duplicates": (("scenario.order=[1, 1, 2]",), ("scenario.order",)),
    "class_names_wrong_count": (("model.text.class_names=[a, b]",), ("model.text.class_names",)),
    "clip_unknown_name": (("model.clip.model_cfg=null", "model.clip.name=ViT-Nope"), ("ViT-Nope",)),
    "clip_model_cfg_incomplete": (
        ("model.clip.model_cfg={embed_dim: 32}",),
        ("model.clip.model_cfg",),
    ),
    "clip_pretrained_neither_file_nor_tag": (
        ("model.clip.pretrained=nonsense",),
        ("model.clip.pretrained", "nonsense"),
    ),
    "precision_unknown": (("run.precision=fp8",), ("run.precision",)),
    "unknown_key": (("train.bse.iters=3",), ("train.bse",)),
    "wrong_type": (("train.batch_size=two",), ("train.batch_size",)),
    "set_without_equals": (("train",), ("--set",)),
    "voc_without_data_root": (
        ("scenario.dataset=voc", "scenario.setting=15-5", "scenario.data_root=null"),
        ("scenario.data_root", "CISS_DATA"),
    ),
}


def _config_case(sets: tuple[str, ...], needles: tuple[str, ...]):
    def body(w: World) -> str:
        out = w.out()
        return refused(cli(*smoke(out, *sets)), needles, absent=[out])

    return body


for _name, (_sets, _needles) in CONFIG_REFUSED.items():
    case("config", _name)(_config_case(_sets, _needles))


def _steps_case(steps: str):
    def body(w: World) -> str:
        out = w.out()
        return refused(cli(*smoke(out, extra=["--steps", steps])), ["--steps"], absent=[out])

    return body


for _steps in ("5", "1-0", "a-b", "-1", "0-7"):
    case("config", f"steps_{_steps}")(_steps_case(_steps))


def _params_case(text: str):
    def body(w: World) -> str:
        params = w.tmp("params") / "mine.yaml"
        params.write_text(text)
        out = w.out()
        return refused(cli("run", params, "--out", out), [str(params)], absent=[out])

    return body


for _name, _text in {
    "params_empty": "",
    "params_comments_only": "# my scenario\n# (to be written)\n",
    "params_a_list": "- run\n- scenario\n",
    "params_bad_yaml": "run: {seed: [\n",
    "params_null_section": "run:\n",
}.items():
    case("config", _name)(_params_case(_text))


@case("config")
def case_params_missing(w: World) -> str:
    out = w.out()
    return refused(cli("run", w.tmp() / "nope.yaml", "--out", out), ["nope.yaml"], absent=[out])


def _load(*args) -> tuple[object, Exception | None]:
    from cisslib.config import load_config

    try:
        return load_config(*args), None
    except Exception as e:  # noqa: BLE001
        return None, e


@case("config")
def case_validate_off_in_file(w: World) -> str:
    params = w.tmp("params") / "off.yaml"
    params.write_text(SMOKE.read_text().replace("scenario:\n", "scenario:\n  validate: off\n", 1))
    cfg, err = _load(params)
    return "clean" if err is None and cfg.scenario.validate == "off" else "wrong"


@case("config")
def case_validate_off_override(w: World) -> str:
    cfg, err = _load(SMOKE, ["scenario.validate=off"])
    return "clean" if err is None and cfg.scenario.validate == "off" else "wrong"


# ============================================================================ data
def _voc_refused(w: World, root: Path, needles, *sets: str) -> str:
    out = w.out()
    return refused(cli(*smoke(out, *voc_sets(root, *sets))), needles, absent=[out])


def _label_path(root: Path, i: int) -> Path:
    return root / "VOC2012" / "SegmentationClassAug" / f"2008_{i:06d}.png"


def _image_path(root: Path, i: int) -> Path:
    return root / "VOC2012" / "JPEGImages" / f"2008_{i:06d}.jpg"


@case("data")
def case_voc_data_root_missing(w: World) -> str:
    return _voc_refused(w, w.tmp() / "nowhere", ["nowhere"])


@case("data")
def case_voc_data_root_is_a_file(w: World) -> str:
    f = w.tmp() / "file"
    f.write_text("x")
    return _voc_refused(w, f, [str(f)])


@case("data")
def case_voc_no_split_list(w: World) -> str:
    root = w.voc()
    shutil.rmtree(root / "VOC2012" / "splits")
    return _voc_refused(w, root, ["train_aug.txt"])


@case("data")
def case_voc_bad_split_line(w: World) -> str:
    root = w.voc()
    lst = root / "VOC2012" / "splits" / "train_aug.txt"
    lst.write_text(lst.read_text() + "only-one-field.jpg\n")
    return _voc_refused(w, root, ["train_aug.txt"])


@case("data")
def case_voc_empty_split_list(w: World) -> str:
    root = w.voc()
    (root / "VOC2012" / "splits" / "train_aug.txt").write_text("")
    return _voc_refused(w, root, ["voc/train"])


@case("data")
def case_voc_empty_split_list_validate_off(w: World) -> str:
    root = w.voc()
    (root / "VOC2012" / "splits" / "train_aug.txt").write_text("")
    return _voc_refused(w, root, ["voc/train"], "scenario.validate=off")


@case("data")
def case_voc_missing_image(w: World) -> str:
    root = w.voc()
    _image_path(root, 3).unlink()
    return _voc_refused(w, root, ["2008_000003.jpg"])


@case("data")
def case_voc_missing_label(w: World) -> str:
    root = w.voc()
    _label_path(root, 4).unlink()
    return _voc_refused(w, root, ["2008_000004.png"])


@case("data")
def case_voc_corrupt_image(w: World) -> str:
    root = w.voc()
    _image_path(root, 2).write_bytes(b"\xff\xd8\xff garbage")
    return _voc_refused(w, root, ["2008_000002.jpg"])


@case("data")
def case_voc_rgb_label(w: World) -> str:
    from PIL import Image

    root = w.voc()
    Image.new("RGB", (16, 16), (128, 0, 0)).save(_label_path(root, 5))
    return _voc_refused(w, root, ["2008_000005.png"])


@case("data")
def case_voc_label_out_of_range(w: World) -> str:
    root = w.voc()
    lab = np.full((16, 16), 40, np.uint8)
    write_label(_label_path(root, 6), lab)
    return _voc_refused(w, root, ["2008_000006.png", "40"])


@case("data")
def case_voc_size_mismatch(w: World) -> str:
    root = w.voc()
    write_label(_label_path(root, 7), np.ones((12, 16), np.uint8))
    return _voc_refused(w, root, ["2008_000007.png"])


@case("data")
def case_voc_corrupt_label_outside_the_sample(w: World) -> str:
    """validate: sample checks 200 items; the corrupt label is one it does not check."""
    root = w.voc(n_train=230, n_val=2)
    picked = set(np.random.default_rng(0).choice(230, size=200, replace=False).tolist())
    i = next(i for i in range(230) if i not in picked)
    _label_path(root, i).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return _voc_refused(w, root, [_label_path(root, i).name])


@case("data")
def case_voc_corrupt_label_validate_off(w: World) -> str:
    root = w.voc()
    _label_path(root, 1).write_bytes(b"not a png")
    return _voc_refused(w, root, ["2008_000001.png"], "scenario.validate=off")


@case("data")
def case_voc_missing_label_validate_off(w: World) -> str:
    root = w.voc()
    _label_path(root, 8).unlink()
    return _voc_refused(w, root, ["2008_000008.png"], "scenario.validate=off")


@case("data")
def case_voc_step_without_training_images(w: World) -> str:
    """No training label holds a class of step 1 (16..20): the step cannot train."""
    root = w.voc()
    for i in range(12):
        lab = np.zeros((16, 16), np.uint8)
        lab[3:9, 3:9] = 1 + i % 15
        write_label(_label_path(root, i), lab)
    return _voc_refused(w, root, ["step 1"])


# ============================================================================ weights
def _weights_case(kind: str, make):
    key = "model.clip.pretrained" if kind == "clip" else "model.init_weights"

    def body(w: World) -> str:
        path = make(w, w.tmp("weights"))
        out = w.out()
        return refused(cli(*smoke(out, f"{key}={path}")), [Path(path).name], absent=[out])

    return body


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _torch_file(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _reshaped_step0(w: World, d: Path) -> Path:
    state = torch.load(w.reference() / "checkpoints" / "step0.pt", weights_only=False)
    key = next(k for k in state["model"] if k.startswith("decoder.") and k.endswith(".weight"))
    state["model"][key] = torch.zeros(3, 3)
    return _torch_file(d / "reshaped.pt", state)


WEIGHTS = {
    "clip_truncated": ("clip", lambda w, d: truncate(w.clip_file(), d / "clip.pt")),
    "clip_text_file": ("clip", lambda w, d: _write(d / "clip.pt", b"ViT-B-16 weights here\n")),
    "clip_empty_file": ("clip", lambda w, d: _write(d / "clip.pt", b"")),
    "clip_pickled_list": ("clip", lambda w, d: _torch_file(d / "clip.pt", [1, 2, 3])),
    "clip_dict_of_strings": ("clip", lambda w, d: _torch_file(d / "clip.pt", {"a": "b"})),
    "clip_numpy_array": ("clip", lambda w, d: _write(d / "clip.pt", _npy(np.ones(3)))),
    "clip_wrong_width": ("clip", lambda w, d: w.clip_file(width=64, head_width=16)),
    "clip_wrong_patch": ("clip", lambda w, d: w.clip_file(patch_size=16)),
    "clip_given_a_step_checkpoint": ("clip", lambda w, d: w.reference() / "checkpoints/step0.pt"),
    "clip_directory": ("clip", lambda w, d: d),
    "clip_missing_file": ("clip", lambda w, d: d / "missing.pt"),
    "init_truncated": (
        "init",
        lambda w, d: truncate(w.reference() / "checkpoints/step0.pt", d / "s0.pt"),
    ),
    "init_text_file": ("init", lambda w, d: _write(d / "s0.pt", b"weights\n")),
    "init_missing": ("init", lambda w, d: d / "missing.pt"),
    "init_directory": ("init", lambda w, d: d),
    "init_clip_file": ("init", lambda w, d: w.clip_file()),
    "init_wrong_shapes": ("init", _reshaped_step0),
    "init_pickled_list": ("init", lambda w, d: _torch_file(d / "s0.pt", [1, 2])),
}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


for _name, (_kind, _make) in WEIGHTS.items():
    case("weights", _name)(_weights_case(_kind, _make))


def _resume_with(w: World, name: str, damage) -> str:
    run = w.copy(w.killed(1))
    target = run / "checkpoints" / name
    damage(target)
    before = snapshot(run)
    res = cli(*smoke(run, extra=["--resume"]))
    return refused(res, [name], keep=(run, before))


@case("weights")
def case_resume_truncated_last_pt(w: World) -> str:
    return _resume_with(w, "last.pt", lambda p: truncate(p, p))


@case("weights")
def case_resume_text_as_last_pt(w: World) -> str:
    return _resume_with(w, "last.pt", lambda p: p.write_text("resume here\n"))


@case("weights")
def case_resume_truncated_step0_pt(w: World) -> str:
    return _resume_with(w, "step0.pt", lambda p: truncate(p, p))


@case("weights")
def case_resume_truncated_reference_prototypes(w: World) -> str:
    return _resume_with(w, "reference_prototypes.pt", lambda p: truncate(p, p, 0.3))


# ============================================================================ embeddings
def _emb_case(make, needles=()):
    def body(w: World) -> str:
        path = make(w.tmp("emb"))
        out = w.out()
        res = cli(*smoke(out, f"model.text.embeddings={path}"))
        return refused(res, [Path(path).name, *needles], absent=[out])

    return body


def _save_npy(path: Path, arr: np.ndarray, allow_pickle: bool = False) -> Path:
    np.save(path, arr, allow_pickle=allow_pickle)
    return path


def _good(rows: int = 20, dim: int = 32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)


def _with(arr: np.ndarray, i: int, j: int, value: float) -> np.ndarray:
    arr = arr.copy()
    arr[i, j] = value
    return arr


EMBEDDINGS = {
    "emb_text_file": (lambda d: _write(d / "t.npy", b"aeroplane 0.1 0.2\n"), ()),
    "emb_truncated": (lambda d: truncate(_save_npy(d / "t.npy", _good()), d / "t.npy", 0.6), ()),
    "emb_nan": (lambda d: _save_npy(d / "t.npy", _with(_good(), 3, 4, np.nan)), ("nan",)),
    "emb_inf": (lambda d: _save_npy(d / "t.npy", _with(_good(), 0, 0, np.inf)), ()),
    "emb_zero_row": (lambda d: _save_npy(d / "t.npy", _with(_good(), 2, slice(None), 0)), ()),
    "emb_1d": (lambda d: _save_npy(d / "t.npy", np.ones(32, np.float32)), ()),
    "emb_3d": (lambda d: _save_npy(d / "t.npy", np.ones((20, 32, 1), np.float32)), ()),
    "emb_integers": (lambda d: _save_npy(d / "t.npy", np.ones((20, 32), np.int64)), ()),
    "emb_too_few_rows": (lambda d: _save_npy(d / "t.npy", _good(10)), ("10",)),
    "emb_wrong_dim": (lambda d: _save_npy(d / "t.npy", _good(20, 16)), ("16",)),
    "emb_object_array": (
        lambda d: _save_npy(d / "t.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
        (),
    ),
    "emb_missing": (lambda d: d / "missing.npy", ()),
    "emb_directory": (lambda d: d, ()),
}

for _name, (_make, _needles) in EMBEDDINGS.items():
    case("embeddings", _name)(_emb_case(_make, _needles))


# ============================================================================ faults
def _no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*.tmp")] if root.exists() else True


def _disk_full_then_resume(w: World, fail) -> str:
    """A fresh run whose writes hit a full disk where ``fail(path)`` says; then space is freed
    and ``--resume`` must end with the uninterrupted run's tables and weights."""
    import builtins

    import cisslib.runs as runs

    out = w.out()
    real_open, real_save = builtins.open, torch.save

    def full_open(file, mode="r", *a, **k):
        if ("w" in mode or "a" in mode) and fail(Path(file)):
            raise enospc(file)
        return real_open(file, mode, *a, **k)

    def full_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and fail(Path(f)):
            raise enospc(f)
        return real_save(obj, f, *a, **k)

    with patched(runs, "open", full_open), patched(torch, "save", full_save):
        res = cli(*smoke(out))
    first = refused(res, ["no space left"], quiet=False)
    if first == "clean" and not _no_temp_files(out):
        first = "wrong"
    again = cli(*smoke(out, extra=["--resume"]))
    return _first_unclean(first, resumed(again, out, w.reference()))


@case("faults")
def case_disk_full_at_a_table(w: World) -> str:
    return _disk_full_then_resume(w, lambda p: "summary.csv" in p.name)


@case("faults")
def case_disk_full_at_the_resume_point(w: World) -> str:
    return _disk_full_then_resume(w, lambda p: "last.pt" in p.name)


@case("faults")
def case_disk_full_at_a_step_checkpoint(w: World) -> str:
    return _disk_full_then_resume(w, lambda p: "step1.pt" in p.name)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` (root only; else :class:`hostile.Unavailable`)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        raise Unavailable("mounting a small disk needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)])
    if res.returncode != 0:
        raise Unavailable("mount -t tmpfs failed")
    try:
        yield lambda bigger: subprocess.run(
            ["mount", "-o", f"remount,size={bigger}", str(folder)], check=True
        )
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@case("faults")
def case_disk_really_full(w: World) -> str:
    """A real full disk (a 1.5 MB tmpfs: the step checkpoint does not fit), then more space and
    --resume: the uninterrupted run's tables and weights."""
    disk = w.tmp("disk")
    with small_disk(disk, "1500k") as grow:
        out = disk / "run"
        first = refused(cli(*smoke(out)), ["no space left", str(out)], quiet=False)
        if first == "clean" and not _no_temp_files(out):
            first = "wrong"
        grow("64m")
        again = resumed(cli(*smoke(out, extra=["--resume"])), out, w.reference())
    return _first_unclean(first, again)


@case("faults")
def case_read_only_file_system_on_resume(w: World) -> str:
    """Step 0 done on a disk that is then remounted read-only (EROFS): --resume is one line and
    changes nothing."""
    disk = w.tmp("disk")
    with small_disk(disk, "64m"):
        out = disk / "run"
        if cli(*smoke(out, extra=["--steps", "0"])).rc != 0:
            return "wrong"
        before = snapshot(out)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        res = cli(*smoke(out, extra=["--resume"]))
        verdict = refused(res, ["read-only", str(out)], keep=(out, before))
    return verdict


@case("faults")
def case_read_only_run_folder(w: World) -> str:
    out = w.tmp("ro") / "run"
    out.mkdir()
    with read_only(out):
        res = cli(*smoke(out))
    return refused(res, [str(out)]) if not list(out.iterdir()) else "wrong"


@case("faults")
def case_read_only_parent_folder(w: World) -> str:
    parent = w.tmp("ro")
    out = parent / "run"
    with read_only(parent):
        res = cli(*smoke(out))
    return refused(res, [str(parent)], absent=[out])


@case("faults")
def case_read_only_run_on_resume(w: World) -> str:
    run = w.copy(w.killed(1))
    before = snapshot(run)
    with read_only(run):
        res = cli(*smoke(run, extra=["--resume"]))
    return refused(res, [str(run)], keep=(run, before))


@case("faults")
def case_out_is_a_file(w: World) -> str:
    out = w.tmp() / "run"
    out.write_text("not a folder")
    return refused(cli(*smoke(out)), [str(out)], keep=(out.parent, snapshot(out.parent)))


@case("faults")
def case_nan_loss_names_the_iteration(w: World) -> str:
    out = w.out()
    res = cli(*smoke(out, "train.base.lr=1e30"))
    return refused(res, ["step 0", "iteration 1"], quiet=False)


# Kill points along a FAST smoke run (see hostile.KillPoint), in time order.
KILL_POINTS = (
    ("iteration", 0, 1),  # before the first checkpoint
    ("resume_point", 0, 2),  # right after a checkpoint
    ("prototypes", 0, None),  # during the evaluation of step 0
    ("step_checkpoint", 0, None),  # step0.pt written, tables not flushed
    ("table", 0, "summary"),  # between two table flushes
    ("table", 0, "shift"),  # all tables flushed, resume point not cleared
    ("cleared", 0, None),  # step 0 complete, step 1 not begun
    ("iteration", 1, 1),
    ("resume_point", 1, 2),
    ("step_checkpoint", 1, None),  # the last step boundary
    ("table", 1, "per_class"),
)


#: The points in runs that reach each in turn: after a kill at a step's boundary the resumed run
#: does not redo the step's end, so the later boundary points of that step start their own run.
KILL_CHAINS = (
    (KILL_POINTS[0], KILL_POINTS[1], KILL_POINTS[2], KILL_POINTS[3], *KILL_POINTS[7:10]),
    (KILL_POINTS[4], KILL_POINTS[10]),
    (KILL_POINTS[5], ("table", 1, "summary")),
    (KILL_POINTS[6], ("cleared", 1, None)),
)


def kill_chain(w: World, points) -> str:
    """Kill a run at each point in turn (resuming after each), finish it, compare it with the
    uninterrupted run: tables byte-identical, weights equal."""
    out = w.out()
    for point in points:
        extra = ["--resume"] if out.exists() else []
        code = run_forked(smoke(out, extra=extra), point)
        if code != -signal.SIGKILL:
            return "wrong"  # the point was never reached
    return resumed(cli(*smoke(out, extra=["--resume"])), out, w.reference())


for _point in KILL_POINTS:
    _label = "_".join(str(p) for p in _point if p is not None)
    case("faults", f"kill_at_{_label}")(lambda w, p=_point: kill_chain(w, [p]))


@case("faults")
def case_resume_at_another_thread_count_warns(w: World) -> str:
    run = w.copy(w.killed(1))
    # another machine's environment: run.threads auto follows OMP_NUM_THREADS. A fresh
    # interpreter, not a fork: OpenMP's thread pool does not survive fork() with more threads
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    argv = [sys.executable, "-m", "cisslib.cli", *smoke(run, extra=["--resume"])]
    try:
        code = subprocess.run(argv, env=env, capture_output=True, timeout=LIMIT_S * 2).returncode
    except subprocess.TimeoutExpired:
        return "wrong"
    log = (run / "log.txt").read_text().splitlines()
    warned = any(re.search(r"thread.*\b1\b.*\b2\b", line.lower()) for line in log)
    return "clean" if code == 0 and warned else "wrong"


# ============================================================================ folders
def _refused_keeping(w: World, source: Path, sets=(), extra=(), needles=("--resume",)) -> str:
    run = w.copy(source)
    before = snapshot(run)
    res = cli(*smoke(run, *sets, extra=list(extra)))
    return refused(res, list(needles), keep=(run, before))


@case("folders")
def case_rerun_complete_without_resume(w: World) -> str:
    return _refused_keeping(w, w.reference())


@case("folders")
def case_rerun_interrupted_step0_without_resume(w: World) -> str:
    return _refused_keeping(w, w.killed(0), needles=("--resume", "last.pt"))


@case("folders")
def case_rerun_interrupted_step0_with_other_config(w: World) -> str:
    return _refused_keeping(w, w.killed(0), sets=("run.seed=7",), needles=("--resume", "last.pt"))


@case("folders")
def case_rerun_interrupted_step1_without_resume(w: World) -> str:
    return _refused_keeping(w, w.killed(1), needles=("--resume",))


@case("folders")
def case_steps_1_with_another_seed(w: World) -> str:
    return _refused_keeping(
        w, w.reference(), sets=("run.seed=7",), extra=["--steps", "1"], needles=("run.seed",)
    )


@case("folders")
def case_steps_1_already_complete(w: World) -> str:
    return _refused_keeping(w, w.reference(), extra=["--steps", "1"], needles=("step 1",))


@case("folders")
def case_steps_1_over_a_resume_point(w: World) -> str:
    return _refused_keeping(w, w.killed(1), extra=["--steps", "1"], needles=("--resume",))


@case("folders")
def case_resume_with_another_config(w: World) -> str:
    return _refused_keeping(
        w, w.killed(1), sets=("run.seed=7",), extra=["--resume"], needles=("run.seed",)
    )


@case("folders")
def case_steps_in_two_calls(w: World) -> str:
    out = w.out()
    a = cli(*smoke(out, extra=["--steps", "0"]))
    b = cli(*smoke(out, extra=["--steps", "1"]))
    return _first_unclean(accepted(a), resumed(b, out, w.reference()))


@case("folders")
def case_steps_1_with_another_seed_after_step_0(w: World) -> str:
    out = w.out()
    a = accepted(cli(*smoke(out, extra=["--steps", "0"])))
    before = snapshot(out)
    res = cli(*smoke(out, "run.seed=7", extra=["--steps", "1"]))
    return _first_unclean(a, refused(res, ["run.seed"], keep=(out, before)))


@case("folders")
def case_resume_a_folder_that_does_not_exist(w: World) -> str:
    out = w.out()
    return refused(cli(*smoke(out, extra=["--resume"])), [str(out)], absent=[out])


@case("folders")
def case_resume_an_empty_folder(w: World) -> str:
    out = w.out()
    out.mkdir()
    res = cli(*smoke(out, extra=["--resume"]))
    return refused(res, [str(out)]) if not list(out.iterdir()) else "wrong"


@case("folders")
def case_resume_a_complete_run_changes_nothing(w: World) -> str:
    run = w.copy(w.reference())
    before = snapshot(run)
    res = cli(*smoke(run, extra=["--resume"]))
    lost = [k for k in changed(before, run) if k != "log.txt"]
    return "lost" if lost else accepted(res)


def _second_run_while_first_runs(w: World, extra: list[str]) -> str:
    out = w.out()
    first = forked(smoke(out))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "config.yaml").exists():
        time.sleep(0.02)
    res = cli(*smoke(out, extra=extra))
    first.join(600)
    if first.exitcode != 0 or not same_tables(out, w.reference()):
        return "lost"
    return refused(res, [str(first.pid), HOST])


@case("folders")
def case_two_runs_at_once(w: World) -> str:
    return _second_run_while_first_runs(w, [])


@case("folders")
def case_resume_while_the_run_runs(w: World) -> str:
    return _second_run_while_first_runs(w, ["--resume"])


def _untouched(verdict: str, run: Path, before: dict[str, bytes]) -> str:
    """A refusal must leave the locked folder as it was (a run that went ahead is ``wrong``: the
    lock's holder is made up here, so nothing real was lost)."""
    return verdict if verdict != "clean" or not changed(before, run) else "wrong"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _lock(run: Path, text: str) -> None:
    (run / "run.lock").write_text(text)


@case("folders")
def case_stale_lock_is_taken_over(w: World) -> str:
    run = w.copy(w.killed(1))
    _lock(run, json.dumps({"pid": _dead_pid(), "host": HOST, "started": "2020-01-01T00:00:00"}))
    res = cli(*smoke(run, extra=["--resume"]))
    return resumed(res, run, w.reference())


@case("folders")
def case_lock_of_another_host(w: World) -> str:
    run = w.copy(w.killed(1))
    _lock(run, json.dumps({"pid": 1234, "host": "node-elsewhere", "started": "2020-01-01"}))
    before = snapshot(run)
    res = cli(*smoke(run, extra=["--resume"]))
    return _untouched(refused(res, ["node-elsewhere", "run.lock"]), run, before)


@case("folders")
def case_lock_of_a_live_process(w: World) -> str:
    run = w.copy(w.killed(1))
    other = subprocess.Popen(["sleep", "60"])
    try:
        _lock(run, json.dumps({"pid": other.pid, "host": HOST, "started": "2020-01-01"}))
        before = snapshot(run)
        res = cli(*smoke(run, extra=["--resume"]))
    finally:
        other.kill()
        other.wait()
    return _untouched(refused(res, [str(other.pid), "run.lock"]), run, before)


@case("folders")
def case_unreadable_lock(w: World) -> str:
    run = w.copy(w.killed(1))
    _lock(run, "\x00garbage")
    before = snapshot(run)
    res = cli(*smoke(run, extra=["--resume"]))
    return _untouched(refused(res, ["run.lock"]), run, before)


@case("folders")
def case_failed_run_then_corrected_resume(w: World) -> str:
    out = w.out()
    bad = refused(cli(*smoke(out, "train.base.lr=1e30")), ["loss"], quiet=False)
    again = cli(*smoke(out, extra=["--resume"]))
    return _first_unclean(bad, resumed(again, out, w.reference()))


@case("folders")
def case_failed_run_then_corrected_fresh_start(w: World) -> str:
    out = w.out()
    bad = refused(cli(*smoke(out, "train.base.lr=1e30")), ["loss"], quiet=False)
    again = cli(*smoke(out))
    return _first_unclean(bad, resumed(again, out, w.reference()))


@case("folders")
def case_failed_start_leaves_nothing(w: World) -> str:
    out = w.out()
    bad = refused(cli(*smoke(out, "run.log_every=0")), ["run.log_every"], absent=[out])
    again = cli(*smoke(out))
    return _first_unclean(bad, resumed(again, out, w.reference()))


@case("folders")
def case_failed_start_into_an_existing_empty_folder(w: World) -> str:
    out = w.out()
    out.mkdir()
    bad = refused(cli(*smoke(out, "train.crop=50")), ["train.crop"])
    return _first_unclean(bad, "clean" if not list(out.iterdir()) else "wrong")


@case("folders")
def case_report_to_a_non_html_file(w: World) -> str:
    target = w.tmp() / "report.txt"
    res = cli("report", w.reference(), "--out", target)
    return refused(res, [".html"], cmd="report", absent=[target])


@case("folders")
def case_report_on_a_folder_without_tables(w: World) -> str:
    d = w.tmp("empty")
    res = cli("report", d, "--out", w.tmp() / "r.html")
    return refused(res, [str(d)], cmd="report")


@case("folders")
def case_report_on_a_missing_folder(w: World) -> str:
    d = w.tmp() / "gone"
    res = cli("report", d, "--out", w.tmp() / "r.html")
    return refused(res, ["gone"], cmd="report")


@case("folders")
def case_load_runs_takes_a_json_list(w: World) -> str:
    from cisslib.runs import load_runs

    ref = w.reference()
    try:
        data = load_runs(json.dumps([str(ref)]))
    except Exception:  # noqa: BLE001
        return "traceback"
    return (
        "clean" if len(data["summary"]) == 4 and not data["summary"].attrs["missing"] else "wrong"
    )


# ============================================================================ caches
def _truth(source) -> np.ndarray:
    from cisslib.data.sources import read_label

    k = len(source.class_names)
    out = np.zeros((len(source), k + 1), bool)
    for i in range(len(source)):
        values = np.unique(read_label(source.paths(i)[1]))
        out[i, values[values <= k]] = True
    return out


def _membership(root: Path, folder: Path | None = None):
    from cisslib.data.membership import class_membership
    from cisslib.data.sources import VOCSegmentation

    source = VOCSegmentation(root, "train")
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return source, class_membership(source, cache_folder=folder, progress=False), None
        except Exception as e:  # noqa: BLE001
            return source, None, e


def _membership_verdict(root: Path, folder: Path | None = None) -> str:
    source, got, err = _membership(root, folder)
    if err is not None:
        return "traceback"
    return "clean" if np.array_equal(got, _truth(source)) else "wrong"


def _relabel(root: Path, shift: int = 3) -> None:
    """Every training label's classes moved by ``shift`` (same file names, new content)."""
    from cisslib.data.sources import read_label

    for p in sorted((root / "VOC2012" / "SegmentationClassAug").glob("*.png")):
        lab = read_label(p)
        fg = (lab > 0) & (lab < 255)
        lab[fg] = (lab[fg] - 1 + shift) % 20 + 1
        write_label(p, lab)


@case("caches")
def case_membership_of_a_relabelled_copy(w: World) -> str:
    """Two dataset folders with the same file names but other labels."""
    cache = w.tmp("cache")
    a = w.voc()
    b = w.tmp("copy")
    shutil.copytree(a / "VOC2012", b / "VOC2012")
    _relabel(b)
    first = _membership_verdict(a, cache)
    return _first_unclean(first, _membership_verdict(b, cache))


@case("caches")
def case_membership_after_relabelling_in_place(w: World) -> str:
    cache = w.tmp("cache")
    a = w.voc()
    first = _membership_verdict(a, cache)
    time.sleep(0.01)
    _relabel(a)
    return _first_unclean(first, _membership_verdict(a, cache))


def _cache_file(folder: Path) -> Path:
    files = sorted(folder.glob("membership-*.npy"))
    assert len(files) == 1, files
    return files[0]


def _damaged_cache(w: World, damage) -> str:
    cache = w.tmp("cache")
    a = w.voc()
    first = _membership_verdict(a, cache)
    damage(_cache_file(cache))
    return _first_unclean(first, _membership_verdict(a, cache))


@case("caches")
def case_membership_cache_corrupt(w: World) -> str:
    return _damaged_cache(w, lambda p: p.write_bytes(b"\x93NUMPY garbage"))


@case("caches")
def case_membership_cache_truncated(w: World) -> str:
    return _damaged_cache(w, lambda p: truncate(p, p, 0.7))


@case("caches")
def case_membership_cache_wrong_content(w: World) -> str:
    def damage(p: Path) -> None:
        arr = np.load(p)
        np.save(p, ~arr)

    return _damaged_cache(w, damage)


@case("caches")
def case_membership_cache_folder_read_only(w: World) -> str:
    cache = w.tmp("cache")
    a = w.voc()
    with read_only(cache):
        return _membership_verdict(a, cache)


def _text_cache_case(w: World, damage) -> str:
    from cisslib.config import load_config
    from cisslib.model.clip import load_clip
    from cisslib.model.text import class_text_embeddings, encode_class_names

    cfg = load_config(SMOKE).model.clip.model_cfg
    torch.manual_seed(0)
    model, tok = load_clip(model_cfg=cfg)
    folder = w.tmp("text")
    names, templates = ["red circle", "blue ring"], ("a photo of a {}",)
    class_text_embeddings(model, tok, names, templates, model_key="k", cache_dir=folder)
    damage(next(folder.glob("*.npy")))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            got = class_text_embeddings(
                model, tok, names, templates, model_key="k", cache_dir=folder
            )
    except Exception:  # noqa: BLE001
        return "traceback"
    want = encode_class_names(model, tok, names, templates)
    return "clean" if torch.equal(got, want) else "wrong"


@case("caches")
def case_text_cache_corrupt(w: World) -> str:
    return _text_cache_case(w, lambda p: p.write_bytes(b"garbage"))


@case("caches")
def case_text_cache_with_nan(w: World) -> str:
    return _text_cache_case(w, lambda p: np.save(p, np.full((2, 32), np.nan, np.float32)))


def _run_with_cache(w: World, cache: Path) -> str:
    out = w.out()
    res = cli(*smoke(out), env={"CISSLIB_CACHE": str(cache)})
    return resumed(res, out, w.reference())


@case("caches")
def case_cache_env_points_to_a_file(w: World) -> str:
    f = w.tmp() / "cache-file"
    f.write_text("x")
    w.reference()
    return _run_with_cache(w, f)


@case("caches")
def case_cache_folder_read_only(w: World) -> str:
    cache = w.tmp("cache")
    w.reference()
    with read_only(cache):
        return _run_with_cache(w, cache)
