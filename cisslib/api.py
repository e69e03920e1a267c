"""The Python entry points used by the CLI and the notebooks: run a scenario, read a step back.

:func:`run` guards the run folder: it refuses to start over results without ``--resume``, to
continue with another config, to resume a folder that holds no run, or to share a folder with a
live run (``run.lock``); and it writes nothing into the folder before every check that can fail on
bad input (config, data, weights, embeddings, checkpoints) has passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cisslib import build
from cisslib.config import Config, ConfigError, from_dict, load_config, to_dict
from cisslib.config.validation import validate_device
from cisslib.data.step_dataset import StepDataset
from cisslib.engine import Runner
from cisslib.paths import find_params, in_project
from cisslib.protocol import Scenario, parse_setting, scenario_setting
from cisslib.runs import (
    RunDir,
    RunFolderError,
    RunLock,
    close_log_file,
    default_run_name,
    read_step_checkpoint,
)

__all__ = ["run", "load_step", "LoadedStep", "parse_steps", "resolve_run_dir"]

log = logging.getLogger("cisslib")


def parse_steps(steps: str | int | Sequence[int] | None) -> tuple[int | None, int | None]:
    """``"1-3"`` / ``"2"`` / ``2`` / ``[0, 1]`` -> ``(first, last)``; ``None`` -> all steps.

    A list must hold consecutive steps (in any order); ``[0, 2]`` is refused, not run as 0-2.
    """
    if steps is None or steps == "":
        return None, None
    if isinstance(steps, int):
        first, last = steps, steps
    elif isinstance(steps, str):
        parts = steps.split("-")
        try:
            if len(parts) not in (1, 2):
                raise ValueError(steps)
            first, last = int(parts[0]), int(parts[-1])
        except ValueError:
            raise ConfigError(
                f"--steps {steps!r}: use A-B (e.g. 0-2) or a single step number"
            ) from None
    else:
        values = sorted({int(s) for s in steps})
        if not values:
            return None, None
        if values != list(range(values[0], values[-1] + 1)):
            raise ConfigError(
                f"steps {list(steps)}: not consecutive; each step starts from the previous "
                f"step's weights, so list every step from {values[0]} to {values[-1]} (or give "
                f"'{values[0]}-{values[-1]}')"
            )
        first, last = values[0], values[-1]
    if first < 0 or last < first:
        raise ConfigError(f"--steps {steps!r}: give steps A-B with 0 <= A <= B")
    return first, last


def check_steps(cfg: Config, first: int | None, last: int | None) -> None:
    """The step range against the scenario (before any data is read)."""
    sc = cfg.scenario
    k, base, inc = parse_setting(sc.dataset, scenario_setting(sc))
    n = Scenario(num_classes=k, base=base, increment=inc).n_steps
    top = last if last is not None else first
    if top is not None and top >= n:
        setting = scenario_setting(sc)
        raise ConfigError(
            f"--steps {first}-{last}: {sc.dataset} {setting} has steps 0..{n - 1}; pick steps in "
            "that range"
        )


def resolve_run_dir(cfg: Config, params: str | Path | None, out: str | Path | None) -> Path:
    """The run folder, recording the run's name in ``cfg.run.name`` (it labels every table row).

    ``out`` given: that folder, named ``run.name`` or the folder's name; otherwise
    ``<run.out_root>/<run.name or params stem_preset>``. A relative ``out`` or ``out_root`` is
    under the project root (:func:`cisslib.paths.in_project`), whatever the working directory.
    """
    r, sc = cfg.run, cfg.scenario
    name = r.name or (
        Path(out).name if out else default_run_name(params, r.preset, sc.dataset, sc.setting)
    )
    cfg.run.name = name
    if params is not None and not cfg.run.params:
        cfg.run.params = Path(params).stem
    return in_project(out) if out else in_project(r.out_root) / name


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _saved_config(rd: RunDir) -> dict | None:
    if not rd.config.is_file():
        return None
    try:
        data = yaml.safe_load(rd.config.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunFolderError(
            f"{rd.config} is unreadable ({type(e).__name__}); restore it, or use a new --out"
        ) from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{rd.config} holds no config; restore it, or use a new --out")
    return data


def _holdings(rd: RunDir) -> str:
    parts = []
    if rd.completed_steps():
        parts.append(f"complete steps {rd.completed_steps()}")
    if rd.last_checkpoint.is_file():
        parts.append(f"a resume point ({rd.last_checkpoint})")
    return ", ".join(parts) or "tables"


def check_folder(
    rd: RunDir, cfg: Config, resume: bool, first: int | None, main: bool = True
) -> bool:
    """Whether the run in ``rd`` may go ahead as asked (raises :class:`RunFolderError` with one
    line if not); returns ``resume`` as it applies: ``False`` when a folder that was asked to
    resume holds nothing to resume (a failed earlier start). ``main``: the process that locks
    the folder (the others of a torchrun group do not look at the lock)."""
    root = rd.root
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"--out {root} is a file, not a folder; pass a folder path")
    if main:
        RunLock(root).check()
    old = _saved_config(rd)
    diffs = _config_differences(old, to_dict(cfg)) if old is not None else []
    results = rd.holds_results()
    if resume:
        if old is None:
            what = "does not exist" if not root.exists() else "holds no run (no config.yaml)"
            raise RunFolderError(
                f"--resume: run folder {root} {what}; drop --resume to start a new run there"
            )
        if not results:
            log.info("run folder %s holds no checkpoint yet: starting from step 0", root)
            return False
    elif results and not first:
        raise RunFolderError(
            f"run folder {root} already holds a run ({_holdings(rd)}); continue it with "
            "resume=True (--resume), or give another folder (--out)"
        )
    elif results and rd.last_checkpoint.is_file():
        raise RunFolderError(
            f"run folder {root} holds a resume point ({rd.last_checkpoint}); continue it "
            "with resume=True (--resume), or give another folder (--out)"
        )
    if diffs and results:
        raise RunFolderError(
            f"run folder {root} was run with another config ({'; '.join(diffs[:3])}; see "
            f"{rd.config}); use the same params and overrides, or --out for a new folder"
        )
    return resume


def _check_not_done(rd: RunDir, first: int | None, last: int | None, resume: bool) -> None:
    if resume or not first:
        return
    done = [t for t in rd.completed_steps() if first <= t <= (last if last is not None else t)]
    if done:
        raise RunFolderError(
            f"step {done[0]} is already complete in {rd.root} ({rd.step_checkpoint(done[0])}); "
            "pass --resume to skip complete steps, or --out for a new folder"
        )


def run(
    params: str | Path | None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    steps: str | int | Sequence[int] | None = None,
    resume: bool = False,
) -> Path:
    """Run (or resume) a scenario from a params file; returns the run folder.

    Args:
        params: a params file, or its name in ``params/`` (``toy_15-1``); ``None``: defaults.
        overrides: ``key.sub=value`` strings applied after the file.
        out: the run folder (default ``<run.out_root>/<params stem>_<preset>``); relative paths
            are under the project root.
        steps: which steps to run (``"A-B"``); steps after 0 need the previous step's checkpoint
            in the same folder, run with the same config.
        resume: continue an interrupted run in ``out``: complete steps are skipped, the resume
            point is continued, rows missing from the tables are restored from the step
            checkpoints.

    Nothing is written into the run folder before the config, the data, the CLIP, the text
    embeddings and the folder's checkpoints have been checked; while the run works the folder
    holds ``run.lock``.
    """
    params = find_params(params) if params is not None else None
    where = str(params) if params is not None else "config"
    cfg = load_config(params, overrides)
    validate_device(cfg, where)
    run_dir = resolve_run_dir(cfg, params, out)
    first, last = parse_steps(steps)
    check_steps(cfg, first, last)
    rd = RunDir(run_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    resume = check_folder(rd, cfg, resume, first, main)
    _check_not_done(rd, first, last, resume)
    runner = Runner(cfg, run_dir, resume=resume, where=where)
    runner.check(first, last)
    lock = RunLock(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # removed on a failure
    try:
        if main:
            lock.acquire()
            check_folder(rd, cfg, resume, first)  # again, holding the lock
            _check_not_done(rd, first, last, resume)
        runner.run_steps(first, last)
    except BaseException as e:
        if runner.started and not isinstance(e, KeyboardInterrupt):  # the traceback: log.txt only
            log.error("run failed: %s", e, exc_info=True, extra={"detail": True})
        if created and not runner.started:  # a failed start leaves no folder behind
            lock.release()
            with contextlib.suppress(OSError):
                for folder in created:
                    folder.rmdir()
        raise
    finally:
        lock.release()
        close_log_file()
    return run_dir


# --------------------------------------------------------------------------------------------
# reading a trained step back


@dataclass
class LoadedStep:
    """A trained step loaded for inspection (the explorer, notebooks)."""

    model: torch.nn.Module
    text: torch.Tensor  # (C_t, D) seen classes, label order
    class_names: list[str]  # seen classes, label order (label c+1 <-> class_names[c])
    cfg: Config
    val_source: Any
    scenario: Scenario
    step: int
    device: torch.device

    @property
    def num_images(self) -> int:
        n = len(self.val_source)
        return min(n, self.cfg.eval.max_images) if self.cfg.eval.max_images else n

    @torch.no_grad()
    def segment(self, i: int, tau: float | None = None) -> dict:
        """Segment val image ``i``.

        Returns ``image (H,W,3) uint8, gt (H,W), pred (H,W), scores (C,H,W)``.
        """
        _, test = build.build_transforms(self.cfg)
        img, gt = StepDataset(self.val_source, [i], self.scenario.test_lut(self.step), test)[0]
        e = self.cfg.eval
        labels, scores = self.model.segment(
            img[None].to(self.device),
            self.text.to(self.device),
            window=e.window,
            stride=e.stride,
            tau=tau,
            window_batch=e.window_batch,
        )
        return {
            "image": img.permute(1, 2, 0).clamp(0, 255).round().byte().numpy(),
            "gt": gt.numpy(),
            "pred": labels[0].cpu().numpy(),
            "scores": scores[0].float().cpu().numpy(),
        }


def load_step(run_dir: str | Path, step: int, device: str = "cpu") -> LoadedStep:
    """Load the model of ``step`` from a run folder, with its text and the val data."""
    state = read_step_checkpoint(run_dir, step)
    where = str(RunDir(run_dir).step_checkpoint(step))
    cfg = from_dict(state["config"], where=where)
    if "pos_embed_grid" not in state["config"].get("model", {}):
        cfg.model.pos_embed_grid = "checkpoint"  # written before the key existed (issue 9)
    model = build.build_model(cfg, build.build_clip(cfg))
    model.load_state_dict(state["model"])
    dev = torch.device(device)
    model.to(dev).eval()
    _, val = build.build_sources(cfg)
    scenario = build.build_scenario(cfg, len(val.class_names))
    c = state["num_seen"]
    return LoadedStep(
        model=model,
        text=state["text"][:c],
        class_names=list(state["class_names"][:c]),
        cfg=cfg,
        val_source=val,
        scenario=scenario,
        step=step,
        device=dev,
    )
