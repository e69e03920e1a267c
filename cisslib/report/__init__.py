"""Reports: tables and figures from run folders, the papermill workbook, the explorer widget.

Notebooks use ``from cisslib import report`` and call ``report.load_runs``, the table functions
(``report.results_table`` ...) and the figure functions (``report.forgetting_curves`` ...).
"""

from cisslib.report.figures import (
    colorize,
    forgetting_curves,
    loss_curves,
    palette,
    per_class_heatmap,
    semantic_shift_plots,
    show_example,
    zero_shot_curves,
)
from cisslib.report.tables import (
    forgetting_table,
    results_table,
    shift_table,
    styled,
    zero_shot_table,
)
from cisslib.runs import load_runs

__all__ = [
    "colorize",
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
    "zero_shot_curves",
    "zero_shot_table",
]
