"""Layer 4, optimisers: optax transformations built on curvature products and solvers.

Modules: :mod:`~curvopt.optimizers.problem` (the model/loss split and data routing),
:mod:`~curvopt.optimizers.curvature_parts` (the curvature part and objective-based preconditioners),
:mod:`~curvopt.optimizers.damping` (the damping part), :mod:`~curvopt.optimizers.newton_cg`
(Newton-CG / Hessian-free, composed of the three parts), :mod:`~curvopt.optimizers.kfac`
(K-FAC).
"""
