r"""Linear-solver registry of Newton-CG for the damped system :math:`(C + \lambda I)\, d = g`.

A solver is a :class:`LinearSolver`, three pure functions:

* ``init(params) -> state``: what the solver keeps between updates (a Nyström sketch);
* ``prepare(matvec, params, state, count) -> (state, work)``: once per update, before any
  trial solve, with the *undamped* curvature ``matvec`` (refresh the sketch every ``k``
  updates, form a dense matrix and its eigendecomposition); ``work`` lives for one update;
* ``solve(matvec, b, damping, x0, work, *, preconditioner, tol, backtrack_fn) ->``
  :class:`SolveResult`: one damped solve, called once per trial (a rejected trial re-solves
  with a larger damping, warm-started from the rejected direction ``x0``).

The registry :data:`SOLVERS` maps names to builders ``builder(options: SolverOptions) ->
LinearSolver``; adding a solver is one builder and one entry. A user may instead pass a
:class:`LinearSolver`, or a plain function ``solve(matvec, b, damping) -> x`` (wrapped by
:func:`from_function`).

Built-in solvers:

* ``"cg"``: truncated (preconditioned) CG, :func:`curvopt.linalg.cg.conjugate_gradient`;
* ``"nystrom"``: CG preconditioned by a randomized Nyström approximation of :math:`C` of
  rank :math:`r` (Frangella, Tropp and Udell 2023), sketched from :math:`r` curvature
  products every ``refresh_every`` updates and kept in the optimiser state;
* ``"dense"``: the exact damped solve from the dense curvature (formed by :math:`n`
  products and eigendecomposed once per update): for a least-squares loss with the GGN this
  is the Levenberg-Marquardt / energy natural gradient step (Müller and Zeinhofer 2023).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvopt._typing import Matvec, Params
from curvopt.linalg import cg

_RESIDUAL = cg.CG_STATUSES.index("residual")
_NEGATIVE = cg.CG_STATUSES.index("negative_curvature")
_NONFINITE = cg.CG_STATUSES.index("nonfinite")


class SolveResult(NamedTuple):
  r"""One damped solve.

  Attributes:
    x: the direction :math:`d \approx (C + \lambda I)^{-1} b`.
    quadratic_value: :math:`\phi(d) = \tfrac12 d^\top (C + \lambda I) d - b^\top d`.
    num_steps: curvature products spent inside the solve (CG iterations).
    status: why it stopped, an index into :data:`curvopt.linalg.cg.CG_STATUSES`.
    negative_curvature: whether :math:`C + \lambda I` showed non-positive curvature.
    min_curvature: the smallest damped Rayleigh quotient seen (``inf`` if unknown).
  """

  x: Any
  quadratic_value: jax.Array
  num_steps: jax.Array
  status: jax.Array
  negative_curvature: jax.Array
  min_curvature: jax.Array


class SolverOptions(NamedTuple):
  """Static options the built-in solvers are built from.

  Attributes:
    max_steps: CG iterations per solve at most.
    progress_tol: Martens' CG progress tolerance, or ``None``.
    rank: Nyström sketch size :math:`r`.
    refresh_every: Nyström sketch refreshed every this many updates.
    seed: seed of the Nyström test matrices.
  """

  max_steps: int = 100
  progress_tol: float | None = 5e-4
  rank: int = 20
  refresh_every: int = 10
  seed: int = 0


class LinearSolver(NamedTuple):
  """A damped linear solver: ``init``, ``prepare``, ``solve`` (see the module docstring)."""

  init: Callable[[Params], Any]
  prepare: Callable[[Matvec, Params, Any, jax.Array], tuple[Any, Any]]
  solve: Callable[..., SolveResult]


def _damped(matvec: Matvec, damping: jax.Array) -> Matvec:
  return lambda v: optax.tree.add_scale(matvec(v), damping, v)


def quadratic_value(matvec: Matvec, b: Any, damping: jax.Array, x: Any) -> jax.Array:
  r""":math:`\phi(x) = \tfrac12 x^\top (C + \lambda I) x - b^\top x`, by one product."""
  ax = _damped(matvec, damping)(x)
  return jnp.real(0.5 * optax.tree.vdot(x, ax) - optax.tree.vdot(b, x))


def _no_prepare(matvec, params, state, count):
  del matvec, params, count
  return state, None


# ------------------------------------------------------------------------------------- cg


def _cg_solve(max_steps, progress_tol, matvec, b, damping, x0, preconditioner, tol, backtrack_fn):
  result = cg.conjugate_gradient(
    _damped(matvec, damping),
    b,
    x0,
    preconditioner=preconditioner,
    max_steps=max_steps,
    tol=tol,
    progress_tol=progress_tol,
    backtrack_fn=backtrack_fn,
  )
  return SolveResult(
    x=result.x,
    quadratic_value=result.quadratic_value,
    num_steps=result.num_steps,
    status=result.status,
    negative_curvature=result.negative_curvature,
    min_curvature=result.min_curvature,
  )


def cg_solver(options: SolverOptions) -> LinearSolver:
  """Truncated preconditioned CG (Steihaug exit, Martens' progress rule)."""

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=1e-4, backtrack_fn=None):
    del work
    return _cg_solve(
      options.max_steps,
      options.progress_tol,
      matvec,
      b,
      damping,
      x0,
      preconditioner,
      tol,
      backtrack_fn,
    )

  return LinearSolver(init=lambda params: (), prepare=_no_prepare, solve=solve)


