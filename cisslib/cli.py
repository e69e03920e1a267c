"""``cisslib`` command line: run scenarios, list settings, build reports, the demo, results docs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from cisslib import paths
from cisslib.api import run
from cisslib.config import PRESET_HELP, ConfigError
from cisslib.data import DatasetError
from cisslib.jobs import results_doc, run_demo
from cisslib.protocol import NUM_CLASSES, SETTINGS
from cisslib.report.workbook import build_report
from cisslib.toy.clip import checkpoint_meta, pretrain_tiny_clip


def _params_path(name: str) -> Path:
    """A params file path, or a bare name looked up in the project's params/ folder."""
    return paths.find_params(name)


def cmd_run(args: argparse.Namespace) -> int:
    run_dir = run(
        _params_path(args.params),
        overrides=args.set,
        out=args.out,
        steps=args.steps,
        resume=args.resume,
    )
    print(run_dir)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    print("settings (scenario.dataset / scenario.setting; custom 'BASE-INC' also accepted):")
    for dataset, settings in SETTINGS.items():
        items = ", ".join(
            f"{name} ({1 + (NUM_CLASSES[dataset] - b) // i} steps)"
            for name, (b, i) in settings.items()
        )
        print(f"  {dataset:4s} {items}")
    print("modes (scenario.mode): overlap, disjoint")
    print("presets (run.preset):")
    for name, text in PRESET_HELP.items():
        print(f"  {name:9s} {text}")
    for folder in paths.params_dirs():
        print(f"params files ({folder}):")
        for p in sorted(folder.glob("*.yaml")):
            print(f"  {p.name}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = build_report(
        [Path(r) for r in args.runs], Path(args.out), title=args.title, convention=args.convention
    )
    print(f"{out} ({out.stat().st_size / 1024:.0f} KiB, self-contained)")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from cisslib.report.batch import run_batch

    given = {}
    for item in args.parameter:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-y {item!r}: use NAME=YAML, e.g. -y images=2")
        given[key] = yaml.safe_load(value)
    index, items = run_batch(args.notebook, args.targets, given, args.set, args.index)
    failed = [i for i in items if i.error]
    print(f"index: {index} ({len(items) - len(failed)} ok, {len(failed)} failed)")
    return 1 if failed else 0


def cmd_lab(args: argparse.Namespace) -> int:
    from cisslib.report.lab import run_lab

    run_lab(args.args)
    return 0


def cmd_toy_clip(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = pretrain_tiny_clip(progress=True)
    meta = checkpoint_meta(path)
    print(f"tiny CLIP: {path}")
    print(f"zero-shot accuracy on single-object images: {meta.get('zero_shot_accuracy')}")
    print(
        f"pretraining seconds (when trained): {meta.get('seconds')}; this call: "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = paths.in_project(args.out)
    report = run_demo(out, params=_params_path(args.params), overrides=args.set)
    print(report)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    out = results_doc(
        paths.in_project(args.out),
        params=_params_path(args.params),
        seeds=args.seeds,
        presets=args.presets,
        overrides=args.set,
        doc=Path(args.doc) if args.doc else None,
    )
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cisslib", description="CLIP-guided class-incremental semantic segmentation workbook"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run (or resume) a scenario from a params file")
    p.add_argument("params", help="params YAML file (or a name in params/, e.g. smoke)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.base.iters=100 (repeatable)",
    )
    p.add_argument("--out", default=None, help="run folder (default outputs/<params>_<preset>)")
    p.add_argument("--steps", default=None, help="steps to run, A-B (default: all)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("settings", help="list the incremental settings, presets and params files")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("report", help="HTML report (forgetting, zero-shot, shift) of run folders")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", required=True, help="output .html file")
    p.add_argument("--title", default="cisslib report")
    p.add_argument("--convention", default="fg_only", choices=("fg_only", "with_bg"))
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "batch", help="execute a notebook per params file or run folder, with HTML and an index"
    )
    p.add_argument("notebook", help="notebook name (run_scenario, forgetting, ...) or .ipynb path")
    p.add_argument("targets", nargs="+", help="params files/names or run folders")
    p.add_argument(
        "-y",
        dest="parameter",
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="notebook parameter for every execution, e.g. -y convention=with_bg",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for a params-file notebook (repeatable)",
    )
    p.add_argument("--index", default=None, help="index page (default outputs/batch/NB.html)")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(
        "lab", help="JupyterLab at the project root; committed notebooks saved clean"
    )
    p.add_argument(
        "args", nargs="*", help="passed on to jupyter lab, after --: cisslib lab -- --port 8899"
    )
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("toy-clip", help="pretrain (or load from cache) the embedded tiny CLIP")
    p.set_defaults(func=cmd_toy_clip)

    p = sub.add_parser("demo", help="toy world: full method vs fine-tuning, HTML report")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--params", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("table", help="results table of every preset on a toy setting")
    p.add_argument("--out", default="outputs/table")
    p.add_argument("--params", default="toy_15-1")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument(
        "--presets", nargs="+", default=["full", "finetune", "no_cacp", "no_gpd", "no_qd", "joint"]
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--doc", default=None, help="also write the markdown table to this file")
    p.set_defaults(func=cmd_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, FileNotFoundError) as e:
        print(f"cisslib {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
