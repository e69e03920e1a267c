"""The Python entry points used by the CLI and the notebooks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import yaml

from cisslib.build import default_run_name
from cisslib.config import Config, ConfigError, load_config, to_dict
from cisslib.engine import Engine, LoadedStep, load_step
from cisslib.runs import RunDir

__all__ = ["run", "load_step", "LoadedStep", "parse_steps", "resolve_run_dir"]

log = logging.getLogger("cisslib")


def parse_steps(steps: str | int | Sequence[int] | None) -> tuple[int | None, int | None]:
    """``"1-3"`` / ``"2"`` / ``2`` / ``[0, 1]`` -> ``(first, last)``; ``None`` -> all steps."""
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
    values = [int(s) for s in steps]
    if not values:
        return None, None
    return min(values), max(values)


def resolve_run_dir(cfg: Config, params: str | Path | None, out: str | Path | None) -> Path:
    cfg.run.name = default_run_name(cfg, params) if not out else (cfg.run.name or Path(out).name)
    return Path(out) if out else Path(cfg.run.out_root) / cfg.run.name


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
        params: a ``params/*.yaml`` file (``None``: defaults).
        overrides: ``key.sub=value`` strings applied after the file.
        out: the run folder (default ``<run.out_root>/<params stem>_<preset>``).
        steps: which steps to run (``"A-B"``); steps after 0 need the previous step's checkpoint
            in the same folder.
        resume: continue an interrupted run in ``out`` from its last checkpoint.
    """
    cfg = load_config(params, overrides)
    run_dir = resolve_run_dir(cfg, params, out)
    first, last = parse_steps(steps)
    rd = RunDir(run_dir)
    if rd.config.is_file() and resume:
        old = yaml.safe_load(rd.config.read_text()) or {}
        diffs = _config_differences(old, to_dict(cfg))
        if diffs:
            raise ConfigError(
                f"{rd.config}: --resume with a different config ({'; '.join(diffs[:3])}); "
                "resume with the same params and overrides, or use a new --out"
            )
    elif rd.completed_steps() and not resume and (first is None or first == 0):
        raise ConfigError(
            f"run folder {run_dir} already holds results (steps {rd.completed_steps()}); pass "
            "--resume to continue it or --out for a new folder"
        )
    engine = Engine(cfg, run_dir, resume=resume)
    engine.run_steps(first, last)
    return run_dir
