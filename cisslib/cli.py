"""``cisslib`` command line: run scenarios, list settings, build reports, the demo, results docs.

Every mistake of the user (a bad config value, missing or malformed data, weights or embeddings,
a run folder that cannot be used as asked, a read-only folder or a full disk) ends in ONE line on
stderr, ``cisslib <cmd>: error: ...``, naming the key, file or value and what to do, with exit
code 2. The traceback goes to the run's ``log.txt`` (when the run had started) and to stderr
with ``--debug``. Anything else is a bug: one line with exit code 1 and the same traceback rules.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
import traceback
from pathlib import Path

import yaml

from cisslib import paths
from cisslib.api import run
from cisslib.config import PRESET_HELP, ConfigError
from cisslib.data import DatasetError
from cisslib.files import WriteError
from cisslib.jobs import run_demo, run_grid
from cisslib.model import WeightsError
from cisslib.model.clip import clip_file_meta
from cisslib.protocol import NUM_CLASSES, SETTINGS
from cisslib.report.batch import run_batch
from cisslib.report.lab import run_lab
from cisslib.report.workbook import NotebookError, build_report
from cisslib.runs import RunFolderError, setup_logging
from cisslib.toy.clip import (
    pretrain_tiny_clip,
    shipped_difference,
    shipped_path,
    write_shipped_weights,
)
from cisslib.toy.recipe import ToyClipConfig


class ReportError(ValueError):
    """``cisslib report`` inputs that cannot make a report (wrong output name, no tables)."""


#: Errors that are the user's to fix: their message is the one line shown.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DatasetError,
    WeightsError,
    RunFolderError,
    ReportError,
    NotebookError,  # names the failed cell and the executed copy with the traceback
    WriteError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FloatingPointError,  # a diverging loss: the message names the step, iteration and terms
)
#: OSError numbers that are the user's to fix (disk full, read-only file system, ...).
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


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
    out = Path(args.out)
    if out.suffix != ".html":
        raise ReportError(f"--out {out}: the report is an HTML file; give a path ending in .html")
    for r in args.runs:
        if not (Path(r) / "metrics" / "summary.csv").is_file():
            what = "does not exist" if not Path(r).exists() else "has no metrics/summary.csv"
            raise ReportError(
                f"run folder {r} {what}; pass folders written by `cisslib run` that finished at "
                "least one step"
            )
    try:
        out = build_report(
            [Path(r) for r in args.runs], out, title=args.title, convention=args.convention
        )
    except (ValueError, KeyError) as e:  # tables that cannot be read back (load_runs)
        raise ReportError(str(e)) from None
    print(f"{out} ({out.stat().st_size / 1024:.0f} KiB, self-contained)")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
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
    run_lab(args.args)
    return 0


def cmd_toy_clip(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    path = pretrain_tiny_clip(progress=True, force=args.force)
    meta = clip_file_meta(path)
    print(f"tiny CLIP: {path}")
    print(f"zero-shot accuracy on single-object images: {meta.get('zero_shot_accuracy')}")
    print(
        f"pretraining seconds (when trained): {meta.get('seconds')}; this call: "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if args.write_shipped:
        print(f"wrote the shipped weights {write_shipped_weights(path)}")
    elif args.force and (diff := shipped_difference(path)) is not None:
        if diff == 0:
            print(f"reproduced: identical to the shipped weights {shipped_path(ToyClipConfig())}")
        else:
            print(
                f"not reproduced: the weights differ from the shipped ones by up to {diff:.3g} "
                "(another CPU or torch version rounds differently); the cache now holds the "
                "retrained ones"
            )
    return 0


#: What continues the work of a command after Ctrl-C (said on the interrupt's line).
_AFTER_INTERRUPT = {
    "run": "; continue with --resume",
    **dict.fromkeys(
        ("demo", "grid", "table"),
        "; the same command again continues (complete runs are kept, interrupted ones resume)",
    ),
}


def _jobs(text: str) -> int | None:
    """``--jobs``: ``auto`` (None) or a number >= 1."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto or a number of runs >= 1")
    return int(text)


def cmd_demo(args: argparse.Namespace) -> int:
    out = paths.in_project(args.out)
    setup_logging(None)  # the demo's own lines (tiny CLIP, each run done) reach the console
    report = run_demo(out, params=_params_path(args.params), overrides=args.set, jobs=args.jobs)
    print(report)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    out = run_grid(
        paths.in_project(args.out),
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
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command, too
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[debug], help="run (or resume) a scenario from a params file")
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

    p = sub.add_parser(
        "settings", parents=[debug], help="list the incremental settings, presets and params files"
    )
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser(
        "report", parents=[debug], help="HTML report (forgetting, zero-shot, shift) of run folders"
    )
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", required=True, help="output .html file")
    p.add_argument("--title", default="cisslib report")
    p.add_argument("--convention", default="fg_only", choices=("fg_only", "with_bg"))
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "toy-clip",
        parents=[debug],
        help="the embedded tiny CLIP: the shipped weights, or pretrain (or load from cache)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="pretrain now into the cache (about 21 minutes on one core), compare with the shipped",
    )
    p.add_argument(
        "--write-shipped",
        action="store_true",
        help="maintainers: write cisslib/toy/weights/ from the cached weights (a new recipe)",
    )
    p.set_defaults(func=cmd_toy_clip)

    p = sub.add_parser(
        "batch",
        parents=[debug],
        help="execute a notebook per params file or run folder, with HTML and an index",
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
        "lab", parents=[debug], help="JupyterLab at the project root; notebooks saved clean"
    )
    p.add_argument(
        "args", nargs="*", help="passed on to jupyter lab, after --: cisslib lab -- --port 8899"
    )
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser(
        "demo", parents=[debug], help="toy world: full method vs fine-tuning vs joint, HTML report"
    )
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--params", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="runs side by side (default auto: one per CPU core for the toy CLIP, one on CUDA)",
    )
    p.set_defaults(func=cmd_demo)

    every = ["full", "finetune", "joint", "no_gpd", "no_qd", "no_cacp", "zero_shot",
             "frozen_encoder"]  # fmt: skip
    p = sub.add_parser(
        "grid",
        parents=[debug],
        help="params x presets x seeds x class orders, aggregated to mean +- std",
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

    p = sub.add_parser(
        "table", parents=[debug], help="every preset on one params file (a grid, identity order)"
    )
    p.add_argument("--params", nargs=1, default=["toy_15-1"])
    p.add_argument("--presets", nargs="+", default=every)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--out", default="outputs/table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--doc", default=None, help="also write the results document to this file")
    p.set_defaults(func=cmd_grid, orders=[0])
    return parser


def is_user_error(e: BaseException) -> bool:
    """True for an error the user fixes (bad input, folder, disk), False for a bug."""
    if isinstance(e, USER_ERRORS):
        return True
    return isinstance(e, OSError) and e.errno in USER_ERRNOS


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and not isinstance(e, WriteError) and e.filename:
        text = f"{e.strerror or text}: {e.filename}" if e.strerror else text
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"cisslib {args.command}: interrupted{_AFTER_INTERRUPT.get(args.command, '')}",
              file=sys.stderr)  # fmt: skip
        return 130
    except Exception as e:
        # the traceback is in the run's log.txt when the run had started (cisslib.api.run) and
        # on stderr with --debug
        if args.debug:
            traceback.print_exc()
        user = is_user_error(e)
        what = "error" if user else f"internal error ({type(e).__name__})"
        hint = "" if user else "; this is a bug: rerun with --debug for the traceback"
        print(f"cisslib {args.command}: {what}: {_one_line(e)}{hint}", file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())
