"""workbook.py (finding notebooks, the kernel, HTML export, the index page), explorer.py (with a
fake ``load_step`` object), paths.py, session.py and the JupyterLab save hook (lab.py). Papermill
executions of the notebooks are in test_notebooks.py, a real browser in test_browser.py."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_runs import write_fake_run  # noqa: E402

from cisslib import paths, session  # noqa: E402
from cisslib.config import ConfigError  # noqa: E402
from cisslib.report import explorer, lab, workbook  # noqa: E402

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


def test_export_html_is_self_contained(tmp_path):
    nb = _tiny_executed_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("math $x^2$ and a widget-free page"))
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    text = workbook.export_html(nb, tmp_path / "nb.html").read_text()
    assert "<script" not in text  # no require.js, MathJax, mermaid or widget manager
    assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", text)
    assert "table 0.123" in text


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
    ex = explorer.build_explorer(run, loader=loader, live=True)
    assert isinstance(ex, explorer.Explorer)
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


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_explorer_widget_shows_the_figure_as_png(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(explorer, "display", shown.append)  # the Output widget's content
    ex = explorer.build_explorer(write_fake_run(tmp_path, "full"), loader=Loader(), live=True)
    assert len(shown) == 1 and shown[0].data.startswith(b"\x89PNG")  # no backend needed
    ex.image.value = 2
    assert len(shown) == 2 and _pixels(shown[1].data).shape == _pixels(shown[0].data).shape
    assert (_pixels(shown[1].data) != _pixels(shown[0].data)).any()  # the new image's score map


def test_explorer_outside_a_notebook_is_a_static_gallery(tmp_path, monkeypatch):
    run = write_fake_run(tmp_path, "full")
    monkeypatch.setenv(session.SESSION_ENV, "batch")
    loader = Loader()
    gallery = explorer.build_explorer(run, loader=loader, images=2)
    assert isinstance(gallery, explorer.Gallery)  # no widget exists in a batch run
    assert [(s, i) for s, i, _, _ in gallery.entries] == [(0, 0), (0, 1), (1, 0), (1, 1),
                                                          (2, 0), (2, 1)]  # fmt: skip
    assert all(calls == [(0, None), (1, None)] for calls in
               (loader.steps[t].calls for t in (0, 1, 2)))  # fmt: skip
    html = gallery._repr_html_()
    assert html.count('<img src="data:image/png;base64,') == 6
    assert "step 1  image 0  prediction: fg_only" in html
    assert _pixels(gallery.entries[0][3]).shape[1] > 300
    monkeypatch.setenv(session.SESSION_ENV, "notebook")
    assert isinstance(explorer.build_explorer(run, loader=Loader()), explorer.Explorer)
    few = explorer.build_explorer(run, loader=Loader(), images=9, live=False)
    assert len(few.entries) == 3 + 4 + 5  # at most num_images per step


def test_explorer_bad_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found .*scripts/demo.sh"):
        explorer.build_explorer(tmp_path / "nope", loader=Loader())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoints: no step\{t\}.pt checkpoints"):
        explorer.build_explorer(tmp_path / "empty", loader=Loader())


# ---------------------------------------------------------------------------------- session
class _Kernel:
    def __init__(self, allow_stdin: bool) -> None:
        self._allow_stdin = allow_stdin


@pytest.mark.parametrize(
    ("kernel", "tty", "kind"),
    [(_Kernel(True), False, "notebook"), (_Kernel(False), False, "batch"),
     (None, True, "terminal"), (None, False, "batch")],
)  # fmt: skip
def test_session_kind_and_progress(monkeypatch, kernel, tty, kind):
    monkeypatch.delenv(session.SESSION_ENV, raising=False)
    monkeypatch.setattr(session, "_kernel", lambda: kernel)
    monkeypatch.setattr(sys, "stderr", type("Err", (), {"isatty": lambda self: tty})())
    assert session.session_kind() == kind
    assert session.show_bar("auto") == (kind != "batch")
    assert session.show_bar("bar") and not session.show_bar("log")
    # lines on stderr unless a terminal bar owns it
    assert session.log_to_console("auto") == (kind != "terminal")
    assert session.log_to_console("log")


def test_session_env_override(monkeypatch):
    monkeypatch.setenv(session.SESSION_ENV, "notebook")
    assert session.session_kind() == "notebook" and session.interactive()
    monkeypatch.setenv(session.SESSION_ENV, "nope")
    with pytest.raises(ValueError, match="CISSLIB_SESSION='nope'; use one of terminal"):
        session.session_kind()


# ---------------------------------------------------------------------------------- paths
def _project(root: Path) -> Path:
    (root / "params").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "params" / "mine.yaml").write_text("run: {seed: 1}\n")
    return root


def test_project_root_and_params(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the working directory does not matter
    assert paths.project_root() == REPO
    assert paths.find_params("toy_15-1") == REPO / "params" / "toy_15-1.yaml"
    assert paths.find_params("params/smoke.yaml") == REPO / "params" / "smoke.yaml"
    assert paths.in_project("outputs/x") == REPO / "outputs" / "x"
    home = _project(tmp_path / "home")
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    assert paths.project_root() == home
    assert paths.outputs_dir() == home / "outputs"
    assert paths.find_params("mine") == home / "params" / "mine.yaml"
    assert paths.find_params("smoke") == REPO / "params" / "smoke.yaml"  # the shipped examples
    with pytest.raises(
        ConfigError, match=r"params file 'nope' not found .*available names: .*mine"
    ):
        paths.find_params("nope")
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="CISSLIB_HOME=.*absent: not a folder"):
        paths.project_root()


def test_run_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.HOME_ENV, str(_project(tmp_path / "home")))
    a = write_fake_run(tmp_path / "home" / "outputs", "full")
    b = write_fake_run(tmp_path / "home" / "outputs", "finetune")
    assert paths.run_folders(["outputs/toy_full", str(b)]) == [a, b]
    assert paths.run_folders('["outputs/toy_full", "outputs/toy_finetune"]') == [a, b]  # -p
    assert paths.run_folder("outputs/toy_full") == a
    with pytest.raises(FileNotFoundError, match=r"outputs/demo/full: no run folder .*demo.sh"):
        paths.run_folders(["outputs/demo/full"])


# ---------------------------------------------------------------------------------- lab
def _dirty(nb: nbformat.NotebookNode) -> dict:
    d = json.loads(nbformat.writes(nb))
    d["cells"][1]["execution_count"] = 3
    d["cells"][1]["metadata"] = {"tags": ["parameters"], "scrolled": True, "execution": {}}
    d["metadata"]["language_info"] = {"name": "python", "version": "3.11.2"}
    d["metadata"]["widgets"] = {"state": {}}
    return d


def test_save_hook_cleans_committed_notebooks_only(tmp_path, monkeypatch):
    home = _project(tmp_path / "home")
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    nb = _tiny_executed_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                  "language": "python"}}  # fmt: skip
    manager = type("CM", (), {"root_dir": str(home)})()
    model = {"type": "notebook", "content": _dirty(nb)}
    lab.strip_committed(model, "notebooks/a.ipynb", manager)
    cell = model["content"]["cells"][1]
    assert cell["outputs"] == [] and cell["execution_count"] is None
    assert cell["metadata"] == {"tags": ["parameters"]}
    assert model["content"]["metadata"] == {
        "kernelspec": nb.metadata["kernelspec"], "language_info": {"name": "python"}
    }  # fmt: skip
    elsewhere = {"type": "notebook", "content": _dirty(nb)}
    lab.strip_committed(elsewhere, "outputs/a.ipynb", manager)  # a working copy keeps outputs
    assert elsewhere["content"]["cells"][1]["outputs"]
    command = lab.lab_command(["--port", "9"])
    assert f"--ServerApp.root_dir={home}" in command and command[-2:] == ["--port", "9"]
    assert f"--ContentsManager.pre_save_hook={lab.HOOK}" in command
