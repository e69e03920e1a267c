"""Who is watching this process: a person at a terminal, a person in a notebook, or nobody.

One answer for the progress display (:mod:`cisslib.engine.runner`) and for widgets (the explorer):

- ``"notebook"``: an IPython kernel whose current request allows stdin. JupyterLab (and the other
  frontends a person types into) sends ``allow_stdin: true`` with every cell it runs; nbclient,
  which papermill and ``nbconvert --execute`` use, sends ``false``. A tqdm notebook bar and live
  widgets.
- ``"terminal"``: outside a kernel, stderr is a terminal. A tqdm bar, per-step lines in log.txt.
- ``"batch"``: anything else (papermill, nbconvert, a job's log file). One line per step and per
  evaluation, no bars, no widgets (static figures instead).

``CISSLIB_SESSION=terminal|notebook|batch`` overrides the detection.

A run in a child process whose parent draws the bar (the demo's runs side by side,
:mod:`cisslib.jobs`) relays its step bars to the parent: :func:`relay_bars` in the child, then
:func:`step_bar` returns a :class:`RelayBar` that puts ``(tag, n)`` on the parent's queue.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

SESSION_ENV = "CISSLIB_SESSION"
SESSIONS = ("terminal", "notebook", "batch")

#: ``(queue, tag)`` in a process whose step bars go to its parent (:func:`relay_bars`).
_relay: tuple[Any, str] | None = None


def _kernel():
    """The running ipykernel, or None outside one."""
    if "ipykernel" not in sys.modules:
        return None
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None)


def session_kind() -> str:
    """``"terminal"``, ``"notebook"`` or ``"batch"`` (see the module docstring)."""
    forced = os.environ.get(SESSION_ENV, "").strip()
    if forced:
        if forced not in SESSIONS:
            raise ValueError(f"{SESSION_ENV}={forced!r}; use one of {', '.join(SESSIONS)}")
        return forced
    kernel = _kernel()
    if kernel is not None:
        return "notebook" if getattr(kernel, "_allow_stdin", False) else "batch"
    isatty = getattr(sys.stderr, "isatty", None)
    return "terminal" if isatty is not None and isatty() else "batch"


def interactive() -> bool:
    """True when a person is watching a notebook (live widgets make sense)."""
    return session_kind() == "notebook"


def show_bar(progress: str) -> bool:
    """``run.progress`` -> whether to draw tqdm bars: ``bar`` always, ``log`` never, ``auto`` in a
    terminal or a notebook (``tqdm.auto`` then picks the notebook bar inside a kernel)."""
    return progress == "bar" or (progress == "auto" and session_kind() != "batch")


def log_to_console(progress: str) -> bool:
    """Whether step and evaluation lines also go to stderr: always, except under a terminal bar
    (the lines would tear it; they are in log.txt). A notebook shows them below its bar."""
    return not (show_bar(progress) and session_kind() == "terminal")


def relay_bars(queue: Any, tag: str) -> None:
    """From now on this process's step bars put ``(tag, iterations)`` on ``queue`` (a
    multiprocessing queue its parent drains into one bar) instead of drawing."""
    global _relay
    _relay = (queue, tag)


def relayed() -> bool:
    """True in a process whose step bars go to its parent: it draws no bar of its own."""
    return _relay is not None


class RelayBar:
    """The part of a tqdm bar the runner uses, sending each update to the parent's queue."""

    def __init__(self, queue: Any, tag: str, initial: int) -> None:
        self.queue, self.tag = queue, tag
        if initial:
            self.queue.put((tag, initial))  # a resumed step: the parent counts what was done

    def update(self, n: int = 1) -> None:
        self.queue.put((self.tag, n))

    def set_postfix(self, **_: Any) -> None:  # the parent's bar shows the runs, not the loss
        pass

    def close(self) -> None:
        pass


def step_bar(total: int, initial: int, desc: str):
    """The bar of one training step: tqdm (terminal or notebook), or a :class:`RelayBar`."""
    if _relay is not None:
        return RelayBar(*_relay, initial=initial)
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
