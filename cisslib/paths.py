"""The project root and the folders under it: where params files, notebooks and runs live.

Relative paths given to the workbook resolve against the project root, not against the working
directory, so a JupyterLab kernel (which starts in ``notebooks/``), papermill from any directory and
the CLI find the same params files and write runs into the same ``outputs/``.

The root is, in order: ``$CISSLIB_HOME`` when set; the checkout that holds the imported ``cisslib``
package (``params/`` and ``notebooks/`` beside ``cisslib/``, as with ``pip install -e .``); the
nearest folder at or above the working directory that has both; the working directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import yaml

from cisslib.config import ConfigError

HOME_ENV = "CISSLIB_HOME"
DEMO_HINT = (
    "`bash scripts/demo.sh` (or `cisslib demo`) writes outputs/demo/full and outputs/demo/finetune"
)


def _is_project(folder: Path) -> bool:
    return (folder / "params").is_dir() and (folder / "notebooks").is_dir()


def package_checkout() -> Path | None:
    """The repository that holds the imported ``cisslib`` package, or None (a plain install)."""
    folder = Path(__file__).resolve().parent.parent
    return folder if _is_project(folder) else None


def project_root() -> Path:
    """The project root (see the module docstring); an absolute path."""
    home = os.environ.get(HOME_ENV)
    if home:
        root = Path(home).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"{HOME_ENV}={home}: not a folder; unset it or create it")
        return root
    checkout = package_checkout()
    if checkout is not None:
        return checkout
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if _is_project(folder):
            return folder
    return here


def in_project(path: str | os.PathLike) -> Path:
    """``path`` itself when absolute, else ``<project root>/path``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def outputs_dir() -> Path:
    """``<project root>/outputs``: run folders, executed notebooks, reports (git ignores it)."""
    return project_root() / "outputs"


def params_dirs() -> list[Path]:
    """Folders searched for a params file given by name: the project's ``params/``, then the
    package checkout's (the shipped examples, when ``CISSLIB_HOME`` points elsewhere)."""
    dirs = [project_root() / "params"]
    checkout = package_checkout()
    if checkout is not None and checkout / "params" not in dirs:
        dirs.append(checkout / "params")
    return [d for d in dirs if d.is_dir()]


def notebooks_dir() -> Path:
    """The committed notebooks: ``notebooks/`` of the project root, else of the package checkout."""
    for base in (project_root(), package_checkout()):
        if base is not None and (base / "notebooks").is_dir():
            return base / "notebooks"
    raise FileNotFoundError(
        f"no notebooks/ folder in {project_root()}; install cisslib editable from its repository "
        f"(pip install -e .) or set {HOME_ENV} to the repository"
    )


def find_params(name_or_path: str | os.PathLike) -> Path:
    """A params file: an existing path (as given, then under the project root), or a name
    (``toy_15-1`` or ``toy_15-1.yaml``) in :func:`params_dirs`. Raises one-line ``ConfigError``."""
    path = Path(name_or_path).expanduser()
    candidates = [path] if path.is_absolute() else [path, project_root() / path]
    if len(path.parts) == 1:
        name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        candidates += [d / name for d in params_dirs()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    names = sorted({p.stem for d in params_dirs() for p in d.glob("*.yaml")})
    raise ConfigError(
        f"params file {str(name_or_path)!r} not found (as a path, under {project_root()}, or by "
        f"name in params/); available names: {', '.join(names) or 'none'}"
    )


def as_list(value: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """A list of paths from a list, one path, or a YAML/JSON list in a string (what
    ``papermill -p run_dirs '["a", "b"]'`` passes)."""
    if isinstance(value, os.PathLike):
        return [os.fspath(value)]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = yaml.safe_load(text)
            return [str(v) for v in parsed]
        return [text]
    return [os.fspath(v) for v in value]


def run_folders(value: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Existing run folders (``metrics/summary.csv`` present) for a notebook's ``run_dir(s)``
    parameter, relative paths under the project root. A missing one raises one line that names it
    and the command that creates the demo's runs."""
    folders = [in_project(p) for p in as_list(value)]
    if not folders:
        raise ValueError("no run folder given; pass at least one run folder")
    for folder, given in zip(folders, as_list(value), strict=True):
        if not (folder / "metrics" / "summary.csv").is_file():
            what = "no run folder at" if not folder.is_dir() else "no metrics/summary.csv in"
            raise FileNotFoundError(
                f"{given}: {what} {folder}; {DEMO_HINT} (`cisslib run PARAMS` writes others)"
            )
    return folders


def run_folder(value: str | os.PathLike) -> Path:
    """One run folder for a notebook's ``run_dir`` parameter (see :func:`run_folders`)."""
    folders = run_folders(value)
    if len(folders) != 1:
        raise ValueError(f"run_dir: expected one run folder, got {len(folders)}")
    return folders[0]
