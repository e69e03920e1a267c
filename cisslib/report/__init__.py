"""Reports: tables and figures from run folders, the papermill workbook, the explorer widget.

Notebooks use ``from cisslib import report`` and call ``report.load_runs`` (unique run labels,
tau per run), ``report.summary_table`` and the other table functions, ``report.styled`` (IoU in
percent) and the figure functions (``report.forgetting_curves`` ...).
"""

from cisslib.report.diagnostics import (
    continual_table,
    cost_table,
    ece_curves,
    pixel_flow_chart,
    reliability_diagram,
)
from cisslib.report.examples import class_palette, colorize, palette, show_example
from cisslib.report.figures import (
    forgetting_curves,
    loss_curves,
    per_class_heatmap,
    semantic_shift_plots,
    zero_shot_curves,
)
from cisslib.report.grid import continual_summary, curves_with_bands
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
    "continual_summary",
    "continual_table",
    "cost_table",
    "curves_with_bands",
    "ece_curves",
    "pixel_flow_chart",
    "reliability_diagram",
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
