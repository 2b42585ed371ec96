"""curvopt: second-order optimisation and curvature for JAX.

Layers (imports flow downward only):

1. autodiff primitives: :mod:`~curvopt.derivatives`, :mod:`~curvopt.products`,
   :mod:`~curvopt.targets`, :mod:`~curvopt.custom_rules`, :mod:`~curvopt.implicit`,
   :mod:`~curvopt.meta`;
2. algorithms on any matvec: :mod:`~curvopt.estimators`, :mod:`~curvopt.solvers`;
3. optax transformations: :mod:`~curvopt.newton_cg`, :mod:`~curvopt.per_example`
   (with :mod:`~curvopt.ghost`), :mod:`~curvopt.privacy`, :mod:`~curvopt.sharding`;
4. the experiment launcher's parts: :mod:`curvopt.experiment` (imported on demand).
"""

import importlib

from curvopt import estimators, ghost, sharding
from curvopt.custom_rules import clip_gradient, log1pexp, straight_through
from curvopt.derivatives import (
  batch_hessian,
  batch_jacobian,
  empirical_ntk,
  hessian,
  is_elementwise,
  jacobian,
  jacobian_diagonal,
  jacobian_gram,
  jmp,
  mjp,
)
from curvopt.estimators import (
  EigenResult,
  LanczosResult,
  SpectralDensity,
  TraceEstimate,
  hutchinson_diagonal,
  hutchinson_trace,
  hutchpp_trace,
  lanczos,
  spectral_density,
  top_eigenvalues,
)
from curvopt.implicit import FixedPointSolution, fixed_point
from curvopt.meta import MamlAux, maml_loss
from curvopt.newton_cg import (
  CurvatureFn,
  NewtonCGState,
  newton_cg,
  scale_by_newton_cg,
  value_fn_from_model,
)
from curvopt.per_example import (
  ClippedSum,
  ClipPerExampleState,
  DPSGDState,
  clip_per_example,
  clipped_grad,
  clipped_sum_fn,
  dp_aggregate,
  dp_sgd,
  per_example_grads,
)
from curvopt.products import empirical_fisher_fn, ggn_fn, ggn_vp, hvp, hvp_fn
from curvopt.solvers import CG_STATUSES, CGResult, conjugate_gradient
from curvopt.targets import lambda_returns, td0_loss, td_target

__version__ = "0.1.0"


def __getattr__(name: str):
  # ``curvopt.privacy`` imports dp-accounting (about a second): load it on first use only.
  if name == "privacy":
    return importlib.import_module("curvopt.privacy")
  raise AttributeError(f"module 'curvopt' has no attribute {name!r}")


__all__ = [
  "CG_STATUSES",
  "CGResult",
  "ClipPerExampleState",
  "ClippedSum",
  "CurvatureFn",
  "DPSGDState",
  "EigenResult",
  "FixedPointSolution",
  "LanczosResult",
  "MamlAux",
  "NewtonCGState",
  "SpectralDensity",
  "TraceEstimate",
  "batch_hessian",
  "batch_jacobian",
  "clip_gradient",
  "clip_per_example",
  "clipped_grad",
  "clipped_sum_fn",
  "conjugate_gradient",
  "dp_aggregate",
  "dp_sgd",
  "empirical_fisher_fn",
  "empirical_ntk",
  "estimators",
  "fixed_point",
  "ghost",
  "ggn_fn",
  "ggn_vp",
  "hessian",
  "hutchinson_diagonal",
  "hutchinson_trace",
  "hutchpp_trace",
  "hvp",
  "hvp_fn",
  "is_elementwise",
  "jacobian",
  "jacobian_diagonal",
  "jacobian_gram",
  "jmp",
  "lambda_returns",
  "lanczos",
  "log1pexp",
  "maml_loss",
  "mjp",
  "newton_cg",
  "per_example_grads",
  "privacy",
  "scale_by_newton_cg",
  "sharding",
  "spectral_density",
  "straight_through",
  "td0_loss",
  "td_target",
  "top_eigenvalues",
  "value_fn_from_model",
]
