"""Differential privacy: per-example gradients, clipping (vmap and ghost), DP-SGD, accounting.

Modules: :mod:`~curvopt.privacy.per_example` (``vmap(grad)`` per-example gradients),
:mod:`~curvopt.privacy.clipping` (the clipping policy, ``clipped_grad``, ``clip_per_example``),
:mod:`~curvopt.privacy.ghost` (ghost norms without per-example gradients),
:mod:`~curvopt.privacy.dp_sgd` (noise and the optimiser) and
:mod:`~curvopt.privacy.accounting` (privacy spent, by dp-accounting; Poisson sampling).

The accounting names are also reachable here (``curvopt.privacy.epsilon``), loaded on first use
because dp-accounting takes about a second to import.
"""

import importlib

_ACCOUNTING = (
  "PoissonBatch",
  "dp_sgd_event",
  "epsilon",
  "noise_multiplier_for_epsilon",
  "padded_batch_size",
  "poisson_sample",
)


def __getattr__(name: str):
  if name in _ACCOUNTING:
    return getattr(importlib.import_module("curvopt.privacy.accounting"), name)
  if name in ("accounting", "clipping", "dp_sgd", "ghost", "per_example"):
    return importlib.import_module(f"curvopt.privacy.{name}")
  raise AttributeError(f"module 'curvopt.privacy' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_ACCOUNTING])
