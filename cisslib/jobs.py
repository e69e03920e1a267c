"""Jobs made of several runs: the demo (README command 1) and grids of params x presets x seeds
x class orders with their aggregated results document (``cisslib grid``, ``cisslib table``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from cisslib.api import run
from cisslib.build import joint_iterations
from cisslib.config import from_dict, load_config
from cisslib.files import atomic_write_text
from cisslib.protocol import Scenario, parse_setting, scenario_setting
from cisslib.report import grid
from cisslib.report.workbook import build_report
from cisslib.runs import RunDir, read_table
from cisslib.toy.clip import pretrain_tiny_clip

log = logging.getLogger("cisslib")


#: The demo's runs: the method, its lower bound and its upper bound (all classes in one step).
DEMO_PRESETS = ("full", "finetune", "joint")


def run_demo(out: Path, params: Path, overrides: Sequence[str] = ()) -> Path:
    """Load (or pretrain) the tiny CLIP; run the full method, fine-tuning and joint training;
    write a report.

    Returns the path of ``<out>/report.html``. Existing complete runs in ``out`` are reused
    (resume), so a second call only rebuilds the report.
    """
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pretrain_tiny_clip(progress=True)
    log.info("demo: tiny CLIP ready after %.0f s", time.perf_counter() - t0)
    runs = []
    for preset in DEMO_PRESETS:
        run_dir = out / preset
        runs.append(
            run(
                params,
                overrides=[*overrides, f"run.preset={preset}"],
                out=run_dir,
                resume=(run_dir / "config.yaml").is_file(),
            )
        )
        log.info("demo: %s done after %.0f s", preset, time.perf_counter() - t0)
    report = build_report(
        runs, out / "report.html", title="cisslib demo: full method vs fine-tuning vs joint"
    )
    log.info("demo: report %s after %.0f s", report, time.perf_counter() - t0)
    return report


def grid_cells(
    params: Sequence[Path], presets: Sequence[str], seeds: Sequence[int], orders: Sequence[int]
) -> list[tuple[Path, str, int, int]]:
    """Every ``(params, preset, seed, order)`` of a grid, in run order."""
    return [(p, pr, s, o) for p in params for o in orders for s in seeds for pr in presets]


def grid_run_dir(out: Path, params: Path, preset: str, seed: int, order: int) -> Path:
    """``<out>/<params stem>/<preset>/seed<seed>`` (``..._order<k>`` for a random order)."""
    tail = f"seed{seed}" + (f"_order{order}" if order else "")
    return out / Path(params).stem / preset / tail


def _is_complete(run_dir: Path) -> bool:
    """Every step of the run's own scenario has its checkpoint and its summary rows."""
    rd = RunDir(run_dir)
    if not rd.config.is_file() or not rd.table("summary").is_file():
        return False
    sc = from_dict(yaml.safe_load(rd.config.read_text()) or {}, where=str(rd.config)).scenario
    k, base, inc = parse_setting(sc.dataset, scenario_setting(sc))
    steps = list(range(Scenario(num_classes=k, base=base, increment=inc).n_steps))
    summary_steps = {int(r["step"]) for r in read_table(rd.table("summary"))}
    return rd.completed_steps() == steps and summary_steps == set(steps)


def run_grid(
    out: Path,
    params: Sequence[Path],
    presets: Sequence[str],
    seeds: Sequence[int],
    orders: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    doc: Path | None = None,
    title: str | None = None,
) -> Path:
    """Run params x presets x seeds x class orders (0 = identity, N = random order seed N),
    skipping complete runs and resuming interrupted ones; aggregate to mean +- std (n) per cell.

    Writes ``<out>/metrics.csv`` (every run's metrics), ``<out>/aggregate.csv`` (per cell) and
    ``<out>/results.md`` (also to ``doc``); returns the results document.
    """
    cells = grid_cells(params, presets, seeds, orders)
    t0 = time.perf_counter()
    dirs = []
    for k, (p, preset, seed, order) in enumerate(cells, 1):
        run_dir = grid_run_dir(out, p, preset, seed, order)
        dirs.append(run_dir)
        if _is_complete(run_dir):
            log.info("grid %d/%d: %s complete, skipped", k, len(cells), run_dir)
            continue
        name = "_".join(run_dir.relative_to(out).parts)  # unique across the grid
        extra = [f"run.preset={preset}", f"run.seed={seed}", f"scenario.random_order={order}",
                 f"run.name={name}"]  # fmt: skip
        log.info("grid %d/%d: %s (%.0f s so far)", k, len(cells), run_dir,
                 time.perf_counter() - t0)  # fmt: skip
        run(p, overrides=[*overrides, *extra], out=run_dir,
            resume=RunDir(run_dir).config.is_file())  # fmt: skip
    metrics = grid.metrics_table(dirs)
    agg = grid.aggregate(metrics)
    noise = grid.exceeds_noise(metrics)
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    atomic_write_text(out / "aggregate.csv", agg.to_csv(index=False))
    names = ", ".join(Path(p).stem for p in params)
    text = grid.markdown(agg, noise, title or f"Results ({names})")
    text += _grid_footnote(params, seeds, orders, overrides)
    path = out / "results.md"
    atomic_write_text(path, text)
    if doc is not None:
        atomic_write_text(doc, text)
    log.info("grid: %d runs, %s (%.0f s)", len(cells), path, time.perf_counter() - t0)
    return path


def _grid_footnote(params, seeds, orders, overrides) -> str:
    cfg = load_config(params[0], overrides)
    lines = [
        "",
        f"Seeds {', '.join(map(str, seeds))}; class orders "
        + ", ".join("identity" if o == 0 else f"random #{o}" for o in orders)
        + ". Percent; mean ± std over the runs of a cell (n runs). `joint` trains for "
        f"{joint_iterations(cfg)} iterations, the total of an incremental run; its old/new are "
        "the means of the per-class IoUs of the setting's base / later classes.",
    ]
    return "\n".join(lines) + "\n"
