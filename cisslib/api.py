"""The Python entry points used by the CLI and the notebooks: run a scenario, read a step back."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cisslib import build
from cisslib.config import Config, ConfigError, from_dict, load_config, to_dict
from cisslib.data.step_dataset import StepDataset
from cisslib.engine import Runner
from cisslib.paths import find_params, in_project
from cisslib.protocol import Scenario
from cisslib.runs import RunDir, default_run_name, read_step_checkpoint

__all__ = ["run", "load_step", "LoadedStep", "parse_steps", "resolve_run_dir"]

log = logging.getLogger("cisslib")


def parse_steps(steps: str | int | Sequence[int] | None) -> tuple[int | None, int | None]:
    """``"1-3"`` / ``"2"`` / ``2`` / ``[0, 1]`` -> ``(first, last)``; ``None`` -> all steps.

    A list must hold consecutive steps (in any order); ``[0, 2]`` is refused, not run as 0-2.
    """
    if steps is None or steps == "":
        return None, None
    if isinstance(steps, int):
        return steps, steps
    if isinstance(steps, str):
        parts = steps.split("-")
        try:
            if len(parts) == 1:
                return int(parts[0]), int(parts[0])
            if len(parts) == 2:
                return int(parts[0]), int(parts[1])
        except ValueError:
            pass
        raise ConfigError(f"--steps {steps!r}: use A-B (e.g. 0-2) or a single step number")
    values = sorted({int(s) for s in steps})
    if not values:
        return None, None
    if values != list(range(values[0], values[-1] + 1)):
        raise ConfigError(
            f"steps {list(steps)}: not consecutive; each step starts from the previous step's "
            f"weights, so list every step from {values[0]} to {values[-1]} (or give "
            f"'{values[0]}-{values[-1]}')"
        )
    return values[0], values[-1]


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
            in the same folder.
        resume: continue an interrupted run in ``out`` from its last checkpoint.
    """
    params = find_params(params) if params is not None else None
    cfg = load_config(params, overrides)
    run_dir = resolve_run_dir(cfg, params, out)
    first, last = parse_steps(steps)
    rd = RunDir(run_dir)
    if rd.config.is_file() and resume:
        old = yaml.safe_load(rd.config.read_text()) or {}
        diffs = _config_differences(old, to_dict(cfg))
        if diffs:
            raise ConfigError(
                f"{rd.config}: resume with a different config ({'; '.join(diffs[:3])}); "
                "resume with the same params and overrides, or use a new run folder "
                "(out=... / --out)"
            )
    elif rd.completed_steps() and not resume and (first is None or first == 0):
        raise ConfigError(
            f"run folder {run_dir} already holds results (steps {rd.completed_steps()}); "
            "resume=True (--resume) continues it, a new run folder (out=... / --out) starts over"
        )
    Runner(cfg, run_dir, resume=resume).run_steps(first, last)
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
