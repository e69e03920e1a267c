"""The incremental training engine: runtime, data order, optimizer, checkpoints, the step
trainer, the evaluator and the runner of a scenario's steps."""

from cisslib.engine.data_order import SeededItems, StreamSampler
from cisslib.engine.evaluator import EvalResult, EvalSettings, Evaluator
from cisslib.engine.optim import make_optimizer, param_groups, warmup_poly
from cisslib.engine.runner import Runner
from cisslib.engine.runtime import Runtime, autocast
from cisslib.engine.trainer import StepTrainer

__all__ = [
    "EvalResult",
    "EvalSettings",
    "Evaluator",
    "Runner",
    "Runtime",
    "SeededItems",
    "StepTrainer",
    "StreamSampler",
    "autocast",
    "make_optimizer",
    "param_groups",
    "warmup_poly",
]
