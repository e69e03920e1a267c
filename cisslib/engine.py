"""The incremental training engine: steps of a scenario, evaluation, checkpoints, exact resume, DDP.

One :class:`Engine` runs steps ``A..B`` of a scenario (SPEC 1.5, 4): for each step it slices the
training set, builds the step's model from the previous step's final weights (or from CLIP at step
0), trains for a fixed number of iterations with AdamW + warmup/poly, evaluates on the whole val set
under both background conventions, and writes the step checkpoint and the tidy tables of the run
folder. Inside a step a resumable checkpoint (model, optimizer, scheduler, scaler, RNG states,
data position) is written atomically every ``run.checkpoint_every`` iterations; ``resume=True``
continues from it and ends with the same weights and metrics as an uninterrupted run.

Data order and augmentation do not depend on worker processes or on restarts: iteration ``i`` of
step ``t`` reads the samples at positions ``i * B .. (i + 1) * B - 1`` of a stream of seeded
permutations, and every sample's augmentation is seeded by its position.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from cisslib import build
from cisslib.config import Config, from_dict, save_config, to_dict
from cisslib.datasets import StepDataset
from cisslib.diagnostics import PrototypeAccumulator, shift_rows
from cisslib.io import atomic_torch_save
from cisslib.metrics import SegMetrics
from cisslib.runs import TABLES, RunDir, Table, setup_logging
from cisslib.weights import load_segmenter_weights

log = logging.getLogger("cisslib")

IDENTITY_LUT = np.arange(256, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# distributed, device, precision, seeds


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device is {name!r} but CUDA is not available; use run.device=cpu")
        torch.cuda.set_device(device)
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` = bf16 on CUDA, fp32 on CPU (autocast is a no-op there)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type != "cuda" and name != "fp32":
        log.info("precision %s requested on %s: using fp32 (no autocast on CPU)", name, device)
        return "fp32"
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mix(*ints: int) -> int:
    """A stable seed from integers (SeedSequence hashing; the first 32-bit word, as published
    results were produced with it)."""
    state = np.random.SeedSequence([abs(int(i)) for i in ints]).generate_state(2, np.uint32)
    return int(state.astype(np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------
# data order


class StreamSampler(Sampler):
    """This rank's ``(item, seed)`` pairs for iterations ``start..total-1`` of a step.

    The global stream concatenates permutations of the ``n`` items (epoch ``e`` shuffled by
    ``(seed, e)``); iteration ``i`` takes global positions ``i*B .. i*B+B-1`` and rank ``r`` the
    ``B / world`` of them starting at ``i*B + r*B/world``. Each pair's augmentation seed is derived
    from its global position, so data never depends on workers, ranks order or restarts.
    """

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, rank: int, world: int):
        if n == 0:
            raise ValueError("no training images for this step: check the scenario and data")
        self.n, self.batch, self.seed = n, batch, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self.per_rank = batch // world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(_mix(self.seed, epoch)).permutation(self.n)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return (self.total - self.start) * self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for it in range(self.start, self.total):
            first = it * self.batch + self.rank * self.per_rank
            for pos in range(first, first + self.per_rank):
                epoch, k = divmod(pos, self.n)
                yield int(self._perm(epoch)[k]), _mix(self.seed, 7919, pos)


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(k, seed)`` runs its random transform under ``seed``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        k, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[k]


# --------------------------------------------------------------------------------------------
# schedule


def warmup_poly(it: int, max_iters: int, warmup_iters: int, warmup_factor: float, power: float) -> float:
    """detectron2 ``WarmupPolyLR`` factor (SPEC 4): linear warmup times ``(1 - it/max)^power``."""
    warm = 1.0
    if it < warmup_iters:
        alpha = it / warmup_iters
        warm = warmup_factor * (1 - alpha) + alpha
    return warm * (1 - it / max_iters) ** power


# --------------------------------------------------------------------------------------------
# the engine


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Engine:
    """Runs the steps of one scenario into one run folder."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.resume = resume
        device = cfg.run.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dist = init_distributed(device)
        self.device = resolve_device(device, self.dist.local_rank)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        if cfg.train.batch_size % self.dist.world:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                f"{self.dist.world} processes; pick a multiple"
            )
        progress = cfg.run.progress
        self.bar = self.dist.main and (progress == "bar" or (progress == "auto" and sys.stderr.isatty()))
        if self.dist.main:
            setup_logging(self.run.log, to_console=not self.bar)
            save_config(cfg, self.run.config)
        seed_everything(cfg.run.seed)

        # data, scenario, CLIP and text: once per run
        self.train_source, self.val_source = build.build_sources(cfg)
        self.scenario = build.build_scenario(cfg, len(self.train_source.class_names))
        self.class_names = self.scenario.label_names(self.train_source.class_names)
        self.step_of_label = self.scenario.step_of_label()
        self._validate_data()
        from cisslib.protocol import class_membership

        self.membership = class_membership(
            self.train_source, num_workers=max(1, cfg.run.num_workers), progress=self.bar
        )
        self.clip = build.build_clip(cfg)
        self.text = build.build_text(cfg, self.clip, self.train_source.class_names, self.scenario)
        self.train_transform, self.test_transform = build.build_transforms(cfg)
        self.criterion = build.build_criterion(cfg)

        meta = {
            "run": cfg.run.name,
            "preset": cfg.run.preset,
            "dataset": cfg.scenario.dataset,
            "setting": "joint" if cfg.scenario.joint else cfg.scenario.setting,
            "mode": cfg.scenario.mode,
            "seed": cfg.run.seed,
        }
        self.meta = meta
        self._ref_protos: torch.Tensor | None = None
        self._ref_protos_on_disk = resume and self.run.reference_prototypes.is_file()
        self.tables = {
            name: Table(self.run.table(name), cols, enabled=self.dist.main)
            for name, cols in TABLES.items()
        }

    # ---------------------------------------------------------------- helpers

    def _validate_data(self) -> None:
        mode = self.cfg.scenario.validate
        if mode == "off" or self.cfg.scenario.dataset == "toy":
            return
        from cisslib.datasets import validate_source

        for source in (self.train_source, self.val_source):
            if mode == "full":
                validate_source(source, check_all=True, progress=self.bar)
            else:
                validate_source(source, sample=min(200, len(source)), progress=self.bar)

    def _schedule(self, step: int):
        return self.cfg.train.base if step == 0 else self.cfg.train.incremental

    def _new_model(self) -> torch.nn.Module:
        return build.build_model(self.cfg, self.clip).to(self.device)

    def _load_step_weights(self, model: torch.nn.Module, step: int) -> None:
        path = self.run.step_checkpoint(step)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: step {step + 1} starts from step {step}'s weights; run step "
                f"{step} first (or all steps) into this run folder"
            )
        state = torch.load(path, map_location=self.device, weights_only=False)
        key = "best_model" if self.cfg.train.select_best_on_val and "best_model" in state else "model"
        model.load_state_dict(state[key])

    def _loader(self, step: int, start: int) -> DataLoader:
        cfg = self.cfg
        indices = self.scenario.train_indices(self.membership, step)
        ds = StepDataset(
            self.train_source, indices, self.scenario.train_lut(step), self.train_transform
        )
        sampler = StreamSampler(
            len(ds), cfg.train.batch_size, _mix(cfg.run.seed, step), start,
            self._schedule(step).iters, self.dist.rank, self.dist.world,
        )
        workers = cfg.run.num_workers
        return DataLoader(
            SeededItems(ds),
            batch_size=cfg.train.batch_size // self.dist.world,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            # own generator: creating the iterator must not draw from the global RNG (resume)
            generator=torch.Generator().manual_seed(0),
            persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
        )

    def _optimizer(self, model: torch.nn.Module, step: int):
        tr = self.cfg.train
        sched = self._schedule(step)
        groups = build.param_groups(model, sched.lr, tr.weight_decay, tr.head_lr_mult)
        opt = torch.optim.AdamW(groups, lr=sched.lr, weight_decay=tr.weight_decay)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda it: warmup_poly(
                it, sched.iters, sched.warmup_iters, tr.warmup_factor, tr.poly_power
            ),
        )
        return opt, lr_sched

    # ---------------------------------------------------------------- the run

    def run_steps(self, first: int | None = None, last: int | None = None) -> None:
        """Train and evaluate steps ``first..last`` (default: all; with resume, what is left)."""
        n = self.scenario.n_steps
        first = 0 if first is None else first
        last = n - 1 if last is None else last
        if not 0 <= first <= last < n:
            raise ValueError(f"steps {first}-{last} out of range: this scenario has steps 0..{n - 1}")
        done = set(self.run.completed_steps()) if self.resume else set()
        keep = (lambda r: int(r["step"]) in done) if self.resume else (lambda r: int(r["step"]) < first)
        for name, table in self.tables.items():
            # the loss history of an interrupted step is trimmed in run_step, at its resume point
            table.load(keep=(lambda r: True) if name == "losses" and self.resume else keep)
        log.info(
            "run %s: %s %s %s, preset %s, %d steps, device %s, precision %s, %d process(es)",
            self.run.root, self.cfg.scenario.dataset, self.meta["setting"], self.cfg.scenario.mode,
            self.cfg.run.preset, n, self.device, self.precision, self.dist.world,
        )
        for step in range(first, last + 1):
            if step in done:
                log.info("step %d: already complete, skipped (resume)", step)
                continue
            self.run_step(step)

    def run_step(self, step: int) -> None:
        cfg, sc = self.cfg, self.scenario
        seed_everything(_mix(cfg.run.seed, 1000 + step))
        c_t, c_old = sc.num_seen(step), (sc.num_seen(step - 1) if step > 0 else 0)
        text_t = self.text[:c_t].to(self.device)
        sched = self._schedule(step)

        model = self._new_model()
        reference = old_model = None
        if step == 0:
            if cfg.loss.use_gpd:
                # SPEC 1.1 ori_clip: a frozen copy of the original CLIP image encoder
                from cisslib.segmenter import frozen_encoder_copy

                reference = frozen_encoder_copy(model.encoder)
            if cfg.model.init_weights:
                layout = load_segmenter_weights(model, cfg.model.init_weights)
                log.info("step 0: weights from %s (%s layout)", cfg.model.init_weights, layout)
        else:
            self._load_step_weights(model, step - 1)
            if cfg.loss.use_gpd or cfg.loss.use_qd:
                old_model = _freeze(copy.deepcopy(model))  # SPEC 1.5: eval + frozen
        opt, lr_sched = self._optimizer(model, step)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        start = 0
        best = {"score": -math.inf, "state": None}
        if self.resume and self.run.last_checkpoint.is_file():
            state = torch.load(self.run.last_checkpoint, map_location=self.device, weights_only=False)
            if state["step"] == step:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                lr_sched.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
                start = state["iter"]
                best = state.get("best", best)
                log.info("step %d: resumed at iteration %d/%d", step, start, sched.iters)
        self.tables["losses"].rows = [
            r for r in self.tables["losses"].rows
            if int(r["step"]) < step or (int(r["step"]) == step and int(r["iter"]) <= start)
        ]

        train_model: torch.nn.Module = model
        if self.dist.world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        loader = self._loader(step, start)
        if start > 0:
            _set_rng_state(state["rng"])  # after the loader: nothing below the loop draws first
        log.info(
            "step %d: classes %s, %d training images, %d iterations, lr %.2e (decoder x%g)",
            step, sc.step_classes(step), loader.sampler.n,
            sched.iters, sched.lr, cfg.train.head_lr_mult,
        )
        bar = None
        if self.bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=sched.iters, initial=start, desc=f"step {step}", dynamic_ncols=True)
        model.train()
        t0, it = time.perf_counter(), start
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                outputs = train_model(images, text_t)
                kwargs: dict[str, Any] = {}
                with torch.no_grad():
                    if reference is not None:
                        ref = reference(images)
                        kwargs.update(ref_global=ref.global_embedding, ref_dense=ref.dense_embedding)
                    if old_model is not None:
                        kwargs["old_outputs"] = old_model(images, text_t[:c_old])
                terms = self.criterion(outputs, labels, num_old=c_old, **kwargs)
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"step {step} iteration {it}: loss is {loss.item()} "
                    f"({ {k: float(v) for k, v in terms.items()} }); lower the LR or use fp32/bf16"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(opt)
            scaler.update()
            lr_sched.step()
            it += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if it % cfg.run.log_every == 0 or it == sched.iters:
                self._log_losses(step, it, terms, grad_norm, opt, time.perf_counter() - t0, start)
            if cfg.train.select_best_on_val and cfg.train.eval_every and it % cfg.train.eval_every == 0 \
                    and it < sched.iters:
                self._track_best(model, step, best)
                model.train()
            if cfg.run.checkpoint_every and it % cfg.run.checkpoint_every == 0 and it < sched.iters:
                self._save_last(step, it, model, opt, lr_sched, scaler, best)
        if bar is not None:
            bar.close()
        self.tables["losses"].flush()
        self._finish_step(step, model, best)

    # ---------------------------------------------------------------- logging, checkpoints

    def _log_losses(self, step, it, terms, grad_norm, opt, seconds, start) -> None:
        values = {k: float(v.detach()) for k, v in terms.items()}
        if self.dist.world > 1:
            vec = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(vec)
            values = dict(zip(values, (vec / self.dist.world).tolist(), strict=True))
        rows = [{**self.meta, "step": step, "iter": it, "term": k, "value": v} for k, v in values.items()]
        rows.append({**self.meta, "step": step, "iter": it, "term": "grad_norm", "value": float(grad_norm)})
        self.tables["losses"].extend(rows, flush=False)
        speed = (it - start) / max(seconds, 1e-9)
        parts = " ".join(f"{k.removeprefix('loss_')}={v:.4f}" for k, v in values.items())
        log.info(
            "step %d it %d/%d %s grad_norm=%.2f lr=%.2e %.2f it/s",
            step, it, self._schedule(step).iters, parts, float(grad_norm),
            opt.param_groups[0]["lr"], speed, extra={"detail": True},
        )

    def _save_last(self, step, it, model, opt, lr_sched, scaler, best) -> None:
        if self.dist.main:
            self.tables["losses"].flush()
            atomic_torch_save(
                {
                    "step": step,
                    "iter": it,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": lr_sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "best": best,
                    "config": to_dict(self.cfg),
                },
                self.run.last_checkpoint,
            )
        if self.dist.world > 1:
            dist.barrier()

    def _track_best(self, model, step, best) -> None:
        """Opt-in val-selected checkpoint (SPEC 5, 7.2): keep the best new-class mIoU."""
        summary, _ = self.evaluate(model, step, probe=False)
        score = next(r["mIoU_new"] for r in summary if r["convention"] == "fg_only")
        if not math.isnan(score) and score > best["score"]:
            best["score"] = score
            best["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            log.info("step %d: new best val mIoU_new %.4f", step, score)

    def _finish_step(self, step: int, model: torch.nn.Module, best: dict) -> None:
        summary, per_class = self.evaluate(model, step, probe=True)
        if self.cfg.train.select_best_on_val:
            self._track_best(model, step, best)
        for row in summary:
            log.info(
                "eval step %d %s: mIoU %.4f base %.4f novel %.4f old %.4f new %.4f",
                step, row["convention"], row["mIoU"], row["mIoU_base"], row["mIoU_novel"],
                row["mIoU_old"], row["mIoU_new"],
            )
        if self.dist.main:
            state = {
                "step": step,
                "model": model.state_dict(),
                "config": to_dict(self.cfg),
                "text": self.text,
                "class_names": self.class_names,
                "num_seen": self.scenario.num_seen(step),
                "pos_embed_grid": list(_unwrap(model).encoder.pos_grid),
                "summary": summary,
            }
            if self.cfg.train.select_best_on_val and best["state"] is not None:
                state["best_model"] = best["state"]
                state["best_score"] = best["score"]
            atomic_torch_save(state, self.run.step_checkpoint(step))
            for name in ("summary", "per_class", "zero_shot", "shift", "losses"):
                self.tables[name].flush()
            self.run.last_checkpoint.unlink(missing_ok=True)
        if self.dist.world > 1:
            dist.barrier()

    # ---------------------------------------------------------------- evaluation

    def _val_loader(self) -> DataLoader:
        n = len(self.val_source)
        if self.cfg.eval.max_images:
            n = min(n, self.cfg.eval.max_images)
        indices = list(range(self.dist.rank, n, self.dist.world))
        return DataLoader(
            # identity lut: raw labels; each use applies its own test lut on the tensor
            StepDataset(self.val_source, indices, IDENTITY_LUT, self.test_transform),
            batch_size=1,
            num_workers=self.cfg.run.num_workers,
            generator=torch.Generator().manual_seed(0),
        )

    def _reference_prototypes(self, loader: DataLoader) -> torch.Tensor | None:
        """Class prototypes under the ORIGINAL CLIP (computed once per run, then read back)."""
        if self._ref_protos is not None:
            return self._ref_protos
        path = self.run.reference_prototypes
        if self._ref_protos_on_disk:  # decided at start-up, identically on every rank
            self._ref_protos = torch.load(path, map_location="cpu", weights_only=True)
        else:
            encoder = _freeze(self._new_model().encoder)
            self._ref_protos = self._prototypes(encoder, loader)
            if self.dist.main:
                atomic_torch_save(self._ref_protos, path)
        return self._ref_protos

    @torch.no_grad()
    def _prototypes(self, encoder, loader) -> torch.Tensor:
        lut = torch.as_tensor(self.scenario.test_lut(self.scenario.n_steps - 1).astype(np.int64))
        acc = PrototypeAccumulator(self.scenario.num_classes, self.text.shape[1])
        for image, raw in loader:
            image, labels = self._patch_crop(image, lut[raw], encoder.patch_size)
            with autocast(self.device, self.precision):
                dense = encoder(image.to(self.device)).dense_embedding
            acc.update(dense.float().cpu(), labels)
        acc.all_reduce_()
        return acc.prototypes()

    @staticmethod
    def _patch_crop(image, labels, patch):
        h, w = image.shape[-2:]
        h2, w2 = max(patch, h - h % patch), max(patch, w - w % patch)
        return image[..., :h2, :w2], labels[..., :h2, :w2]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int, probe: bool) -> tuple[list, list]:
        """Val metrics of ``model`` after ``step`` under both conventions (SPEC 5).

        With ``probe``, also the zero-shot probe (IoU of future classes with every class text)
        and the semantic-shift diagnostics, written to their tables.
        """
        cfg, sc = self.cfg, self.scenario
        was_training = model.training
        model.eval()
        c_t, k = sc.num_seen(step), sc.num_classes
        text_t, text_all = self.text[:c_t].to(self.device), self.text.to(self.device)
        lut_t = torch.as_tensor(sc.test_lut(step).astype(np.int64))
        lut_all = torch.as_tensor(sc.test_lut(sc.n_steps - 1).astype(np.int64))
        do_probe = probe and cfg.eval.zero_shot_probe and c_t < k
        count_pred_only = cfg.eval.miou_denominator == "gt_or_pred"
        metrics = SegMetrics(c_t, tau=cfg.eval.tau, count_pred_only=count_pred_only)
        future = (
            SegMetrics(k, tau=cfg.eval.tau, count_pred_only=count_pred_only) if do_probe else None
        )
        loader = self._val_loader()
        win, stride = cfg.eval.window, cfg.eval.stride
        for image, raw in loader:
            image = image.to(self.device)
            with autocast(self.device, self.precision):
                scores = model.sliding_scores(image, text_t, window=win, stride=stride)
            metrics.update(scores.float().cpu(), lut_t[raw])
            if future is not None:
                with autocast(self.device, self.precision):
                    scores = model.sliding_scores(image, text_all, window=win, stride=stride)
                future.update(scores.float().cpu(), lut_all[raw])
        metrics.all_reduce_()
        summary, per_class = metrics.summary(
            step, self.step_of_label, self.class_names[:c_t]
        )
        summary = [{**self.meta, **r} for r in summary]
        per_class = [{**self.meta, **r} for r in per_class]
        if probe:
            self.tables["summary"].extend(summary, flush=False)
            self.tables["per_class"].extend(per_class, flush=False)
        if future is not None:
            future.all_reduce_()
            # every class counts as 'seen' for this pass; step_added comes from the scenario
            sol = np.minimum(self.step_of_label, step)
            _, rows = future.summary(step, sol, self.class_names)
            zs = [
                {**self.meta, "step": step, "class_index": r["class_index"],
                 "class_name": r["class_name"],
                 "step_added": int(self.step_of_label[int(r["class_index"])]), "iou": r["iou"]}
                for r in rows
                if r["convention"] == "fg_only" and int(r["class_index"]) > c_t
            ]
            self.tables["zero_shot"].extend(zs, flush=False)
            mean = np.nanmean([r["iou"] for r in zs]) if any(
                not math.isnan(r["iou"]) for r in zs) else float("nan")
            log.info("eval step %d zero-shot probe: mIoU on %d future classes %.4f", step,
                     k - c_t, mean)
        if probe and cfg.eval.shift_diagnostics:
            ref = self._reference_prototypes(loader)
            protos = self._prototypes(_unwrap(model).encoder, loader)
            rows = shift_rows(
                step, protos, self.text, ref, self.step_of_label, self.class_names, c_t
            )
            self.tables["shift"].extend([{**self.meta, **r} for r in rows], flush=False)
        if was_training:
            model.train()
        return summary, per_class


