"""Layer 3, linear algebra: solvers for linear systems given only as matvecs on pytrees.

Modules: :mod:`~curvopt.linalg.status` (the :class:`SolverStatus` enumeration),
:mod:`~curvopt.linalg.cg` (preconditioned truncated conjugate gradient),
:mod:`~curvopt.linalg.nystrom` (randomized Nyström approximation and preconditioner),
:mod:`~curvopt.linalg.dense` (dense Cholesky / eigh / least-squares solve for small models),
:mod:`~curvopt.linalg.solve` (the one-shot solver protocol ``SolveFn``, registry ``SOLVE_FNS``),
:mod:`~curvopt.linalg.layout` (convolutions in XLA:CPU's canonical layout, fast inside loops).
"""
