"""The workbook in a real browser (Debian's chromium driven by Playwright): JupyterLab "Run All" of
every notebook with its defaults, the explorer's controls, and the HTML report opened from disk.

A short demo-like run comes first: the demo's two run folders (``outputs/demo/full`` and
``outputs/demo/finetune``) written from ``params/smoke.yaml`` (progress ``auto``) into a project
of the test's own (``CISSLIB_HOME``), the full run stopped after step 0 so that "Run All" of
``run_scenario`` continues it with a progress bar. JupyterLab is started with ``cisslib lab`` on
127.0.0.1 at a free port. Screenshots go to ``outputs/browser/`` of the repository.

Skipped, with the reason, where chromium or Playwright is missing (``.ci/run`` installs chromium).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "outputs" / "browser"
CHROMIUM = os.environ.get("CISSLIB_CHROMIUM") or shutil.which("chromium") or ""
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
NOTEBOOKS = ("run_scenario", "forgetting", "semantic_shift", "explorer")
# the figures each notebook shows after Run All (the explorer: the widget's one figure)
FIGURES = {"run_scenario": 2, "forgetting": 4, "semantic_shift": 2, "explorer": 1}
RUN_ALL_SECONDS = 300

pytestmark = pytest.mark.browser

if not CHROMIUM or not Path(CHROMIUM).is_file():
    pytest.skip("no chromium (apt-get install chromium; .ci/run does)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright not installed (pip)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with the demo's run folders from a tiny run; the full run stops after step 0."""
    from cisslib.api import run

    home = tmp_path_factory.mktemp("home")
    (home / "params").mkdir()
    smoke = (REPO / "params" / "smoke.yaml").read_text()
    (home / "params" / "demo.yaml").write_text(smoke.replace("  progress: log\n", ""))
    demo = home / "outputs" / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CISSLIB_HOME", str(home))
        mp.setenv("CISSLIB_SESSION", "batch")
        run("demo", ["run.preset=finetune"], out=demo / "finetune")
        run("demo", ["run.preset=full"], out=demo / "full", steps="0")
    return home


@pytest.fixture(scope="module")
def committed() -> dict[str, bytes]:
    """The committed notebooks' bytes; restored afterwards whatever happens."""
    before = {n: (REPO / "notebooks" / f"{n}.ipynb").read_bytes() for n in NOTEBOOKS}
    yield before
    for name, data in before.items():
        path = REPO / "notebooks" / f"{name}.ipynb"
        if path.read_bytes() != data:
            path.write_bytes(data)


