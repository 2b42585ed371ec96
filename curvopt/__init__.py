"""curvopt: second-order optimisation and curvature for JAX.

The package is layered; imports flow downward only (see ``ARCHITECTURE.md``):

1. :mod:`curvopt.autodiff`: derivatives, custom rules, implicit differentiation;
2. :mod:`curvopt.curvature`: curvature products and estimators;
3. :mod:`curvopt.linalg`: solvers for matvec operators (conjugate gradient);
4. :mod:`curvopt.optimizers`: Newton-CG;
5. :mod:`curvopt.privacy`: per-example gradients, clipping, ghost clipping, DP-SGD, accounting;
6. :mod:`curvopt.recipes`: TD targets, MAML;
7. :mod:`curvopt.launcher`: the launcher's reusable parts (imported on demand).

:mod:`curvopt.sharding` (data-parallel placement helpers) stands beside the layers. Every public
function is re-exported here as ``curvopt.<name>``; no module is shadowed by a function.
"""

from curvopt import autodiff, curvature, linalg, optimizers, privacy, recipes, sharding
from curvopt.autodiff.custom_rules import clip_gradient, log1pexp, straight_through
from curvopt.autodiff.derivatives import (
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
from curvopt.autodiff.implicit import (
  FixedPointSolution,
  NonConvergenceError,
  NonConvergenceWarning,
  fixed_point,
  fixed_point_solve,
)
from curvopt.autodiff.operators import divergence, hessian_diagonal, laplacian
from curvopt.curvature import estimators
from curvopt.curvature.estimators import (
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
from curvopt.curvature.kronecker import (
  KroneckerFactors,
  kronecker_factors,
  kronecker_inverse_fn,
  kronecker_matvec,
)
from curvopt.curvature.products import empirical_fisher_fn, ggn_fn, ggn_vp, hvp, hvp_fn
from curvopt.linalg.cg import CG_STATUSES, CGResult, conjugate_gradient
from curvopt.linalg.conv_layout import canonical_convolutions
from curvopt.linalg.dense import dense_matrix, dense_solve
from curvopt.linalg.nystrom import (
  NystromApproximation,
  nystrom_approximation,
  nystrom_cg,
  nystrom_preconditioner,
)
from curvopt.linalg.solvers import CG, Auto, Dense, NystromPreconditioner, SolverKind
from curvopt.linalg.status import SolverStatus
from curvopt.optimizers.curvature_parts import GGN, CurvatureFn, DiagonalFn, Fisher, Hessian
from curvopt.optimizers.damping import LevenbergMarquardt
from curvopt.optimizers.kfac import KFACInfo, KFACState, kfac
from curvopt.optimizers.newton_cg import (
  NewtonCGInfo,
  NewtonCGState,
  newton_cg,
  newton_cg_parts,
  scale_by_newton_cg,
)
from curvopt.optimizers.preconditioners import (
  DiagonalPreconditioner,
  KFACPreconditioner,
  MartensDiagonal,
)
from curvopt.optimizers.problem import value_fn_from_model
from curvopt.privacy import ghost
from curvopt.privacy.clipping import (
  ClippedSum,
  ClipPerExampleState,
  clip_per_example,
  clipped_grad,
  clipped_sum_fn,
)
from curvopt.privacy.dp_sgd import DPSGDState, dp_aggregate, dp_sgd
from curvopt.privacy.per_example import per_example_grads
from curvopt.recipes.batch_stats import recompute_batch_stats
from curvopt.recipes.meta import MamlAux, maml_loss
from curvopt.recipes.targets import lambda_returns, td0_loss, td_target

__version__ = "0.1.0"


def __getattr__(name: str):
  # The launcher's parts need the `experiments` extras: imported on first use only.
  if name == "launcher":
    import importlib

    return importlib.import_module("curvopt.launcher")
  raise AttributeError(f"module 'curvopt' has no attribute {name!r}")


__all__ = [
  "CG",
  "GGN",
  "Auto",
  "CGResult",
  "CG_STATUSES",
  "ClipPerExampleState",
  "ClippedSum",
  "CurvatureFn",
  "Dense",
  "DiagonalFn",
  "DiagonalPreconditioner",
  "Fisher",
  "Hessian",
  "LevenbergMarquardt",
  "MartensDiagonal",
  "DPSGDState",
  "EigenResult",
  "KFACInfo",
  "KFACPreconditioner",
  "KFACState",
  "KroneckerFactors",
  "FixedPointSolution",
  "LanczosResult",
  "MamlAux",
  "NewtonCGInfo",
  "NewtonCGState",
  "NonConvergenceError",
  "NonConvergenceWarning",
  "NystromApproximation",
  "NystromPreconditioner",
  "SolverKind",
  "SolverStatus",
  "SpectralDensity",
  "TraceEstimate",
  "autodiff",
  "batch_hessian",
  "batch_jacobian",
  "clip_gradient",
  "clip_per_example",
  "clipped_grad",
  "clipped_sum_fn",
  "canonical_convolutions",
  "conjugate_gradient",
  "curvature",
  "dense_matrix",
  "dense_solve",
  "divergence",
  "dp_aggregate",
  "dp_sgd",
  "empirical_fisher_fn",
  "empirical_ntk",
  "estimators",
  "fixed_point",
  "fixed_point_solve",
  "ggn_fn",
  "ggn_vp",
  "ghost",
  "hessian",
  "hessian_diagonal",
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
  "kfac",
  "kronecker_factors",
  "kronecker_inverse_fn",
  "kronecker_matvec",
  "lambda_returns",
  "lanczos",
  "laplacian",
  "linalg",
  "log1pexp",
  "maml_loss",
  "mjp",
  "newton_cg",
  "newton_cg_parts",
  "nystrom_approximation",
  "nystrom_cg",
  "nystrom_preconditioner",
  "optimizers",
  "per_example_grads",
  "privacy",
  "recipes",
  "recompute_batch_stats",
  "scale_by_newton_cg",
  "sharding",
  "spectral_density",
  "straight_through",
  "td0_loss",
  "td_target",
  "top_eigenvalues",
  "value_fn_from_model",
]
