"""The explorer of one run: image / ground truth / prediction / score map of val images, by step.

``build_explorer`` returns, where a person watches a notebook (:func:`cisslib.session.interactive`:
JupyterLab), the ipywidgets :class:`Explorer` (pick a step, an image, a background convention and
tau); elsewhere (papermill, ``nbconvert --execute``) a static :class:`Gallery` of the first few
images of every step, plain PNGs in HTML, so an executed notebook and its HTML export show the
figures. No widget is created in batch runs: nbclient mimics an ipywidgets Output widget by
sending ``comm_msg`` updates on the shell socket while it awaits the cell's ``execute_reply``, and
that reply was then read only at the next timeout (jupyter/nbclient#312): the explorer stalled.

It reads the run folder through ``cisslib.api.load_step(run_dir, step)``, whose result has
``.class_names`` (seen classes, label order), ``.num_images`` and ``.segment(i, tau=None)``
returning ``dict(image (H, W, 3) uint8, gt (H, W) int, pred (H, W) int, scores (C, H, W) float)``.
Loaded steps are cached, so going back to a step costs nothing.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from IPython.display import Image, display
from matplotlib.figure import Figure

from cisslib.api import load_step
from cisslib.constants import CONVENTIONS
from cisslib.paths import DEMO_HINT, in_project
from cisslib.report.examples import show_example
from cisslib.report.loading import run_tau
from cisslib.runs import RunDir
from cisslib.session import interactive

DEFAULT_TAU = 0.5
#: Images per step in the static gallery, and its resolution.
GALLERY_IMAGES = 3
GALLERY_DPI = 72


def available_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps with a checkpoint ``checkpoints/step{t}.pt`` in ``run_dir``, ascending."""
    steps = RunDir(run_dir).completed_steps()
    if not steps:
        raise FileNotFoundError(
            f"{RunDir(run_dir).checkpoints}: no step{{t}}.pt checkpoints; run the scenario "
            "(cisslib run) first"
        )
    return steps


