"""Hostile-but-realistic use of cisslib (issue 10): the machinery and the cases.

Each case plays one mistake a researcher makes (a mistyped value, a moved dataset, a truncated
weights file, a kill, a full disk, a second run on the same folder, a corrupt cache) through the
real CLI (``cisslib.cli.main``, in this process, or in a forked child that is SIGKILLed at a chosen
point) and returns its verdict:

* ``clean``: what should happen happened: a refused input ends in exit code 2 and ONE stderr
  line ``cisslib <cmd>: error: ...`` naming the key, file or value; nothing was written (or left
  half-written) and no existing file changed; an accepted input ran and gave the right result.
* ``traceback``: an exception escaped (the user sees a Python traceback).
* ``wrong``: no traceback, but the wrong outcome: exit 0 on bad input, a message that does not
  name the culprit, extra files left in the run folder, wrong numbers.
* ``lost``: a file that existed before (results, checkpoints, config) changed or disappeared.

``tests/test_hostile.py`` asserts every case is clean. ``python tests/hostile.py`` prints the tally
(tried / clean / traceback / wrong / lost) per case class, which is how the issue counts them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "params" / "smoke.yaml"
#: Shortens the smoke run to a few seconds: 4 + 4 iterations, resume points at iteration 2.
FAST = (
    "train.base.iters=4",
    "train.incremental.iters=4",
    "run.checkpoint_every=2",
    "run.log_every=2",
    "scenario.toy.val_length=4",
)
TABLE_FILES = (
    "losses.csv",
    "metrics/summary.csv",
    "metrics/per_class.csv",
    "metrics/zero_shot.csv",
    "metrics/shift.csv",
)
CLASSES = ("config", "data", "weights", "embeddings", "faults", "folders", "caches")
VERDICTS = ("clean", "traceback", "wrong", "lost")


# ------------------------------------------------------------------------------------ running
@dataclass
class Result:
    rc: int | None
    err: str
    exc: BaseException | None = None

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class Unavailable(Exception):
    """The machine cannot play this case (e.g. mounting a small disk needs root): not counted."""


class TookTooLong(Exception):
    """A case ran past :data:`LIMIT_S` (e.g. a refused input that trains a default ViT-B/16)."""


#: Seconds one ``cli`` call may take (a FAST smoke run takes a few).
LIMIT_S = 120


def _too_long(signum, frame):
    raise TookTooLong(f"ran more than {LIMIT_S} s")


def cli(*argv: object, env: dict[str, str] | None = None) -> Result:
    """``cisslib.cli.main(argv)`` in this process, stderr captured, exceptions caught; a call
    that runs past :data:`LIMIT_S` is stopped and has exit code ``None`` (verdict ``wrong``)."""
    from cisslib.cli import main

    buf = io.StringIO()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    handler = signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(LIMIT_S)
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
            except TookTooLong:
                return Result(None, buf.getvalue() + "\n(stopped: took too long)")
            except Exception as e:  # noqa: BLE001 - the verdict "traceback"
                return Result(None, buf.getvalue(), e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, handler)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(rc, buf.getvalue())


def smoke(out: Path, *sets: str, extra: Sequence[str] = ()) -> list[str]:
    """argv of a FAST smoke run into ``out`` with extra ``--set`` overrides."""
    argv = ["run", str(SMOKE), "--out", str(out)]
    for s in (*FAST, *sets):
        argv += ["--set", s]
    return [*argv, *extra]


# Kill points of a forked run: (kind, step, detail). The child SIGKILLs itself right AFTER the
# named event: "iteration" (an iteration and its callbacks, detail = iteration), "resume_point"
# (last.pt written at iteration detail), "prototypes" (the reference prototypes saved, i.e. during
# the evaluation of the step), "step_checkpoint" (step{t}.pt written, tables not yet flushed),
# "table" (that table flushed after the step checkpoint), "cleared" (resume point removed: the
# step is complete).
KillPoint = tuple[str, int, object]


def _arm(kill: KillPoint) -> None:
    """Monkeypatch the engine (in the child) so that it SIGKILLs itself at ``kill``."""
    import cisslib.engine.checkpoint as ck
    import cisslib.engine.runner as rn
    import cisslib.runs as runs

    kind, step, detail = kill
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    state = {"step": None, "checkpointed": False}

    orig_callbacks = rn.Runner._callbacks

    def callbacks(self, step_, *a, **k):
        state["step"] = step_
        cbs = orig_callbacks(self, step_, *a, **k)

        def killer(it, terms, grad_norm):
            if kind == "iteration" and step_ == step and it == detail:
                die()

        return [*cbs, killer]

    orig_save = ck.ResumePoint.save

    def save(self, **k):
        orig_save(self, **k)
        if kind == "resume_point" and k["step"] == step and k["it"] == detail:
            die()

    orig_step_ckpt = rn.save_step_checkpoint

    def step_ckpt(path, **k):
        orig_step_ckpt(path, **k)
        if k["step"] == step:
            state["checkpointed"] = True
            if kind == "step_checkpoint":
                die()

    orig_flush = runs.Table.flush

    def flush(self):
        orig_flush(self)
        if kind == "table" and state["checkpointed"] and self.path.stem == detail:
            die()

    orig_clear = ck.ResumePoint.clear

    def clear(self):
        orig_clear(self)
        if kind == "cleared" and state["checkpointed"]:
            die()

    orig_atomic = rn.atomic_torch_save

    def atomic(obj, path):
        orig_atomic(obj, path)
        if kind == "prototypes" and state["step"] == step and "prototypes" in str(path):
            die()

    rn.Runner._callbacks = callbacks
    ck.ResumePoint.save = save
    rn.save_step_checkpoint = step_ckpt
    runs.Table.flush = flush
    ck.ResumePoint.clear = clear
    rn.atomic_torch_save = atomic


def _child(argv: list[str], kill: KillPoint | None, threads: int | None) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if threads:
        torch.set_num_threads(threads)
    if kill is not None:
        _arm(kill)
    from cisslib.cli import main

    os._exit(main(argv))


def forked(argv: list[str], kill: KillPoint | None = None, threads: int | None = None):
    """Start ``main(argv)`` in a forked child (killed at ``kill``); returns the Process."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, kill, threads))
    proc.start()
    return proc


