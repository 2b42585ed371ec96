"""Layer 2, curvature: matrix-free curvature products and the estimators that read them.

Modules: :mod:`~curvopt.curvature.products` (Hessian-, Gauss-Newton- and Fisher-vector
products), :mod:`~curvopt.curvature.estimators` (Hutchinson trace and diagonal, Lanczos, top
eigenvalues, spectral density).
"""
