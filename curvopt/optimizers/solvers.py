r"""Linear-solver registry of Newton-CG for the damped system :math:`(C + \lambda I)\, d = g`.

The linear algebra lives in :mod:`curvopt.linalg` (truncated CG, the Nyström approximation
and preconditioner, the dense matrix); this module adapts it to an optimiser that solves one
system per trial step and may keep solver state between steps. A solver here is a
:class:`LinearSolver`, three pure functions:

* ``init(params) -> state``: what the solver keeps between updates (a Nyström sketch);
* ``prepare(matvec, params, state, count) -> (state, work)``: once per update, before any
  trial solve, with the *undamped* curvature ``matvec`` (refresh the sketch every ``k``
  updates, form a dense matrix and its eigendecomposition); ``work`` lives for one update;
* ``solve(matvec, b, damping, x0, work, *, preconditioner, tol, backtrack_fn) ->``
  :class:`~curvopt.linalg.cg.CGResult`: one damped solve, called once per trial (a rejected
  trial re-solves with a larger damping, warm-started from the rejected direction ``x0``).

The registry :data:`SOLVERS` maps names to builders ``builder(options: SolverOptions) ->
LinearSolver``; adding a solver is one builder and one entry. A user may instead pass a
:class:`LinearSolver`, or any function following :mod:`curvopt.linalg.solve`'s protocol
``solve(matvec, b, x0, *, damping, preconditioner, max_steps, tol) -> CGResult`` (wrapped by
:func:`from_solve_fn`; e.g. ``curvopt.linalg.dense.dense_solve`` or
``functools.partial(curvopt.linalg.nystrom.nystrom_cg, rank=20)``).

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
from jax.flatten_util import ravel_pytree

from curvopt._typing import Matvec, Params
from curvopt.linalg import cg, dense, nystrom
from curvopt.linalg.cg import CGResult
from curvopt.linalg.status import SolverStatus


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
  solve: Callable[..., CGResult]


def _no_prepare(matvec, params, state, count):
  del matvec, params, count
  return state, None


def _cg(options, matvec, b, damping, x0, preconditioner, tol, backtrack_fn) -> CGResult:
  return cg.conjugate_gradient(
    matvec,
    b,
    x0,
    damping=damping,
    preconditioner=preconditioner,
    max_steps=options.max_steps,
    tol=tol,
    progress_tol=options.progress_tol,
    backtrack_fn=backtrack_fn,
  )


# ------------------------------------------------------------------------------------- cg


def cg_solver(options: SolverOptions) -> LinearSolver:
  """Truncated preconditioned CG (Steihaug exit, Martens' progress rule)."""

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=1e-4, backtrack_fn=None):
    del work
    return _cg(options, matvec, b, damping, x0, preconditioner, tol, backtrack_fn)

  return LinearSolver(init=lambda params: (), prepare=_no_prepare, solve=solve)


# ------------------------------------------------------------------------------- nystrom


class NystromState(NamedTuple):
  """The Nyström approximation of the curvature kept between updates, and the next key."""

  approximation: nystrom.NystromApproximation
  key: jax.Array


def nystrom_solver(options: SolverOptions) -> LinearSolver:
  r"""CG preconditioned by a rank-``options.rank`` Nyström sketch refreshed periodically.

  NysNewton-CG (Rathore et al. 2024): the undamped curvature is sketched with
  :func:`curvopt.linalg.nystrom.nystrom_approximation` at updates ``0, k, 2k, ...`` and kept
  in the optimiser state; each trial solve runs CG with
  :func:`curvopt.linalg.nystrom.nystrom_preconditioner` at the trial's damping.
  """

  def init(params):
    n = sum(jnp.size(a) for a in jax.tree.leaves(params))
    rank = min(options.rank, n)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    basis = jax.tree.map(lambda a: jnp.zeros((rank, *jnp.shape(a)), jnp.result_type(a)), params)
    return NystromState(
      nystrom.NystromApproximation(basis, jnp.zeros((rank,), dtype)),
      jax.random.PRNGKey(options.seed),
    )

  def prepare(matvec, params, state, count):
    def refresh(state):
      key, sub = jax.random.split(state.key)
      rank = state.approximation.eigenvalues.shape[0]
      approximation = nystrom.nystrom_approximation(matvec, params, sub, rank)
      return NystromState(approximation, key)

    state = jax.lax.cond(count % options.refresh_every == 0, refresh, lambda s: s, state)
    return state, state.approximation

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=1e-4, backtrack_fn=None):
    del preconditioner  # The Nyström preconditioner replaces any diagonal one.
    precond = nystrom.nystrom_preconditioner(work, damping)
    return _cg(options, matvec, b, damping, x0, precond, tol, backtrack_fn)

  return LinearSolver(init=init, prepare=prepare, solve=solve)


