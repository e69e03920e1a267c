"""What is measured: confusion-matrix metrics under both background conventions and the
semantic-shift diagnostics of class prototypes."""

from cisslib.metrics.confusion import SegMetrics, iou_from_confusion, mean_iou
from cisslib.metrics.conventions import CONVENTIONS, labels_from_scores
from cisslib.metrics.shift import PrototypeAccumulator, shift_rows

__all__ = [
    "CONVENTIONS",
    "PrototypeAccumulator",
    "SegMetrics",
    "iou_from_confusion",
    "labels_from_scores",
    "mean_iou",
    "shift_rows",
]
