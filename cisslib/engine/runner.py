"""The steps of a scenario (SPEC 1.5, 4): prepare once, then per step train, evaluate, write, save.

For each step the runner slices the training set, builds the step's model from the previous
step's final weights (or from CLIP at step 0), trains it for a fixed number of iterations
(:mod:`cisslib.engine.trainer`), evaluates it (:mod:`cisslib.engine.evaluator`), writes the
step's rows to the run folder's tables and saves the step checkpoint. Inside a step a resume point
is written every ``run.checkpoint_every`` iterations; ``resume=True`` continues from it and ends
with the same weights and metrics as an uninterrupted run (at the same thread count and
determinism settings, which the checkpoints record; a resume under others gets a warning).

Building a :class:`Runner` writes nothing: data, CLIP, text and every check that can fail on bad
input run first; :meth:`Runner.run_steps` then writes the config and the log. A step is complete
when its checkpoint (which holds the step's rows) and its rows in the tables are both on disk;
on resume a missing half is restored from the other.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from cisslib import build
from cisslib.config import Config, ConfigError, save_config, to_dict
from cisslib.config.validation import validate_model
from cisslib.data.step_dataset import StepDataset
from cisslib.engine.checkpoint import (
    BestState,
    Resumed,
    ResumePoint,
    apply_rng,
    check_step_checkpoints,
    forget_stale_resume_point,
    read_reference_prototypes,
    restore_rows,
    save_step_checkpoint,
    step_fix,
)
from cisslib.engine.cost import StepCost
from cisslib.engine.data_order import train_loader
from cisslib.engine.evaluator import EvalResult, Evaluator
from cisslib.engine.optim import make_optimizer
from cisslib.engine.runtime import (
    Runtime,
    apply_threads,
    describe_threads,
    mix_seed,
    plan_threads,
    seed_everything,
)
from cisslib.engine.threshold import TauRule
from cisslib.engine.trainer import StepTrainer
from cisslib.files import atomic_torch_save, read_torch
from cisslib.metrics.continual import CONTINUAL_INPUTS, continual_tables
from cisslib.model import freeze, frozen_encoder_copy, load_segmenter_weights
from cisslib.model.clip import clip_geometry
from cisslib.runs import (
    DERIVED_TABLES,
    TABLES,
    RunDir,
    RunFolderError,
    Table,
    run_meta,
    setup_logging,
)
from cisslib.session import log_to_console, relayed, show_bar, step_bar

log = logging.getLogger("cisslib")


class Runner:
    """Runs the steps of one scenario into one run folder.

    Args:
        cfg: the validated config.
        run_dir: the run folder (nothing is written into it before :meth:`run_steps`).
        resume: continue the run in ``run_dir`` (complete steps are skipped, a resume point is
            continued, missing table rows are restored from the step checkpoints).
        where: names the config in error messages (the params file).
    """

    def __init__(
        self, cfg: Config, run_dir: str | Path, resume: bool = False, where: str = "config"
    ):
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.resume = resume
        self.started = False
        self.runtime = Runtime.create(cfg.run.device, cfg.run.precision)
        world = self.runtime.dist.world
        if cfg.train.batch_size % world:
            raise ConfigError(
                f"{where}: key 'train.batch_size' {cfg.train.batch_size} is not divisible by the "
                f"{world} processes; pick a multiple"
            )
        main = self.runtime.dist.main
        self.bar = main and show_bar(cfg.run.progress)  # terminal / notebook / batch: session.py
        if main:
            setup_logging(None, to_console=log_to_console(cfg.run.progress))  # log.txt: at start
        seed_everything(cfg.run.seed)
        data = build.build_run_data(cfg, progress=self.bar and not relayed())
        self.train_source, self.val_source = data.train_source, data.val_source
        self.scenario, self.class_names, self.membership = (
            data.scenario,
            data.class_names,
            data.membership,
        )
        self.clip = build.build_clip(cfg)
        n_params = sum(p.numel() for p in self.clip.model.visual.parameters())
        self.threads = plan_threads(
            cfg.run.threads, model_params=n_params, workers=cfg.run.num_workers,
            device_type=self.runtime.device.type,
        )  # fmt: skip
        apply_threads(self.threads)
        validate_model(cfg, **clip_geometry(self.clip.model), where=where)
        self.text = build.build_text(cfg, self.clip, self.train_source.class_names, self.scenario)
        self.train_transform, test_transform = build.build_transforms(cfg, self.runtime.device.type)
        self.criterion = build.build_criterion(cfg)
        self.meta = run_meta(cfg)
        self.evaluator = Evaluator(
            self.scenario, self.text, self.class_names, self.val_source, test_transform,
            build.build_eval_settings(cfg, self.threads.workers), self.runtime, self.meta,
        )  # fmt: skip
        e = cfg.eval
        self.tau_rule = TauRule(
            e.tau_from, e.tau, e.tau_images, self.scenario, self.membership, self.train_source,
            self.evaluator, self.runtime, self.meta, self.run.table("threshold"),
        )  # fmt: skip
        self.resume_point = ResumePoint(self.run.last_checkpoint, enabled=main)
        self._ref_protos: torch.Tensor | None = None
        path = self.run.reference_prototypes
        if resume and path.is_file():  # decided at start-up, identically on every rank
            self._ref_protos = read_reference_prototypes(path)
        self.tables = {
            name: Table(self.run.table(name), cols, enabled=main) for name, cols in TABLES.items()
        }
        if cfg.model.init_weights and not self.run.step_checkpoint(0).is_file():
            with torch.random.fork_rng(devices=[]):  # the run's random draws stay as they were
                load_segmenter_weights(self._new_model(), cfg.model.init_weights)

    # ---------------------------------------------------------------- the run

    def check(self, first: int | None = None, last: int | None = None) -> tuple[int, int]:
        """Check what steps ``first..last`` need from the run folder, writing nothing: the step
        range, the checkpoint the first step to train starts from, the resume point and (on
        resume) the complete steps' checkpoints. Returns ``(first, last)``."""
        n = self.scenario.n_steps
        first = 0 if first is None else first
        last = n - 1 if last is None else last
        if not 0 <= first <= last < n:
            raise ConfigError(f"--steps {first}-{last}: this scenario has steps 0..{n - 1}")
        done = set(self.run.completed_steps()) if self.resume else set()
        check_step_checkpoints(self.run, done, [t for t in range(first, last + 1) if t not in done])
        if self.resume:
            self.resume_point.peek()
        return first, last

    def _start(self) -> None:
        """The run starts: the config and the log (with what was logged so far) are written."""
        if self.runtime.dist.main:
            setup_logging(self.run.log, to_console=log_to_console(self.cfg.run.progress))
            save_config(self.cfg, self.run.config)
            log.info("%s", describe_threads(self.threads))
        self.started = True

    def run_steps(self, first: int | None = None, last: int | None = None) -> None:
        """Train and evaluate steps ``first..last`` (default: all; with resume, what is left)."""
        first, last = self.check(first, last)
        n = self.scenario.n_steps
        self._start()
        done = set(self.run.completed_steps()) if self.resume else set()
        if self.resume:
            keep = lambda r: int(r["step"]) in done  # noqa: E731
        else:
            keep = lambda r: int(r["step"]) < first  # noqa: E731
        for name, table in self.tables.items():
            if name in DERIVED_TABLES:
                continue  # recomputed after every step
            # the loss history of an interrupted step is trimmed in _train, at its resume point
            table.load(keep=(lambda r: True) if name == "losses" and self.resume else keep)
        if self.resume:
            done = restore_rows(self.run, self.tables, done)
            forget_stale_resume_point(self.resume_point, self.run, done)
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
        if self.resume and self.runtime.dist.main:  # rows may have been restored: re-derive
            self._derive_continual()
            for name in DERIVED_TABLES:
                self.tables[name].flush()

    def run_step(self, step: int) -> None:
        """Prepare, train, evaluate, write and save step ``step``."""
        cfg = self.cfg
        seed_everything(mix_seed(cfg.run.seed, 1000 + step))
        sched = build.step_schedule(cfg, step)
        trainer = self._trainer(step)
        cost = StepCost(self.runtime, trainer.model)
        if cost.trainable:
            best, done = self._train(step, trainer, sched)
        else:
            log.info("step %d: nothing to train (preset %s): evaluation only", step,
                     cfg.run.preset)  # fmt: skip
            best, done = BestState(), 0
        cost.trained(done, cfg.train.batch_size)
        self._finish_step(step, trainer.model, best, cost)

    def _train(self, step: int, trainer: StepTrainer, sched) -> tuple[BestState, int]:
        """The training iterations of ``step`` (from its resume point when resuming); returns
        the val-selection state and the number of iterations run here."""
        sc, tr = self.scenario, self.cfg.train
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
            bar = step_bar(total=sched.iters, initial=start, desc=f"step {step}")
        callbacks = self._callbacks(
            step, trainer, start, sched.iters, opt, lr_sched, scaler, best, bar
        )
        last = trainer.train(
            loader, start=start, step=step, optimizer=opt, scheduler=lr_sched, scaler=scaler,
            callbacks=callbacks, check_every=self._check_every(), total=sched.iters,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        self.tables["losses"].flush()
        return best, last - start

    # ---------------------------------------------------------------- the step's objects

    def _check_every(self) -> int:
        """How often the trainer reads the loss's finiteness: every iteration that logs, saves a
        resume point or evaluates (their greatest common divisor), so none sees a bad model."""
        r, tr = self.cfg.run, self.cfg.train
        periods = [r.log_every, r.checkpoint_every]
        if tr.select_best_on_val:
            periods.append(tr.eval_every)
        return math.gcd(*[p for p in periods if p > 0]) or 1

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
            compile=cfg.run.compile,
        )  # fmt: skip

    def _load_step_weights(self, model: nn.Module, step: int) -> None:
        path = self.run.step_checkpoint(step)
        if not path.is_file():
            raise RunFolderError(
                f"{path} is missing: step {step + 1} starts from step {step}'s weights; run step "
                f"{step} first (or all steps) into this run folder"
            )
        state = read_torch(
            path, fix=step_fix(step), error=RunFolderError, map_location=self.runtime.device
        )
        use_best = self.cfg.train.select_best_on_val and "best_model" in state
        model.load_state_dict(state["best_model" if use_best else "model"])

    def _loader(self, step: int, start: int, iters: int):
        sc, d = self.scenario, self.runtime.dist
        indices = sc.train_indices(self.membership, step)
        dataset = StepDataset(self.train_source, indices, sc.train_lut(step), self.train_transform)
        return train_loader(
            dataset, batch_size=self.cfg.train.batch_size, seed=mix_seed(self.cfg.run.seed, step),
            start=start, total=iters, rank=d.rank, world=d.world,
            num_workers=self.threads.workers, pin_memory=self.runtime.device.type == "cuda",
        )  # fmt: skip

    # ---------------------------------------------------------------- callbacks

    def _callbacks(self, step, trainer, start, iters, opt, lr_sched, scaler, best, bar) -> list:
        """Per-iteration work, in order: progress bar, loss log, val selection, resume point."""
        cfg, model = self.cfg, trainer.model
        t0 = time.perf_counter()

        def progress(it, terms, grad_norm):
            if bar is not None:
                bar.update(1)
                if it % cfg.run.log_every == 0 or it == iters:  # a host sync: not every iteration
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
        if self._ref_protos is not None:  # read back at start-up on resume
            return self._ref_protos
        self._ref_protos = self.evaluator.prototypes(freeze(self._new_model().encoder))
        if self.runtime.dist.main:
            atomic_torch_save(self._ref_protos, self.run.reference_prototypes)
        return self._ref_protos

    def _finish_step(self, step: int, model: nn.Module, best: BestState, cost: StepCost) -> None:
        """Evaluate, write the step's rows and its checkpoint; the resume point goes."""
        tau, threshold = self.tau_rule.for_step(step, model, self.tables["threshold"].rows)
        result: EvalResult = self.evaluator.evaluate(model, step, self._reference_prototypes, tau)
        result.threshold = threshold
        if self.cfg.train.select_best_on_val:
            self._track_best(model, step, best)
        cost.evaluated()
        for row in result.summary:
            log.info(
                "eval step %d %s: mIoU %.4f base %.4f novel %.4f old %.4f new %.4f",
                step, row["convention"], row["mIoU"], row["mIoU_base"], row["mIoU_novel"],
                row["mIoU_old"], row["mIoU_new"],
            )  # fmt: skip
        for name in EvalResult.TABLES:
            self.tables[name].extend(getattr(result, name), flush=False)
        self.tables["cost"].extend([{**self.meta, **cost.row(step)}], flush=False)
        self._derive_continual()
        if self.runtime.dist.main:
            # the checkpoint first, holding the step's rows: a run cut before the tables are
            # flushed gets them back on resume (_restore_rows)
            save_step_checkpoint(
                self.run.step_checkpoint(step), step=step, model=model,
                config=to_dict(self.cfg), text=self.text, class_names=self.class_names,
                num_seen=self.scenario.num_seen(step), pos_embed_grid=model.encoder.pos_grid,
                rows={
                    name: table.step_rows(step)
                    for name, table in self.tables.items()
                    if name not in DERIVED_TABLES
                },
                best=best if self.cfg.train.select_best_on_val else None,
            )  # fmt: skip
            for table in self.tables.values():
                table.flush()
        self.resume_point.clear()
        self.runtime.barrier()

    def _derive_continual(self) -> None:
        """Rewrite the continual-learning tables from the run's summary and per-class rows."""
        meta = {k: self.meta[k] for k in ("run", "preset", "seed")}
        per_run, per_class = continual_tables(
            *(pd.DataFrame(self.tables[n].rows, columns=list(TABLES[n])) for n in CONTINUAL_INPUTS)
        )
        self.tables["continual"].rows = [{**meta, **r} for r in per_run]
        self.tables["continual_per_class"].rows = [{**meta, **r} for r in per_class]
