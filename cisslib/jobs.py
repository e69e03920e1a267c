"""Jobs made of several runs: the demo (README command 1) and the results document of presets."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cisslib.api import run
from cisslib.build import joint_iterations
from cisslib.config import load_config
from cisslib.files import atomic_write_text
from cisslib.protocol import parse_setting
from cisslib.report.workbook import build_report
from cisslib.toy.clip import pretrain_tiny_clip

log = logging.getLogger("cisslib")


def run_demo(out: Path, params: Path, overrides: Sequence[str] = ()) -> Path:
    """Pretrain (or load) the tiny CLIP, run the full method and fine-tuning, write a report.

    Returns the path of ``<out>/report.html``. Existing complete runs in ``out`` are reused
    (resume), so a second call only rebuilds the report.
    """
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pretrain_tiny_clip(progress=True)
    log.info("demo: tiny CLIP ready after %.0f s", time.perf_counter() - t0)
    runs = []
    for preset in ("full", "finetune"):
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
        runs, out / "report.html", title="cisslib demo: full method vs fine-tuning"
    )
    log.info("demo: report %s after %.0f s", report, time.perf_counter() - t0)
    return report


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def joint_rows(per_class: pd.DataFrame, base: int) -> pd.DataFrame:
    """Summary-like rows of a joint run split as the incremental setting would split it:
    ``mIoU_old`` over labels ``1..base`` (and background under ``with_bg``), ``mIoU_new`` over the
    rest, each the mean IoU of classes with ground truth."""
    rows = []
    for (name, preset, step, conv), g in per_class.groupby(["run", "preset", "step", "convention"]):
        old = g[(g["class_index"] <= base)]
        new = g[g["class_index"] > base]
        rows.append(
            {
                "run": name,
                "preset": preset,
                "step": step,
                "convention": conv,
                "mIoU_old": old["iou"].mean(),
                "mIoU_new": new["iou"].mean(),
                "mIoU": g["iou"].mean(),
            }
        )
    return pd.DataFrame(rows)


def results_markdown(
    frames: list[pd.DataFrame], zero_shot: list[pd.DataFrame], seeds: Sequence[int], title: str
) -> str:
    """A markdown table: old / new / all mIoU after the last step, both conventions, per preset.

    A ``joint`` run enters as :func:`joint_rows` (old/new = the incremental setting's classes).
    """
    summary = pd.concat(frames, ignore_index=True)
    last = summary[summary["step"] == summary.groupby("run")["step"].transform("max")]
    lines = [
        f"### {title}",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. mIoU in %, mean over seeds, "
        "after the last step (joint: its single step, old/new = the setting's base/later "
        "classes).",
        "",
    ]
    lines.append(
        "| preset | fg_only old | fg_only new | fg_only all | with_bg old | with_bg new | "
        "with_bg all |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for preset, grp in last.groupby("preset", sort=False):
        cells = []
        for conv in ("fg_only", "with_bg"):
            g = grp[grp["convention"] == conv]
            cells += [
                _fmt(g["mIoU_old"].mean()),
                _fmt(g["mIoU_new"].mean()),
                _fmt(g["mIoU"].mean()),
            ]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    zs = [z for z in zero_shot if len(z)]
    if zs:
        z = pd.concat(zs, ignore_index=True)
        z = z.groupby(["preset", "step"])["iou"].mean().unstack("step")
        lines += [
            "",
            "Zero-shot probe: mIoU (%) on the classes of future steps, after each step "
            "(before they are learned).",
            "",
        ]
        lines.append("| preset | " + " | ".join(f"after step {s}" for s in z.columns) + " |")
        lines.append("|---|" + "---|" * len(z.columns))
        for preset, row in z.iterrows():
            lines.append(f"| {preset} | " + " | ".join(_fmt(v) for v in row.values) + " |")
    return "\n".join(lines) + "\n"


def results_doc(
    out: Path,
    params: Path,
    seeds: Sequence[int],
    presets: Sequence[str],
    overrides: Sequence[str] = (),
    doc: Path | None = None,
) -> Path:
    """Run every preset (x seeds) on a toy params file; write ``<out>/results.md``.

    ``joint`` trains for an incremental run's total iterations (:func:`build.joint_iterations`).
    """
    cfg = load_config(params, overrides)
    base = parse_setting(cfg.scenario.dataset, cfg.scenario.setting)[1]
    joint_iters = joint_iterations(cfg)
    frames, zero = [], []
    for seed in seeds:
        for preset in presets:
            run_dir = out / f"{preset}_seed{seed}"
            run(
                params,
                overrides=[*overrides, f"run.preset={preset}", f"run.seed={seed}"],
                out=run_dir,
                resume=(run_dir / "config.yaml").is_file(),
            )
            if preset == "joint":
                per_class = pd.read_csv(run_dir / "metrics" / "per_class.csv")
                frames.append(joint_rows(per_class, base))
            else:
                frames.append(pd.read_csv(run_dir / "metrics" / "summary.csv"))
            zpath = run_dir / "metrics" / "zero_shot.csv"
            if zpath.is_file() and preset in ("full", "finetune"):
                zero.append(pd.read_csv(zpath))
    text = results_markdown(frames, zero, seeds, f"Toy results ({Path(params).stem})")
    if "joint" in presets:
        text += (
            f"\njoint trained for {joint_iters} iterations, the total of an incremental run "
            f"({cfg.train.base.iters} + {joint_iters - cfg.train.base.iters}).\n"
        )
    path = out / "results.md"
    atomic_write_text(path, text)
    if doc is not None:
        atomic_write_text(doc, text)
    return path
