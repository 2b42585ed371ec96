r"""Why a linear solve stopped: one enumeration shared by every solver in :mod:`curvopt.linalg`.

Solvers return the status as an ``int32`` array (so it can be traced, ``vmap``-ed and stored in
optimiser states); :class:`SolverStatus` turns the integer back into a name and a message.
"""

import enum

import jax
import numpy as np

_MESSAGES = {
  "MAX_STEPS": "The iteration limit max_steps was reached before any stopping rule held.",
  "RESIDUAL": "Converged: the relative residual ||b - A x|| / ||b|| fell below tol.",
  "PROGRESS": "Converged: the quadratic model stopped making progress (Martens 2010 rule).",
  "NEGATIVE_CURVATURE": (
    "A direction of non-positive curvature p'Ap <= 0 was met; the operator is not positive "
    "definite (add damping). The last iterate before it is returned."
  ),
  "NONFINITE": (
    "A non-finite value (NaN or inf) appeared in the operator products; the last finite "
    "iterate is returned."
  ),
  "DIRECT": "Solved exactly by a dense factorisation (Cholesky).",
  "INDEFINITE": (
    "The dense matrix has a negative eigenvalue (Cholesky failed); the saddle-free step "
    "(every negative curvature flipped) from its eigendecomposition is returned."
  ),
  "SINGULAR": (
    "The dense matrix is singular to working precision (Cholesky failed); the minimum-norm "
    "solution on its numerically non-zero eigenvalues is returned."
  ),
}


class SolverStatus(enum.IntEnum):
  """Outcome codes of the solvers in :mod:`curvopt.linalg` (the ``status`` result field).

  The codes ``0..4`` keep the order of the historical :data:`curvopt.CG_STATUSES` tuple.

  Examples:
    >>> SolverStatus.RESIDUAL.value, SolverStatus.names()[1]
    (1, 'residual')
    >>> SolverStatus.message(SolverStatus.RESIDUAL)[:10]
    'Converged:'
    >>> SolverStatus.is_converged(SolverStatus.PROGRESS)
    True
  """

  MAX_STEPS = 0
  RESIDUAL = 1
  PROGRESS = 2
  NEGATIVE_CURVATURE = 3
  NONFINITE = 4
  DIRECT = 5
  INDEFINITE = 6
  SINGULAR = 7

  @classmethod
  def names(cls) -> tuple[str, ...]:
    """Lower-case names indexed by code (``names()[code]``)."""
    return tuple(member.name.lower() for member in cls)

  @classmethod
  def message(cls, code: "int | SolverStatus | jax.Array") -> str:
    """Human-readable explanation of a concrete status code (not a traced one).

    Raises:
      ValueError: for a code that is not a member.
    """
    value = int(np.asarray(code))
    try:
      member = cls(value)
    except ValueError:
      raise ValueError(
        f"Unknown solver status {value!r}; expected one of {[int(m) for m in cls]}."
      ) from None
    return _MESSAGES[member.name]

  @classmethod
  def is_converged(cls, code: "int | SolverStatus") -> bool:
    """Whether a concrete code means the system was solved to the requested accuracy."""
    return int(np.asarray(code)) in (cls.RESIDUAL, cls.PROGRESS, cls.DIRECT)


#: Lower-case status names indexed by code, as in ``CG_STATUSES[int(result.status)]``.
CG_STATUSES: tuple[str, ...] = SolverStatus.names()
