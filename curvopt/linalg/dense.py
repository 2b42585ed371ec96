r"""Dense solves of a damped symmetric system, for models small enough to form the matrix.

One dense step serves every caller (:func:`dense_solve`, Newton-CG's parameter-space and
sample-space solvers): :func:`damped_dense_solve` factorises :math:`M = A + \lambda I` by
Cholesky and, only if that fails (an indefinite or numerically singular :math:`M`), falls back
to its eigendecomposition and takes the *saddle-free* step

.. math:: x = \sum_{i:\ |\mu_i| + \lambda > \tau} v_i \frac{v_i^\top b}{|\mu_i| + \lambda},
   \qquad \mu_i = w_i - \lambda \ \text{the eigenvalues of } A,

(Dauphin et al. 2014): the Newton step with every negative curvature flipped, a descent
direction whose quadratic model value is negative, and the minimum-norm solution on a singular
positive semi-definite :math:`A` (eigenvalues below :math:`\tau = n\,\epsilon \max_i|w_i|` are
dropped). The status names which case happened.

For a Gram matrix :math:`A = F^\top F` with :math:`F \in \mathbb R^{m\times n}` (a
Gauss-Newton matrix from per-example Jacobians, an empirical Fisher from per-example gradients)
the system can instead be solved in the :math:`m`-dimensional *sample space* with the kernel
:math:`K = F F^\top` (:func:`kernel_solve`), which is cheaper when :math:`m < n`.
"""

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvopt._checks import check_choice
from curvopt._typing import Matvec
from curvopt.linalg.cg import CGResult
from curvopt.linalg.conv_layout import with_conv_layout
from curvopt.linalg.status import SolverStatus

__all__ = ["DENSE_METHODS", "damped_dense_solve", "dense_matrix", "dense_solve", "kernel_solve"]

#: The factorisations :func:`dense_solve` offers.
DENSE_METHODS = ("cholesky", "eigh", "lstsq")

_HI = jax.lax.Precision.HIGHEST


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


