"""Layer 2, curvature: matrix-free curvature products and the estimators that read them.

Modules: :mod:`~curvopt.curvature.products` (Hessian-, Gauss-Newton- and Fisher-vector
products), :mod:`~curvopt.curvature.estimators` (Hutchinson trace and diagonal, Lanczos, top
eigenvalues, spectral density), :mod:`~curvopt.curvature.kronecker` (K-FAC's Kronecker factors of
the layers found in a model's jaxpr, and their damped inverses).
"""
