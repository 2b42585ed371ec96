r"""Dense solve of a damped symmetric system for small models.

Forms the matrix of the operator with one product per coordinate (``vmap`` over the
standard basis), adds the damping to the diagonal and factorises it. Exact where CG is
approximate, at :math:`O(n)` products, :math:`O(n^2)` memory and :math:`O(n^3)` time, so for
models with up to a few thousand parameters.
"""

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvopt._checks import check_choice
from curvopt.linalg.cg import CGResult
from curvopt.linalg.layout import with_conv_layout
from curvopt.linalg.status import SolverStatus

Matvec = Callable[[Any], Any]

__all__ = ["DENSE_METHODS", "dense_matrix", "dense_solve"]

#: The factorisations :func:`dense_solve` offers.
DENSE_METHODS = ("cholesky", "eigh", "lstsq")


def dense_matrix(matvec: Matvec, like: Any) -> jax.Array:
  r"""The ``(n, n)`` matrix of a linear operator on pytrees shaped like ``like``.

  Column :math:`j` is ``matvec`` of the j-th standard basis vector, in the coordinates of
  :func:`jax.flatten_util.ravel_pytree` (``n`` products, batched with ``vmap``).

  Examples:
    >>> m = dense_matrix(lambda v: {"a": 2.0 * v["a"], "b": v["a"] + v["b"]},
    ...                  {"a": jnp.zeros(()), "b": jnp.zeros(())})
    >>> m.tolist()
    [[2.0, 0.0], [1.0, 1.0]]
  """
  flat, unravel = ravel_pytree(like)
  matvec = with_conv_layout(matvec)  # fast convolutions if this runs inside a loop on CPU
  basis = jnp.eye(flat.size, dtype=flat.dtype)
  columns = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(basis)
  return columns.T


