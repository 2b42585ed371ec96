"""curvopt: second-order optimisation and curvature for JAX."""

from curvopt.products import empirical_fisher_fn, ggn_fn, ggn_vp, hvp, hvp_fn

__version__ = "0.1.0"

__all__ = [
  "empirical_fisher_fn",
  "ggn_fn",
  "ggn_vp",
  "hvp",
  "hvp_fn",
]
