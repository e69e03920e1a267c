"""The steps of a scenario (SPEC 1.5, 4): prepare once, then per step train, evaluate, write, save.

For each step the runner slices the training set, builds the step's model from the previous
step's final weights (or from CLIP at step 0), trains it for a fixed number of iterations
(:mod:`cisslib.engine.trainer`), evaluates it (:mod:`cisslib.engine.evaluator`), writes the
step's rows to the run folder's tables and saves the step checkpoint. Inside a step a resume point
is written every ``run.checkpoint_every`` iterations; ``resume=True`` continues from it and ends
with the same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from cisslib import build
from cisslib.config import Config, save_config, to_dict
from cisslib.data.membership import class_membership
from cisslib.data.step_dataset import StepDataset
from cisslib.data.validation import validate_source
from cisslib.engine.checkpoint import (
    BestState,
    Resumed,
    ResumePoint,
    apply_rng,
    save_step_checkpoint,
)
from cisslib.engine.data_order import train_loader
from cisslib.engine.evaluator import EvalResult, EvalSettings, Evaluator
from cisslib.engine.optim import make_optimizer
from cisslib.engine.runtime import Runtime, mix_seed, seed_everything
from cisslib.engine.trainer import StepTrainer
from cisslib.files import atomic_torch_save
from cisslib.model import freeze, frozen_encoder_copy, load_segmenter_weights
from cisslib.runs import TABLES, RunDir, Table, setup_logging
from cisslib.session import log_to_console, show_bar

log = logging.getLogger("cisslib")

#: Items checked by ``scenario.validate: sample`` per split.
VALIDATE_SAMPLE = 200


class Runner:
    """Runs the steps of one scenario into one run folder."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.resume = resume
        self.runtime = Runtime.create(cfg.run.device, cfg.run.precision)
        world = self.runtime.dist.world
        if cfg.train.batch_size % world:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                f"{world} processes; pick a multiple"
            )
        main = self.runtime.dist.main
        self.bar = main and show_bar(cfg.run.progress)  # terminal / notebook / batch: session.py
        if main:
            setup_logging(self.run.log, to_console=log_to_console(cfg.run.progress))
            save_config(cfg, self.run.config)
        seed_everything(cfg.run.seed)
        self._prepare_data()
        self.clip = build.build_clip(cfg)
        self.text = build.build_text(cfg, self.clip, self.train_source.class_names, self.scenario)
        self.train_transform, test_transform = build.build_transforms(cfg)
        self.criterion = build.build_criterion(cfg)
        self.meta = {
            "run": cfg.run.name,
            "preset": cfg.run.preset,
            "dataset": cfg.scenario.dataset,
            "setting": "joint" if cfg.scenario.joint else cfg.scenario.setting,
            "mode": cfg.scenario.mode,
            "seed": cfg.run.seed,
        }
        e = cfg.eval
        settings = EvalSettings(
            window=e.window, stride=e.stride, tau=e.tau,
            count_pred_only=e.miou_denominator == "gt_or_pred", max_images=e.max_images,
            zero_shot_probe=e.zero_shot_probe, shift_diagnostics=e.shift_diagnostics,
            num_workers=cfg.run.num_workers,
        )  # fmt: skip
        self.evaluator = Evaluator(
            self.scenario, self.text, self.class_names, self.val_source, test_transform,
            settings, self.runtime, self.meta,
        )  # fmt: skip
        self.resume_point = ResumePoint(self.run.last_checkpoint, enabled=main)
        self._ref_protos: torch.Tensor | None = None
        self._ref_protos_on_disk = resume and self.run.reference_prototypes.is_file()
        self.tables = {
            name: Table(self.run.table(name), cols, enabled=main) for name, cols in TABLES.items()
        }

    def _prepare_data(self) -> None:
        """Sources, scenario, class names, data checks and the class-membership matrix."""
        cfg = self.cfg
        self.train_source, self.val_source = build.build_sources(cfg)
        self.scenario = build.build_scenario(cfg, len(self.train_source.class_names))
        self.class_names = self.scenario.label_names(self.train_source.class_names)
        mode = cfg.scenario.validate
        if mode != "off" and cfg.scenario.dataset != "toy":
            for source in (self.train_source, self.val_source):
                if mode == "full":
                    validate_source(source, check_all=True, progress=self.bar)
                else:
                    validate_source(
                        source, sample=min(VALIDATE_SAMPLE, len(source)), progress=self.bar
                    )
        self.membership = class_membership(
            self.train_source, num_workers=max(1, cfg.run.num_workers), progress=self.bar
        )

    # ---------------------------------------------------------------- the run

    def run_steps(self, first: int | None = None, last: int | None = None) -> None:
        """Train and evaluate steps ``first..last`` (default: all; with resume, what is left)."""
        n = self.scenario.n_steps
        first = 0 if first is None else first
        last = n - 1 if last is None else last
        if not 0 <= first <= last < n:
            raise ValueError(
                f"steps {first}-{last} out of range: this scenario has steps 0..{n - 1}"
            )
        done = set(self.run.completed_steps()) if self.resume else set()
        if self.resume:
            keep = lambda r: int(r["step"]) in done  # noqa: E731
        else:
            keep = lambda r: int(r["step"]) < first  # noqa: E731
        for name, table in self.tables.items():
            # the loss history of an interrupted step is trimmed in run_step, at its resume point
            table.load(keep=(lambda r: True) if name == "losses" and self.resume else keep)
        rt = self.runtime
        log.info(
            "run %s: %s %s %s, preset %s, %d steps, device %s, precision %s, %d process(es)",
            self.run.root, self.cfg.scenario.dataset, self.meta["setting"], self.cfg.scenario.mode,
            self.cfg.run.preset, n, rt.device, rt.precision, rt.dist.world,
        )  # fmt: skip
        for step in range(first, last + 1):
            if step in done:
                log.info("step %d: already complete, skipped (resume)", step)
                continue
            self.run_step(step)

    def run_step(self, step: int) -> None:
        """Prepare, train, evaluate, write and save step ``step``."""
        cfg, sc = self.cfg, self.scenario
        seed_everything(mix_seed(cfg.run.seed, 1000 + step))
        sched = build.step_schedule(cfg, step)
        trainer = self._trainer(step)
        tr = cfg.train
        opt, lr_sched = make_optimizer(
            trainer.model, lr=sched.lr, iters=sched.iters, warmup_iters=sched.warmup_iters,
            warmup_factor=tr.warmup_factor, poly_power=tr.poly_power,
            weight_decay=tr.weight_decay, head_lr_mult=tr.head_lr_mult,
        )  # fmt: skip
        scaler = torch.amp.GradScaler(
            self.runtime.device.type, enabled=self.runtime.precision == "fp16"
        )
        resumed = Resumed()
        if self.resume:
            resumed = self.resume_point.restore(
                step, self.runtime.device, model=trainer.model, optimizer=opt,
                scheduler=lr_sched, scaler=scaler,
            )  # fmt: skip
            if resumed.start:
                log.info("step %d: resumed at iteration %d/%d", step, resumed.start, sched.iters)
        start, best = resumed.start, resumed.best
        self.tables["losses"].rows = [
            r for r in self.tables["losses"].rows
            if int(r["step"]) < step or (int(r["step"]) == step and int(r["iter"]) <= start)
        ]  # fmt: skip
        trainer.wrap_for_processes()
        loader = self._loader(step, start, sched.iters)
        apply_rng(resumed)  # after the loader: nothing below the loop draws first
        log.info(
            "step %d: classes %s, %d training images, %d iterations, lr %.2e (decoder x%g)",
            step, sc.step_classes(step), loader.sampler.n, sched.iters, sched.lr, tr.head_lr_mult,
        )  # fmt: skip
        bar = None
        if self.bar:
            bar = tqdm(total=sched.iters, initial=start, desc=f"step {step}", dynamic_ncols=True)
        callbacks = self._callbacks(
            step, trainer, start, sched.iters, opt, lr_sched, scaler, best, bar
        )
        trainer.train(
            loader, start=start, step=step, optimizer=opt, scheduler=lr_sched, scaler=scaler,
            callbacks=callbacks,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        self.tables["losses"].flush()
        self._finish_step(step, trainer.model, best)

    # ---------------------------------------------------------------- the step's objects

    def _new_model(self) -> nn.Module:
        return build.build_model(self.cfg, self.clip).to(self.runtime.device)

    def _trainer(self, step: int) -> StepTrainer:
        """The step's model (from CLIP, ``model.init_weights`` or the previous step) and the
        frozen models its losses read (SPEC 1.1 ``ori_clip``, 1.5 the old model)."""
        cfg = self.cfg
        model = self._new_model()
        reference = old_model = None
        if step == 0:
            if cfg.loss.use_gpd:
                reference = frozen_encoder_copy(model.encoder)
            if cfg.model.init_weights:
                layout = load_segmenter_weights(model, cfg.model.init_weights)
                log.info("step 0: weights from %s (%s layout)", cfg.model.init_weights, layout)
        else:
            self._load_step_weights(model, step - 1)
            if cfg.loss.use_gpd or cfg.loss.use_qd:
                old_model = freeze(copy.deepcopy(model))  # SPEC 1.5: eval + frozen
        sc = self.scenario
        return StepTrainer(
            model, self.criterion, self.runtime,
            text=self.text[: sc.num_seen(step)].to(self.runtime.device),
            num_old=sc.num_seen(step - 1) if step > 0 else 0,
            grad_clip=cfg.train.grad_clip, reference=reference, old_model=old_model,
        )  # fmt: skip

    def _load_step_weights(self, model: nn.Module, step: int) -> None:
        path = self.run.step_checkpoint(step)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: step {step + 1} starts from step {step}'s weights; run step "
                f"{step} first (or all steps) into this run folder"
            )
        state = torch.load(path, map_location=self.runtime.device, weights_only=False)
        use_best = self.cfg.train.select_best_on_val and "best_model" in state
        model.load_state_dict(state["best_model" if use_best else "model"])

    def _loader(self, step: int, start: int, iters: int):
        sc, d = self.scenario, self.runtime.dist
        indices = sc.train_indices(self.membership, step)
        dataset = StepDataset(self.train_source, indices, sc.train_lut(step), self.train_transform)
        return train_loader(
            dataset, batch_size=self.cfg.train.batch_size, seed=mix_seed(self.cfg.run.seed, step),
            start=start, total=iters, rank=d.rank, world=d.world,
            num_workers=self.cfg.run.num_workers, pin_memory=self.runtime.device.type == "cuda",
        )  # fmt: skip

    # ---------------------------------------------------------------- callbacks

    def _callbacks(self, step, trainer, start, iters, opt, lr_sched, scaler, best, bar) -> list:
        """Per-iteration work, in order: progress bar, loss log, val selection, resume point."""
        cfg, model = self.cfg, trainer.model
        t0 = time.perf_counter()

        def progress(it, terms, grad_norm):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['total'].item():.3f}")

        def losses(it, terms, grad_norm):
            if it % cfg.run.log_every == 0 or it == iters:
                seconds = time.perf_counter() - t0
                self._log_losses(step, it, iters, terms, grad_norm, opt, seconds, start)

        def select(it, terms, grad_norm):
            every = cfg.train.eval_every
            if cfg.train.select_best_on_val and every and it % every == 0 and it < iters:
                self._track_best(model, step, best)

        def resume_point(it, terms, grad_norm):
            every = cfg.run.checkpoint_every
            if every and it % every == 0 and it < iters:
                if self.runtime.dist.main:
                    self.tables["losses"].flush()
                self.resume_point.save(
                    step=step, it=it, model=model, optimizer=opt, scheduler=lr_sched,
                    scaler=scaler, best=best, config=to_dict(cfg),
                )  # fmt: skip
                self.runtime.barrier()

        return [progress, losses, select, resume_point]

    # ---------------------------------------------------------------- logging, evaluation

    def _log_losses(self, step, it, iters, terms, grad_norm, opt, seconds, start) -> None:
        values = self.runtime.mean_over_processes({k: float(v.detach()) for k, v in terms.items()})
        row = {**self.meta, "step": step, "iter": it}
        rows = [{**row, "term": k, "value": v} for k, v in values.items()]
        rows.append({**row, "term": "grad_norm", "value": float(grad_norm)})
        self.tables["losses"].extend(rows, flush=False)
        speed = (it - start) / max(seconds, 1e-9)
        parts = " ".join(f"{k.removeprefix('loss_')}={v:.4f}" for k, v in values.items())
        log.info(
            "step %d it %d/%d %s grad_norm=%.2f lr=%.2e %.2f it/s",
            step, it, iters, parts, float(grad_norm), opt.param_groups[0]["lr"], speed,
            extra={"detail": True},
        )  # fmt: skip

    def _track_best(self, model: nn.Module, step: int, best: BestState) -> None:
        """Opt-in val-selected checkpoint (SPEC 5, 7.2): keep the best new-class mIoU."""
        summary = self.evaluator.metrics(model, step).summary
        score = next(r["mIoU_new"] for r in summary if r["convention"] == "fg_only")
        if not math.isnan(score) and score > best.score:
            best.score = score
            best.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            log.info("step %d: new best val mIoU_new %.4f", step, score)

    def _reference_prototypes(self) -> torch.Tensor:
        """Class prototypes under the ORIGINAL CLIP (computed once per run, then read back)."""
        if self._ref_protos is not None:
            return self._ref_protos
        path = self.run.reference_prototypes
        if self._ref_protos_on_disk:  # decided at start-up, identically on every rank
            self._ref_protos = torch.load(path, map_location="cpu", weights_only=True)
        else:
            self._ref_protos = self.evaluator.prototypes(freeze(self._new_model().encoder))
            if self.runtime.dist.main:
                atomic_torch_save(self._ref_protos, path)
        return self._ref_protos

    def _finish_step(self, step: int, model: nn.Module, best: BestState) -> None:
        """Evaluate, write the step's rows and its checkpoint; the resume point goes."""
        result: EvalResult = self.evaluator.evaluate(model, step, self._reference_prototypes)
        if self.cfg.train.select_best_on_val:
            self._track_best(model, step, best)
        for row in result.summary:
            log.info(
                "eval step %d %s: mIoU %.4f base %.4f novel %.4f old %.4f new %.4f",
                step, row["convention"], row["mIoU"], row["mIoU_base"], row["mIoU_novel"],
                row["mIoU_old"], row["mIoU_new"],
            )  # fmt: skip
        for name in ("summary", "per_class", "zero_shot", "shift"):
            self.tables[name].extend(getattr(result, name), flush=False)
        if self.runtime.dist.main:
            save_step_checkpoint(
                self.run.step_checkpoint(step), step=step, model=model,
                config=to_dict(self.cfg), text=self.text, class_names=self.class_names,
                num_seen=self.scenario.num_seen(step), pos_embed_grid=model.encoder.pos_grid,
                summary=result.summary,
                best=best if self.cfg.train.select_best_on_val else None,
            )  # fmt: skip
            for name in ("summary", "per_class", "zero_shot", "shift", "losses"):
                self.tables[name].flush()
        self.resume_point.clear()
        self.runtime.barrier()
