"""The committed notebooks: clean (no outputs), a parameters cell each (real type annotations,
defaults that are the demo's runs), thin (no def/class); and executed through papermill on
fabricated run folders, exported to HTML, combined into a report, run in a batch.

run_scenario.ipynb and explorer.ipynb need the engine (cisslib.api); they are skipped without it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from papermill.translators import PythonTranslator

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_runs import write_fake_run, write_two_runs  # noqa: E402

from cisslib import cli, paths  # noqa: E402
from cisslib.report import workbook  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Seconds per cell: a safety net so that a hung kernel fails a test instead of stalling CI. The
# explorer's stall (nbclient's Output-widget mimic) is avoided, not waited out: under papermill
# the explorer creates no widget (test_explorer_notebook_is_static_under_papermill).
CELL_TIMEOUT = 300
EXPECTED_PARAMETERS = {
    "run_scenario": ["params_file", "overrides", "out_dir", "steps", "resume"],
    "forgetting": ["run_dirs", "convention"],
    "semantic_shift": ["run_dirs"],
    "explorer": ["run_dir", "images"],
}
DEMO_RUNS = ["outputs/demo/full", "outputs/demo/finetune"]  # what `cisslib demo` writes
DEFAULTS = {
    "run_scenario": {"params_file": "demo", "overrides": [], "out_dir": "outputs/demo/full",
                     "steps": [], "resume": True},
    "forgetting": {"run_dirs": DEMO_RUNS, "convention": "fg_only"},
    "semantic_shift": {"run_dirs": DEMO_RUNS},
    "explorer": {"run_dir": "outputs/demo/full", "images": 3},
}  # fmt: skip


def _code_outputs(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _parameters_cell(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


# ---------------------------------------------------------------------------------- committed
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_committed_notebook_is_clean_and_thin(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name}: no code cells"
    for c in code:
        assert c.outputs == [], f"{name}: committed with outputs"
        assert c.execution_count is None, f"{name}: committed with an execution count"
        assert not re.search(r"^\s*(def|class|async def)\s", c.source, re.M), (
            f"{name}: defines code"
        )
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    params = PythonTranslator.inspect(tagged[0])
    assert [p.name for p in params] == EXPECTED_PARAMETERS[name]
    assert all(p.help for p in params), f"{name}: every parameter needs a comment"
    assert all(p.inferred_type_name != "None" or p.default == "None" for p in params)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_parameters_are_typed_and_default_to_the_demo(name):
    cell = _parameters_cell(name)
    space: dict = {}
    # as a kernel runs it (without this module's `from __future__ import annotations`)
    exec(compile(cell.source, name, "exec", dont_inherit=True), space)
    annotations = space["__annotations__"]
    # real types, so papermill --help-notebook prints `str`, `list`, not a quoted string
    assert all(isinstance(t, type) for t in annotations.values()), annotations
    shown = {p.name: p.inferred_type_name for p in PythonTranslator.inspect(cell)}
    assert shown == {k: t.__name__ for k, t in annotations.items()}
    assert {k: space[k] for k in annotations} == DEFAULTS[name]
    for key in ("run_dirs", "run_dir", "out_dir"):
        for d in paths.as_list(space.get(key, [])):
            assert paths.in_project(d) == paths.project_root() / d  # outputs/ of the project


# ---------------------------------------------------------------------------------- executed
# ---------------------------------------------------------------------------------- executed
@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three runs: a/toy_full and b/toy_full share a folder name (and preset, seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("report")
    runs = [*write_two_runs(root / "a"), write_fake_run(root / "b", "full", seed=1)]
    return workbook.build_report(runs, root / "reports" / "toy.html", title="Toy comparison")


def test_report_is_one_html_with_figures_and_tables(report):
    text = report.read_text()
    assert sorted(p.name for p in report.parent.glob("*.html")) == ["index.html", "toy.html"]
    assert "<title>Toy comparison</title>" in text
    # forgetting.ipynb: curves, curves with bands, 3 heatmaps, losses; semantic_shift.ipynb:
    # zero-shot, shift, and the fabricated runs' absent pixel flow (2 notes) and calibration (1)
    assert text.count("<img") == 11
    # the runs, labelled uniquely, with their tau
    assert "a/toy_full" in text and "b/toy_full" in text and "tau (with_bg)" in text
    # summary first: fg_only full old = 1.4 / 3 in both seeds, finetune all = 0.35
    summary = text.index("Summary: mIoU (%) after the last step")
    assert summary < text.index("Forgetting curves") < text.index("Per-class IoU")
    assert "46.7 ± 0.0" in text and "35.0" in text and "with_bg, tau = 0.4" in text
    # forgetting table: finetune square 0.8 - 0.1, in IoU points
    assert "70.0" in text
    # zero-shot table: full step 0 mean of (0.2, 0.1); shift table: finetune step 2 drift 0.6
    assert "15.0" in text and "0.600" in text
    assert "Traceback" not in text and "ValueError" not in text
    assert "load_runs" not in text  # no code in the report
    assert "<script" not in text  # self-contained: no require.js / MathJax from a CDN
    assert 'href="toy.html"' in (report.parent / "index.html").read_text()


def test_report_keeps_executed_notebooks(report):
    folder = report.parent / "toy_notebooks"
    for name in ("forgetting", "semantic_shift"):
        nb = nbformat.read(folder / f"{name}.ipynb", as_version=4)
        outputs = _code_outputs(nb)
        assert not [o for o in outputs if o.output_type == "error"]
        assert any("image/png" in o.get("data", {}) for o in outputs), name
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and "toy_finetune" in injected[0].source


def test_semantic_shift_without_probes_notes_absence(tmp_path):
    run = write_fake_run(tmp_path, "full", run="bare", zero_shot=False, shift=False)
    out = workbook.execute_notebook(
        "semantic_shift",
        tmp_path / "ss.ipynb",
        {"run_dirs": [str(run)]},
        cwd=tmp_path,
        execution_timeout=CELL_TIMEOUT,
    )
    html = workbook.export_html(out, tmp_path / "ss.html").read_text()
    # the notes are figures: zero-shot, shift, pixel flow (2), calibration
    assert html.count("<img") == 5
    assert "Traceback" not in html
    nb = nbformat.read(out, as_version=4)
    assert not [o for o in _code_outputs(nb) if o.output_type == "error"]


def test_failed_notebook_raises_one_line_and_keeps_copy(tmp_path):
    out = tmp_path / "failed.ipynb"
    with pytest.raises(
        RuntimeError, match=r"forgetting.ipynb failed in cell \d+: FileNotFoundError"
    ):
        workbook.execute_notebook(
            "forgetting",
            out,
            {"run_dirs": [str(tmp_path / "nowhere")]},
            cwd=tmp_path,
            execution_timeout=CELL_TIMEOUT,
        )
    nb = nbformat.read(out, as_version=4)
    errors = [o for o in _code_outputs(nb) if o.output_type == "error"]
    assert len(errors) == 1 and "no run folder" in errors[0].evalue
    assert "scripts/demo.sh" in errors[0].evalue  # names the command that creates the runs


def test_batch_writes_reports_under_run_folders_and_an_index(tmp_path, capsys):
    good = write_fake_run(tmp_path, "full")
    bad = write_fake_run(tmp_path, "finetune")
    shift = pd.read_csv(bad / "metrics" / "shift.csv").drop(columns=["drift_cos"])
    shift.to_csv(bad / "metrics" / "shift.csv", index=False)
    index = tmp_path / "index" / "batch.html"
    rc = cli.main(["batch", "semantic_shift", str(good), str(bad), "--index", str(index)])
    assert rc == 1  # one target failed; the other still ran
    html = (good / "reports" / "semantic_shift.html").read_text()
    # zero-shot, shift, and the notes of the absent pixel flow (2) and calibration
    assert html.count("<img") == 5 and "<script" not in html
    assert (good / "reports" / "semantic_shift.ipynb").is_file()
    assert not (bad / "reports" / "semantic_shift.html").exists()
    page = index.read_text()
    assert 'href="../toy_full/reports/semantic_shift.html"' in page
    assert 'href="../toy_finetune/reports/semantic_shift.ipynb"' in page  # the traceback copy
    assert "failed: semantic_shift.ipynb failed in cell" in page and "drift_cos" in page
    out = capsys.readouterr().out
    assert "[1/2] semantic_shift" in out and "(1 ok, 1 failed)" in out


# ---------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def scenario_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """run_scenario.ipynb as JupyterLab runs it: the kernel starts in notebooks/, the params file
    is given by name, the run folder relative; CISSLIB_HOME is a project of the test's own."""
    pytest.importorskip("cisslib.api")
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(paths.HOME_ENV, str(home))  # the kernel inherits it
        out = workbook.execute_notebook(
            "run_scenario",
            home / "run_scenario.ipynb",
            {"params_file": "smoke", "out_dir": "outputs/run", "steps": [1, 0], "resume": False},
            cwd=NOTEBOOKS,
            execution_timeout=CELL_TIMEOUT,
        )
    return out, home / "outputs" / "run"


