"""An ipywidgets explorer of one run: pick a step, an image, a background convention and tau, and
see image / ground truth / prediction / score map (``cisslib.report.figures.show_example``).

It reads the run folder through ``cisslib.api.load_step(run_dir, step)``, whose result has
``.class_names`` (seen classes, label order), ``.num_images`` and ``.segment(i, tau=None)``
returning ``dict(image (H, W, 3) uint8, gt (H, W) int, pred (H, W) int, scores (C, H, W) float)``.
Loaded steps are cached, so going back to a step costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import yaml
from IPython.display import display
from matplotlib.figure import Figure

from cisslib.api import load_step
from cisslib.constants import CONVENTIONS
from cisslib.report.figures import show_example
from cisslib.runs import RunDir

DEFAULT_TAU = 0.5


def available_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps with a checkpoint ``checkpoints/step{t}.pt`` in ``run_dir``, ascending."""
    steps = RunDir(run_dir).completed_steps()
    if not steps:
        raise FileNotFoundError(
            f"{RunDir(run_dir).checkpoints}: no step{{t}}.pt checkpoints; run the scenario "
            "(cisslib run) first"
        )
    return steps


def config_tau(run_dir: str | os.PathLike) -> float | None:
    """``eval.tau`` from the run's resolved ``config.yaml``, or None when absent."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    tau = (cfg.get("eval") or {}).get("tau") if isinstance(cfg, dict) else None
    return float(tau) if tau is not None else None


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
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"{self.run_dir}: run folder not found")
        self._loader = loader or load_step
        steps = list(steps) if steps is not None else available_steps(self.run_dir)
        if not steps:
            raise ValueError(f"{self.run_dir}: no steps to explore")
        self._cache: dict[int, Any] = {}
        self._updating = False
        self.figure: Figure | None = None
        self.example: dict | None = None
        tau = tau if tau is not None else config_tau(self.run_dir)
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
        ex = data.segment(int(self.image.value), tau=self.current_tau())
        missing = [k for k in ("image", "gt", "pred") if k not in ex]
        if missing:
            raise KeyError(
                f"load_step(...).segment returned no {missing}; expected image, gt, pred"
            )
        self.example = ex
        self.figure = show_example(
            ex["image"], ex["gt"], ex["pred"], ex.get("scores"), list(data.class_names),
            self.score_class.value,
        )  # fmt: skip
        tau = self.current_tau()
        self.figure.suptitle(
            f"{self.run_dir.name}  step {self.step.value}  image {self.image.value}  "
            f"{self.convention.value}" + ("" if tau is None else f" (tau={tau:.2f})")
        )
        with self.output:
            self.output.clear_output(wait=True)
            display(self.figure)
        return self.figure


def build_explorer(
    run_dir: str | os.PathLike,
    loader: Callable[[Path, int], Any] | None = None,
    steps: Sequence[int] | None = None,
    tau: float | None = None,
) -> Explorer:
    """The explorer widget for ``run_dir`` (loader: ``cisslib.api.load_step`` by default; steps:
    those with a checkpoint; tau: ``eval.tau`` from config.yaml, else 0.5)."""
    return Explorer(run_dir, loader=loader, steps=steps, tau=tau)
