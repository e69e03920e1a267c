"""The run folder's one owner: its layout, naming, tidy CSV tables (written atomically, read back
into DataFrames), the step checkpoints read back, and the run's log.

```
<run>/config.yaml               the resolved config
<run>/log.txt                   one line per logged iteration and per evaluation
<run>/losses.csv                run, preset, step, iter, term, value
<run>/metrics/summary.csv       per step and convention: mIoU, mIoU_base, _novel, _old, _new
<run>/metrics/per_class.csv     per step, convention and class: group, step_added, iou
<run>/metrics/zero_shot.csv     per step and future class: iou before it is learned
<run>/metrics/shift.csv         per step and class: text_cos, drift_cos
<run>/metrics/pixel_flow.csv    per step, convention and class: where its GT pixels are predicted
<run>/metrics/calibration.csv   per step and old/new group: reliability bins of P(present), ECE
<run>/metrics/cost.csv          per step: wall time, iterations/s, images/s, peak memory, params
<run>/metrics/continual.csv     avg incremental mIoU, final old/new/all, hIoU, forgetting, BWT, ...
<run>/metrics/continual_per_class.csv   per class: forgetting, backward transfer, ...
<run>/checkpoints/step{t}.pt    weights after step t (+ config, the step's rows of every table)
<run>/checkpoints/last.pt       resume point inside the running step (removed when the step ends)
<run>/run.lock                  while a run works in the folder: its pid, host and start time
```

A step is complete when its checkpoint AND its rows are on disk: the checkpoint is written first
and holds the step's rows, so a run cut between the two restores the rows on ``--resume``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from cisslib.files import atomic_path, read_torch, write_error
from cisslib.protocol import scenario_setting
from cisslib.runlock import LOCK_NAME, RunFolderError, RunLock

__all__ = [
    "LOCK_NAME",
    "TABLES",
    "RunDir",
    "RunFolderError",
    "RunLock",
    "Table",
    "default_run_name",
    "load_runs",
    "read_step_checkpoint",
    "read_table",
    "run_folders",
    "close_log_file",
    "setup_logging",
    "write_table",
]

LOGGER_NAME = "cisslib"
#: The time format of every log line (log.txt and the console).
DATEFMT = "%Y-%m-%d %H:%M:%S"

#: The run folder's tidy tables and their columns (``RunDir.table(name)`` gives the path).
TABLES: dict[str, tuple[str, ...]] = {
    "losses": ("run", "preset", "step", "iter", "term", "value"),
    "summary": (
        "run", "preset", "dataset", "setting", "mode", "seed", "step", "convention", "n_seen",
        "mIoU", "mIoU_base", "mIoU_novel", "mIoU_old", "mIoU_new",
    ),
    "per_class": (
        "run", "preset", "step", "convention", "class_index", "class_name", "group", "step_added",
        "iou",
    ),
    "zero_shot": ("run", "preset", "step", "class_index", "class_name", "step_added", "iou"),
    "shift": (
        "run", "preset", "step", "class_index", "class_name", "step_added", "seen", "text_cos",
        "drift_cos",
    ),
    "pixel_flow": (
        "run", "preset", "step", "convention", "class_index", "class_name", "step_added", "group",
        "n_pixels", "to_self", "to_old", "to_new", "to_background",
    ),
    "calibration": (
        "run", "preset", "step", "group", "bin", "bin_low", "bin_high", "n", "frac_present",
        "mean_prob", "ece", "mean_prob_present", "mean_prob_absent",
    ),
    "threshold": ("run", "preset", "step", "tau", "tau_from", "images", "miou_with_bg"),
    "cost": (
        "run", "preset", "step", "device", "precision", "threads", "processes", "iterations",
        "train_seconds", "iters_per_second", "images_per_second", "eval_seconds",
        "peak_memory_mb", "memory_kind", "trainable_params",
    ),
    "continual": ("run", "preset", "seed", "convention", "metric", "value"),
    "continual_per_class": (
        "run", "preset", "seed", "convention", "class_index", "class_name", "step_added",
        "iou_learned", "iou_best", "iou_final", "forgetting", "backward_transfer",
        "zero_shot_before",
    ),
}  # fmt: skip

#: Tables rewritten whole after every step from the others (not appended to).
DERIVED_TABLES = ("continual", "continual_per_class")


def default_run_name(
    params: str | os.PathLike | None, preset: str, dataset: str, setting: str
) -> str:
    """``<params stem>_<preset>`` (``<dataset>_<setting>_<preset>`` without a params file)."""
    stem = Path(params).stem if params else f"{dataset}_{setting}"
    return f"{stem}_{preset}"


def run_meta(cfg) -> dict:
    """The columns that label every table row of a run (``cfg``: its resolved config)."""
    sc = cfg.scenario
    return {
        "run": cfg.run.name,
        "preset": cfg.run.preset,
        "dataset": sc.dataset,
        "setting": scenario_setting(sc),
        "mode": sc.mode,
        "seed": cfg.run.seed,
    }


class RunDir:
    """Paths of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step{step}.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def reference_prototypes(self) -> Path:
        return self.checkpoints / "reference_prototypes.pt"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    def table(self, name: str) -> Path:
        if name == "losses":
            return self.root / "losses.csv"
        return self.root / "metrics" / f"{name}.csv"

    def holds_results(self) -> bool:
        """True when the folder holds anything a new run would lose: a step checkpoint, a
        resume point or a table."""
        return bool(
            self.completed_steps()
            or self.last_checkpoint.is_file()
            or any(self.table(name).is_file() for name in TABLES)
        )

    def completed_steps(self) -> list[int]:
        """Steps whose final checkpoint exists, in order."""
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for p in self.checkpoints.glob("step*.pt"):
            tail = p.stem[4:]
            if tail.isdigit():
                steps.append(int(tail))
        return sorted(steps)


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def write_table(path: str | Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """Write a tidy CSV atomically (NaN as empty cells, which pandas reads back as NaN)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in columns})


def read_table(path: str | Path) -> list[dict]:
    """Rows of a CSV written by :func:`write_table` (values as strings; empty if absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Table:
    """An in-memory tidy table mirrored to its CSV file after every change."""

    def __init__(self, path: str | Path, columns: Sequence[str], enabled: bool = True):
        self.path = Path(path)
        self.columns = tuple(columns)
        self.enabled = enabled
        self.rows: list[dict] = []

    def load(self, keep=lambda row: True) -> None:
        """Read back existing rows, keeping those for which ``keep(row)`` is true (resume)."""
        self.rows = [r for r in read_table(self.path) if keep(r)]

    def step_rows(self, step: int) -> list[dict]:
        return [r for r in self.rows if int(r["step"]) == step]

    def replace_step(self, step: int, rows: Iterable[dict]) -> None:
        """Put ``rows`` in place of the rows of ``step``, keeping the rows in step order."""
        kept = [r for r in self.rows if int(r["step"]) != step]
        merged = kept + list(rows)
        self.rows = sorted(merged, key=lambda r: int(r["step"]))  # stable: order within a step

    def extend(self, rows: Iterable[dict], flush: bool = True) -> None:
        self.rows.extend(rows)
        if flush:
            self.flush()

    def flush(self) -> None:
        if self.enabled:
            write_table(self.path, self.columns, self.rows)


# --------------------------------------------------------------------------------------------
# reading runs back


def run_folders(run_dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders from one path, a list of paths, or a JSON list in a string (as papermill's
    ``-p run_dirs '["a", "b"]'`` passes it)."""
    if isinstance(run_dirs, str) and run_dirs.lstrip().startswith("["):
        try:
            parsed = json.loads(run_dirs)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(d, str) for d in parsed):
            return [Path(d) for d in parsed]
    if isinstance(run_dirs, (str, os.PathLike)):
        return [Path(run_dirs)]
    return [Path(d) for d in run_dirs]


def load_runs(run_dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, pd.DataFrame]:
    """Read and concatenate the tidy CSVs of one or more run folders.

    Returns one DataFrame per table of :data:`TABLES` (``summary``, ``per_class``, ...).
    ``run_dirs`` may also be a JSON list in a string (papermill ``-p``). ``metrics/summary.csv``
    must exist in every folder; any other file may be absent (probe
    disabled): its table then holds only the other runs' rows (or none, with the schema columns),
    and ``df.attrs["missing"]`` lists the folders that lack it, so that plots can say so.
    """
    dirs = run_folders(run_dirs)
    if not dirs:
        raise ValueError("load_runs: no run folder given; pass at least one run directory")
    parts: dict[str, list[pd.DataFrame]] = {key: [] for key in TABLES}
    missing: dict[str, list[str]] = {key: [] for key in TABLES}
    owner: dict[str, Path] = {}
    for d in dirs:
        run = RunDir(d)
        if not run.table("summary").is_file():
            raise FileNotFoundError(
                f"{d}: no metrics/summary.csv; pass a run folder written by the engine "
                "(cisslib run) that has finished at least one step"
            )
        for key in TABLES:
            path = run.table(key)
            if not path.is_file():
                missing[key].append(str(d))
                continue
            df = pd.read_csv(path)
            absent = [c for c in TABLES[key] if c not in df.columns]
            if absent:
                raise ValueError(
                    f"{path}: missing column(s) {absent}; rewrite it with the current engine"
                )
            parts[key].append(df)
        for name in parts["summary"][-1]["run"].astype(str).unique():
            if name in owner and owner[name] != d:
                raise ValueError(
                    f"run name {name!r} appears in both {owner[name]} and {d}; "
                    "give the runs distinct run.name values"
                )
            owner[name] = d
    out: dict[str, pd.DataFrame] = {}
    for key in TABLES:
        if parts[key]:
            df = pd.concat(parts[key], ignore_index=True)
        else:
            df = pd.DataFrame(columns=TABLES[key])
        if "run" in df.columns:
            df["run"] = df["run"].astype(str)
        if key == "shift" and len(df):
            df["seen"] = df["seen"].astype(str).str.lower().isin(("true", "1"))
        df.attrs["missing"] = missing[key]
        out[key] = df
    return out


def read_step_checkpoint(run_dir: str | os.PathLike, step: int) -> dict:
    """The saved state of ``step`` (weights, config, text, class names, ...)."""
    run = RunDir(run_dir)
    path = run.step_checkpoint(step)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; completed steps in {run.root}: {run.completed_steps()}"
        )
    state = read_torch(path, fix=f"step {step} must be trained again", error=RunFolderError)
    if not isinstance(state, dict) or "model" not in state:
        raise RunFolderError(f"{path} is not a cisslib step checkpoint")
    return state


# --------------------------------------------------------------------------------------------
# the run's log


def _not_detail(record: logging.LogRecord) -> bool:
    return not getattr(record, "detail", False)


class _Pending(logging.Handler):
    """Holds the records logged before the run folder may be written (replayed into log.txt)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _LogFile(logging.FileHandler):
    """A log file that, when it cannot be written (disk full), says so once and goes quiet."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        err = sys.exc_info()[1]
        logging.getLogger(LOGGER_NAME).removeHandler(self)
        print(
            f"cisslib: warning: cannot write {self.baseFilename} ({err}); the log goes to the "
            "console only",
            file=sys.stderr,
        )


#: Written before every console line of this process (``tag_console``): which run speaks when
#: several print to one console (the demo's runs side by side). log.txt lines carry no tag.
_console_tag = ""


def tag_console(tag: str) -> None:
    """Start this process's console lines with ``[tag]`` (from the next :func:`setup_logging`)."""
    global _console_tag
    _console_tag = f"[{tag}] " if tag else ""


def setup_logging(
    log_file: Path | None, to_console: bool = True, console_details: bool = False
) -> logging.Logger:
    """The ``cisslib`` logger: a plain line format to ``log_file`` and (optionally) stderr.

    Records logged with ``extra={"detail": True}`` (per-iteration loss lines) go to the file
    only, unless ``console_details``: a papermill or batch log gets one line per step and per
    evaluation, not thousands. Without ``log_file`` the records are kept, and a later call with
    a ``log_file`` writes them into it first (nothing is written before a run is known to start).
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    pending: list[logging.LogRecord] = []
    for h in list(logger.handlers):
        if getattr(h, "_cisslib", False):
            logger.removeHandler(h)
            h.close()
            pending += getattr(h, "records", [])
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt=DATEFMT)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh: logging.Handler = _LogFile(log_file)
        except OSError as e:
            raise write_error(log_file, e) from None
        fh.setFormatter(fmt)
        for record in pending:
            fh.handle(record)
    else:
        fh = _Pending()
    fh._cisslib = True  # type: ignore[attr-defined]
    logger.addHandler(fh)
    if to_console:
        sh = logging.StreamHandler(sys.stderr)
        tag = _console_tag.replace("%", "%%")
        sh.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", datefmt=DATEFMT))
        if not console_details:
            sh.addFilter(_not_detail)
        sh._cisslib = True  # type: ignore[attr-defined]
        logger.addHandler(sh)
    logger.propagate = False
    return logger


def close_log_file() -> None:
    """Detach and close the run's ``log.txt`` handler (the console handler stays), so that a
    later run in the same process never writes into this run's log."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler) and getattr(h, "_cisslib", False):
            logger.removeHandler(h)
            h.close()
