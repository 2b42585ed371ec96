"""Runs an optimiser comparison: ``python experiments/run.py configs/NAME.yaml [key=value ...]``.

``--resume RUN_DIR`` continues an interrupted run from its checkpoints. Each task family is a
module in this folder, imported only when a config names it. A config's ``mesh:`` section
(``num_devices``, ``data_axis``, ``distributed``) runs it data-parallel over several devices or
hosts, e.g. ``python experiments/run.py configs/mlp_digits.yaml mesh.num_devices=4`` (batches
of 256 split over 4 devices) or ``configs/quickstart_sharded.yaml`` (every device).
"""

import importlib
import os
import sys

# jaxlib's CPU LAPACK calls (the dense and Nyström solvers' solve/eigh) spin-wait on OpenBLAS
# threads on busy cores; one thread keeps them fast. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The task families are not installed (pip installs curvopt alone): they are imported from this
# checkout, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curvopt.launcher.runner import TaskEntry, main  # noqa: E402

# task name -> module of this checkout's `experiments` folder defining `Config` (schema) and
# `build(cfg, dtype)`.
TASK_MODULES = {
  "logreg": "logreg",
  "autoencoder": "autoencoder",
  "classification": "classification",
  "spectrum": "spectrum",
  "td": "td",
  "maml": "maml",
  "hyperopt": "hyperopt",
  "pinn": "pinn",
}


def _loader(module_name: str):
  def load() -> TaskEntry:
    module = importlib.import_module(f"experiments.{module_name}")
    return TaskEntry(schema=module.Config, build=module.build)

  return load


TASKS = {name: _loader(module) for name, module in TASK_MODULES.items()}

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:], tasks=TASKS, prog=sys.argv[0]))
