"""Layer 3, linear algebra: solvers for linear systems given only as matvecs on pytrees.

Modules: :mod:`~curvopt.linalg.cg` (preconditioned truncated conjugate gradient).
"""