def test_run_scenario_notebook(scenario_run, tmp_path):
    out, run_dir = scenario_run
    assert (run_dir / "metrics" / "summary.csv").is_file()  # the project's outputs/
    assert (run_dir / "checkpoints" / "step1.pt").is_file()
    assert not (NOTEBOOKS / "outputs").exists()  # never next to the notebooks
    html = workbook.export_html(out, tmp_path / "run.html").read_text()
    assert "<img" in html and "mIoU_old (%)" in html and "Traceback" not in html
    streams = "".join(o.get("text", "") for o in _code_outputs(nbformat.read(out, 4)))
    assert "eval step 1 fg_only" in streams  # one line per step and evaluation, no bar
    assert " it 8/8 " not in streams and "it/s]" not in streams


def test_run_scenario_rerun_resumes_or_refuses(scenario_run, tmp_path, monkeypatch):
    from cisslib.api import parse_steps, run

    _, run_dir = scenario_run
    monkeypatch.setenv(paths.HOME_ENV, str(run_dir.parent.parent))
    out = workbook.execute_notebook(  # the notebook's default: resume=True
        "run_scenario", tmp_path / "again.ipynb",
        {"params_file": "smoke", "out_dir": "outputs/run"}, cwd=NOTEBOOKS,
        execution_timeout=CELL_TIMEOUT,
    )  # fmt: skip
    streams = "".join(o.get("text", "") for o in _code_outputs(nbformat.read(out, 4)))
    assert "step 0: already complete" in streams and "step 1: already complete" in streams
    with pytest.raises(ValueError, match=r"already holds a run .*resume=True \(--resume\)"):
        run("smoke", out="outputs/run")
    assert parse_steps([2, 1]) == (1, 2)
    with pytest.raises(ValueError, match=r"steps \[0, 2\]: not consecutive"):
        parse_steps([0, 2])


