r"""Solvers for a sequence of damped systems :math:`(C + \lambda I)\, d = b`: one protocol.

An optimiser such as Newton-CG solves one damped system per trial step, with a curvature
:math:`C` that changes every update and a damping :math:`\lambda` that may change between
trials of one update. A **solver** is a small immutable value that follows :class:`Solver`:

* ``init(like) -> state``: what it keeps between updates (a Nyström sketch, K-FAC factors);
* ``resolve(system) -> Solver``: the concrete solver for this update's :class:`System`
  (:class:`Auto` chooses one by a cost model; the others return themselves);
* ``prepare(system, state, count) -> (state, work)``: once per update, with the undamped
  curvature (refresh a sketch, form and keep a dense matrix); ``work`` lives for one update;
* ``initial_guess(previous) -> x0 | None``: the warm start of the update's first trial;
* ``solve(system, work, b, damping, x0, *, backtrack_fn=None) ->``
  :class:`~curvopt.linalg.cg.CGResult`: one damped solve, once per trial.

Vectors are tuples of 1-D arrays (one per dtype, :mod:`curvopt.linalg.flat`); the dense solvers
need a single dtype. A :class:`System` carries the undamped product, optionally a
:class:`GramFactor` (:math:`C = F^\top F` with the rows of :math:`F` available: a Gauss-Newton
matrix of per-example Jacobians, an empirical Fisher), the cost of one product, and an opaque
``context`` handed to preconditioners. Adding a solver is one class with these methods.

Built-in solvers: :class:`CG` (truncated preconditioned CG with a :class:`Preconditioner`,
e.g. :class:`NystromPreconditioner`), :class:`Dense` (exact, in parameter space
:math:`n \times n` or sample space :math:`m \times m`) and :class:`Auto` (the default of
Newton-CG; its cost model is documented on the class).
"""

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from curvopt._typing import Matvec
from curvopt.linalg import cg as cg_lib
from curvopt.linalg import dense as dense_lib
from curvopt.linalg import nystrom as nystrom_lib
from curvopt.linalg.cg import CGResult

__all__ = [
  "CG",
  "Auto",
  "Dense",
  "GramFactor",
  "NystromPreconditioner",
  "Preconditioner",
  "Solver",
  "SolverKind",
  "System",
]


class SolverKind(enum.IntEnum):
  """Which solver an update used (Newton-CG's ``solver`` diagnostic).

  Examples:
    >>> SolverKind(2).name
    'DENSE_SAMPLES'
  """

  CG = 0
  DENSE_PARAMS = 1
  DENSE_SAMPLES = 2
  OTHER = 3


class GramFactor(NamedTuple):
  r"""A curvature :math:`C = F^\top F` whose rows :math:`F \in \mathbb R^{m\times n}` we can form.

  Attributes:
    num_rows: :math:`m` (static).
    matrix: ``chunk_rows -> F``, shape ``(m, n)``, formed ``chunk_rows`` rows at a time
      (``None``: all at once).
    gram: ``chunk_rows -> F^T F``, shape ``(n, n)``, accumulated over chunks of rows, so
      that only ``chunk_rows`` rows are in memory at once.
    residual: ``() -> r`` with the gradient part of ``b`` equal to :math:`F^\top r`, shape
      ``(m,)``, or ``None``.
    rows_cost: floating-point operations to form all rows (for :class:`Auto`).
  """

  num_rows: int
  matrix: Callable[[int | None], jax.Array]
  gram: Callable[[int | None], jax.Array]
  residual: Callable[[], jax.Array] | None
  rows_cost: float


