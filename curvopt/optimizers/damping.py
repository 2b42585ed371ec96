r"""Damping rules and diagonal preconditioners of Newton-CG, as pure functions.

Each rule is a small function of arrays, tested on its own (as optax tests its L-BFGS
preconditioner), and :func:`curvopt.optimizers.newton_cg.scale_by_newton_cg` composes them:

* :func:`reduction_ratio`: :math:`\rho` = actual / predicted decrease of a step;
* :func:`levenberg_marquardt`: Martens' (2010) adaptation of :math:`\lambda` from :math:`\rho`;
* :func:`retry_damping`: the raised :math:`\lambda` after a rejected trial step (Nielsen 1999);
* :func:`negative_curvature_damping`: the :math:`\lambda` that makes the damped curvature
  positive along a direction of non-positive curvature;
* :func:`martens_diagonal` and :func:`diagonal_preconditioner`: Martens' (2010 §4.7)
  :math:`M = (\mathrm{diag}(\frac1B\sum_i g_i^2) + \lambda)^\alpha`.

Every function accepts traced values (all branching is ``jnp.where``), so hyper-parameters
may come from ``optax.inject_hyperparams``. :class:`LevenbergMarquardt` is the damping part of
Newton-CG: the policy that composes these rules (initial value, bounds, factors, acceptance
test, retries).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from curvopt._typing import Matvec, Params

# The diagonal preconditioner's floor, relative to the diagonal's largest entry. Martens' diagonal
# of squared gradients misses curvature the gradients do not see (a weight decay, a feature that
# is almost always zero): without a floor its inverse there grows like 1/lambda^alpha as the
# damping falls, and CG stalls (digits logistic regression with a 1e-12 damping floor: 368
# updates instead of 18).
DIAGONAL_FLOOR = 1e-4


def reduction_ratio(actual: jax.Array, predicted: jax.Array) -> jax.Array:
  r"""Reduction ratio :math:`\rho = \Delta f / \Delta q` of a trial step (Martens 2010 §4.1).

  ``actual`` :math:`= f(\theta + p) - f(\theta)` and ``predicted`` :math:`= q(p) - q(0)` of the
  damped quadratic model. When the model predicts no decrease (``predicted >= 0``, e.g. after
  an inexact solve in float32), :math:`\rho` is ``1`` if the loss did not increase and
  ``-inf`` otherwise; a non-finite ``actual`` gives ``-inf``. So :math:`\rho` is always
  comparable with an acceptance threshold.

  Args:
    actual: actual change of the loss.
    predicted: change predicted by the quadratic model (negative for a descent step).

  Returns:
    :math:`\rho`, a scalar of the inputs' dtype.

  Examples:
    >>> float(reduction_ratio(jnp.array(-1.0), jnp.array(-2.0)))
    0.5
    >>> float(reduction_ratio(jnp.array(jnp.nan), jnp.array(-2.0)))
    -inf
  """
  actual, predicted = jnp.asarray(actual), jnp.asarray(predicted)
  dtype = jnp.result_type(actual, predicted)
  descent = predicted < 0
  rho = jnp.where(
    descent,
    actual / jnp.where(descent, predicted, -1.0),
    jnp.where(actual <= 0, 1.0, -jnp.inf),
  )
  return jnp.where(jnp.isfinite(actual), rho, -jnp.inf).astype(dtype)


def levenberg_marquardt(
  damping: jax.Array,
  rho: jax.Array,
  *,
  increase: float | jax.Array = 1.5,
  decrease: float | jax.Array = 2.0 / 3.0,
  low: float = 0.25,
  high: float = 0.75,
) -> jax.Array:
  r"""Martens' (2010 §4.1) Levenberg-Marquardt rule for the next step's :math:`\lambda`.

  .. math::
    \lambda \leftarrow \begin{cases}
      \lambda \cdot \mathrm{increase} & \rho < \mathrm{low} \\
      \lambda \cdot \mathrm{decrease} & \rho > \mathrm{high} \\
      \lambda & \text{otherwise.}
    \end{cases}

  A NaN :math:`\rho` (no objective to measure it) leaves :math:`\lambda` unchanged.

  Args:
    damping: the current :math:`\lambda`.
    rho: the reduction ratio of the accepted step.
    increase: factor :math:`\ge 1` for a poor model fit.
    decrease: factor in :math:`(0, 1]` for a good one.
    low: threshold below which the model fit is poor.
    high: threshold above which it is good.

  Returns:
    The new :math:`\lambda` (not clipped).

  Examples:
    >>> [float(levenberg_marquardt(jnp.array(1.0), jnp.array(r), decrease=0.5))
    ...  for r in (0.1, 0.5, 0.9)]
    [1.5, 1.0, 0.5]
  """
  return jnp.where(
    rho < low, damping * increase, jnp.where(rho > high, damping * decrease, damping)
  ).astype(jnp.result_type(damping))


def retry_damping(
  damping: jax.Array,
  retry: jax.Array,
  curvature_along_step: jax.Array,
  *,
  increase: float | jax.Array = 1.5,
) -> jax.Array:
  r"""Damping for the next trial after a rejected step: :math:`\lambda\,\gamma\, 2^k`, floored.

  The :math:`k`-th retry (``retry`` :math:`= k = 0, 1, \dots`) multiplies :math:`\lambda` by
  :math:`\gamma\, 2^k` with :math:`\gamma` = ``increase``, so the factors grow geometrically
  as in Nielsen's (1999) rule and a handful of retries spans many orders of magnitude. The
  result is at least the curvature :math:`\mu = g^\top d / \|d\|^2` of the damped system along
  the rejected direction :math:`d` (for a CG solution this is :math:`d^\top (C + \lambda I) d /
  \|d\|^2`), which about halves the step along :math:`d`: this makes the first retry useful
  when :math:`\lambda` is tiny or zero, whatever the problem's scale. A non-finite or
  non-positive :math:`\mu` is ignored.

  Args:
    damping: :math:`\lambda` of the rejected trial.
    retry: index :math:`k` of the retry about to be made.
    curvature_along_step: :math:`\mu`.
    increase: :math:`\gamma \ge 1`.

  Returns:
    The raised :math:`\lambda`.

  Examples:
    >>> [float(retry_damping(jnp.array(1.0), k, jnp.array(0.0))) for k in range(3)]
    [1.5, 3.0, 6.0]
    >>> float(retry_damping(jnp.array(0.0), 0, jnp.array(40.0)))
    40.0
  """
  dtype = jnp.result_type(damping)
  raised = damping * increase * jnp.exp2(jnp.asarray(retry, dtype))
  mu = jnp.asarray(curvature_along_step, dtype)
  floor = jnp.where(jnp.isfinite(mu) & (mu > 0), mu, 0.0)
  return jnp.maximum(raised, floor).astype(dtype)


def negative_curvature_damping(
  damping: jax.Array, min_curvature: jax.Array, *, increase: float | jax.Array = 1.5
) -> jax.Array:
  r"""Damping that makes :math:`C + \lambda' I` positive along a non-positive direction.

  A solver that met :math:`\mu = p^\top (C + \lambda I) p / p^\top p \le 0` reports
  :math:`\mu`; then :math:`p^\top C p / p^\top p = \mu - \lambda`, and
  :math:`\lambda' = \gamma (\lambda - \mu)` with :math:`\gamma` = ``increase`` :math:`> 1`
  makes the damped curvature along :math:`p` equal to :math:`(\gamma - 1)(\lambda - \mu) > 0`.

  Args:
    damping: the current :math:`\lambda`.
    min_curvature: :math:`\mu`, the smallest damped Rayleigh quotient met.
    increase: :math:`\gamma`.

  Returns:
    :math:`\max(\lambda, \gamma(\lambda - \mu))` (``damping`` if :math:`\mu` is not finite).

  Examples:
    >>> float(negative_curvature_damping(jnp.array(1.0), jnp.array(-3.0), increase=2.0))
    8.0
  """
  needed = increase * (damping - min_curvature)
  return jnp.where(jnp.isfinite(needed), jnp.maximum(damping, needed), damping).astype(
    jnp.result_type(damping)
  )


def martens_diagonal(per_example_grads: Params) -> Params:
  r"""Martens' (2010 §4.7) diagonal :math:`\frac1B \sum_i g_i \odot g_i` (empirical Fisher).

  Args:
    per_example_grads: gradients with a leading example axis of size :math:`B`.

  Returns:
    A pytree shaped like one gradient.

  Examples:
    >>> martens_diagonal(jnp.array([[1.0, 2.0], [3.0, 0.0]])).tolist()
    [5.0, 2.0]
  """
  return jax.tree.map(lambda g: jnp.mean(jnp.abs(g) ** 2, axis=0), per_example_grads)


def diagonal_preconditioner(
  diagonal: Params, damping: jax.Array, exponent: float | jax.Array = 0.75
) -> Matvec:
  r"""``r -> M⁻¹ r`` with :math:`M = (\mathrm{diagonal} + \lambda + \epsilon \max
  \mathrm{diagonal})^\alpha` (Martens 2010 §4.7).

  The exponent :math:`\alpha < 1` (Martens uses 0.75) tempers a diagonal that is only a rough
  estimate of the curvature's; the floor :math:`\epsilon` = ``DIAGONAL_FLOOR`` (1e-4) keeps
  it from growing without bound where the diagonal is near zero and the damping small.

  Args:
    diagonal: non-negative pytree shaped like the parameters.
    damping: :math:`\lambda`.
    exponent: :math:`\alpha`.

  Returns:
    The inverse preconditioner as a function of a pytree.

  Examples:
    >>> apply = diagonal_preconditioner(jnp.array([3.0, 15.0]), 1.0, exponent=0.5)
    >>> [round(v, 3) for v in apply(jnp.array([2.0, 8.0])).tolist()]  # the floor: 1e-4 * 15
    [1.0, 2.0]
  """
  leaves = jax.tree.leaves(diagonal)
  floor = DIAGONAL_FLOOR * functools.reduce(jnp.maximum, [jnp.max(d) for d in leaves])
  m = jax.tree.map(lambda d: (d + damping + floor) ** exponent, diagonal)

  def apply(r: Any) -> Any:
    return jax.tree.map(lambda ri, mi: ri / mi.astype(ri.dtype), r, m)

  return apply


def curvature_along(direction: Params, rhs: Params) -> jax.Array:
  r""":math:`b^\top d / \|d\|^2`, the damped curvature along a CG solution :math:`d`.

  For a CG iterate from zero, :math:`b^\top d = d^\top A d` exactly, so this is the Rayleigh
  quotient of :math:`A` along :math:`d`; it is cheap (two inner products) and used by
  :func:`retry_damping`.

  Examples:
    >>> float(curvature_along(jnp.array([0.5, 0.0]), jnp.array([1.0, 0.0])))
    2.0
  """
  dd = optax.tree.vdot(direction, direction)
  return jnp.real(optax.tree.vdot(rhs, direction)) / jnp.where(dd > 0, jnp.real(dd), jnp.nan)


def _concrete(value: Any) -> float | None:
  """``value`` as a Python float, or ``None`` when it is traced (then checks are skipped)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _check(name: str, value: Any, ok, requirement: str) -> None:
  v = _concrete(value)
  if v is not None and not ok(v):
    raise ValueError(f"LevenbergMarquardt.{name} must be {requirement}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class LevenbergMarquardt:
  r"""Levenberg-Marquardt damping with an acceptance test and in-update re-solves.

  **Acceptance** (trust-region style). A trial step :math:`p = -d` is rejected when
  :math:`d` or the loss is non-finite, or (unless ``accept_ratio`` is ``None``) when its
  reduction ratio :math:`\rho \le` ``accept_ratio`` (:func:`reduction_ratio`, measured on
  the same mini-batch). It is then re-solved with :math:`\lambda` raised by
  :func:`retry_damping` (factor ``increase`` :math:`\cdot 2^k` at the :math:`k`-th retry,
  and at least the curvature along the rejected step; past :math:`-\mu` when the solver met
  curvature :math:`\mu \le 0`), up to ``max_retries`` times, inside the compiled update.
  With ``accept_ratio=0`` the loss on the step's mini-batch never increases.

  **Adaptation** (Martens 2010 §4.1). After an accepted trial, :math:`\lambda` is multiplied
  by ``increase`` when :math:`\rho < \tfrac14` and by ``decrease`` when
  :math:`\rho > \tfrac34` (by its square when the previous update's :math:`\rho` was above
  :math:`\tfrac34` too; :func:`levenberg_marquardt`), raised past negative curvature the
  solver met (:func:`negative_curvature_damping`), and clipped to ``bounds`` (when ``adapt``;
  otherwise retries raise :math:`\lambda` for the current update only).

  Attributes:
    init: the initial :math:`\lambda \ge 0`.
    adapt: adapt :math:`\lambda` between updates.
    bounds: ``(min, max)`` of :math:`\lambda`.
    increase: :math:`\gamma_+ \ge 1`.
    decrease: :math:`\gamma_- \in (0, 1]`; after two updates in a row with
      :math:`\rho > \tfrac34` the factor is :math:`\gamma_-^2`, so a run of very good steps
      (a convex problem started from a large :math:`\lambda`) reaches a small damping in a
      few updates, as Nielsen's rule accelerates the increases (measured: digits logistic
      regression in 9 steps instead of 12; the 2-D Poisson PINN's error after 250 steps
      4.9e-6 instead of 1.4e-5).
    accept_ratio: trials with :math:`\rho \le` ``accept_ratio`` are rejected; ``None``
      accepts every finite trial.
    max_retries: re-solves per update after rejected trials (``0``: none).

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010. Nielsen, "Damping
    parameter in Marquardt's method", IMM-REP-1999-05, 1999.
  """

  init: float = 1.0
  adapt: bool = True
  bounds: tuple[float, float] = (1e-12, 1e8)
  increase: float = 1.5
  decrease: float = 1.0 / 3.0
  accept_ratio: float | None = 0.0
  max_retries: int = 8

  def __post_init__(self):
    _check("init", self.init, lambda v: v >= 0, ">= 0")
    lo, hi = self.bounds
    if _concrete(lo) is not None and _concrete(hi) is not None and not 0 <= lo <= hi:
      raise ValueError(
        f"LevenbergMarquardt.bounds must satisfy 0 <= min <= max; got {self.bounds!r}."
      )
    _check("increase", self.increase, lambda v: v >= 1, ">= 1")
    _check("decrease", self.decrease, lambda v: 0 < v <= 1, "in (0, 1]")
    if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool):
      raise ValueError(
        f"LevenbergMarquardt.max_retries must be an int >= 0; got {self.max_retries!r}."
      )
    _check("max_retries", self.max_retries, lambda v: v >= 0, "an int >= 0")

  @property
  def needs_objective(self) -> bool:
    """Whether the policy measures the reduction ratio (and so needs the objective)."""
    return self.adapt or self.accept_ratio is not None

  def accepts(self, rho: jax.Array, finite: jax.Array) -> jax.Array:
    """Whether a trial with reduction ratio ``rho`` is accepted."""
    return finite if self.accept_ratio is None else finite & (rho > self.accept_ratio)

  def clip(self, damping: jax.Array) -> jax.Array:
    lo, hi = self.bounds
    return jnp.clip(damping, lo, hi).astype(jnp.result_type(damping))

  def retry(self, damping, k, direction, rhs, negative, min_curvature) -> jax.Array:
    """The damping of the next trial after the ``k``-th rejected one."""
    dtype = jnp.result_type(damping)
    mu = curvature_along(direction, rhs).astype(dtype)
    new = retry_damping(damping, k, mu, increase=self.increase)
    needed = negative_curvature_damping(damping, min_curvature, increase=self.increase)
    return self.clip(jnp.where(negative, jnp.maximum(new, needed), new))

  def next(self, damping, rho, accepted, negative, min_curvature, initial, previous_rho=None):
    """The damping of the next update, after this update's last trial (at ``damping``)."""
    if not self.adapt:
      return initial
    decrease = self.decrease
    if previous_rho is not None:  # a second very good step in a row: decrease faster
      decrease = jnp.where(previous_rho > 0.75, decrease * decrease, decrease)
    new = levenberg_marquardt(damping, rho, increase=self.increase, decrease=decrease)
    needed = negative_curvature_damping(damping, min_curvature, increase=self.increase)
    new = jnp.where(negative, jnp.maximum(new, needed), new)
    return self.clip(jnp.where(accepted, new, damping))  # damping was already raised on failure
