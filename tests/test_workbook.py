"""workbook.py (finding notebooks, the kernel, HTML export, the index page) and explorer.py (with a
fake ``load_step`` object). Papermill executions of the notebooks are in test_notebooks.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_runs import write_fake_run  # noqa: E402

from cisslib.report import explorer, workbook  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- notebooks
def test_notebooks_dir_and_find(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any working directory
    assert workbook.notebooks_dir() == REPO / "notebooks"
    assert workbook.find_notebook("forgetting") == REPO / "notebooks" / "forgetting.ipynb"
    assert workbook.find_notebook("semantic_shift.ipynb").name == "semantic_shift.ipynb"
    with pytest.raises(FileNotFoundError, match=r"notebook 'nope' not found .* available: \["):
        workbook.find_notebook("nope")


# ---------------------------------------------------------------------------------- kernel
def _write_spec(root: Path, name: str, argv0: str) -> None:
    d = root / "kernels" / name
    d.mkdir(parents=True)
    spec = {"argv": [argv0, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": name, "language": "python"}  # fmt: skip
    (d / "kernel.json").write_text(json.dumps(spec))


def test_python3_kernel_kept_when_it_runs_this_interpreter(tmp_path, monkeypatch):
    _write_spec(tmp_path, "python3", "python")  # jupyter_client swaps "python" for sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    with workbook.interpreter_kernel("python3") as name:
        assert name == "python3"


def test_python3_kernel_replaced_when_it_runs_another_python(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    _write_spec(tmp_path, "python3", "/usr/bin/false")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    with workbook.interpreter_kernel("python3") as name:
        assert name == workbook.RUNTIME_KERNEL
        spec = KernelSpecManager().get_kernel_spec(name)
        assert spec.argv[0] == sys.executable
        tmp_entry = os.environ["JUPYTER_PATH"].split(os.pathsep)[0]
        assert os.environ["JUPYTER_PATH"].endswith(str(tmp_path))
    assert os.environ["JUPYTER_PATH"] == str(tmp_path)  # restored
    assert not Path(tmp_entry).exists()  # temporary spec removed
    with workbook.interpreter_kernel("my-kernel") as name:  # explicit names are left alone
        assert name == "my-kernel"


def test_spec_runs_this_python():
    assert workbook._spec_runs_this_python([sys.executable, "-m", "ipykernel_launcher"])
    assert workbook._spec_runs_this_python(["python3"])
    assert not workbook._spec_runs_this_python(["/usr/bin/false"])
    assert not workbook._spec_runs_this_python([])


# ---------------------------------------------------------------------------------- export / index
def _tiny_executed_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("secret_code_line = 1")
    cell.outputs = [
        nbformat.v4.new_output(
            "execute_result", {"text/html": "<p>table 0.123</p>"}, execution_count=1
        )  # fmt: skip
    ]
    nb.cells = [nbformat.v4.new_markdown_cell("# Heading here"), cell]
    return nb


def test_export_html_hides_code(tmp_path):
    path = tmp_path / "nb.ipynb"
    nbformat.write(_tiny_executed_notebook(), path)
    out = workbook.export_html(path, tmp_path / "out" / "nb.html", title="My title")
    text = out.read_text()
    assert "table 0.123" in text and "Heading here" in text
    assert "secret_code_line" not in text
    assert "<title>My title</title>" in text
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # not left with the temp file's mode
    with_code = workbook.export_html(path, tmp_path / "code.html", no_input=False).read_text()
    assert "secret_code_line" in with_code
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    with pytest.raises(FileNotFoundError, match="missing.ipynb: notebook to export not found"):
        workbook.export_html(tmp_path / "missing.ipynb", tmp_path / "x.html")


def test_write_index_lists_reports(tmp_path):
    workbook.export_html(_tiny_executed_notebook(), tmp_path / "a.html", title="Report <A>")
    workbook.export_html(_tiny_executed_notebook(), tmp_path / "b.html", title="Report B")
    os.utime(tmp_path / "a.html", (1, 1))  # a is older: listed second
    index = workbook.write_index(tmp_path).read_text()
    assert index.index('href="b.html"') < index.index('href="a.html"')
    assert "Report &lt;A&gt;" in index and "index.html" not in index.split("<body>")[1]


def test_build_report_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics/summary.csv"):
        workbook.build_report([tmp_path], tmp_path / "r.html")
    run = write_fake_run(tmp_path, "full")
    with pytest.raises(ValueError, match="must be written to a .html path"):
        workbook.build_report([run], tmp_path / "r.txt")
    with pytest.raises(ValueError, match="index.html is reserved"):
        workbook.build_report([run], tmp_path / "index.html")


def test_execute_notebook_rejects_non_ipynb_output(tmp_path):
    with pytest.raises(ValueError, match="must be written to a .ipynb path"):
        workbook.execute_notebook("forgetting", tmp_path / "out.json", {})


# ---------------------------------------------------------------------------------- explorer
class FakeStep:
    """The interface of cisslib.api.load_step's result."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.class_names = ["circle", "square", "triangle"][: step + 2]
        self.num_images = 3 + step
        self.calls: list[tuple[int, float | None]] = []

    def segment(self, i: int, tau: float | None = None) -> dict:
        self.calls.append((i, tau))
        c = len(self.class_names)
        scores = np.zeros((c, 4, 5))
        scores[c - 1] = 0.1 * (i + 1)
        pred = np.full((4, 5), c)
        if tau is not None:
            pred[scores.max(0) < tau] = 0
        return dict(image=np.zeros((4, 5, 3), np.uint8), gt=np.ones((4, 5), int), pred=pred,
                    scores=scores)  # fmt: skip


