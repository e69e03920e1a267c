"""Reports: tables and figures from run folders, the papermill workbook, the explorer widget.

Notebooks use ``from cisslib import report`` and call ``report.load_runs`` (unique run labels,
tau per run), ``report.summary_table`` and the other table functions, ``report.styled`` (IoU in
percent) and the figure functions (``report.forgetting_curves`` ...).
"""

from cisslib.report.examples import class_palette, colorize, palette, show_example
from cisslib.report.figures import (
    forgetting_curves,
    loss_curves,
    per_class_heatmap,
    semantic_shift_plots,
    zero_shot_curves,
)
from cisslib.report.loading import load_runs
from cisslib.report.tables import (
    convention_note,
    forgetting_table,
    results_table,
    shift_table,
    styled,
    summary_note,
    summary_table,
    zero_shot_table,
)

__all__ = [
    "class_palette",
    "colorize",
    "convention_note",
    "forgetting_curves",
    "forgetting_table",
    "load_runs",
    "loss_curves",
    "palette",
    "per_class_heatmap",
    "results_table",
    "semantic_shift_plots",
    "shift_table",
    "show_example",
    "styled",
    "summary_note",
    "summary_table",
    "zero_shot_curves",
    "zero_shot_table",
]
