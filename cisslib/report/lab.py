"""JupyterLab on the project: ``cisslib lab`` keeps the committed notebooks clean.

JupyterLab autosaves a notebook with its outputs. For the committed notebooks (the project's
``notebooks/*.ipynb``) :func:`strip_committed` runs before every save: the file on disk keeps no
outputs, no execution counts, cell metadata other than tags, and no notebook metadata beyond the
kernel spec and the language name (the browser still shows the outputs). Any other notebook, e.g.
a copy saved under ``outputs/``, is saved as it is. ``cisslib lab`` starts JupyterLab at the project
root with this hook installed; extra arguments go to ``jupyter lab``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cisslib import paths

HOOK = "cisslib.report.lab.strip_committed"


def is_committed(path: str | os.PathLike) -> bool:
    """True for a notebook directly in the project's ``notebooks/`` folder."""
    p = Path(path).resolve()
    try:
        return p.suffix == ".ipynb" and p.parent == paths.notebooks_dir().resolve()
    except FileNotFoundError:
        return False


def clean_notebook(nb: dict) -> dict:
    """Strip outputs, execution counts, non-tag cell metadata and extra notebook metadata, in
    place (``nb`` is a notebook as JSON: a dict); returns it."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        tags = (cell.get("metadata") or {}).get("tags")
        cell["metadata"] = {"tags": tags} if tags else {}
    meta = nb.get("metadata") or {}
    language = (meta.get("language_info") or {}).get("name", "python")
    kept = {"language_info": {"name": language}}
    if "kernelspec" in meta:
        kept["kernelspec"] = meta["kernelspec"]
    nb["metadata"] = kept
    return nb


def strip_committed(model: dict, path: str, contents_manager: Any, **kwargs: Any) -> None:
    """jupyter_server ``pre_save_hook``: clean the model of a committed notebook before it is
    written (see the module docstring)."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    root = getattr(contents_manager, "root_dir", os.getcwd())
    if is_committed(Path(root) / path.lstrip("/")):
        clean_notebook(model["content"])


def lab_command(extra: Sequence[str] = ()) -> list[str]:
    """The ``jupyter lab`` command line: this interpreter, the project root (the folder that holds
    ``notebooks/``) as the server's root, the save hook, then ``extra``."""
    root = paths.notebooks_dir().parent
    return [
        sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}",
        f"--ContentsManager.pre_save_hook={HOOK}", *extra,
    ]  # fmt: skip


def run_lab(extra: Sequence[str] = ()) -> None:
    """Replace this process with JupyterLab (:func:`lab_command`)."""
    if importlib.util.find_spec("jupyterlab") is None:
        raise FileNotFoundError(
            "JupyterLab is not installed in this environment; pip install 'cisslib[notebooks]'"
        )
    cmd = lab_command(extra)
    os.execv(cmd[0], cmd)
