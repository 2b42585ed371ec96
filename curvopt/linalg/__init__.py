"""Layer 3, linear algebra: solvers for linear systems given only as matvecs on pytrees.

Modules: :mod:`~curvopt.linalg.status` (the :class:`SolverStatus` enumeration),
:mod:`~curvopt.linalg.cg` (preconditioned truncated conjugate gradient),
:mod:`~curvopt.linalg.nystrom` (randomized Nyström approximation and preconditioner),
:mod:`~curvopt.linalg.dense` (the dense damped solve, in parameter or sample space),
:mod:`~curvopt.linalg.flat` (pytrees packed into one vector per dtype),
:mod:`~curvopt.linalg.solvers` (the solver protocol and values: CG, Dense, Auto),
:mod:`~curvopt.linalg.conv_layout` (convolutions in XLA:CPU's canonical layout, fast inside loops).
"""