class System(NamedTuple):
  """One update's curvature, as a solver sees it.

  Attributes:
    matvec: ``v -> C v`` (undamped) on tuples of vectors shaped like ``like``.
    like: the parameters as a tuple of 1-D vectors (one per dtype).
    factor: a :class:`GramFactor` of :math:`C`, or ``None``.
    product_cost: floating-point operations of one ``matvec``, or ``None`` if unknown.
    context: anything the optimiser hands to preconditioners (parameters, data, ...).
  """

  matvec: Matvec
  like: tuple[jax.Array, ...]
  factor: GramFactor | None = None
  product_cost: float | None = None
  context: Any = None


class Preconditioner(Protocol):
  """A preconditioner of :class:`CG`: ``init``, ``prepare`` (once per update) and ``apply``."""

  def init(self, like: tuple[jax.Array, ...]) -> Any: ...

  def prepare(self, system: System, state: Any, count: jax.Array) -> tuple[Any, Any]: ...

  def apply(self, work: Any, damping: jax.Array) -> Matvec:
    """``r -> M^{-1} r`` for the damped system, symmetric positive definite."""


class Solver(Protocol):
  """A damped-system solver (see the module docstring)."""

  kind: SolverKind

  def init(self, like: tuple[jax.Array, ...]) -> Any: ...

  def resolve(self, system: System) -> "Solver": ...

  def prepare(self, system: System, state: Any, count: jax.Array) -> tuple[Any, Any]: ...

  def initial_guess(self, previous: Any) -> Any | None: ...

  def solve(
    self,
    system: System,
    work: Any,
    b: Any,
    damping: jax.Array,
    x0: Any | None,
    *,
    backtrack_fn: Callable[[Any], jax.Array] | None = None,
  ) -> CGResult: ...


def _positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _static_int(obj: Any, field: str) -> None:
  """Makes ``obj.field`` a Python int (it fixes array shapes), with named errors."""
  name, value = f"{type(obj).__name__}.{field}", getattr(obj, field)
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{name} fixes array shapes and must be a Python int, but it is traced (e.g. by "
      "optax.inject_hyperparams); pass optax.inject_hyperparams(newton_cg, "
      "static_args=('cg_max_steps',)) or leave it at its default."
    )
  if not isinstance(value, bool) and hasattr(value, "__index__"):
    value = int(value)
  elif not isinstance(value, bool) and getattr(value, "shape", None) == () and value == int(value):
    value = int(value)
  _positive_int(name, value)
  object.__setattr__(obj, field, value)


