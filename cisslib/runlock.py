"""The lock of a run folder (``<run>/run.lock``): at most one run works in a folder at a time.

The lock file records the holder's pid, host, process start time and start date. A lock left by a
process that no longer runs on this host (a killed run) is stale and taken over, with a log line;
a lock of a live process, or of another host (which cannot be checked from here), refuses the run
with one line that says who holds it and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import tempfile
from pathlib import Path

from cisslib.files import write_error

log = logging.getLogger("cisslib")

LOCK_NAME = "run.lock"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked: in use, holding another run, nothing to resume."""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks after boot), to tell a reused pid apart."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None


def _alive(pid: int, start: str | None) -> bool:
    """Process ``pid`` runs (not a zombie) and, when known, started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and (start is None or stat[19] == start)


class RunLock:
    """``<root>/run.lock``: :meth:`check` (read only), :meth:`acquire`, :meth:`release`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.held = False

    def holder(self) -> dict | None:
        """The recorded holder (``pid``, ``host``, ``started``, ...), or None without a lock."""
        try:
            data = json.loads(self.path.read_text())
            return {**data, "pid": int(data["pid"]), "host": str(data["host"])}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise RunFolderError(
                f"{self.path} is not a readable lock file; if no run is using {self.root}, "
                "delete it and retry"
            ) from None

    @staticmethod
    def _mine(info: dict) -> bool:
        return info["host"] == socket.gethostname() and info["pid"] == os.getpid()

    def _stale(self, info: dict) -> bool:
        same_host = info["host"] == socket.gethostname()
        return same_host and not _alive(info["pid"], info.get("proc_start"))

    def check(self) -> None:
        """Raise :class:`RunFolderError` when a live (or unknown) run holds the folder."""
        info = self.holder()
        if self.held or info is None or self._stale(info) or self._mine(info):
            return
        who = f"pid {info['pid']} on host {info['host']}, since {info.get('started', '?')}"
        if info["host"] == socket.gethostname():
            raise RunFolderError(
                f"run folder {self.root} is in use by a running cisslib ({who}; {self.path}); "
                "wait for it to end, or use another --out"
            )
        raise RunFolderError(
            f"run folder {self.root} is locked by {who} ({self.path}); if that run is no longer "
            "running, delete the lock file and retry"
        )

    def _record(self) -> str:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proc_start": _proc_start(os.getpid()),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        return json.dumps(me) + "\n"

    def acquire(self) -> None:
        """Take the lock, creating the folder; a stale lock is taken over."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{LOCK_NAME}.", suffix=".tmp", dir=self.root)
            with os.fdopen(fd, "w") as f:
                f.write(self._record())
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            for _ in range(3):
                self.check()
                stale = self.holder()
                if stale is not None:
                    log.info(
                        "run folder %s: stale lock of pid %s taken over", self.root, stale["pid"]
                    )
                    with contextlib.suppress(FileNotFoundError):
                        if self.holder() == stale:  # nobody took it over meanwhile
                            os.remove(self.path)
                if self._link(tmp):
                    self.held = True
                    return
            self.check()
            raise RunFolderError(f"{self.path}: could not take the lock; retry")
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _link(self, tmp: str) -> bool:
        """Publish the lock file atomically; False when another process has one already."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise write_error(self.path, e) from None
        try:  # a file system without hard links: exclusive create
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise write_error(self.path, e) from None
        with os.fdopen(fd, "w") as f:
            f.write(Path(tmp).read_text())
        return True

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
