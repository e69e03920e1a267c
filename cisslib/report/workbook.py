"""Papermill batch runs of the notebooks, nbconvert HTML export, reports and their index page.

Notebooks are found in the project's ``notebooks/`` (:mod:`cisslib.paths`), so this works from any
working directory. Execution always uses the running interpreter: the ``python3`` kernel is used
when it resolves to ``sys.executable``; otherwise a kernel spec for this interpreter is written
into a temporary ``JUPYTER_PATH`` entry for the duration of the call (no global Jupyter setup).

HTML exports are self-contained: figures are inline PNGs and the template (nbconvert's ``lab``
minus require.js, MathJax, mermaid and the widget manager, all loaded from a CDN otherwise) holds
no script, so a report opens offline and behind firewalls without a network request.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import html
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import nbformat
import papermill as pm
from jinja2 import DictLoader
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbconvert import HTMLExporter

from cisslib import paths
from cisslib.files import atomic_write_text
from cisslib.report.loading import load_runs


class NotebookError(RuntimeError):
    """A notebook cell failed; the message names the cell, the error and the executed copy."""


REPORT_NOTEBOOKS = ("forgetting", "semantic_shift")
INDEX_NAME = "index.html"
RUNTIME_KERNEL = "cisslib-python"
REPORT_TEMPLATE = "cisslib_report.html.j2"
# nbconvert's lab template without anything fetched from the network.
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


# --------------------------------------------------------------------------------------- finding
def notebooks_dir() -> Path:
    """The project's ``notebooks/`` (see :func:`cisslib.paths.notebooks_dir`)."""
    return paths.notebooks_dir()


def find_notebook(name_or_path: str | os.PathLike) -> Path:
    """A notebook path: an existing ``.ipynb`` path, or a name (``forgetting`` or
    ``forgetting.ipynb``) in :func:`notebooks_dir`."""
    path = Path(name_or_path)
    if path.suffix == ".ipynb" and path.is_file():
        return path.resolve()
    folder = notebooks_dir()
    candidate = folder / (path.name if path.suffix == ".ipynb" else f"{path.name}.ipynb")
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in folder.glob("*.ipynb"))
    raise FileNotFoundError(
        f"notebook {str(name_or_path)!r} not found (as a path or in {folder}); available: "
        f"{available}"
    )