def test_explorer_notebook_is_static_under_papermill(scenario_run, tmp_path):
    _, run_dir = scenario_run
    out = workbook.execute_notebook(
        "explorer",
        tmp_path / "explorer.ipynb",
        {"run_dir": str(run_dir), "images": 2},
        cwd=tmp_path,
        execution_timeout=CELL_TIMEOUT,
    )
    nb = nbformat.read(out, as_version=4)
    outputs = _code_outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    # no widget at all: nothing for nbclient's Output-widget mimic to sync (the stall's cause)
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.data]
    assert "widgets" not in nb.metadata
    (gallery,) = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert gallery.count("data:image/png;base64,") == 4  # 2 steps x 2 images
    html = workbook.export_html(out, tmp_path / "explorer.html").read_text()
    assert html.count("<img") == 4 and "step 1  image 1" in html


def test_cell_timeout_stops_a_hung_cell_and_leaves_no_copy(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell("seconds = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("import time\ntime.sleep(seconds)")]
    src = tmp_path / "sleepy.ipynb"
    nbformat.write(nb, src)
    out = tmp_path / "run" / "sleepy.ipynb"
    with pytest.raises(Exception, match="(?i)timed out|timeout"):
        workbook.execute_notebook(src, out, {"seconds": 60}, cwd=tmp_path, execution_timeout=2)
    assert not out.exists() and list(out.parent.iterdir()) == []
