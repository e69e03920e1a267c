"""Data: dataset sources (VOC, ADE20K, the toy world), their validation, class membership,
the per-step dataset and the transforms."""

from cisslib.data.sources import (
    ADE_CLASSES,
    VOC_CLASSES,
    ADE20KSegmentation,
    DatasetError,
    SegSource,
    VOCSegmentation,
    resolve_data_root,
)
from cisslib.data.step_dataset import StepDataset

__all__ = [
    "ADE20KSegmentation",
    "ADE_CLASSES",
    "DatasetError",
    "SegSource",
    "StepDataset",
    "VOCSegmentation",
    "VOC_CLASSES",
    "resolve_data_root",
]
