"""Jobs made of several runs: the demo (README command 1) and grids of params x presets x seeds
x class orders with their aggregated results document (``cisslib grid``, ``cisslib table``)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from queue import Empty
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cisslib.api import run
from cisslib.build import joint_iterations, run_iterations
from cisslib.config import Config, from_dict, load_config
from cisslib.engine.runtime import TINY_MODEL_PARAMS, available_cores, plan_threads
from cisslib.files import atomic_write_text
from cisslib.protocol import Scenario, parse_setting, scenario_setting
from cisslib.report import grid
from cisslib.report.workbook import build_report
from cisslib.runs import RunDir, read_table, tag_console
from cisslib.session import SESSION_ENV, relay_bars, show_bar
from cisslib.toy.clip import pretrain_tiny_clip

log = logging.getLogger("cisslib")


#: The demo's runs: the method, its lower bound and its upper bound (all classes in one step).
DEMO_PRESETS = ("full", "finetune", "joint")


def demo_jobs(cfg: Config) -> int:
    """How many of the demo's runs go side by side under ``--jobs auto``.

    On CUDA one (the runs would share the GPU). On CPU one run per core its thread plan leaves
    (the toy CLIP's runs use one intra-op thread each, :func:`plan_threads`; another model
    counts as large), at most one per run: on 2 cores the demo takes about 40% less wall time.
    A run's numbers do not depend on the process it runs in.
    """
    device = cfg.run.device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 1
    toy = cfg.model.clip.pretrained == "toy"
    cores = available_cores()
    plan = plan_threads(
        cfg.run.threads, model_params=0 if toy else TINY_MODEL_PARAMS, workers=0,
        device_type="cpu", cores=cores,
    )  # fmt: skip
    return max(1, min(len(DEMO_PRESETS), cores // plan.threads))


def run_demo(
    out: Path, params: Path, overrides: Sequence[str] = (), jobs: int | None = None
) -> Path:
    """Load (or pretrain) the tiny CLIP; run the full method, fine-tuning and joint training,
    ``jobs`` of them side by side (``None``: :func:`demo_jobs`); write a report.

    Returns the path of ``<out>/report.html``. Existing complete runs in ``out`` are reused
    (resume), so a second call only rebuilds the report.
    """
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pretrain_tiny_clip(progress=True)
    log.info("demo: tiny CLIP ready after %.0f s", time.perf_counter() - t0)
    cfgs = {p: load_config(params, [*overrides, f"run.preset={p}"]) for p in DEMO_PRESETS}
    jobs = demo_jobs(cfgs["full"]) if jobs is None else max(1, int(jobs))
    runs = []
    if jobs == 1:
        for preset in DEMO_PRESETS:
            runs.append(_demo_run(params, overrides, out, preset))
            log.info("demo: %s done after %.0f s", preset, time.perf_counter() - t0)
    else:
        runs = _demo_side_by_side(params, overrides, out, cfgs, jobs, t0)
    report = build_report(
        runs, out / "report.html", title="cisslib demo: full method vs fine-tuning vs joint"
    )
    log.info("demo: report %s after %.0f s", report, time.perf_counter() - t0)
    return report


def _demo_run(params: Path, overrides: Sequence[str], out: Path, preset: str) -> Path:
    run_dir = out / preset
    resume = (run_dir / "config.yaml").is_file()
    return run(params, overrides=[*overrides, f"run.preset={preset}"], out=run_dir, resume=resume)


def _demo_child_init(queue: Any, session: str) -> None:
    """A side-by-side demo process: it is watched as its parent is (bars relayed to the parent's
    queue, or tagged lines in batch)."""
    os.environ[SESSION_ENV] = session
    _child["queue"] = queue


_child: dict[str, Any] = {}


def _demo_child(params: Path, overrides: Sequence[str], out: Path, preset: str) -> Path:
    relay_bars(_child["queue"], preset)
    tag_console(preset)
    return _demo_run(params, overrides, out, preset)


def _demo_side_by_side(
    params: Path,
    overrides: Sequence[str],
    out: Path,
    cfgs: dict[str, Config],
    jobs: int,
    t0: float,
) -> list[Path]:
    """The demo's runs in ``jobs`` spawned processes; one bar over every run's iterations where
    a person watches (the runs' lines are in their log.txt), else the runs' lines tagged with
    their preset."""
    totals = {p: run_iterations(c) for p, c in cfgs.items()}
    bars = show_bar(cfgs["full"].run.progress)
    log.info("demo: %s side by side, %d at a time", ", ".join(DEMO_PRESETS), jobs)
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
    queue = ctx.Queue()
    done = dict.fromkeys(DEMO_PRESETS, 0)
    runs: dict[str, Path] = {}
    bar = tqdm(total=sum(totals.values()), desc="demo", disable=not bars, dynamic_ncols=True)
    pool = ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_demo_child_init,
        initargs=(queue, "terminal" if bars else "batch"),
    )  # fmt: skip
    try:
        with logging_redirect_tqdm(loggers=[log]):
            queued, futures = list(DEMO_PRESETS), {}
            while queued or futures:
                while queued and len(futures) < jobs:  # none waits in the pool: after Ctrl-C
                    preset = queued.pop(0)  # or an error, no further run starts
                    futures[pool.submit(_demo_child, params, overrides, out, preset)] = preset
                finished, _ = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(queue, done, bar)
                for future in finished:
                    preset = futures.pop(future)
                    runs[preset] = future.result()  # a run's error stops the demo here
                    bar.update(totals[preset] - done[preset])  # complete steps a resume skipped
                    done[preset] = totals[preset]
                    log.info("demo: %s done after %.0f s", preset, time.perf_counter() - t0)
                bar.set_postfix_str(
                    " ".join(f"{p} {100 * done[p] // max(1, totals[p])}%" for p in DEMO_PRESETS)
                )
    finally:
        # a running run ends at its own error or interrupt (Ctrl-C reaches the whole process
        # group) and leaves a folder the next demo resumes
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return [runs[p] for p in DEMO_PRESETS]


def _drain(queue: Any, done: dict[str, int], bar) -> None:
    """Count every relayed update on ``queue`` into ``done`` and ``bar``."""
    while True:
        try:
            preset, n = queue.get_nowait()
        except Empty:
            return
        done[preset] += n
        bar.update(n)


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