def dense_solve(
  matvec: Matvec,
  b: Any,
  x0: Any | None = None,
  *,
  damping: float | jax.Array = 0.0,
  preconditioner: Matvec | None = None,
  max_steps: int | None = None,
  tol: float | jax.Array | None = None,
  method: Literal["cholesky", "eigh", "lstsq"] = "cholesky",
) -> CGResult:
  r"""Solves :math:`(A + \delta I)x = b` by forming the matrix; a small-model Newton step.

  With :math:`M = \tfrac12(A + A^\top) + \delta I` (``matvec`` evaluated on the ``n``
  basis vectors):

  * ``"cholesky"``: :math:`M = LL^\top`, two triangular solves; if :math:`M` is not positive
    definite (the factor is not finite) it falls back to ``"eigh"``;
  * ``"eigh"``: :math:`M = V\Lambda V^\top`, and the solve is restricted to the positive
    eigenvalues, :math:`x = \sum_{\lambda_i > \tau} v_i v_i^\top b / \lambda_i`
    (:math:`\tau = n\,\epsilon\max|\lambda|`): the Newton step on the positive-curvature
    subspace, whose quadratic value
    :math:`-\tfrac12\sum_{\lambda_i>\tau} (v_i^\top b)^2/\lambda_i` is never positive;
  * ``"lstsq"``: the minimum-norm least-squares solution :math:`M^{+} b`.

  With the generalised Gauss-Newton matrix of a least-squares loss
  :math:`\tfrac12\|r(\theta)\|^2`, :math:`A = J^\top J` and :math:`b = J^\top r`, so this is
  the Levenberg-Marquardt step (Levenberg 1944; Marquardt 1963), and for PINN residuals the
  energy natural gradient (Müller and Zeinhofer 2023).

  Follows the solver protocol of :mod:`curvopt.linalg.solve`; ``x0``, ``preconditioner``,
  ``max_steps`` and ``tol`` are accepted for it and unused (the solve is direct).

  Args:
    matvec: symmetric ``v -> A v`` on pytrees shaped like ``b``, undamped.
    b: right-hand side pytree.
    x0: unused.
    damping: :math:`\delta` added to the diagonal (may be traced).
    preconditioner: unused.
    max_steps: unused.
    tol: unused.
    method: ``"cholesky"`` (default), ``"eigh"`` or ``"lstsq"``.

  Returns:
    A :class:`~curvopt.linalg.cg.CGResult` with ``x`` shaped like ``b``; ``num_steps`` is
    ``n`` (the products used); ``status`` is ``SolverStatus.DIRECT`` when :math:`M` is
    positive definite, ``INDEFINITE`` when it is not (then ``negative_curvature`` is true),
    ``NONFINITE`` for a matrix with NaN or inf (then ``x = 0``); ``min_curvature`` is
    :math:`\lambda_{\min}(M)` when an eigendecomposition was computed and the Rayleigh
    quotient :math:`x^\top M x / x^\top x` (an upper bound on it) after a Cholesky solve.

  Raises:
    ValueError: for an unknown ``method``.

  Examples:
    :math:`(A + I)^{-1} b = [[5, 1], [1, 4]]^{-1} [1, 2] = [2, 9] / 19`:

    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> result = dense_solve(lambda v: A @ v, jnp.array([1.0, 2.0]), damping=1.0)
    >>> [round(float(v), 4) for v in result.x], SolverStatus(int(result.status)).name
    ([0.1053, 0.4737], 'DIRECT')

  References:
    Marquardt, "An algorithm for least-squares estimation of nonlinear parameters", SIAM J.
    Appl. Math. 1963. Müller and Zeinhofer, "Achieving high accuracy with PINNs via energy
    natural gradient descent", ICML 2023.
  """
  del x0, preconditioner, max_steps, tol
  check_choice("method", method, DENSE_METHODS)
  flat_b, unravel = ravel_pytree(b)
  dtype = flat_b.dtype
  n = flat_b.size
  a = dense_matrix(matvec, b).astype(dtype)
  m = 0.5 * (a + a.T) + jnp.asarray(damping, dtype) * jnp.eye(n, dtype=dtype)
  finite = jnp.all(jnp.isfinite(m))
  m = jnp.where(finite, m, jnp.eye(n, dtype=dtype))
  eps = jnp.finfo(dtype).eps

  def eigh_solve(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    w, v = jnp.linalg.eigh(m)
    positive = w > n * eps * jnp.max(jnp.abs(w))
    coefficients = jnp.where(positive, (v.T @ flat_b) / jnp.where(positive, w, 1.0), 0.0)
    return v @ coefficients, w[0]

  def lstsq_solve(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jnp.linalg.lstsq(m, flat_b)[0]
    return x, jnp.linalg.eigvalsh(m)[0]

  def cholesky_solve(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    factor = jnp.linalg.cholesky(m)
    ok = jnp.all(jnp.isfinite(factor))

    def solved(factor: jax.Array) -> tuple[jax.Array, jax.Array]:
      x = jax.scipy.linalg.cho_solve((factor, True), flat_b)
      xx = x @ x
      rayleigh = jnp.where(xx > 0, (x @ (m @ x)) / jnp.where(xx > 0, xx, 1.0), jnp.inf)
      return x, rayleigh.astype(dtype)

    return jax.lax.cond(ok, solved, lambda _: eigh_solve(m), factor)

  solve = {"cholesky": cholesky_solve, "eigh": eigh_solve, "lstsq": lstsq_solve}[method]
  x, min_curvature = solve(m)
  # After a successful Cholesky the Rayleigh quotient is positive; otherwise min_curvature is
  # the smallest eigenvalue: either way its sign says whether M is positive definite.
  definite = min_curvature > 0
  x = jnp.where(finite, x, 0.0)
  residual = flat_b - m @ x
  b_norm = jnp.linalg.norm(flat_b)
  relative = jnp.where(b_norm > 0, jnp.linalg.norm(residual) / jnp.where(b_norm > 0, b_norm, 1), 0)
  quadratic = 0.5 * x @ (m @ x) - flat_b @ x
  status = jnp.where(
    ~finite,
    SolverStatus.NONFINITE,
    jnp.where(definite, SolverStatus.DIRECT, SolverStatus.INDEFINITE),
  ).astype(jnp.int32)
  steps = jnp.asarray(n, jnp.int32)
  return CGResult(
    x=unravel(x),
    num_steps=steps,
    relative_residual=relative.astype(dtype),
    quadratic_value=jnp.where(finite, quadratic, 0.0).astype(dtype),
    status=status,
    negative_curvature=status == SolverStatus.INDEFINITE,
    converged=status == SolverStatus.DIRECT,
    selected_step=steps,
    min_curvature=jnp.where(finite, min_curvature, jnp.nan).astype(dtype),
  )