# --------------------------------------------------------------------------------- dense


class DenseWork(NamedTuple):
  """Eigendecomposition :math:`C = V \\Lambda V^\\top` of the dense curvature of one update."""

  eigenvalues: jax.Array
  eigenvectors: jax.Array


def dense_solver(options: SolverOptions) -> LinearSolver:
  r"""Exact solve from the dense curvature, formed by :math:`n` products once per update.

  The matrix (:func:`curvopt.linalg.dense.dense_matrix`) is eigendecomposed once per update,
  so every trial damping costs two :math:`n \times n` matrix-vector products instead of
  :math:`n` curvature products and a factorisation. If :math:`C + \lambda I` is not positive
  definite (an indefinite Hessian), the step uses :math:`|\Lambda| + \lambda` (the
  saddle-free Newton step of Dauphin et al. 2014) and reports negative curvature, so the
  damping rule raises :math:`\lambda` past :math:`-\lambda_{\min}(C)`. For a least-squares
  loss with the GGN this is the Levenberg-Marquardt / energy natural gradient step (Müller
  and Zeinhofer 2023).
  """
  del options

  def prepare(matvec, params, state, count):
    del count
    matrix = dense.dense_matrix(matvec, params)
    eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
    return state, DenseWork(eigenvalues, eigenvectors)

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=0.0, backtrack_fn=None):
    del matvec, x0, preconditioner, tol, backtrack_fn
    flat_b, unravel = ravel_pytree(b)
    lam, v = work.eigenvalues, work.eigenvectors
    damped = lam + damping
    min_curvature = damped[0]
    negative = ~(min_curvature > 0)
    x = v @ ((v.T @ flat_b) / jnp.where(negative, jnp.abs(lam) + damping, damped))
    phi = 0.5 * jnp.sum(damped * (v.T @ x) ** 2) - flat_b @ x
    r = flat_b - v @ (damped * (v.T @ x))
    b_norm = jnp.linalg.norm(flat_b)
    status = jnp.where(
      jnp.isfinite(phi),
      jnp.where(negative, SolverStatus.INDEFINITE.value, SolverStatus.DIRECT.value),
      SolverStatus.NONFINITE.value,
    ).astype(jnp.int32)
    return CGResult(
      x=unravel(x),
      num_steps=jnp.zeros((), jnp.int32),
      relative_residual=jnp.linalg.norm(r) / jnp.where(b_norm > 0, b_norm, 1.0),
      quadratic_value=phi,
      status=status,
      negative_curvature=negative,
      converged=~negative & jnp.isfinite(phi),
      selected_step=jnp.zeros((), jnp.int32),
      min_curvature=min_curvature,
    )

  return LinearSolver(init=lambda params: (), prepare=prepare, solve=solve)


# ---------------------------------------------------------------------------- user solve


def from_solve_fn(fn: Callable[..., CGResult], options: SolverOptions) -> LinearSolver:
  r"""A stateless :class:`LinearSolver` from a :mod:`curvopt.linalg.solve` ``SolveFn``.

  ``fn(matvec, b, x0, *, damping, preconditioner, max_steps, tol) -> CGResult`` with the
  *undamped* ``matvec``; its ``quadratic_value`` feeds the reduction ratio.

  Examples:
    >>> from curvopt.linalg.dense import dense_solve
    >>> solver = from_solve_fn(dense_solve, SolverOptions())
    >>> result = solver.solve(lambda v: 2.0 * v, jnp.ones(2), 1.0, None, None)  # C = 2 I
    >>> [round(v, 4) for v in result.x.tolist()], round(float(result.quadratic_value), 4)
    ([0.3333, 0.3333], -0.3333)
  """

  def solve(matvec, b, damping, x0, work, *, preconditioner=None, tol=1e-4, backtrack_fn=None):
    del work, backtrack_fn
    return fn(
      matvec,
      b,
      x0,
      damping=damping,
      preconditioner=preconditioner,
      max_steps=options.max_steps,
      tol=tol,
    )

  return LinearSolver(init=lambda params: (), prepare=_no_prepare, solve=solve)


#: Built-in solvers by name: ``builder(options) -> LinearSolver``.
SOLVERS: dict[str, Callable[[SolverOptions], LinearSolver]] = {
  "cg": cg_solver,
  "nystrom": nystrom_solver,
  "dense": dense_solver,
}
