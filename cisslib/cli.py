"""``cisslib`` command line: run scenarios, list settings, build reports, the demo, results docs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cisslib.api import run
from cisslib.config import PRESET_HELP, ConfigError
from cisslib.data import DatasetError
from cisslib.jobs import run_demo, run_grid
from cisslib.protocol import NUM_CLASSES, SETTINGS
from cisslib.report.workbook import build_report
from cisslib.toy.clip import checkpoint_meta, pretrain_tiny_clip

PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"


def _params_path(name: str) -> Path:
    """A params file path, or a bare name looked up in the repository's params/ folder."""
    p = Path(name)
    if p.is_file() or p.suffix:
        return p
    candidate = PARAMS_DIR / f"{name}.yaml"
    return candidate if candidate.is_file() else p


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
    if PARAMS_DIR.is_dir():
        print(f"params files ({PARAMS_DIR}):")
        for p in sorted(PARAMS_DIR.glob("*.yaml")):
            print(f"  {p.name}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = build_report(
        [Path(r) for r in args.runs], Path(args.out), title=args.title, convention=args.convention
    )
    print(out)
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
    report = run_demo(Path(args.out), params=_params_path(args.params), overrides=args.set)
    print(report)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    out = run_grid(
        Path(args.out),
        params=[_params_path(p) for p in args.params],
        presets=args.presets,
        seeds=args.seeds,
        orders=args.orders,
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

    p = sub.add_parser("toy-clip", help="pretrain (or load from cache) the embedded tiny CLIP")
    p.set_defaults(func=cmd_toy_clip)

    p = sub.add_parser("demo", help="toy world: full method vs fine-tuning, HTML report")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--params", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)

    every = ["full", "finetune", "joint", "no_gpd", "no_qd", "no_cacp", "zero_shot",
             "frozen_encoder"]  # fmt: skip
    p = sub.add_parser(
        "grid", help="params x presets x seeds x class orders, aggregated to mean +- std"
    )
    p.add_argument("--params", nargs="+", default=["toy_15-1"], help="params files or names")
    p.add_argument("--presets", nargs="+", default=every)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    orders_help = "class orders: 0 = identity (the authors'), N = random order of seed N"
    p.add_argument("--orders", type=int, nargs="+", default=[0], help=orders_help)
    p.add_argument("--out", default="outputs/grid")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--doc", default=None, help="also write the results document to this file")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("table", help="every preset on one params file (a grid, identity order)")
    p.add_argument("--params", nargs=1, default=["toy_15-1"])
    p.add_argument("--presets", nargs="+", default=every)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--out", default="outputs/table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--doc", default=None, help="also write the results document to this file")
    p.set_defaults(func=cmd_grid, orders=[0])
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