@pytest.fixture(scope="module")
def lab(home: Path, committed, tmp_path_factory: pytest.TempPathFactory):
    """``cisslib lab`` on 127.0.0.1; yields its base URL and token, stops it afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    jupyter = tmp_path_factory.mktemp("jupyter")
    settings = jupyter / "config" / "lab" / "user-settings" / "@jupyterlab"
    for folder, file, value in (
        # every cell in the DOM (no virtual scrolling), so the test sees all outputs
        ("notebook-extension", "tracker", '{"windowingMode": "none"}'),
        # no "get notified about Jupyter news?" toast over the screenshots (and no fetch)
        ("apputils-extension", "notification", '{"fetchNews": "false"}'),
    ):
        (settings / folder).mkdir(parents=True)
        (settings / folder / f"{file}.jupyterlab-settings").write_text(value)
    env = {
        **os.environ,
        "CISSLIB_HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
        "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
        "JUPYTER_DATA_DIR": str(jupyter / "data"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("CISSLIB_SESSION", None)
    args = [
        "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--ServerApp.token={token}",
        "--ServerApp.port_retries=0",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",  # no PyPI request
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    log = open(jupyter / "lab.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "cisslib.cli", "lab", "--", *args], env=env, cwd=home,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"cisslib lab did not start: {(jupyter / 'lab.log').read_text()}")
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """A headless chromium (fresh profile) through Playwright; yields a browser context."""
    with tempfile.TemporaryDirectory(prefix="cisslib-chromium-") as profile:
        with playwright.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": 1400, "height": 1000},
            )  # fmt: skip
            yield context
            context.close()


def _shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# ---------------------------------------------------------------------------------- JupyterLab
NB = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on screen
_PROMPTS = f"""() => [...document.querySelectorAll('{NB} .jp-CodeCell .jp-InputPrompt')]
    .map(e => e.textContent.trim())"""
_FIGURES = f"""() => [...document.querySelectorAll('{NB} .jp-OutputArea-output img')]
    .filter(i => i.complete && i.naturalWidth > 0).length"""
# the status bar once the notebook's kernel has started and is waiting
_IDLE = """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
    .some(e => /\\(ipykernel\\) \\| Idle$/.test(e.textContent.trim()))"""


def _menu(page, menu: str, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()


def _open(page, base: str, token: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/notebooks/{name}.ipynb?reset&token={token}")
    n_code = sum(c["cell_type"] == "code" for c in json.loads(
        (REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"])  # fmt: skip
    page.wait_for_function(
        f"() => document.querySelectorAll('{NB} .jp-CodeCell').length === {n_code}",
        timeout=90_000,
    )
    page.wait_for_function(_IDLE, timeout=90_000)


def _run_all(page) -> str:
    """Run > Run All Cells from the menu bar; wait until every code cell has run."""
    _menu(page, "Run", "Run All Cells")
    page.wait_for_function(
        f"() => {{ const p = ({_PROMPTS})(); "
        "return p.length > 0 && p.every(t => /^\\[\\d+\\]:$/.test(t)); }",
        timeout=RUN_ALL_SECONDS * 1000,
    )
    page.wait_for_function(_IDLE, timeout=60_000)
    return "\n".join(page.locator(f"{NB} .jp-OutputArea-output").all_inner_texts())


def _save(page, path: Path) -> None:
    """File > Save Notebook (what autosave does); the save hook strips the outputs on disk."""
    before = path.stat().st_mtime_ns
    _menu(page, "File", "Save Notebook")
    deadline = time.monotonic() + 30
    while path.stat().st_mtime_ns == before:
        assert time.monotonic() < deadline, f"{path.name} was not saved"
        page.wait_for_timeout(200)


def test_jupyterlab_run_all_with_defaults(lab, browser, home, committed):
    base, token = lab
    page = browser.new_page()
    page.set_viewport_size({"width": 1400, "height": 2400})  # a whole notebook on screen
    for name in NOTEBOOKS:
        _open(page, base, token, name)
        _shot(page, f"lab_{name}_opened")
        text = _run_all(page)
        assert "Traceback" not in text and "Error:" not in text, f"{name}: {text[-2000:]}"
        page.wait_for_function(f"() => ({_FIGURES})() >= {FIGURES[name]}", timeout=60_000)
        _shot(page, f"lab_{name}")
        if name == "run_scenario":
            # step 1 was left to do: a notebook progress bar, one line per step and evaluation
            bar = page.locator(f"{NB} .jp-OutputArea-output .widget-hprogress .progress-bar")
            assert bar.count() == 1 and "progress-bar-success" in bar.get_attribute("class")
            assert "step 1: 100%" in text.replace("\u2007", " ")
            assert "step 0: already complete" in text and "eval step 1 fg_only" in text
            assert str(home / "outputs" / "demo" / "full") in text
        if name == "explorer":
            _explore(page)
        _save(page, REPO / "notebooks" / f"{name}.ipynb")
    assert (home / "outputs" / "demo" / "full" / "checkpoints" / "step1.pt").is_file()
    assert not (REPO / "notebooks" / "outputs").exists()
    for name, data in committed.items():  # saved, and still clean
        assert (REPO / "notebooks" / f"{name}.ipynb").read_bytes() == data, f"{name} was dirtied"
    page.close()


_NEW_FIGURE = f"""(old) => {{ const i = [...document.querySelectorAll(
    '{NB} .jp-OutputArea-output img')].pop(); return i && i.src !== old && i.complete
    && i.naturalWidth > 0; }}"""


def _figure_src(page) -> str:
    return page.locator(f"{NB} .jp-OutputArea-output img").last.get_attribute("src")


def _explore(page) -> None:
    """Change the step, then the image: each time the explorer draws a new figure."""
    first = _figure_src(page)
    page.locator(f"{NB} .widget-dropdown select").first.select_option(label="0")
    page.wait_for_function(_NEW_FIGURE, arg=first, timeout=60_000)
    _shot(page, "lab_explorer_step0")
    second = _figure_src(page)
    image = page.locator(f"{NB} .widget-slider").filter(has_text=re.compile(r"^\s*image"))
    track = image.locator(".noUi-target")
    box = track.bounding_box()
    track.click(position={"x": box["width"] * 0.6, "y": box["height"] / 2})
    page.wait_for_function(_NEW_FIGURE, arg=second, timeout=60_000)
    _shot(page, "lab_explorer_step0_image")


# ---------------------------------------------------------------------------------- the report
def test_report_in_the_browser(lab, browser, home):
    """The demo's report, rebuilt after Run All completed the full run, opened from disk."""
    from cisslib.report.workbook import build_report

    demo = home / "outputs" / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CISSLIB_HOME", str(home))
        report = build_report([demo / "full", demo / "finetune"], demo / "report.html")
    page = browser.new_page()
    errors, failed, requests = [], [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate(
        "() => [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    _shot(page, "report")
    with contextlib.suppress(Exception):
        page.set_viewport_size({"width": 1400, "height": 1000})
        page.screenshot(path=str(SHOTS / "report_top.png"))
    assert errors == [] and failed == []
    external = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert external == [] and requests[0] == report.as_uri()
    assert len(images) >= 6 and all(c and w > 0 and h > 0 for c, w, h in images), images
    assert "Summary: mIoU (%) after the last step" in page.inner_text("body")
    page.close()
