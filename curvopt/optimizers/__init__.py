"""Layer 4, optimisers: optax transformations built on curvature products and solvers.

Modules: :mod:`~curvopt.optimizers.newton_cg` (Newton-CG / Hessian-free),
:mod:`~curvopt.optimizers.kfac` (K-FAC).
"""
