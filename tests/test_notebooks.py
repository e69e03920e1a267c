"""The committed notebooks: clean (no outputs), a parameters cell each, thin (no def/class); and
executed through papermill on fabricated run folders, exported to HTML, combined into a report.

run_scenario.ipynb and explorer.ipynb need the engine (cisslib.api); they are skipped without it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
from papermill.translators import PythonTranslator

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_runs import write_fake_run, write_two_runs  # noqa: E402

from cisslib.report import workbook  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell: a hung kernel fails the test instead of stalling CI
EXPECTED_PARAMETERS = {
    "run_scenario": ["params_file", "overrides", "out_dir", "steps"],
    "forgetting": ["run_dirs", "convention"],
    "semantic_shift": ["run_dirs"],
    "explorer": ["run_dir"],
}


def _code_outputs(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


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


# ---------------------------------------------------------------------------------- executed
@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    runs = write_two_runs(root / "runs")
    return workbook.build_report(runs, root / "reports" / "toy.html", title="Toy comparison")


def test_report_is_one_html_with_figures_and_tables(report):
    text = report.read_text()
    assert sorted(p.name for p in report.parent.glob("*.html")) == ["index.html", "toy.html"]
    assert "<title>Toy comparison</title>" in text
    # forgetting.ipynb: curves, 2 heatmaps, losses; semantic_shift.ipynb: zero-shot, shift
    assert text.count("<img") == 6
    # results table (fg_only): full old = 1.4 / 3, finetune mIoU = 0.35
    assert "0.467" in text and "0.350" in text
    # forgetting table: finetune square 0.8 - 0.1
    assert "0.700" in text
    # zero-shot table: full step 0 mean of (0.2, 0.1); shift table: finetune step 2 drift 0.6
    assert "0.150" in text and "0.600" in text
    assert "Traceback" not in text and "ValueError" not in text
    assert "load_runs" not in text  # no code in the report
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
    assert html.count("<img") == 2  # the two notes are figures
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
    assert len(errors) == 1 and "no metrics/summary.csv" in errors[0].evalue


# ---------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def scenario_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("cisslib.api")
    root = tmp_path_factory.mktemp("scenario")
    out = workbook.execute_notebook(
        "run_scenario",
        root / "run_scenario.ipynb",
        {"params_file": "params/smoke.yaml", "out_dir": str(root / "run"), "steps": [0, 1]},
        cwd=NOTEBOOKS.parent,
        execution_timeout=CELL_TIMEOUT,
    )
    return out, root / "run"


def test_run_scenario_notebook(scenario_run, tmp_path):
    out, run_dir = scenario_run
    assert (run_dir / "metrics" / "summary.csv").is_file()
    assert (run_dir / "checkpoints" / "step1.pt").is_file()
    html = workbook.export_html(out, tmp_path / "run.html").read_text()
    assert "<img" in html and "mIoU_old" in html and "Traceback" not in html


def test_explorer_notebook(scenario_run, tmp_path):
    _, run_dir = scenario_run
    out = workbook.execute_notebook(
        "explorer",
        tmp_path / "explorer.ipynb",
        {"run_dir": str(run_dir)},
        cwd=tmp_path,
        execution_timeout=CELL_TIMEOUT,
    )
    outputs = _code_outputs(nbformat.read(out, as_version=4))
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


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