def _readable(path: Path) -> Path:
    """Give a file written through a temp file (mode 0600) the usual 0666 & ~umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


# --------------------------------------------------------------------------------------- kernel
def _spec_runs_this_python(argv: Sequence[str]) -> bool:
    """True when a kernel spec's ``argv`` launches ``sys.executable`` (jupyter_client swaps a bare
    ``python``/``python3``/``python3.X`` for ``sys.executable``)."""
    if not argv:
        return False
    exe = argv[0]
    major, minor = sys.version_info[:2]
    if exe in {"python", f"python{major}", f"python{major}.{minor}"}:
        return True
    here = Path(sys.executable)
    there = Path(exe)
    # Compare the folder without resolving the interpreter link: a venv's python is a symlink to
    # the base interpreter, but only the venv's path gives the venv's packages.
    try:
        return there.parent.resolve() == here.parent.resolve() and there.samefile(here)
    except OSError:
        return False


@contextlib.contextmanager
def interpreter_kernel(kernel: str = "python3") -> Iterator[str]:
    """Yield a kernel name that papermill can start and that runs the current interpreter.

    ``kernel`` other than ``"python3"`` is yielded unchanged (the caller's explicit choice).
    For ``"python3"``: if that spec launches ``sys.executable`` it is used; otherwise a spec
    ``cisslib-python`` for ``sys.executable`` is written into a temporary folder that is put first
    on ``JUPYTER_PATH`` until the block ends (the process environment is restored afterwards).
    """
    if kernel != "python3":
        yield kernel
        return
    try:
        spec = KernelSpecManager().get_kernel_spec(kernel)
        if _spec_runs_this_python(spec.argv):
            yield kernel
            return
    except NoSuchKernel:
        pass
    with tempfile.TemporaryDirectory(prefix="cisslib-jupyter-") as tmp:
        spec_dir = Path(tmp) / "kernels" / RUNTIME_KERNEL
        spec_dir.mkdir(parents=True)
        spec_json = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"cisslib ({sys.executable})",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec_json, indent=1))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp if not old else tmp + os.pathsep + old
        try:
            yield RUNTIME_KERNEL
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


# --------------------------------------------------------------------------------------- execute
def execute_notebook(
    name_or_path: str | os.PathLike,
    out_ipynb: str | os.PathLike,
    parameters: dict | None = None,
    kernel: str = "python3",
    log_output: bool = False,
    cwd: str | os.PathLike | None = None,
    execution_timeout: float | None = None,
) -> Path:
    """Execute a notebook with papermill, injecting ``parameters``; return ``out_ipynb``.

    ``execution_timeout``: seconds one cell may run before it is stopped with an error (default:
    no limit), so an unattended batch run cannot hang forever.

    The executed copy appears at ``out_ipynb`` only when complete. If a cell fails, the partial
    copy (with the traceback) is still moved to ``out_ipynb`` and a one-line ``RuntimeError``
    names it. ``cwd`` (default: the project root) is the kernel's working directory; the
    notebooks resolve relative paths among their parameters against the project root anyway.
    """
    src = find_notebook(name_or_path)
    out = Path(out_ipynb)
    if out.suffix != ".ipynb":
        raise ValueError(f"{out}: the executed notebook must be written to a .ipynb path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".tmp.ipynb", dir=out.parent)
    os.close(fd)
    try:
        with interpreter_kernel(kernel) as kernel_name:
            pm.execute_notebook(
                str(src),
                tmp,
                parameters=dict(parameters or {}),
                kernel_name=kernel_name,
                log_output=log_output,
                progress_bar=False,
                cwd=str(cwd) if cwd is not None else str(paths.project_root()),
                execution_timeout=execution_timeout,
            )
    except pm.PapermillExecutionError as err:
        os.replace(tmp, out)
        _readable(out)
        raise NotebookError(
            f"{src.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue} "
            f"(executed copy with the traceback: {out})"
        ) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, out)
    return _readable(out)


# --------------------------------------------------------------------------------------- export
def _html_exporter(no_input: bool) -> HTMLExporter:
    """nbconvert's HTML exporter with the self-contained template (no script, no CDN)."""
    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[DictLoader({REPORT_TEMPLATE: _TEMPLATE})],
        template_file=REPORT_TEMPLATE,
        embed_images=True,
    )
    if no_input:
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
    return exporter


def export_html(
    ipynb: str | os.PathLike | nbformat.NotebookNode,
    html_path: str | os.PathLike,
    no_input: bool = True,
    title: str | None = None,
) -> Path:
    """Export an (executed) notebook, or a notebook node, to a self-contained HTML file (inline
    images, no script, no network request) atomically.

    ``no_input=True`` hides code cells and prompts (figures, tables and markdown remain).
    """
    if isinstance(ipynb, nbformat.NotebookNode):
        nb = ipynb
        default_title = "cisslib report"
    else:
        path = Path(ipynb)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: notebook to export not found")
        nb = nbformat.read(path, as_version=4)
        default_title = path.stem
    title = title or default_title
    nb = copy.deepcopy(nb)
    nb.metadata["title"] = title
    nb.metadata.pop("widgets", None)  # widget state needs the CDN widget manager to show
    body, _ = _html_exporter(no_input).from_notebook_node(
        nb, resources={"metadata": {"name": title}}
    )
    out = Path(html_path)
    atomic_write_text(out, body)
    return _readable(out)


# --------------------------------------------------------------------------------------- report
def _merge(notebooks: Sequence[nbformat.NotebookNode], header: str) -> nbformat.NotebookNode:
    merged = nbformat.v4.new_notebook()
    merged.metadata = notebooks[0].metadata
    merged.cells.append(nbformat.v4.new_markdown_cell(header))
    for nb in notebooks:
        merged.cells.extend(nb.cells)
    return merged


