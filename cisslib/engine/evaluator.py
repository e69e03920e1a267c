"""Evaluation after a step (SPEC 5): metrics under both background conventions, the zero-shot
probe on future classes and the semantic-shift diagnostics. It returns rows; it writes nothing."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cisslib.data.step_dataset import StepDataset
from cisslib.engine.data_order import rank_indices, val_loader
from cisslib.engine.runtime import Runtime, unwrap
from cisslib.metrics import PrototypeAccumulator, SegMetrics, shift_rows
from cisslib.metrics.calibration import PresenceCalibration
from cisslib.metrics.pixel_flow import pixel_flow_rows
from cisslib.protocol import Scenario

log = logging.getLogger("cisslib")

IDENTITY_LUT = np.arange(256, dtype=np.uint8)


@dataclass(frozen=True)
class EvalSettings:
    """The ``eval`` keys the evaluator needs, as plain values."""

    window: int = 512
    stride: int = 341
    window_batch: int = 4
    tau: float = 0.5
    count_pred_only: bool = True  # eval.miou_denominator == "gt_or_pred"
    max_images: int = 0
    zero_shot_probe: bool = True
    shift_diagnostics: bool = True
    num_workers: int = 0
    calibration_bins: int = 10


@dataclass
class EvalResult:
    """Rows of one evaluation (dicts in the run-folder table schemas)."""

    summary: list[dict]
    per_class: list[dict]
    zero_shot: list[dict] = field(default_factory=list)
    shift: list[dict] = field(default_factory=list)
    pixel_flow: list[dict] = field(default_factory=list)
    calibration: list[dict] = field(default_factory=list)
    threshold: list[dict] = field(default_factory=list)  # the with_bg tau used (engine/threshold)

    #: the tables of the run folder this result holds rows for
    TABLES = (
        "summary", "per_class", "zero_shot", "shift", "pixel_flow", "calibration", "threshold",
    )  # fmt: skip


class Evaluator:
    """Evaluates models of one scenario on its val source.

    Args:
        scenario: the class-incremental scenario.
        text: ``(K, D)`` text embeddings of every class, label order.
        class_names: ``K`` names, label order.
        val_source: the val source (raw labels; each pass applies its own test lut).
        transform: the test-time transform.
        settings: window, stride, tau, denominator, probes.
        runtime: device, precision, processes (metrics are summed over processes).
        meta: columns added to every row (run, preset, dataset, ...).
    """

    def __init__(
        self,
        scenario: Scenario,
        text: torch.Tensor,
        class_names: list[str],
        val_source: Any,
        transform: Any,
        settings: EvalSettings,
        runtime: Runtime,
        meta: dict,
    ) -> None:
        self.scenario = scenario
        self.text = text
        self.class_names = class_names
        self.val_source = val_source
        self.transform = transform
        self.settings = settings
        self.runtime = runtime
        self.meta = meta
        self.step_of_label = scenario.step_of_label()
        self._loader: DataLoader | None = None

    # ---------------------------------------------------------------- data

    def loader(self) -> DataLoader:
        """The val loader (built once: its workers persist between passes)."""
        if self._loader is None:
            self._loader = self._new_loader()
        return self._loader

    def _new_loader(self) -> DataLoader:
        n = len(self.val_source)
        if self.settings.max_images:
            n = min(n, self.settings.max_images)
        d = self.runtime.dist
        # identity lut: raw labels; each use applies its own test lut on the tensor
        dataset = StepDataset(
            self.val_source, rank_indices(n, d.rank, d.world), IDENTITY_LUT, self.transform
        )
        pin = self.runtime.device.type == "cuda"
        return val_loader(dataset, self.settings.num_workers, pin_memory=pin)

    def _lut(self, step: int) -> torch.Tensor:
        return torch.as_tensor(self.scenario.test_lut(step).astype(np.int64))

    def _scores(
        self, model: nn.Module, image: torch.Tensor, text: torch.Tensor, on_window=None
    ) -> torch.Tensor:
        """``(1, C, H, W)`` float32 scores, left on the device: the confusion matrices are
        counted there (a CUDA score map of 150 classes is ~200 MB to copy per image).
        ``on_window`` sees every sliding window's presence probabilities (calibration)."""
        s = self.settings
        with self.runtime.autocast():
            scores = model.sliding_scores(
                image, text, window=s.window, stride=s.stride, on_window=on_window,
                window_batch=s.window_batch,
            )  # fmt: skip
        return scores.float()

    # ---------------------------------------------------------------- metrics

    @torch.no_grad()
    def metrics(self, model: nn.Module, step: int) -> EvalResult:
        """Summary and per-class rows of ``model`` after ``step`` (no probe, no diagnostics)."""
        return self._run(model, step, probe=False)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        step: int,
        reference_prototypes: Callable[[], torch.Tensor] | None = None,
        tau: float | None = None,
    ) -> EvalResult:
        """Metrics, the zero-shot probe (when enabled and classes remain) and the shift rows.

        ``reference_prototypes`` returns the class prototypes under the original CLIP (the
        runner computes them once per run); without it ``drift_cos`` is NaN. ``tau``: the
        with_bg threshold of this evaluation (default ``settings.tau``).
        """
        was_training = model.training
        model.eval()  # the whole evaluation in eval mode (also the prototypes)
        result = self._run(model, step, probe=self.settings.zero_shot_probe, full=True, tau=tau)
        if self.settings.shift_diagnostics:
            ref = reference_prototypes() if reference_prototypes is not None else None
            protos = self.prototypes(unwrap(model).encoder)
            rows = shift_rows(
                step,
                protos,
                self.text,
                ref,
                self.step_of_label,
                self.class_names,
                self.scenario.num_seen(step),
            )
            result.shift = [{**self.meta, **r} for r in rows]
        model.train(was_training)
        return result

    def _run(
        self, model: nn.Module, step: int, probe: bool, full: bool = False, tau: float | None = None
    ) -> EvalResult:
        """One pass over the val set: metrics, the probe when ``probe``, and with ``full`` the
        pixel flow and the presence calibration of the step."""
        sc, s = self.scenario, self.settings
        tau = s.tau if tau is None else tau
        was_training = model.training
        model.eval()
        c_t, k = sc.num_seen(step), sc.num_classes
        device = self.runtime.device
        text_t, text_all = self.text[:c_t].to(device), self.text.to(device)
        lut_t, lut_all = self._lut(step), self._lut(sc.n_steps - 1)
        seen = SegMetrics(c_t, tau=tau, count_pred_only=s.count_pred_only)
        every = SegMetrics(k, tau=tau, count_pred_only=s.count_pred_only)
        do_probe = probe and c_t < k
        is_old = self.step_of_label[1 : c_t + 1] < step
        calibration = PresenceCalibration(is_old, bins=s.calibration_bins) if full else None
        for image, raw in self.loader():
            image = image.to(device, non_blocking=True)
            labels = lut_t[raw].to(device)
            on_window = None
            if calibration is not None:
                on_window = _presence_recorder(calibration, labels, c_t)
            seen.update(self._scores(model, image, text_t, on_window), labels)
            if do_probe:
                every.update(self._scores(model, image, text_all), lut_all[raw].to(device))
        seen.all_reduce_()
        summary, per_class = seen.summary(step, self.step_of_label, self.class_names[:c_t])
        result = EvalResult(
            summary=[{**self.meta, **r} for r in summary],
            per_class=[{**self.meta, **r} for r in per_class],
        )
        if do_probe:
            every.all_reduce_()
            result.zero_shot = self._zero_shot_rows(every, step)
        if full:
            flow = pixel_flow_rows(
                seen.fg_only.numpy(), seen.with_bg.numpy(), step, self.step_of_label,
                self.class_names[:c_t],
            )  # fmt: skip
            result.pixel_flow = [{**self.meta, **r} for r in flow]
            calibration.all_reduce_()
            result.calibration = [{**self.meta, **r} for r in calibration.rows(step)]
        if was_training:
            model.train()
        return result

    @torch.no_grad()
    def tau_sweep(
        self, model: nn.Module, step: int, dataset: StepDataset, grid: Sequence[float]
    ) -> list[float]:
        """with_bg mIoU (all seen classes) of ``model`` after ``step`` for every ``tau`` of
        ``grid``, on ``dataset`` (this process's share of the images, labels already in the
        step's label space): the ``eval.tau_from: train`` calibration."""
        s = self.settings
        was_training = model.training
        model.eval()
        c_t, device = self.scenario.num_seen(step), self.runtime.device
        text_t = self.text[:c_t].to(device)
        per_tau = [SegMetrics(c_t, tau=t, count_pred_only=s.count_pred_only) for t in grid]
        loader = val_loader(dataset, s.num_workers, pin_memory=device.type == "cuda")
        for image, labels in loader:
            scores = self._scores(model, image.to(device, non_blocking=True), text_t)
            labels = labels.to(device)
            for m in per_tau:
                m.update(scores, labels)
        out = []
        for m in per_tau:
            m.all_reduce_()
            summary, _ = m.summary(step, self.step_of_label, self.class_names[:c_t])
            out.append(next(r["mIoU"] for r in summary if r["convention"] == "with_bg"))
        model.train(was_training)
        return out

    def _zero_shot_rows(self, every: SegMetrics, step: int) -> list[dict]:
        """IoU of the classes of future steps, predicted with every class's text."""
        c_t, k = self.scenario.num_seen(step), self.scenario.num_classes
        # every class counts as 'seen' for this pass; step_added comes from the scenario
        _, rows = every.summary(step, np.minimum(self.step_of_label, step), self.class_names)
        out = [
            {**self.meta, "step": step, "class_index": r["class_index"],
             "class_name": r["class_name"],
             "step_added": int(self.step_of_label[int(r["class_index"])]), "iou": r["iou"]}
            for r in rows
            if r["convention"] == "fg_only" and int(r["class_index"]) > c_t
        ]  # fmt: skip
        ious = [r["iou"] for r in out if not math.isnan(r["iou"])]
        mean = float(np.mean(ious)) if ious else float("nan")
        log.info(
            "eval step %d zero-shot probe: mIoU on %d future classes %.4f", step, k - c_t, mean
        )
        return out

    # ---------------------------------------------------------------- prototypes

    @torch.no_grad()
    def prototypes(self, encoder: nn.Module) -> torch.Tensor:
        """``(K, D)`` class prototypes of ``encoder``'s dense embedding over the val set."""
        lut = self._lut(self.scenario.n_steps - 1)
        acc = PrototypeAccumulator(self.scenario.num_classes, self.text.shape[1])
        for image, raw in self.loader():
            image, labels = _patch_crop(image, lut[raw], encoder.patch_size)
            with self.runtime.autocast():
                dense = encoder(image.to(self.runtime.device)).dense_embedding
            acc.update(dense.float().cpu(), labels)
        acc.all_reduce_()
        return acc.prototypes()


def _patch_crop(image: torch.Tensor, labels: torch.Tensor, patch: int):
    """Crop ``image`` and ``labels`` to a multiple of the patch size (the encoder needs one)."""
    h, w = image.shape[-2:]
    h2, w2 = max(patch, h - h % patch), max(patch, w - w % patch)
    return image[..., :h2, :w2], labels[..., :h2, :w2]


def _presence_recorder(calibration: PresenceCalibration, labels: torch.Tensor, num_seen: int):
    """A sliding-window callback adding each window's presence probabilities with the truth
    "the class has GT pixels in the window" (``labels``: ``(1, H, W)`` test labels)."""

    def record(y0: int, y1: int, x0: int, x1: int, presence: torch.Tensor) -> None:
        window = labels[:, y0:y1, x0:x1].reshape(labels.shape[0], -1)
        present = torch.zeros(presence.shape, dtype=torch.bool, device=window.device)
        for b in range(window.shape[0]):
            ids = torch.unique(window[b])
            ids = ids[(ids >= 1) & (ids <= num_seen)]
            present[b, ids - 1] = True
        calibration.update(presence, present)

    return record