def figure_png(fig: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (no pyplot, no backend needed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or "figure")
    return buf.getvalue()


def _run_folder(run_dir: str | os.PathLike) -> Path:
    folder = in_project(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found ({folder}); {DEMO_HINT}")
    return folder


def _example_figure(data: Any, run: str, step: int, i: int, tau: float | None,
                    score_class: int | None = None) -> tuple[dict, Figure, str]:  # fmt: skip
    """Segment image ``i`` of a loaded step and draw it; the title names run, step, convention."""
    ex = data.segment(int(i), tau=tau)
    missing = [k for k in ("image", "gt", "pred") if k not in ex]
    if missing:
        raise KeyError(f"load_step(...).segment returned no {missing}; expected image, gt, pred")
    fig = show_example(
        ex["image"], ex["gt"], ex["pred"], ex.get("scores"), list(data.class_names), score_class
    )
    conv = "fg_only" if tau is None else f"with_bg (tau={tau:.2f})"
    title = f"{run}  step {step}  image {i}  prediction: {conv}"
    fig.suptitle(title)
    return ex, fig, title


class Explorer(widgets.VBox):
    """The explorer widget: controls on top, the figure below.

    Attributes ``step``, ``image``, ``convention``, ``tau``, ``score_class`` are the controls;
    ``figure`` is the last figure drawn and ``example`` the last ``segment`` result.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        loader: Callable[[Path, int], Any] | None = None,
        steps: Sequence[int] | None = None,
        tau: float | None = None,
    ) -> None:
        self.run_dir = _run_folder(run_dir)
        self._loader = loader or load_step
        steps = list(steps) if steps is not None else available_steps(self.run_dir)
        if not steps:
            raise ValueError(f"{self.run_dir}: no steps to explore")
        self._cache: dict[int, Any] = {}
        self._updating = False
        self.figure: Figure | None = None
        self.example: dict | None = None
        tau = tau if tau is not None else run_tau(self.run_dir)
        tau = DEFAULT_TAU if tau is None else tau

        self.step = widgets.Dropdown(options=steps, value=steps[-1], description="step")
        self.image = widgets.IntSlider(value=0, min=0, max=0, description="image",
                                       continuous_update=False)  # fmt: skip
        self.convention = widgets.ToggleButtons(options=list(CONVENTIONS), value="fg_only",
                                                description="convention")  # fmt: skip
        self.tau = widgets.FloatSlider(value=tau, min=0.0, max=1.0, step=0.01, description="tau",
                                       disabled=True, continuous_update=False)  # fmt: skip
        self.score_class = widgets.Dropdown(options=[], description="score map")
        self.output = widgets.Output()
        super().__init__(
            [
                widgets.HBox([self.step, self.convention, self.tau]),
                widgets.HBox([self.image, self.score_class]),
                self.output,
            ]
        )
        self.step.observe(self._on_step, names="value")
        for w in (self.image, self.convention, self.tau, self.score_class):
            w.observe(self._on_change, names="value")
        self._sync_step()
        self.render()

    # ------------------------------------------------------------------ data
    def load(self, step: int) -> Any:
        """The loaded step (cached)."""
        if step not in self._cache:
            self._cache[step] = self._loader(self.run_dir, step)
        return self._cache[step]

    def current_tau(self) -> float | None:
        """None for ``fg_only`` (argmax over seen classes), the slider value for ``with_bg``."""
        return None if self.convention.value == "fg_only" else float(self.tau.value)

    # ------------------------------------------------------------------ events
    def _sync_step(self) -> None:
        """Fit the image slider and the class list to the selected step."""
        data = self.load(self.step.value)
        names = list(data.class_names)
        self._updating = True
        try:
            self.image.max = max(int(data.num_images) - 1, 0)
            self.image.value = min(self.image.value, self.image.max)
            old = self.score_class.value
            self.score_class.options = [(f"{k}: {n}", k) for k, n in enumerate(names, start=1)]
            self.score_class.value = old if old is not None and old <= len(names) else 1
        finally:
            self._updating = False

    def _on_step(self, change: dict) -> None:
        self._sync_step()
        self.render()

    def _on_change(self, change: dict) -> None:
        self.tau.disabled = self.convention.value == "fg_only"
        if not self._updating:
            self.render()

    # ------------------------------------------------------------------ drawing
    def render(self) -> Figure:
        """Segment the selected image and redraw; returns the figure."""
        data = self.load(self.step.value)
        self.example, self.figure, _ = _example_figure(
            data, self.run_dir.name, self.step.value, self.image.value, self.current_tau(),
            self.score_class.value,
        )  # fmt: skip
        with self.output:
            self.output.clear_output(wait=True)
            display(Image(data=figure_png(self.figure), format="png"))
        return self.figure


class Gallery:
    """The static explorer: image / ground truth / prediction (fg_only) / score map of the first
    ``images`` val images of every step, as PNGs; shown as HTML in a notebook or report.

    ``entries`` lists ``(step, image index, title, png bytes)``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        loader: Callable[[Path, int], Any] | None = None,
        steps: Sequence[int] | None = None,
        images: int = GALLERY_IMAGES,
    ) -> None:
        self.run_dir = _run_folder(run_dir)
        loader = loader or load_step
        steps = list(steps) if steps is not None else available_steps(self.run_dir)
        self.entries: list[tuple[int, int, str, bytes]] = []
        for step in steps:
            data = loader(self.run_dir, step)
            for i in range(min(int(images), int(data.num_images))):
                _, fig, title = _example_figure(data, self.run_dir.name, step, i, None)
                self.entries.append((step, i, title, figure_png(fig, GALLERY_DPI)))

    def _repr_html_(self) -> str:
        parts = [
            f"<p>Static explorer of <code>{html.escape(str(self.run_dir))}</code>: the first "
            "images of every step (prediction: argmax over the seen classes, fg_only). Open the "
            "notebook in JupyterLab to browse every image, the with_bg convention and tau.</p>"
        ]
        for _, _, title, png in self.entries:
            data = base64.b64encode(png).decode("ascii")
            parts.append(
                f'<img src="data:image/png;base64,{data}" alt="{html.escape(title, quote=True)}"'
                ' style="max-width:100%"/>'
            )
        return "\n".join(parts)


def build_explorer(
    run_dir: str | os.PathLike,
    loader: Callable[[Path, int], Any] | None = None,
    steps: Sequence[int] | None = None,
    tau: float | None = None,
    images: int = GALLERY_IMAGES,
    live: bool | None = None,
) -> Explorer | Gallery:
    """The explorer of ``run_dir`` (relative: under the project root): the :class:`Explorer`
    widget when ``live`` (default: a person watches a notebook, :func:`cisslib.session.
    interactive`), else the static :class:`Gallery` of ``images`` images per step.

    loader: ``cisslib.api.load_step`` by default; steps: those with a checkpoint; tau: the
    widget's starting tau, ``eval.tau`` from config.yaml, else 0.5.
    """
    live = interactive() if live is None else live
    if live:
        return Explorer(run_dir, loader=loader, steps=steps, tau=tau)
    return Gallery(run_dir, loader=loader, steps=steps, images=images)
