"""Layer 6, recipes: differentiation patterns from RL and meta-learning.

Modules: :mod:`~curvopt.recipes.targets` (stop-gradient TD targets, TD(0), λ-returns),
:mod:`~curvopt.recipes.meta` (MAML, first-order MAML, implicit MAML),
:mod:`~curvopt.recipes.batch_stats` (precise BatchNorm statistics for flax nnx models).
"""