def _saddle_free(m: jax.Array, b: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:math:`M^{-1} b` if :math:`M` is positive definite, else the saddle-free step; and
  :math:`\\lambda_{\\min}(M)`."""
  w, v = jnp.linalg.eigh(m)
  tau = w.size * jnp.finfo(w.dtype).eps * jnp.max(jnp.abs(w))
  denominator = jnp.where(w[0] > tau, w, jnp.abs(w - damping) + damping)
  keep = denominator > tau
  coefficients = jnp.where(keep, (v.T @ b) / jnp.where(keep, denominator, 1.0), 0.0)
  return v @ coefficients, w[0]


def _pinv(m: jax.Array, b: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
  del damping
  return jnp.linalg.lstsq(m, b)[0], jnp.linalg.eigvalsh(m)[0]


def _cholesky(m: jax.Array, b: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cholesky, or the saddle-free fallback when the factor is not finite."""
  factor = jnp.linalg.cholesky(m)

  def solved(factor: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jax.scipy.linalg.cho_solve((factor, True), b)
    xx = x @ x
    rayleigh = jnp.where(xx > 0, (x @ (m @ x)) / jnp.where(xx > 0, xx, 1.0), jnp.inf)
    return x, rayleigh.astype(m.dtype)

  ok = jnp.all(jnp.isfinite(factor))
  return jax.lax.cond(ok, solved, lambda _: _saddle_free(m, b, damping), factor)


def _status(finite: jax.Array, min_curvature: jax.Array, scale: jax.Array, n: int) -> jax.Array:
  tau = n * jnp.finfo(min_curvature.dtype).eps * scale
  return jnp.select(
    [~finite, min_curvature > tau, min_curvature < -tau],
    [SolverStatus.NONFINITE, SolverStatus.DIRECT, SolverStatus.INDEFINITE],
    SolverStatus.SINGULAR,
  ).astype(jnp.int32)


def damped_dense_solve(
  matrix: jax.Array,
  b: jax.Array,
  damping: float | jax.Array = 0.0,
  *,
  method: Literal["cholesky", "eigh", "lstsq"] = "cholesky",
  num_steps: int = 0,
) -> CGResult:
  r"""Solves :math:`(A + \lambda I)x = b` for a dense symmetric :math:`A` (the module's step).

  With :math:`M = \tfrac12(A + A^\top) + \lambda I`:

  * ``"cholesky"``: :math:`M = LL^\top` and two triangular solves; if :math:`M` is not
    positive definite (the factor is not finite) the saddle-free step of the module docstring;
  * ``"eigh"``: the same from the eigendecomposition: :math:`M^{-1}b` when :math:`M` is
    positive definite, the saddle-free step otherwise;
  * ``"lstsq"``: the minimum-norm least-squares solution :math:`M^{+} b`.

  Args:
    matrix: :math:`A`, shape ``(n, n)``.
    b: right-hand side, shape ``(n,)``.
    damping: :math:`\lambda` (may be traced).
    method: ``"cholesky"`` (default), ``"eigh"`` or ``"lstsq"``.
    num_steps: what to report as ``num_steps`` (the products spent forming ``matrix``).

  Returns:
    A :class:`~curvopt.linalg.cg.CGResult`. ``status`` is ``DIRECT`` when :math:`M` is
    positive definite, ``INDEFINITE`` when it has a negative eigenvalue (then
    ``negative_curvature`` is true), ``SINGULAR`` when it is singular to working precision,
    ``NONFINITE`` for a matrix with NaN or inf (then ``x = 0``). ``min_curvature`` is
    :math:`\lambda_{\min}(M)` when an eigendecomposition was computed and the Rayleigh
    quotient :math:`x^\top M x / x^\top x` (an upper bound on it) after a Cholesky solve.

  Examples:
    >>> a = jnp.array([[-2.0, 0.0], [0.0, 4.0]])   # indefinite: the step flips -2 to |-2|
    >>> result = damped_dense_solve(a, jnp.array([1.0, 2.0]))
    >>> result.x.tolist(), SolverStatus(int(result.status)).name
    ([0.5, 0.5], 'INDEFINITE')
  """
  check_choice("method", method, DENSE_METHODS)
  dtype, n = b.dtype, b.size
  damping = jnp.asarray(damping, dtype)
  m = 0.5 * (matrix + matrix.T).astype(dtype) + damping * jnp.eye(n, dtype=dtype)
  finite = jnp.all(jnp.isfinite(m))
  m = jnp.where(finite, m, jnp.eye(n, dtype=dtype))
  solve = {"cholesky": _cholesky, "eigh": _saddle_free, "lstsq": _pinv}[method]
  x, min_curvature = solve(m, b, damping)
  x = jnp.where(finite, x, 0.0)
  status = _status(finite, min_curvature, jnp.max(jnp.abs(jnp.diag(m))), n)
  return _result(x, m @ x, b, status, min_curvature, num_steps)


def _result(x, mx, b, status, min_curvature, num_steps) -> CGResult:
  """The :class:`CGResult` of a direct solve, given ``x`` and the damped product ``M x``."""
  b_norm = jnp.linalg.norm(b)
  residual = jnp.linalg.norm(b - mx) / jnp.where(b_norm > 0, b_norm, 1.0)
  finite = status != SolverStatus.NONFINITE
  steps = jnp.asarray(num_steps, jnp.int32)
  return CGResult(
    x=x,
    num_steps=steps,
    relative_residual=jnp.where(b_norm > 0, residual, 0.0).astype(b.dtype),
    quadratic_value=jnp.where(finite, 0.5 * x @ mx - b @ x, 0.0).astype(b.dtype),
    status=status,
    negative_curvature=status == SolverStatus.INDEFINITE,
    converged=status == SolverStatus.DIRECT,
    selected_step=steps,
    min_curvature=jnp.where(finite, min_curvature, jnp.nan).astype(b.dtype),
  )


def kernel_solve(
  rows: jax.Array,
  b: jax.Array,
  damping: float | jax.Array,
  residual: jax.Array | None = None,
) -> CGResult:
  r"""Solves :math:`(F^\top F + \lambda I)x = b` in sample space, with :math:`K = FF^\top`.

  For :math:`F \in \mathbb R^{m\times n}` with :math:`m < n` the Woodbury identity trades the
  :math:`n\times n` system for an :math:`m\times m` one (ENGD-Woodbury and SPRING for PINNs,
  Guzmán-Cordero et al. 2025; the "row" solvers of somax). When the right-hand side is a
  gradient :math:`b = F^\top r` of :math:`\tfrac12\|r\|^2` (pass ``residual`` :math:`= r`)
  the step is computed as

  .. math:: x = F^\top (K + \lambda I)^{-1} r \;+\; W(b - F^\top r),\qquad
     W(v) = \tfrac1\lambda\big(v - F^\top (K + \lambda I)^{-1} F v\big),

  whose first term carries no :math:`1/\lambda` cancellation; :math:`W` handles any part of
  ``b`` outside :math:`F^\top r` (e.g. a weight-decay term), exactly, by Woodbury. At
  :math:`\lambda = 0` the minimum-norm solution :math:`(F^\top F)^{+} b` is returned. The
  kernel is factorised by Cholesky, with the eigendecomposition (pseudo-inverse) as the
  fallback when :math:`K + \lambda I` is singular to working precision.

  Args:
    rows: :math:`F`, shape ``(m, n)``.
    b: right-hand side, shape ``(n,)``.
    damping: :math:`\lambda \ge 0` (may be traced).
    residual: optional :math:`r`, shape ``(m,)``, with :math:`b \approx F^\top r`.

  Returns:
    A :class:`~curvopt.linalg.cg.CGResult` (``status`` ``DIRECT``, ``SINGULAR`` after the
    fallback, or ``NONFINITE``); ``min_curvature`` is the Rayleigh quotient of
    :math:`F^\top F + \lambda I` along ``x``.

  Examples:
    >>> f = jnp.array([[1.0, 2.0, 0.0]])              # m = 1 < n = 3
    >>> result = kernel_solve(f, f[0] * 3.0, 1.0)      # (FᵀF + I)⁻¹ Fᵀ 3 = Fᵀ 3 / (5 + 1)
    >>> [round(v, 4) for v in result.x.tolist()]
    [0.5, 1.0, 0.0]
  """
  dtype, m = b.dtype, rows.shape[0]
  rows, damping = rows.astype(dtype), jnp.asarray(damping, dtype)
  damped = jnp.matmul(rows, rows.T, precision=_HI) + damping * jnp.eye(m, dtype=dtype)
  finite = jnp.all(jnp.isfinite(damped))
  damped = jnp.where(finite, damped, jnp.eye(m, dtype=dtype))
  solve_k, ok = _kernel_factor(damped)
  fx = lambda x: jnp.matmul(rows, x, precision=_HI)
  ftu = lambda u: jnp.matmul(rows.T, u, precision=_HI)

  def woodbury(v: jax.Array) -> jax.Array:
    t = solve_k(fx(v))
    return jnp.where(
      damping > 0, (v - ftu(t)) / jnp.where(damping > 0, damping, 1.0), ftu(solve_k(t))
    )

  if residual is None:
    x = woodbury(b)
  else:
    residual = residual.astype(dtype)
    x = ftu(solve_k(residual)) + woodbury(b - ftu(residual))
  x = jnp.where(finite, x, 0.0)
  mx = ftu(fx(x)) + damping * x
  xx = x @ x
  rayleigh = jnp.where(xx > 0, (x @ mx) / jnp.where(xx > 0, xx, 1.0), jnp.inf)
  status = jnp.select(
    [~finite, ok], [SolverStatus.NONFINITE, SolverStatus.DIRECT], SolverStatus.SINGULAR
  ).astype(jnp.int32)
  return _result(x, mx, b, status, rayleigh, 0)


def _kernel_factor(damped: jax.Array) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
  """``u -> (K + λI)⁻¹ u`` by Cholesky, or by the pseudo-inverse when the factor fails."""
  factor = jnp.linalg.cholesky(damped)
  ok = jnp.all(jnp.isfinite(factor))
  w, v = jax.lax.cond(
    ok,
    lambda: (jnp.ones(damped.shape[0], damped.dtype), jnp.zeros_like(damped)),
    lambda: tuple(jnp.linalg.eigh(damped)),
  )
  keep = w > w.size * jnp.finfo(w.dtype).eps * jnp.max(jnp.abs(w))
  inverse = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
  safe_factor = jnp.where(ok, factor, jnp.eye(damped.shape[0], dtype=damped.dtype))

  def solve(u: jax.Array) -> jax.Array:
    chol = jax.scipy.linalg.cho_solve((safe_factor, True), u)
    return jnp.where(ok, chol, v @ (inverse * (v.T @ u)))

  return solve, ok


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
  r"""Solves :math:`(A + \delta I)x = b` on pytrees by forming the matrix; a small-model step.

  Forms :math:`A` from ``n`` products (:func:`dense_matrix`) and calls
  :func:`damped_dense_solve` (Cholesky, with the saddle-free eigendecomposition as the
  fallback for an indefinite or singular matrix). ``x0``, ``preconditioner``, ``max_steps``
  and ``tol`` are accepted (the signature of :func:`~curvopt.linalg.cg.conjugate_gradient`)
  and unused: the solve is direct.

  With the generalised Gauss-Newton matrix of a least-squares loss
  :math:`\tfrac12\|r(\theta)\|^2`, :math:`A = J^\top J` and :math:`b = J^\top r`, so this is
  the Levenberg-Marquardt step (Levenberg 1944; Marquardt 1963), and for PINN residuals the
  energy natural gradient (Müller and Zeinhofer 2023).

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
    ``n`` (the products used); see :func:`damped_dense_solve` for the status.

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
    natural gradient descent", ICML 2023. Dauphin et al., "Identifying and attacking the
    saddle point problem in high-dimensional non-convex optimization", NeurIPS 2014.
  """
  del x0, preconditioner, max_steps, tol
  check_choice("method", method, DENSE_METHODS)
  flat_b, unravel = ravel_pytree(b)
  a = dense_matrix(matvec, b)
  result = damped_dense_solve(a, flat_b, damping, method=method, num_steps=flat_b.size)
  return result._replace(x=unravel(result.x))
