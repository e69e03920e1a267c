"""Run folders -> the tables of a report, each run labelled by a unique name, with its tau.

:func:`load_runs` reads every folder with :func:`cisslib.runs.load_runs`. Two folders whose runs
share a name (``.../demo/full`` and ``.../demo_real/full`` are both ``full``) are relabelled by the
shortest tail of their paths that tells them apart (``demo/full``, ``demo_real/full``), in every
table. Each table's ``attrs["tau"]`` maps run label -> the with_bg tau its evaluations used
(:func:`run_tau`: calibrated or ``eval.tau``), so figures and tables can state it;
``data["runs"]`` lists the runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import yaml

from cisslib import runs as run_tables
from cisslib.paths import as_list, in_project
from cisslib.runs import TABLES, RunDir, read_table

RUNS_COLUMNS = ("run", "folder", "preset", "seed", "tau")


def run_tau(run_dir: str | Path) -> float | None:
    """The with_bg tau the run's evaluations used: step 0's row of ``metrics/threshold.csv``
    (``eval.tau_from: train`` chooses it there and keeps it), else ``eval.tau`` of its
    ``config.yaml`` (runs made before the table existed); None when neither is recorded."""
    rd = RunDir(run_dir)
    first = [r for r in read_table(rd.table("threshold")) if r.get("step") == "0"]
    if first:
        return float(first[0]["tau"])
    cfg = yaml.safe_load(rd.config.read_text()) if rd.config.is_file() else None
    ev = (cfg.get("eval") or {}) if isinstance(cfg, dict) else {}
    if ev.get("tau_from", "fixed") != "fixed":
        return None  # chosen after step 0, which has not been written yet
    return float(ev["tau"]) if ev.get("tau") is not None else None


def unique_labels(names: list[str], folders: list[Path]) -> list[str]:
    """``names`` where unique; a clashing name becomes the shortest path tail (``a/b/name``)
    that no other folder shares (the full path as the last resort)."""
    labels = list(names)
    for i, name in enumerate(names):
        if names.count(name) == 1:
            continue
        parts = folders[i].parts
        for k in range(1, len(parts) + 1):
            tail = "/".join(parts[-k:])
            others = ["/".join(f.parts[-k:]) for j, f in enumerate(folders) if j != i]
            if tail not in others and tail not in names:
                labels[i] = tail if tail.endswith(name) else f"{tail} ({name})"
                break
        else:
            labels[i] = str(folders[i])
    return labels


def load_runs(run_dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, pd.DataFrame]:
    """The tables of :func:`cisslib.runs.load_runs` (``summary``, ``per_class``, ``zero_shot``,
    ``shift``, ``losses``) plus ``runs`` (columns run, folder, preset, seed, tau).

    Relative folders are under the project root; a folder given twice is read once. The ``run``
    column holds unique labels (see the module docstring).
    """
    folders: list[Path] = []
    for d in as_list(run_dirs):
        folder = in_project(d).resolve()
        if folder not in folders:
            folders.append(folder)
    if not folders:
        raise ValueError("load_runs: no run folder given; pass at least one run directory")
    loaded = [run_tables.load_runs([f]) for f in folders]
    names = []
    for f, tables in zip(folders, loaded, strict=True):
        found = tables["summary"]["run"].astype(str).unique()
        if len(found) != 1:
            raise ValueError(f"{f}: metrics/summary.csv holds {len(found)} run names; expected 1")
        names.append(str(found[0]))
    labels = unique_labels(names, folders)
    runs_rows, taus = [], {}
    for folder, tables, label in zip(folders, loaded, labels, strict=True):
        taus[label] = run_tau(folder)
        first = tables["summary"].iloc[0]
        runs_rows.append(
            dict(run=label, folder=str(folder), preset=first["preset"], seed=first["seed"],
                 tau=taus[label])
        )  # fmt: skip
        for df in tables.values():
            if "run" in df.columns and len(df):
                df["run"] = label
    out: dict[str, pd.DataFrame] = {}
    for key in TABLES:
        frames = [t[key] for t in loaded if len(t[key])]
        df = pd.concat(frames, ignore_index=True) if frames else loaded[0][key].iloc[0:0].copy()
        df.attrs = {
            "missing": [m for t in loaded for m in t[key].attrs.get("missing", [])],
            "tau": dict(taus),
        }
        out[key] = df
    out["runs"] = pd.DataFrame(runs_rows, columns=list(RUNS_COLUMNS))
    out["runs"].attrs = {"missing": [], "tau": dict(taus)}
    return out
