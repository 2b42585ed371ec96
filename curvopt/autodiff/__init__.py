"""Layer 1, autodiff: derivatives by the right mode, custom differentiation rules, implicit
differentiation.

Modules: :mod:`~curvopt.autodiff.derivatives` (Jacobians, Hessians, batched and diagonal
Jacobians, Jacobian products, NTK), :mod:`~curvopt.autodiff.custom_rules` (straight-through,
gradient clipping, stable ``log1pexp``), :mod:`~curvopt.autodiff.implicit` (``fixed_point``),
:mod:`~curvopt.autodiff.capture` (reading a model's jaxpr: call primitives, layers).
"""
