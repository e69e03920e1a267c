"""One notebook over many params files or run folders (papermill), with an index page.

``run_batch("forgetting", ["outputs/demo/full", "outputs/demo/finetune"])`` executes the notebook
once per target and writes, under each run folder, ``reports/<notebook>.ipynb`` (the executed copy)
and ``reports/<notebook>.html`` (self-contained, no code), then one index page linking them all.
What a target is follows from the notebook's parameters: a params file (or its name) for a notebook
with ``params_file`` (``run_scenario``: the run folder is the one that run writes), a run folder for
a notebook with ``run_dir`` or ``run_dirs``. A failing target is recorded in the index with its
error and the executed copy that holds the traceback; the others still run.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
from papermill.translators import PythonTranslator

from cisslib import paths
from cisslib.files import atomic_write_text
from cisslib.report.workbook import _given_folder, execute_notebook, export_html, find_notebook

REPORTS_FOLDER = "reports"


@dataclass
class BatchItem:
    """One execution: its target, run folder, output files and outcome (error None when ok)."""

    target: str
    run_dir: Path
    ipynb: Path
    html: Path
    seconds: float = 0.0
    error: str | None = None


def notebook_parameters(notebook: str | os.PathLike) -> list[str]:
    """Names in the notebook's ``parameters`` cell, in order."""
    nb = nbformat.read(find_notebook(notebook), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return [p.name for p in PythonTranslator.inspect(cell)]
    raise ValueError(f"{notebook}: no cell tagged 'parameters'; papermill cannot inject targets")


def _plan(notebook: str, target: str, names: list[str], overrides: Sequence[str]):
    """(run folder, parameters) of one target."""
    if "params_file" in names:
        from cisslib.api import resolve_run_dir
        from cisslib.config import load_config

        params = paths.find_params(target)
        run_dir = resolve_run_dir(load_config(params, overrides), params, None)
        given = {"params_file": str(params), "out_dir": str(run_dir)}
        if "overrides" in names:
            given["overrides"] = list(overrides)
        return run_dir, given
    run_dir = _given_folder(target)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{target}: run folder not found ({run_dir})")
    if "run_dirs" in names:
        return run_dir, {"run_dirs": [str(run_dir)]}
    if "run_dir" in names:
        return run_dir, {"run_dir": str(run_dir)}
    raise ValueError(
        f"{notebook}: its parameters {names} take neither params_file nor run_dir(s); "
        "run it with papermill directly"
    )


def run_batch(
    notebook: str,
    targets: Sequence[str],
    parameters: dict | None = None,
    overrides: Sequence[str] = (),
    index: str | os.PathLike | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[Path, list[BatchItem]]:
    """Execute ``notebook`` once per target (see the module docstring); returns the index page
    (default ``outputs/batch/<notebook>.html``) and the items. ``parameters`` are passed to every
    execution; ``overrides`` are the ``--set`` strings of a ``params_file`` notebook."""
    if not targets:
        raise ValueError("batch: no target given; pass params files or run folders")
    name = find_notebook(notebook).stem
    names = notebook_parameters(notebook)
    unknown = sorted(set(parameters or {}) - set(names))
    if unknown:
        raise ValueError(f"{name}: no parameter(s) {unknown}; it has {names}")
    plans = [(t, *_plan(name, t, names, overrides)) for t in targets]  # bad targets fail first
    items = []
    for k, (target, run_dir, given) in enumerate(plans, start=1):
        out = run_dir / REPORTS_FOLDER
        item = BatchItem(target, run_dir, out / f"{name}.ipynb", out / f"{name}.html")
        t0 = time.perf_counter()
        try:
            execute_notebook(name, item.ipynb, {**(parameters or {}), **given})
            export_html(item.ipynb, item.html, title=f"{name}: {run_dir.name}")
        except (RuntimeError, OSError, ValueError) as e:
            item.error = str(e)
        item.seconds = time.perf_counter() - t0
        status = "ok" if item.error is None else f"FAILED: {item.error}"
        echo(f"[{k}/{len(plans)}] {name} {target}: {status} ({item.seconds:.0f} s) -> {item.html}")
        items.append(item)
    page = Path(index) if index else paths.outputs_dir() / "batch" / f"{name}.html"
    write_batch_index(page, name, items)
    return page, items


def _link(path: Path, base: Path) -> str:
    rel = os.path.relpath(path, base)
    return f'<a href="{html.escape(Path(rel).as_posix(), quote=True)}">{html.escape(path.name)}</a>'


def write_batch_index(page: str | os.PathLike, notebook: str, items: Sequence[BatchItem]) -> Path:
    """An HTML table of the batch: target, run folder, status, time, links (relative)."""
    page = Path(page).resolve()
    base = page.parent
    rows = []
    for it in items:
        ok = it.error is None
        links = (
            _link(it.html, base) + " " + _link(it.ipynb, base)
            if ok
            else (_link(it.ipynb, base) if it.ipynb.is_file() else "")
        )
        status = "ok" if ok else f"failed: {html.escape(it.error or '')}"
        rows.append(
            f"<tr><td>{html.escape(it.target)}</td><td><code>{html.escape(str(it.run_dir))}"
            f"</code></td><td>{status}</td><td>{it.seconds:.0f} s</td><td>{links}</td></tr>"
        )
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"cisslib batch: {notebook}"
    text = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        f"<p>{len(items)} execution(s), {sum(i.error is None for i in items)} ok; {stamp}.</p>\n"
        "<table border='1' cellpadding='4'>\n<tr><th>target</th><th>run folder</th>"
        "<th>status</th><th>time</th><th>report, notebook</th></tr>\n"
        + "\n".join(rows)
        + "\n</table>\n</body></html>\n"
    )
    atomic_write_text(page, text)
    return page
