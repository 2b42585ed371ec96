"""The experiment launcher's reusable parts: config schema, optimiser registry, runner, plots.

``python experiments/run.py configs/NAME.yaml [dotted.key=value ...]`` is the command line;
task families live in ``experiments/`` and subclass :class:`Task`.
"""

import importlib as _importlib

for _module, _package in (
  ("omegaconf", "omegaconf"),
  ("yaml", "pyyaml"),
  ("orbax.checkpoint", "orbax-checkpoint"),
  ("matplotlib", "matplotlib"),
):
  try:
    _importlib.import_module(_module)
  except ModuleNotFoundError as _err:
    raise ModuleNotFoundError(
      f"curvopt.launcher needs {_package}, one of the launcher's extras; install them with "
      "pip install -e '.[experiments]' (from a checkout) or pip install 'curvopt[experiments]'.",
      name=_module,
    ) from _err

from curvopt.launcher.config import (  # noqa: E402
  BudgetConfig,
  Config,
  ConfigError,
  ExperimentConfig,
  MeshConfig,
  Precision,
  load_config,
)
from curvopt.launcher.optimizers import (  # noqa: E402
  OPTIMIZERS,
  Method,
  OptimizerEntry,
  build_method,
  optax_method,
  register_optimizer,
  schema_from_signature,
)
from curvopt.launcher.runner import (  # noqa: E402
  RunHooks,
  RunResult,
  TaskEntry,
  main,
  run_experiment,
  setup_run,
  summarise,
  train,
)
from curvopt.launcher.tasks import Task  # noqa: E402

__all__ = [
  "OPTIMIZERS",
  "OptimizerEntry",
  "RunHooks",
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
  "register_optimizer",
  "run_experiment",
  "schema_from_signature",
  "setup_run",
  "summarise",
  "train",
]