def run_forked(argv: list[str], kill: KillPoint | None = None, threads: int | None = None) -> int:
    """Exit code of a forked ``main(argv)`` (-9 when it was killed at ``kill``)."""
    proc = forked(argv, kill, threads)
    proc.join(LIMIT_S * 2)
    if proc.exitcode is None:  # never reached its kill point, or hangs
        proc.kill()
        proc.join()
        return -999
    return proc.exitcode


# ------------------------------------------------------------------------------------ judging
def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes); empty when absent."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def changed(before: dict[str, bytes], root: Path) -> list[str]:
    """Files of ``before`` that changed or disappeared under ``root``."""
    after = snapshot(root)
    return [k for k, v in before.items() if after.get(k) != v]


def refused(
    res: Result,
    needles: Sequence[str],
    *,
    cmd: str = "run",
    quiet: bool = True,
    absent: Sequence[Path] = (),
    keep: tuple[Path, dict[str, bytes]] | None = None,
) -> str:
    """Verdict of a case that must be refused: exit 2 and one line naming every needle.

    ``quiet``: stderr holds nothing but that line (a refusal before the run started).
    ``absent``: paths that must not exist afterwards (nothing half-written).
    ``keep``: ``(root, snapshot)`` whose files must be unchanged (else the verdict is ``lost``).
    """
    if res.exc is not None or "Traceback (most recent call last)" in res.err:
        return "traceback"
    if keep is not None and changed(keep[1], keep[0]):
        return "lost"
    lines = res.lines
    if res.rc != 2 or not lines or not lines[-1].startswith(f"cisslib {cmd}: error: "):
        return "wrong"
    if not all(n.lower() in lines[-1].lower() for n in needles):
        return "wrong"
    if quiet and len(lines) != 1:
        return "wrong"
    if any(Path(p).exists() for p in absent):
        return "wrong"
    if keep is not None and set(snapshot(keep[0])) - set(keep[1]) - {"log.txt"}:
        return "wrong"
    return "clean"


