"""The experiment launcher's reusable parts: config schema, optimiser registry, runner, plots.

``python experiments/run.py configs/NAME.yaml [dotted.key=value ...]`` is the command line;
task families live in ``experiments/`` and subclass :class:`Task`.
"""

from curvopt.experiment.config import (
  BudgetConfig,
  Config,
  ConfigError,
  ExperimentConfig,
  MeshConfig,
  Precision,
  load_config,
)
from curvopt.experiment.optimizers import OPTIMIZERS, Method, build_method, optax_method
from curvopt.experiment.runner import RunResult, TaskEntry, main, run_experiment
from curvopt.experiment.tasks import Task

__all__ = [
  "OPTIMIZERS",
  "BudgetConfig",
  "Config",
  "ConfigError",
  "ExperimentConfig",
  "MeshConfig",
  "Method",
  "Precision",
  "RunResult",
  "Task",
  "TaskEntry",
  "build_method",
  "load_config",
  "main",
  "optax_method",
  "run_experiment",
]