def _given_folder(path: str | os.PathLike) -> Path:
    """A folder named on a command line: as given when it exists, else under the project root."""
    p = Path(path).expanduser()
    return (p if p.exists() else paths.in_project(p)).resolve()


def report_header(title: str, dirs: Sequence[Path]) -> str:
    """Markdown heading of a report: title, when and where generated, the runs (label, preset,
    seed, tau, folder)."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    host = html.escape(platform.node() or "this machine")
    lines = [
        f"# {html.escape(title)}",
        "",
        f"Generated {stamp} on {host} from {len(dirs)} run folder(s). IoU values are in percent.",
        "",
        "| run | preset | seed | tau (with_bg) | folder |",
        "|---|---|---|---|---|",
    ]
    for r in load_runs(dirs)["runs"].itertuples(index=False):
        tau = "–" if r.tau is None or r.tau != r.tau else f"{r.tau:g}"
        lines.append(f"| {r.run} | {r.preset} | {r.seed} | {tau} | `{r.folder}` |")
    return "\n".join(lines) + "\n"


def build_report(
    run_dirs: str | os.PathLike | Iterable[str | os.PathLike],
    out_html: str | os.PathLike,
    title: str = "cisslib report",
    convention: str = "fg_only",
    kernel: str = "python3",
    index: bool = True,
) -> Path:
    """Execute ``forgetting.ipynb`` and ``semantic_shift.ipynb`` on ``run_dirs`` and export ONE
    HTML report (figures, tables, no code) to ``out_html``.

    The executed notebooks are kept beside it in ``<stem>_notebooks/``; with ``index=True`` the
    folder's ``index.html`` (a list of its reports) is rewritten.
    """
    dirs = [_given_folder(d) for d in paths.as_list(run_dirs)]
    if not dirs:
        raise ValueError("build_report: no run folder given; pass at least one run directory")
    for d in dirs:
        if not (d / "metrics" / "summary.csv").is_file():
            raise FileNotFoundError(
                f"{d}: no metrics/summary.csv; pass run folders written by the engine"
            )
    out = Path(out_html).resolve()
    if out.suffix != ".html":
        raise ValueError(f"{out}: the report must be written to a .html path")
    if out.name == INDEX_NAME:
        raise ValueError(f"{out}: {INDEX_NAME} is reserved for the report index; pick another name")
    work = out.parent / f"{out.stem}_notebooks"
    params = {"run_dirs": [str(d) for d in dirs]}
    executed = [
        execute_notebook(
            "forgetting", work / "forgetting.ipynb", {**params, "convention": convention}, kernel
        ),
        execute_notebook("semantic_shift", work / "semantic_shift.ipynb", params, kernel),
    ]
    header = report_header(title, dirs)
    merged = _merge([nbformat.read(p, as_version=4) for p in executed], header)
    export_html(merged, out, no_input=True, title=title)
    if index:
        write_index(out.parent)
    return out


_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def write_index(folder: str | os.PathLike, title: str = "cisslib reports") -> Path:
    """Write ``folder/index.html`` linking every other ``*.html`` report there, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: report folder not found")
    reports = [p for p in folder.glob("*.html") if p.name != INDEX_NAME]
    reports.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    items = []
    for p in reports:
        with open(p, encoding="utf-8", errors="replace") as f:
            match = _TITLE.search(f.read(65536))
        name = html.unescape(match.group(1).strip()) if match else p.stem
        when = _dt.datetime.fromtimestamp(p.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        items.append(
            f'<li><a href="{html.escape(p.name, quote=True)}">{html.escape(name)}</a> '
            f"<small>({html.escape(p.name)}, {when})</small></li>"
        )
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        + ("<ul>\n" + "\n".join(items) + "\n</ul>" if items else "<p>No reports yet.</p>")
        + "\n</body></html>\n"
    )
    out = folder / INDEX_NAME
    atomic_write_text(out, page)
    return _readable(out)


__all__ = [
    "build_report",
    "execute_notebook",
    "export_html",
    "find_notebook",
    "interpreter_kernel",
    "notebooks_dir",
    "write_index",
]