class Loader:
    def __init__(self) -> None:
        self.loaded: list[int] = []
        self.steps: dict[int, FakeStep] = {}

    def __call__(self, run_dir: Path, step: int) -> FakeStep:
        self.loaded.append(step)
        self.steps[step] = FakeStep(step)
        return self.steps[step]


def test_explorer_widgets_cache_and_tau(tmp_path):
    run = write_fake_run(tmp_path, "full")  # checkpoints step0..2, eval.tau 0.4
    loader = Loader()
    ex = explorer.build_explorer(run, loader=loader)
    assert list(ex.step.options) == [0, 1, 2] and ex.step.value == 2
    assert ex.tau.value == pytest.approx(0.4) and ex.tau.disabled
    assert ex.image.max == 4  # 5 images at step 2
    assert [v for _, v in ex.score_class.options] == [1, 2, 3]
    assert loader.steps[2].calls == [(0, None)]  # fg_only: no tau

    ex.image.value = 3
    assert loader.steps[2].calls[-1] == (3, None)
    ex.convention.value = "with_bg"
    assert not ex.tau.disabled
    assert loader.steps[2].calls[-1] == (3, pytest.approx(0.4))
    assert int((ex.example["pred"] == 0).sum()) == 0  # score 0.4 is not below tau 0.4
    ex.tau.value = 0.5
    assert int((ex.example["pred"] == 0).sum()) == 20  # now every pixel is background

    ex.step.value = 0  # 3 images, 2 classes: slider and class list follow the step
    assert ex.image.max == 2 and ex.image.value == 2
    assert [v for _, v in ex.score_class.options] == [1, 2]
    assert loader.steps[0].calls == [(2, pytest.approx(0.5))]  # one render for the step change
    ex.step.value = 2
    ex.step.value = 0
    assert loader.loaded == [2, 0]  # cached: each step loaded once
    ex.score_class.value = 2
    assert ex.figure.axes[3].get_title() == "score: square"
    assert "step 0" in ex.figure._suptitle.get_text()


def test_explorer_bad_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        explorer.build_explorer(tmp_path / "nope", loader=Loader())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoints: no step\{t\}.pt checkpoints"):
        explorer.build_explorer(tmp_path / "empty", loader=Loader())