# --------------------------------------------------------------------------------------------
# reading a run back


@dataclass
class LoadedStep:
    """A trained step loaded for inspection (the explorer, notebooks)."""

    model: torch.nn.Module
    text: torch.Tensor  # (C_t, D) seen classes, label order
    class_names: list[str]  # seen classes, label order (label c+1 <-> class_names[c])
    cfg: Config
    val_source: Any
    scenario: Any
    step: int
    device: torch.device

    @property
    def num_images(self) -> int:
        n = len(self.val_source)
        return min(n, self.cfg.eval.max_images) if self.cfg.eval.max_images else n

    @torch.no_grad()
    def segment(self, i: int, tau: float | None = None) -> dict:
        """Segment val image ``i``: ``image (H,W,3) uint8, gt (H,W), pred (H,W), scores (C,H,W)``."""
        _, test = build.build_transforms(self.cfg)
        img, gt = StepDataset(self.val_source, [i], self.scenario.test_lut(self.step), test)[0]
        e = self.cfg.eval
        labels, scores = self.model.segment(
            img[None].to(self.device), self.text.to(self.device), window=e.window, stride=e.stride,
            tau=tau,
        )
        return {
            "image": img.permute(1, 2, 0).clamp(0, 255).round().byte().numpy(),
            "gt": gt.numpy(),
            "pred": labels[0].cpu().numpy(),
            "scores": scores[0].float().cpu().numpy(),
        }


def load_step(run_dir: str | Path, step: int, device: str = "cpu") -> LoadedStep:
    """Load the model of ``step`` from a run folder, with its text and the val data."""
    run = RunDir(run_dir)
    path = run.step_checkpoint(step)
    if not path.is_file():
        have = run.completed_steps()
        raise FileNotFoundError(f"{path} does not exist; completed steps in {run.root}: {have}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = from_dict(state["config"], where=str(path))
    if "pos_embed_grid" not in state["config"].get("model", {}):
        cfg.model.pos_embed_grid = "checkpoint"  # written before the key existed (issue 9)
    clip = build.build_clip(cfg)
    model = build.build_model(cfg, clip)
    model.load_state_dict(state["model"])
    dev = torch.device(device)
    model.to(dev).eval()
    _, val = build.build_sources(cfg)
    scenario = build.build_scenario(cfg, len(val.class_names))
    c = state["num_seen"]
    return LoadedStep(
        model=model, text=state["text"][:c], class_names=list(state["class_names"][:c]), cfg=cfg,
        val_source=val, scenario=scenario, step=step, device=dev,
    )
