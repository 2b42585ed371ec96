"""curvopt: second-order optimisation and curvature for JAX."""

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
from curvopt.products import empirical_fisher_fn, ggn_fn, ggn_vp, hvp, hvp_fn

__version__ = "0.1.0"

__all__ = [
  "batch_hessian",
  "batch_jacobian",
  "empirical_ntk",
  "hessian",
  "is_elementwise",
  "jacobian",
  "jacobian_diagonal",
  "jacobian_gram",
  "jmp",
  "mjp",
  "empirical_fisher_fn",
  "ggn_fn",
  "ggn_vp",
  "hvp",
  "hvp_fn",
]