def accepted(res: Result, ok: bool = True) -> str:
    """Verdict of a case that must run: exit 0, no traceback, and ``ok`` (the right result)."""
    if res.exc is not None or "Traceback (most recent call last)" in res.err:
        return "traceback"
    return "clean" if res.rc == 0 and ok else "wrong"


def resumed(res: Result, out: Path, ref: Path) -> str:
    """Verdict of a run that must end like the uninterrupted ``ref``: ``lost`` when it ran but a
    table differs (rows lost or changed), ``wrong`` when the weights differ."""
    if res.exc is not None or "Traceback (most recent call last)" in res.err:
        return "traceback"
    if res.rc != 0 or not same_weights(out, ref):
        return "wrong"
    return "clean" if same_tables(out, ref) else "lost"


def same_tables(a: Path, b: Path) -> bool:
    """The five tables of two run folders are byte-identical."""
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in TABLE_FILES)


def same_weights(a: Path, b: Path, steps: Sequence[int] = (0, 1)) -> bool:
    for t in steps:
        if not (a / "checkpoints" / f"step{t}.pt").is_file():
            return False
        sa = torch.load(a / "checkpoints" / f"step{t}.pt", weights_only=False)["model"]
        sb = torch.load(b / "checkpoints" / f"step{t}.pt", weights_only=False)["model"]
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