# ------------------------------------------------------------------------------- nystrom


class NystromState(NamedTuple):
  r"""A rank-:math:`r` Nyström approximation :math:`\hat C = U \hat\Lambda U^\top`.

  Attributes:
    basis: :math:`U`, a pytree shaped like the parameters with a leading axis :math:`r`
      (orthonormal rows).
    eigenvalues: :math:`\hat\Lambda`, shape ``(r,)``, descending, non-negative.
    key: PRNG key of the next sketch.
  """

  basis: Any
  eigenvalues: jax.Array
  key: jax.Array


def _rows_dot(u: Any, v: Any) -> jax.Array:
  """:math:`U V^\\top` for two pytrees with leading axes (rows)."""
  leaves = [
    jnp.tensordot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1).conj(), ((1,), (1,)))
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True)
  ]
  return jnp.real(sum(leaves))


def _rows_combine(coeffs: jax.Array, rows: Any) -> Any:
  """:math:`A\\, U` (``coeffs`` :math:`(m, r)`, rows :math:`(r, \\dots)`)."""
  return jax.tree.map(lambda a: jnp.tensordot(coeffs.astype(a.dtype), a, ((1,), (0,))), rows)


def nystrom_sketch(matvec: Matvec, params: Params, rank: int, key: jax.Array) -> NystromState:
  r"""Randomized Nyström approximation of a PSD operator from ``rank`` products.

  The numerically stable algorithm of Tropp, Yurtsever, Udell and Cevher (2017, Alg. 3) as
  used by Frangella, Tropp and Udell (2023, Alg. 2.1), on pytrees: orthonormal Gaussian test
  rows :math:`\Omega` (Cholesky QR), :math:`Y = C\Omega`, a shift
  :math:`\nu = \sqrt{n}\,\epsilon\,\|Y\|_F`, :math:`B = \Omega^\top (Y + \nu\Omega)`,
  :math:`F = (Y + \nu \Omega) L^{-\top}` with :math:`B = L L^\top`, and the thin SVD
  :math:`F = U \Sigma V^\top` (from the :math:`r \times r` Gram matrix), giving
  :math:`\hat\Lambda = \max(\Sigma^2 - \nu, 0)`.

  Args:
    matvec: ``v -> Cv`` for a symmetric positive semi-definite :math:`C`.
    params: a point shaped like the operator's vectors (for shapes and dtypes).
    rank: :math:`r \le n`.
    key: PRNG key.

  Returns:
    A :class:`NystromState` (with ``key`` unchanged).

  References:
    Frangella, Tropp and Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal.
    Appl. 2023. Tropp, Yurtsever, Udell and Cevher, "Fixed-rank approximation of a positive
    semidefinite matrix from streaming data", NeurIPS 2017.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  omega = jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, (rank, *jnp.shape(a)), jnp.result_type(a))
      for k, a in zip(keys, leaves, strict=True)
    ],
  )
  dtype = jnp.result_type(*leaves)
  eps = jnp.finfo(dtype).eps
  n = sum(jnp.size(a) for a in leaves)
  gram = _rows_dot(omega, omega)
  chol = jnp.linalg.cholesky(gram + eps * jnp.trace(gram) * jnp.eye(rank, dtype=gram.dtype))
  q = _rows_combine(jnp.linalg.inv(chol), omega)  # orthonormal rows: L⁻¹ Ω
  y = jax.vmap(matvec)(q)
  nu = jnp.sqrt(n) * eps * jnp.sqrt(_rows_dot(y, y).trace())
  y_nu = jax.tree.map(lambda a, b: a + nu * b, y, q)
  b = _rows_dot(q, y_nu)
  b = 0.5 * (b + b.T)
  lower = jnp.linalg.cholesky(b + eps * jnp.trace(b) * jnp.eye(rank, dtype=b.dtype))
  f = _rows_combine(jnp.linalg.inv(lower), y_nu)  # rows of F^T
  sigma2, v = jnp.linalg.eigh(_rows_dot(f, f))
  sigma2, v = sigma2[::-1], v[:, ::-1]
  sigma = jnp.sqrt(jnp.maximum(sigma2, 0.0))
  safe = sigma > eps * jnp.max(sigma)
  inv_sigma = jnp.where(safe, 1.0 / jnp.where(safe, sigma, 1.0), 0.0)
  basis = _rows_combine(inv_sigma[:, None] * v.T, f)
  eigenvalues = jnp.where(safe, jnp.maximum(sigma2 - nu, 0.0), 0.0)
  return NystromState(basis=basis, eigenvalues=eigenvalues.astype(dtype), key=key)


def nystrom_preconditioner(sketch: NystromState, damping: jax.Array) -> Matvec:
  r"""``r -> P⁻¹ r`` for the damped system, from a Nyström sketch (FTU 2023, eq. 5.3).

  .. math::
    P^{-1} = (\hat\lambda_r + \lambda)\, U (\hat\Lambda + \lambda I)^{-1} U^\top
      + (I - U U^\top).

  On a rank-:math:`r` :math:`C` captured exactly, :math:`P^{-1}(C + \lambda I)` has two
  distinct eigenvalues, so CG converges in two iterations.
  """
  lam = jnp.asarray(damping, sketch.eigenvalues.dtype)
  scale = (sketch.eigenvalues[-1] + lam) / (sketch.eigenvalues + lam) - 1.0

  def apply(r: Any) -> Any:
    coeffs = _rows_dot(sketch.basis, jax.tree.map(lambda a: a[None], r))[:, 0]  # U^T r
    correction = jax.tree.map(
      lambda u: jnp.tensordot((scale * coeffs).astype(u.dtype), u, ((0,), (0,))), sketch.basis
    )
    return optax.tree.add(r, correction)

  return apply


def nystrom_solver(options: SolverOptions) -> LinearSolver:
  """CG preconditioned by a rank-``options.rank`` Nyström sketch refreshed periodically."""
  rank, every = options.rank, options.refresh_every

  def init(params):
    n = sum(jnp.size(a) for a in jax.tree.leaves(params))
    r = min(rank, n)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return NystromState(
      basis=jax.tree.map(lambda a: jnp.zeros((r, *jnp.shape(a)), jnp.result_type(a)), params),
      eigenvalues=jnp.zeros((r,), dtype),
      key=jax.random.PRNGKey(options.seed),
    )

  def prepare(matvec, params, state, count):
    def refresh(state):
      key, sub = jax.random.split(state.key)
      sketch = nystrom_sketch(matvec, params, state.eigenvalues.shape[0], sub)
      return sketch._replace(key=key)

    state = jax.lax.cond(count % every == 0, refresh, lambda s: s, state)
    return state, state

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=1e-4, backtrack_fn=None):
    del preconditioner  # The Nyström preconditioner replaces any diagonal one.
    return _cg_solve(
      options.max_steps,
      options.progress_tol,
      matvec,
      b,
      damping,
      x0,
      nystrom_preconditioner(work, damping),
      tol,
      backtrack_fn,
    )

  return LinearSolver(init=init, prepare=prepare, solve=solve)


# --------------------------------------------------------------------------------- dense


class DenseWork(NamedTuple):
  """Eigendecomposition :math:`C = V \\Lambda V^\\top` of the dense curvature of one update."""

  eigenvalues: jax.Array
  eigenvectors: jax.Array


def dense_solver(options: SolverOptions) -> LinearSolver:
  r"""Exact solve from the dense curvature, formed by :math:`n` products per update.

  The curvature is eigendecomposed once per update, so every trial damping costs two
  :math:`n \times n` matrix-vector products. If :math:`C + \lambda I` is not positive definite
  (an indefinite Hessian), the step uses :math:`|\Lambda| + \lambda` (the saddle-free Newton
  step of Dauphin et al. 2014) and reports negative curvature, so the damping rule raises
  :math:`\lambda` past :math:`-\lambda_{\min}(C)`.
  """
  del options

  def prepare(matvec, params, state, count):
    del count
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    columns = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(basis)
    eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (columns + columns.T))
    return state, DenseWork(eigenvalues, eigenvectors)

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=0.0, backtrack_fn=None):
    del matvec, x0, preconditioner, tol, backtrack_fn
    flat_b, unravel = ravel_pytree(b)
    lam, v = work.eigenvalues, work.eigenvectors
    damped = lam + damping
    min_curvature = damped[0]
    negative = ~(min_curvature > 0)
    coeffs = v.T @ flat_b
    x = v @ (coeffs / jnp.where(negative, jnp.abs(lam) + damping, damped))
    phi = 0.5 * jnp.sum(damped * (v.T @ x) ** 2) - flat_b @ x
    status = jnp.where(
      jnp.isfinite(phi), jnp.where(negative, _NEGATIVE, _RESIDUAL), _NONFINITE
    ).astype(jnp.int32)
    return SolveResult(
      x=unravel(x),
      quadratic_value=phi,
      num_steps=jnp.zeros((), jnp.int32),
      status=status,
      negative_curvature=negative,
      min_curvature=min_curvature,
    )

  return LinearSolver(init=lambda params: (), prepare=prepare, solve=solve)


# ---------------------------------------------------------------------------- user solve


def from_function(fn: Callable[[Matvec, Any, jax.Array], Any]) -> LinearSolver:
  r"""A :class:`LinearSolver` from ``fn(matvec, b, damping) -> x``.

  ``matvec`` is the *undamped* curvature; ``fn`` returns :math:`x \approx (C + \lambda
  I)^{-1} b`. One extra product evaluates the quadratic model for the reduction ratio.

  Examples:
    >>> solver = from_function(lambda matvec, b, lam: b / (2.0 + lam))  # C = 2 I
    >>> result = solver.solve(lambda v: 2.0 * v, jnp.ones(2), 1.0, None, None)
    >>> [round(v, 6) for v in result.x.tolist()], round(float(result.quadratic_value), 6)
    ([0.333333, 0.333333], -0.333333)
  """

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=None, backtrack_fn=None):
    del x0, work, preconditioner, tol, backtrack_fn
    x = optax.tree.cast_like(fn(matvec, b, damping), b)
    phi = quadratic_value(matvec, b, damping, x)
    finite = jnp.isfinite(phi)
    return SolveResult(
      x=x,
      quadratic_value=phi,
      num_steps=jnp.ones((), jnp.int32),
      status=jnp.where(finite, _RESIDUAL, _NONFINITE).astype(jnp.int32),
      negative_curvature=jnp.zeros((), bool),
      min_curvature=jnp.asarray(jnp.inf, jnp.result_type(phi)),
    )

  return LinearSolver(init=lambda params: (), prepare=_no_prepare, solve=solve)


#: Built-in solvers by name: ``builder(options) -> LinearSolver``.
SOLVERS: dict[str, Callable[[SolverOptions], LinearSolver]] = {
  "cg": cg_solver,
  "nystrom": nystrom_solver,
  "dense": dense_solver,
}