def _number(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
  """Checks a concrete number; traced values (``optax.inject_hyperparams``) pass."""
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
    raise ValueError(f"{name} must be {requirement}; got {value!r}.")


# ----------------------------------------------------------------------------------- CG


@dataclasses.dataclass(frozen=True)
class NystromPreconditioner:
  r"""Randomized Nyström preconditioner of rank :math:`\ell`, refreshed every ``refresh`` updates.

  NysNewton-CG (Rathore et al. 2024): the undamped curvature is sketched with
  :func:`curvopt.linalg.nystrom.nystrom_approximation` at updates ``0, k, 2k, ...``, kept in
  the solver state, and applied by :func:`curvopt.linalg.nystrom.nystrom_preconditioner` at
  each trial's damping (Frangella, Tropp and Udell 2023).

  Attributes:
    rank: sketch size :math:`\ell` (capped at the number of parameters).
    refresh: updates between sketches.
    seed: seed of the Gaussian test matrices.
  """

  rank: int = 20
  refresh: int = 10
  seed: int = 0

  def __post_init__(self):
    _static_int(self, "rank")
    _positive_int("NystromPreconditioner.refresh", self.refresh)

  def init(self, like):
    n = sum(v.size for v in like)
    rank = min(self.rank, n)
    basis = tuple(jnp.zeros((rank, v.size), v.dtype) for v in like)
    dtype = jnp.result_type(*like)
    approximation = nystrom_lib.NystromApproximation(basis, jnp.zeros((rank,), dtype))
    return approximation, jax.random.PRNGKey(self.seed)

  def prepare(self, system, state, count):
    def refresh(state):
      _, key = state
      key, sub = jax.random.split(key)
      rank = state[0].eigenvalues.shape[0]
      return nystrom_lib.nystrom_approximation(system.matvec, system.like, sub, rank), key

    state = jax.lax.cond(count % self.refresh == 0, refresh, lambda s: s, state)
    return state, state[0]

  def apply(self, work, damping):
    return nystrom_lib.nystrom_preconditioner(work, damping)


@dataclasses.dataclass(frozen=True)
class CG:
  r"""Truncated preconditioned conjugate gradient (Hessian-free; Martens 2010).

  Runs :func:`curvopt.linalg.cg.conjugate_gradient` with the Steihaug exit on non-positive
  curvature, the relative-residual test ``tol`` and Martens' progress rule ``progress_tol``,
  from ``warm_start`` times the previous update's direction.

  Attributes:
    tol: relative residual tolerance, or ``"forcing"`` (the default) for the superlinear
      forcing sequence :math:`\min(\tfrac12, \sqrt{\|b\|})` of scipy's Newton-CG (Nocedal
      and Wright, 7.1): loose solves far from a minimum, tight ones near it.
    max_steps: CG iterations per solve at most (static).
    progress_tol: Martens' progress tolerance; ``None`` disables the test.
    warm_start: decay of the previous direction used as the starting point, in ``[0, 1]``.
    backtracking: return the best saved iterate by the true objective (Martens 2010 §4.6)
      rather than the last one; costs a few objective evaluations.
    preconditioner: ``None`` or a :class:`Preconditioner` (e.g.
      :class:`NystromPreconditioner`, or Newton-CG's Martens diagonal and K-FAC).
  """

  tol: float | Literal["forcing"] = "forcing"
  max_steps: int = 100
  progress_tol: float | None = 5e-4
  warm_start: float = 0.95
  backtracking: bool = False
  preconditioner: Any = None
  kind = SolverKind.CG

  def __post_init__(self):
    if isinstance(self.tol, str):
      if self.tol != "forcing":
        raise ValueError(f"CG.tol must be a number >= 0 or 'forcing'; got {self.tol!r}.")
    else:
      _number("CG.tol", self.tol, lambda v: v >= 0, "a number >= 0 or 'forcing'")
    _static_int(self, "max_steps")
    if self.progress_tol is not None:
      _number("CG.progress_tol", self.progress_tol, lambda v: v >= 0, ">= 0 or None")
    _number("CG.warm_start", self.warm_start, lambda v: 0 <= v <= 1, "in [0, 1]")

  def init(self, like):
    return () if self.preconditioner is None else self.preconditioner.init(like)

  def resolve(self, system):
    del system
    return self

  def prepare(self, system, state, count):
    if self.preconditioner is None:
      return state, None
    return self.preconditioner.prepare(system, state, count)

  def initial_guess(self, previous):
    return optax.tree.scale(self.warm_start, previous)

  def solve(self, system, work, b, damping, x0, *, backtrack_fn=None):
    if isinstance(self.tol, str):
      tol = jnp.minimum(0.5, jnp.sqrt(optax.tree.norm(b)))
    else:
      tol = self.tol
    precond = None if self.preconditioner is None else self.preconditioner.apply(work, damping)
    return cg_lib.conjugate_gradient(
      system.matvec,
      b,
      x0,
      damping=damping,
      preconditioner=precond,
      max_steps=self.max_steps,
      tol=tol,
      progress_tol=self.progress_tol,
      backtrack_fn=backtrack_fn if self.backtracking else None,
    )


# -------------------------------------------------------------------------------- dense


def _single_vector(like: Any, what: str) -> None:
  if len(like) != 1:
    raise ValueError(
      f"{what} needs parameters of one dtype; got {len(like)} dtypes "
      f"({[str(v.dtype) for v in like]}). Cast them to one dtype, or use solver='cg'."
    )


@dataclasses.dataclass(frozen=True)
class Dense:
  r"""Exact damped solve from the dense curvature, in parameter space or in sample space.

  ``space="params"`` forms the :math:`n \times n` matrix once per update (from the rows of a
  :class:`GramFactor`, :math:`F^\top F` accumulated in chunks, or else from :math:`n`
  products) and solves each trial with :func:`~curvopt.linalg.dense.damped_dense_solve`
  (Cholesky, with the saddle-free eigendecomposition as the named fallback).
  ``space="samples"`` needs a :class:`GramFactor`: it keeps :math:`F` and solves each trial
  in the :math:`m`-dimensional sample space with :func:`~curvopt.linalg.dense.kernel_solve`
  (Woodbury), cheaper when :math:`m < n`. For a least-squares loss these are the
  Levenberg-Marquardt / energy-natural-gradient steps (ENGD, and ENGD-W in sample space).

  Attributes:
    space: ``"params"`` or ``"samples"``.
    memory_limit: bytes the rows of :math:`F` may take at once while the matrix is formed;
      the rows are formed in chunks that fit.
  """

  space: Literal["params", "samples"] = "params"
  memory_limit: int = 2**30

  def __post_init__(self):
    if self.space not in ("params", "samples"):
      raise ValueError(f"Dense.space must be 'params' or 'samples'; got {self.space!r}.")
    _positive_int("Dense.memory_limit", self.memory_limit)

  @property
  def kind(self) -> SolverKind:
    return SolverKind.DENSE_PARAMS if self.space == "params" else SolverKind.DENSE_SAMPLES

  def init(self, like):
    del like
    return ()

  def resolve(self, system):
    del system
    return self

  def chunk_rows(self, system: System) -> int | None:
    """Rows of :math:`F` per chunk: all if they fit in ``memory_limit``."""
    n, itemsize = system.like[0].size, system.like[0].dtype.itemsize
    rows = max(1, self.memory_limit // (n * itemsize))
    return None if rows >= system.factor.num_rows else rows

  def prepare(self, system, state, count):
    del count
    _single_vector(system.like, f"Dense(space={self.space!r})")
    if self.space == "samples":
      if system.factor is None:
        raise ValueError(
          "Dense(space='samples') needs a curvature with per-example rows (the GGN of a "
          "per-example loss, or the empirical Fisher); use Dense(space='params') or CG."
        )
      residual = None if system.factor.residual is None else system.factor.residual()
      return state, (system.factor.matrix(self.chunk_rows(system)), residual)
    if system.factor is not None:
      return state, system.factor.gram(self.chunk_rows(system))
    return state, dense_lib.dense_matrix(lambda v: system.matvec((v,))[0], system.like[0])

  def initial_guess(self, previous):
    del previous
    return None

  def solve(self, system, work, b, damping, x0, *, backtrack_fn=None):
    del x0, backtrack_fn
    if self.space == "samples":
      result = dense_lib.kernel_solve(work[0], b[0], damping, work[1])
    else:
      result = dense_lib.damped_dense_solve(work, b[0], damping)
    return result._replace(x=(result.x,))


# --------------------------------------------------------------------------------- auto


@dataclasses.dataclass(frozen=True)
class Auto:
  r"""Chooses :class:`Dense` in parameter or sample space, or :class:`CG`, per update.

  The choice is made at trace time from the shapes of the update's :class:`System`, with
  :math:`n` parameters, :math:`m` rows of the curvature's :class:`GramFactor` (examples
  times outputs; absent for the Hessian), :math:`c` the cost of one curvature product and
  :math:`c_F` the cost of forming all rows (both in floating-point operations, from XLA's
  cost analysis of the model):

  ============================  ===========================================================
  solver                        cost of one update
  ============================  ===========================================================
  ``Dense("params")``           :math:`w c_F + m n^2 + n^3/3` (or :math:`w n c + n^3/3`
                                from :math:`n` products, without a factor)
  ``Dense("samples")``          :math:`w c_F + m^2 n + m^3/3` (needs a factor)
  ``CG``                        :math:`k\,(w c + o)`, :math:`k = \min(n, m + 1,`
                                ``max_steps``:math:`)`
  ============================  ===========================================================

  :math:`k` bounds the products CG takes: at most ``max_steps``, and at most the
  :math:`m + 1` distinct eigenvalues of :math:`C + \lambda I` (exact arithmetic; :math:`C`
  has rank at most :math:`m`). A floating-point operation inside an autodiff product (many
  small kernels, transcendental functions, a loop) costs more than one inside dense matrix
  algebra (matrix products, Cholesky, which run near peak): :math:`w` = ``product_weight``
  says how many. :math:`o` = ``loop_overhead`` is the fixed cost of one CG iteration (a
  loop trip and its vector operations). A dense candidate is admitted only when its
  matrices fit in ``memory_limit`` (:math:`n^2` or :math:`m^2 + m n` numbers) and the
  parameters share one dtype; the cheapest admitted candidate wins (ties: parameter space,
  then sample space, then CG). On CPU this gives, for the reference problems of the tests:
  the parameter-space step for small models (a 257-parameter PINN, a Moré-Garbow-Hillstrom
  function), the sample-space step for a network with more parameters than residuals (5-D
  Poisson with 10,065 parameters and 3,500 points), and CG for logistic regression on digits
  (650 parameters, 17,970 rows) and larger networks. A dense step is exact, so where both
  cost about the same it also makes more progress per update. The choice is reported in
  Newton-CG's ``solver`` diagnostic (a :class:`SolverKind`). ``Auto`` only chooses: the
  optimiser calls ``resolve`` and uses the chosen solver's ``prepare`` and ``solve`` (its
  state is the CG candidate's, which the dense solvers pass through unchanged).

  Attributes:
    cg: the :class:`CG` used when CG is chosen.
    memory_limit: bytes the dense matrices may take.
    loop_overhead: the cost :math:`o`, in floating-point operations, of one CG iteration
      besides its product.
    product_weight: the cost :math:`w` of a floating-point operation inside a product,
      relative to one in dense matrix algebra.
  """

  cg: CG = CG()
  memory_limit: int = 2**30
  loop_overhead: float = 1e6
  product_weight: float = 4.0
  kind = SolverKind.OTHER

  def __post_init__(self):
    if not isinstance(self.cg, CG):
      raise TypeError(f"Auto.cg must be a curvopt CG; got {type(self.cg).__name__}.")
    _positive_int("Auto.memory_limit", self.memory_limit)

  def init(self, like):
    return self.cg.init(like)

  def costs(self, system: System) -> dict[str, float]:
    """The cost of each admitted candidate (see the class docstring)."""
    n = sum(v.size for v in system.like)
    itemsize = max(v.dtype.itemsize for v in system.like)
    factor, w = system.factor, self.product_weight
    c = None if system.product_cost is None else w * system.product_cost
    m = None if factor is None else factor.num_rows
    k = min(n, self.cg.max_steps, n if m is None else m + 1)
    costs = {"cg": k * ((c or 0.0) + self.loop_overhead)}
    if len(system.like) != 1:
      return costs
    if n * n * itemsize <= self.memory_limit and (factor is not None or c is not None):
      build = w * factor.rows_cost + m * n * n if factor is not None else n * c
      costs["params"] = build + n**3 / 3
    if factor is not None and (m * m + m * n) * itemsize <= self.memory_limit:
      costs["samples"] = w * factor.rows_cost + m * m * n + m**3 / 3
    return costs

  def resolve(self, system):
    costs = self.costs(system)
    best = min(costs, key=lambda name: (costs[name], ("params", "samples", "cg").index(name)))
    if best == "cg":
      return self.cg
    return Dense(space=best, memory_limit=self.memory_limit)