# ------------------------------------------------------------------------------------ the world
def _immutable(path: Path, on: bool) -> bool:
    """Make ``path`` read-only for everyone, root included (chattr +i), or chmod for others."""
    if os.geteuid() == 0:
        flag = "+i" if on else "-i"
        res = subprocess.run(["chattr", flag, str(path)], capture_output=True)
        return res.returncode == 0
    path.chmod(0o555 if on else 0o755)
    return True


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` (a folder) read-only inside the block."""
    if not _immutable(path, True):
        raise RuntimeError(f"cannot make {path} read-only here")
    try:
        yield path
    finally:
        _immutable(path, False)


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved index), flat [r0, g0, b0, r1, ...]."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def make_voc(root: Path, n_train: int = 12, n_val: int = 3, seed: int = 0) -> Path:
    """``root/VOC2012`` in the SBD aug layout: 16x16 images, palette labels with 1-2 classes."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"train_aug": [], "val": []}
    for i in range(n_train + n_val):
        stem = f"2008_{i:06d}"
        lab = np.zeros((16, 16), np.uint8)
        lab[2:9, 3:11] = rng.integers(1, 21)
        lab[10:14, 1:6] = rng.integers(1, 21)
        lab[0, :2] = 255
        write_label(voc / "SegmentationClassAug" / f"{stem}.png", lab)
        rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(voc / "JPEGImages" / f"{stem}.jpg", quality=90)
        lists["train_aug" if i < n_train else "val"].append(
            f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png"
        )
    for name, lines in lists.items():
        (voc / "splits" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return voc


def write_label(path: Path, lab: np.ndarray) -> None:
    im = Image.fromarray(lab, mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def voc_sets(root: Path, *sets: str) -> tuple[str, ...]:
    return (
        "scenario.dataset=voc",
        "scenario.setting=15-5",
        f"scenario.data_root={root}",
        *sets,
    )


class World:
    """Temporary folders and the shared, lazily built artefacts of the cases."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._n = 0
        self._made: dict[str, Path] = {}

    def tmp(self, name: str = "case") -> Path:
        self._n += 1
        path = self.root / f"{self._n:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def out(self) -> Path:
        """A run folder that does not exist yet (always named ``run``: same table rows)."""
        return self.tmp("out") / "run"

    def _once(self, key: str, make: Callable[[Path], None]) -> Path:
        if key not in self._made:
            path = self.root / f"shared-{key}" / "run"
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path)
            self._made[key] = path
        return self._made[key]

    def reference(self) -> Path:
        """An uninterrupted FAST smoke run (never modified; copy it with :meth:`copy`)."""

        def make(path: Path) -> None:
            assert run_forked(smoke(path)) == 0

        return self._once("reference", make)

    def killed(self, step: int) -> Path:
        """A FAST smoke run SIGKILLed right after its resume point at iteration 2 of ``step``."""

        def make(path: Path) -> None:
            if step > 0:
                assert run_forked(smoke(path, extra=["--steps", f"0-{step - 1}"])) == 0
                code = run_forked(smoke(path, extra=["--resume"]), ("resume_point", step, 2))
            else:
                code = run_forked(smoke(path), ("resume_point", step, 2))
            assert code == -signal.SIGKILL, code
            assert (path / "checkpoints" / "last.pt").is_file()

        return self._once(f"killed{step}", make)

    def copy(self, source: Path) -> Path:
        dst = self.tmp("copy") / "run"
        shutil.copytree(source, dst)
        return dst

    def clip_file(self, **vision) -> Path:
        """The smoke config's random CLIP saved in cisslib's format (``vision`` changes sizes)."""
        key = "clip" + "".join(f"-{k}{v}" for k, v in sorted(vision.items()))

        def make(path: Path) -> None:
            from cisslib.config import load_config
            from cisslib.model.clip import load_clip, save_clip

            cfg = dict(load_config(SMOKE).model.clip.model_cfg)
            cfg["vision_cfg"] = {**cfg["vision_cfg"], **vision}
            torch.manual_seed(0)
            model, _ = load_clip(model_cfg=cfg)
            path.mkdir()
            save_clip(model, cfg, path / "clip.pt")

        return self._once(key, make) / "clip.pt"

    def voc(self, **kw) -> Path:
        root = self.tmp("voc")
        make_voc(root, **kw)
        return root


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    body: Callable[[World], str]


CASES: dict[str, Case] = {}


def case(kind: str, name: str | None = None):
    assert kind in CLASSES

    def register(fn: Callable[[World], str]) -> Callable[[World], str]:
        key = name or fn.__name__.removeprefix("case_")
        assert key not in CASES, key
        CASES[key] = Case(key, kind, fn)
        return fn

    return register


def names(kind: str) -> list[str]:
    return [c.name for c in CASES.values() if c.kind == kind]


def run_case(name: str, world: World) -> str:
    """The verdict of one case (an exception in the harness itself propagates; a case the
    machine cannot play raises :class:`Unavailable`)."""
    return CASES[name].body(world)


def tally(world: World, pick: Callable[[Case], bool] = lambda c: True) -> dict[str, dict]:
    """Run the cases; ``{class: {"tried": n, verdict: n, ..., "cases": {name: verdict}}}``."""
    import hostile_cases  # noqa: F401  (registers the cases)

    out: dict[str, dict] = {}
    for c in CASES.values():
        if not pick(c):
            continue
        row = out.setdefault(c.kind, {"tried": 0, **dict.fromkeys(VERDICTS, 0), "cases": {}})
        try:
            verdict = c.body(world)
        except Unavailable:
            continue
        except Exception as e:  # noqa: BLE001 - a harness failure counts as a traceback
            verdict = "traceback"
            row["cases"][c.name + " (harness)"] = repr(e)[:200]
        row["tried"] += 1
        row[verdict] += 1
        row["cases"][c.name] = verdict
    return out


def _print_tally(result: dict[str, dict]) -> None:
    total = {k: 0 for k in ("tried", *VERDICTS)}
    print(f"{'class':12s} " + " ".join(f"{k:>9s}" for k in total))
    for kind in CLASSES:
        if kind not in result:
            continue
        row = result[kind]
        for k in total:
            total[k] += row[k]
        print(f"{kind:12s} " + " ".join(f"{row[k]:9d}" for k in total))
    print(f"{'all':12s} " + " ".join(f"{total[k]:9d}" for k in total))
    for kind in CLASSES:
        for name, verdict in result.get(kind, {}).get("cases", {}).items():
            if verdict != "clean":
                print(f"  {kind}/{name}: {verdict}")


# ------------------------------------------------------------------------------------ helpers
def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def main(only: Sequence[str] = ()) -> None:
    """Print the tally of every case (or of the classes named in ``only``)."""
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="cisslib-hostile-") as tmp:
        os.environ["CISSLIB_CACHE"] = str(Path(tmp) / "cache")
        os.environ.pop("CISS_DATA", None)
        t0 = time.perf_counter()
        result = tally(World(Path(tmp) / "world"), lambda c: not only or c.kind in only)
        _print_tally(result)
        print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hostile  # the registry lives in the importable module, not in __main__

    hostile.main(sys.argv[1:])
