"""The experiment config: one tree of dataclasses, loaded from ``params/*.yaml`` plus overrides."""

from cisslib.config.loading import (
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    save_config,
    set_key,
    to_dict,
)
from cisslib.config.presets import PRESET_HELP, PRESETS
from cisslib.config.tree import (
    ClipConfig,
    Config,
    ConfigError,
    EvalConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    ScenarioConfig,
    StepSchedule,
    TextConfig,
    ToyWorldConfig,
    TrainConfig,
)
from cisslib.config.validation import CHOICES, validate

__all__ = [
    "CHOICES",
    "PRESETS",
    "PRESET_HELP",
    "ClipConfig",
    "Config",
    "ConfigError",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "ScenarioConfig",
    "StepSchedule",
    "TextConfig",
    "ToyWorldConfig",
    "TrainConfig",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_override",
    "save_config",
    "set_key",
    "to_dict",
    "validate",
]
