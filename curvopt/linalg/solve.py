r"""The solver protocol: one signature and one result type for every linear solver.

A *solver* solves the damped symmetric system :math:`(A + \delta I)x = b` given only the
undamped operator ``matvec: v -> A v`` on pytrees:

.. code-block:: python

   def solve(matvec, b, x0=None, *, damping=0.0, preconditioner=None, max_steps=100,
             tol=1e-5) -> CGResult: ...

* ``damping`` :math:`\delta` may be a traced scalar (Levenberg-Marquardt damping changes
  every step without recompiling);
* ``x0`` is a warm start, ``preconditioner`` an SPD ``r -> M^{-1} r``, ``max_steps`` and
  ``tol`` the iteration limit and relative-residual tolerance; a solver that has no use for
  one of them accepts and ignores it (the dense solve ignores all four);
* solver-specific options are keyword-only arguments with defaults; bind them with
  :func:`functools.partial` before registering (``partial(nystrom_cg, rank=20)``);
* the result is a :class:`~curvopt.linalg.cg.CGResult`: ``x`` shaped
  like ``b``, ``num_steps``, ``relative_residual``, ``quadratic_value``
  :math:`\tfrac12 x^\top(A+\delta I)x - b^\top x` (what a Newton method's reduction ratio
  needs), ``status`` (a :class:`~curvopt.linalg.status.SolverStatus` code),
  ``negative_curvature``, ``converged``, ``selected_step`` and ``min_curvature``.

:data:`SOLVE_FNS` maps the built-in names to their functions; adding a solver is one function
that follows the protocol and one entry (or pass the function itself where a name is
accepted). These are one-shot solves; Newton-CG's registry
(:mod:`curvopt.optimizers.solvers`) wraps them with the state they keep between updates.
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax

from curvopt.linalg.cg import CGResult, conjugate_gradient
from curvopt.linalg.dense import dense_solve
from curvopt.linalg.nystrom import nystrom_cg

Matvec = Callable[[Any], Any]

__all__ = ["SOLVE_FNS", "SolveFn", "get_solve_fn"]


class SolveFn(Protocol):
  """A linear solver for :math:`(A + \\delta I)x = b` (see the module docstring)."""

  def __call__(
    self,
    matvec: Matvec,
    b: Any,
    x0: Any | None = None,
    *,
    damping: float | jax.Array = 0.0,
    preconditioner: Matvec | None = None,
    max_steps: int = 100,
    tol: float | jax.Array = 1e-5,
  ) -> CGResult: ...


#: Built-in solvers by name: truncated (P)CG, Nyström-preconditioned CG and a dense solve.
SOLVE_FNS: dict[str, SolveFn] = {
  "cg": conjugate_gradient,
  "nystrom": nystrom_cg,
  "dense": dense_solve,
}


def get_solve_fn(solver: "str | SolveFn") -> SolveFn:
  """The solver registered under ``solver``, or ``solver`` itself if it is callable.

  Raises:
    ValueError: for an unknown name.

  Examples:
    >>> get_solve_fn("cg") is conjugate_gradient
    True
  """
  if callable(solver):
    return solver
  if solver not in SOLVE_FNS:
    raise ValueError(
      f"Unknown solver {solver!r}; expected one of {tuple(SOLVE_FNS)} or a function that "
      "follows curvopt.linalg.solve.SolveFn."
    )
  return SOLVE_FNS[solver]
