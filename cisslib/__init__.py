"""cisslib: CLIP-guided class-incremental semantic segmentation (CLIP-CISS) research workbook.

The public API: :func:`run` a scenario from a params file, :func:`load_config`, read runs back
with :func:`load_runs` (tables) and :func:`load_step` (a trained step), and build the segmenter
with :func:`build_segmenter`.
"""

__version__ = "0.1.0"

from cisslib.api import LoadedStep, load_step, run
from cisslib.config import Config, ConfigError, load_config
from cisslib.model import build_segmenter, load_clip
from cisslib.runs import RunDir, load_runs

__all__ = [
    "Config",
    "ConfigError",
    "LoadedStep",
    "RunDir",
    "build_segmenter",
    "load_clip",
    "load_config",
    "load_runs",
    "load_step",
    "run",
]
