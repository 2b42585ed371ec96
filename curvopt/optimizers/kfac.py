r"""K-FAC as an optax optimiser: Kronecker-factored natural gradient with adaptive step sizes.

Each update (Martens & Grosse 2015):

1. estimates every layer's Kronecker factors on the step's batch
   (:func:`curvopt.curvature.kronecker.kronecker_factors`: the layers are found in
   ``model_fn``'s jaxpr) and folds them into exponential moving averages with decay
   :math:`\min(1 - 1/k, \epsilon)`;
2. every ``inverse_every`` updates, inverts them with factored Tikhonov damping and the
   :math:`\pi`-correction (:func:`~curvopt.curvature.kronecker.damped_inverse`), and keeps the
   inverses in the state;
3. preconditions the gradient, :math:`\Delta = \hat F^{-1} \nabla h`;
4. with ``learning_rate=None``, chooses the step :math:`\delta = \alpha \Delta + \mu
   \delta_{\mathrm{prev}}` that minimises the damped quadratic model
   :math:`M(\delta) = \nabla h^\top \delta + \frac12 \delta^\top (C + \lambda I) \delta` of the
   exact Gauss-Newton matrix :math:`C` over :math:`(\alpha, \mu)` (two GGN products, §7:
   :func:`quadratic_step`); with a learning rate :math:`\eta`, :math:`\delta = -\eta \Delta +
   m\, \delta_{\mathrm{prev}}` for the given ``momentum`` :math:`m`;
5. every ``damping_every`` updates, adapts :math:`\lambda` by the Levenberg-Marquardt rule from
   the reduction ratio :math:`\rho = (h(\theta + \delta) - h(\theta)) / M(\delta)` (§6.5:
   multiplied by :math:`\omega = \mathrm{damping\_decay}^{T}` when :math:`\rho > 3/4`, divided
   by it when :math:`\rho < 1/4`).

These are kfac-jax's automatic modes (adaptive learning rate, momentum and damping). Data
arrive as keyword arguments of ``update`` and are routed by name to
``model_fn(params, **data)`` and ``loss_fn(outputs, **data)``, as for
:func:`curvopt.newton_cg`.

References:
  Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
  curvature", ICML 2015. Botev & Martens, "KFAC-JAX", 2022.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks
from curvopt._typing import Params
from curvopt.curvature import kronecker as kron
from curvopt.optimizers import damping as damping_lib
from curvopt.optimizers.problem import Problem, check_number, raised_by_curvopt, route


class KFACInfo(NamedTuple):
  r"""Diagnostics of the last :func:`kfac` update (not used by the algorithm).

  Attributes:
    loss: the objective at the parameters the update was computed at.
    rho: the reduction ratio of the step on the update's batch, measured every
      ``damping_every`` updates (``nan`` in between, and without ``adapt_damping``).
    learning_rate: :math:`\alpha` of :math:`\delta = \alpha \Delta + \mu \delta_{prev}`
      (negative for a descent step).
    momentum: :math:`\mu`.
    quadratic_change: :math:`M(\delta)`, the damped quadratic model's predicted change
      (``nan`` when it was not computed).
  """

  loss: jax.Array
  rho: jax.Array
  learning_rate: jax.Array
  momentum: jax.Array
  quadratic_change: jax.Array


class KFACState(NamedTuple):
  """State of :func:`kfac`.

  Attributes:
    count: number of updates so far.
    key: PRNG key of ``curvature="ggn_sampled"``.
    factors: moving averages of the Kronecker factors (``None`` until the first update when
      :func:`kfac` got no ``data_like``).
    inverse: their damped inverses, refreshed every ``inverse_every`` updates.
    velocity: the last step :math:`\\delta`.
    damping: :math:`\\lambda`.
    info: diagnostics of the last update.
  """

  count: jax.Array
  key: jax.Array
  factors: kron.KroneckerFactors | None
  inverse: kron.KroneckerFactors | None
  velocity: Params
  damping: jax.Array
  info: KFACInfo


def quadratic_step(
  curvature: jax.Array, linear: jax.Array, first: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""The step sizes :math:`(\alpha, \mu)` minimising the 2-D quadratic model (M&G §7).

  Over :math:`\delta = \alpha \Delta + \mu \delta_{prev}`, :math:`M(\delta) = b^\top c +
  \frac12 c^\top Q c` with :math:`c = (\alpha, \mu)`, :math:`Q_{ij} = u_i^\top (C + \lambda I)
  u_j` and :math:`b_i = \nabla h^\top u_i` for :math:`u = (\Delta, \delta_{prev})`. The
  minimiser is :math:`c = -Q^{-1} b` with :math:`M = \frac12 b^\top c`. On the first update
  (no previous step) or when :math:`Q` is singular, only :math:`\alpha = -b_1 / Q_{11}` is
  used.

  Args:
    curvature: :math:`Q`, ``(2, 2)``.
    linear: :math:`b`, ``(2,)``.
    first: whether there is no previous step.

  Returns:
    ``(alpha, mu, change)`` with ``change`` :math:`= M(\delta)`.

  Examples:
    >>> a, m, q = quadratic_step(jnp.array([[2.0, 0.0], [0.0, 4.0]]), jnp.array([-2.0, 4.0]),
    ...                          jnp.array(False))
    >>> float(a), float(m), float(q)
    (1.0, -1.0, -3.0)
  """
  det = curvature[0, 0] * curvature[1, 1] - curvature[0, 1] ** 2
  scale = jnp.abs(curvature[0, 0] * curvature[1, 1])
  joint = ~first & (det > 1e-6 * scale) & (curvature[0, 0] > 0)
  safe_det = jnp.where(joint, det, 1.0)
  alpha_joint = -(curvature[1, 1] * linear[0] - curvature[0, 1] * linear[1]) / safe_det
  mu_joint = -(curvature[0, 0] * linear[1] - curvature[0, 1] * linear[0]) / safe_det
  alpha_only = -linear[0] / jnp.where(curvature[0, 0] > 0, curvature[0, 0], 1.0)
  alpha = jnp.where(joint, alpha_joint, jnp.where(curvature[0, 0] > 0, alpha_only, 0.0))
  mu = jnp.where(joint, mu_joint, 0.0)
  change = 0.5 * (alpha * linear[0] + mu * linear[1])
  return alpha, mu, change


def _quadratic_terms(model, loss, params, damping, vectors, grads):
  """:math:`Q` and :math:`b` of :func:`quadratic_step` from one linearisation of ``model``."""
  outputs, linear_model = jax.linearize(model, params)
  tangents = [linear_model(v) for v in vectors]
  grad_loss = jax.grad(loss)
  curved = [jax.jvp(grad_loss, (outputs,), (t,))[1] for t in tangents]
  q = jnp.stack(
    [
      jnp.stack(
        [
          optax.tree.vdot(t, c) + damping * optax.tree.vdot(u, v)
          for c, v in zip(curved, vectors, strict=True)
        ]
      )
      for t, u in zip(tangents, vectors, strict=True)
    ]
  )
  b = jnp.stack([optax.tree.vdot(grads, v) for v in vectors])
  return 0.5 * (q + q.T), b, loss(outputs)


def _positive(name: str, value: Any) -> None:
  if not isinstance(value, jax.core.Tracer) and not float(value) > 0:
    raise ValueError(f"{name} must be > 0; got {value!r}.")


class _Options(NamedTuple):
  """The configuration of :func:`kfac` that its update reads (see its arguments)."""

  model_fn: Callable[..., Any]
  loss_fn: Callable[..., jax.Array]
  learning_rate: Any
  momentum: Any
  curvature: kron.KroneckerCurvature
  num_samples: int
  weight_sharing: kron.WeightSharing
  adapt_damping: bool
  damping_every: Any
  damping_decay: Any
  factor_decay: Any
  factor_every: Any
  inverse_every: Any

  def model(self, params, data):
    return self.model_fn(params, **route(self.model_fn, data))

  def loss(self, outputs, data):
    return self.loss_fn(outputs, **route(self.loss_fn, data))


def _estimate(opts: _Options, params, data, key) -> kron.KroneckerFactors:
  return kron.kronecker_factors(
    opts.model,
    opts.loss,
    params,
    data,
    curvature=opts.curvature,
    weight_sharing=opts.weight_sharing,
    key=key,
    num_samples=opts.num_samples,
  )


def _update(opts: _Options, grads, state: KFACState, params, value, data):
  """One K-FAC update (module docstring, steps 1-5): ``(step, new state)``."""
  count, lam = state.count, state.damping
  key, sample_key = jax.random.split(state.key)
  factors, inverse = _refresh(opts, state, params, data, sample_key)
  direction = kron.kronecker_matvec(inverse, grads)
  model = lambda p: opts.model(p, data)  # noqa: E731
  loss = lambda out: opts.loss(out, data)  # noqa: E731
  nan = jnp.asarray(jnp.nan, lam.dtype)
  if opts.learning_rate is None:
    q, b, h = _quadratic_terms(model, loss, params, lam, [direction, state.velocity], grads)
    alpha, mu, change = quadratic_step(q, b, count == 0)
  else:
    rate = opts.learning_rate
    eta = rate(count) if callable(rate) else rate
    alpha, mu = -jnp.asarray(eta, lam.dtype), jnp.asarray(opts.momentum, lam.dtype)
    h, change = nan, nan
  h = jnp.asarray(h if value is None else value, lam.dtype)
  step = optax.tree.add(optax.tree.scale(alpha, direction), optax.tree.scale(mu, state.velocity))
  finite = optax.tree.norm(step) < jnp.inf
  step = optax.tree.where(finite, step, optax.tree.zeros_like(step))
  rho, next_lam = _adapt(opts, state, params, data, step, h, change, grads)
  next_lam = jnp.where(finite, next_lam, lam / opts.damping_decay**opts.damping_every)
  info = KFACInfo(h, rho, alpha, mu, change)
  new_state = KFACState(optax.safe_increment(count), key, factors, inverse, step, next_lam, info)
  return step, new_state


def _refresh(opts: _Options, state: KFACState, params, data, key):
  """The factors' moving averages and, every ``inverse_every`` updates, their inverses."""
  lam = state.damping
  if state.factors is None:  # no data_like: the first update allocates the factors
    factors = _estimate(opts, params, data, key)
    return factors, kron.damped_inverse(factors, lam)

  def averaged(old):
    decay = jnp.minimum(1.0 - 1.0 / (state.count + 1.0), opts.factor_decay)
    new = _estimate(opts, params, data, key)
    return jax.tree.map(lambda o, n: (decay * o + (1 - decay) * n).astype(o.dtype), old, new)

  factors = jax.lax.cond(
    state.count % opts.factor_every == 0, averaged, lambda old: old, state.factors
  )
  inverse = jax.lax.cond(
    state.count % opts.inverse_every == 0,
    lambda: kron.damped_inverse(factors, lam),
    lambda: state.inverse,
  )
  return factors, inverse


def _adapt(opts: _Options, state: KFACState, params, data, step, h, change, grads):
  """:math:`\\rho` and the next :math:`\\lambda` (Levenberg-Marquardt, every T1 updates)."""
  lam = state.damping
  nan = jnp.asarray(jnp.nan, lam.dtype)
  if not opts.adapt_damping:
    return nan, lam

  def measure():
    predicted, current = change, h
    if opts.learning_rate is not None:  # the model's value at the fixed-rate step
      model = lambda p: opts.model(p, data)  # noqa: E731
      loss = lambda out: opts.loss(out, data)  # noqa: E731
      q, b, current = _quadratic_terms(model, loss, params, lam, [step], grads)
      predicted = b[0] + 0.5 * q[0, 0]
    new_h = opts.loss(opts.model(optax.tree.add(params, step), data), data)
    rho = damping_lib.reduction_ratio(new_h - current, predicted).astype(lam.dtype)
    omega = opts.damping_decay**opts.damping_every
    new_lam = damping_lib.levenberg_marquardt(lam, rho, increase=1 / omega, decrease=omega)
    return rho, new_lam.astype(lam.dtype)

  adapt_now = state.count % opts.damping_every == opts.damping_every - 1
  return jax.lax.cond(adapt_now, measure, lambda: (nan, lam))


def _check_options(learning_rate, momentum, damping, damping_decay, num_samples) -> None:
  """Named errors for :func:`kfac`'s options (traced values pass)."""
  if learning_rate is not None:
    check_number(
      "kfac: learning_rate", learning_rate, lambda v: v > 0, "> 0, or None for the automatic one"
    )
  if learning_rate is None and not isinstance(momentum, jax.core.Tracer) and momentum != 0:
    raise ValueError(
      "kfac(learning_rate=None) chooses the momentum from the quadratic model; drop "
      f"momentum={momentum!r}, or give a learning_rate."
    )
  for name, value in (("damping", damping), ("damping_decay", damping_decay)):
    _positive(name, value)
  if isinstance(num_samples, jax.core.Tracer):
    raise TypeError(
      "num_samples fixes array shapes and must be a Python int, but it is traced (e.g. by "
      "optax.inject_hyperparams); pass static_args=('model_fn', 'loss_fn', 'num_samples')."
    )


def kfac(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  model_fn: Callable[..., Any],
  loss_fn: Callable[..., jax.Array],
  module: Any = None,
  curvature: kron.KroneckerCurvature = "ggn_sampled",
  num_samples: int | None = None,
  weight_sharing: kron.WeightSharing = "expand",
  damping: float = 1.0,
  adapt_damping: bool = True,
  damping_bounds: tuple[float, float] = (1e-12, 1e8),
  damping_every: int = 5,
  damping_decay: float = 0.95,
  momentum: float = 0.0,
  factor_decay: float = 0.95,
  factor_every: int = 1,
  inverse_every: int = 5,
  data_like: Any = None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""K-FAC (Martens & Grosse 2015): see the module docstring for the algorithm.

  Args:
    learning_rate: ``None`` (default) for the automatic learning rate and momentum of the
      quadratic model, or :math:`\eta` (a float or an optax schedule) for
      :math:`\delta = -\eta \Delta + m \delta_{prev}`.
    model_fn: ``model_fn(params, **data) -> outputs`` whose leaves have a leading example
      axis (with ``module``: ``model_fn(module, **data)``).
    loss_fn: ``loss_fn(outputs, **data) -> scalar``, a mean of per-example losses.
    module: a flax ``nnx.Module`` whose ``nnx.Param`` state is optimised (as for
      :func:`curvopt.newton_cg`).
    curvature: the factors' curvature: ``"ggn_sampled"`` (``num_samples`` Rademacher samples of
      the output Hessian's square root per example; exact for one output per example),
      ``"ggn"`` (exact, one backward pass per output dimension) or ``"fisher"`` (empirical).
    num_samples: samples per example of ``"ggn_sampled"`` (static; ``None`` means 1, and
      leaves it out of ``optax.inject_hyperparams``).
    weight_sharing: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023).
    damping: initial :math:`\lambda > 0`.
    adapt_damping: adapt :math:`\lambda` every ``damping_every`` updates (M&G §6.5).
    damping_bounds: ``(min, max)`` of :math:`\lambda`. The floor is low: the factored damping
      is :math:`\sqrt{\lambda}` per factor, and a PINN's curvature spans many decades (on the
      2-D Poisson problem a floor of 1e-8 instead stalls the error above 1e-6).
    damping_every: :math:`T_1`, updates between damping adaptations.
    damping_decay: :math:`\omega^{1/T_1}`; :math:`\lambda` changes by
      :math:`\omega = \mathrm{damping\_decay}^{T_1}` per adaptation.
    momentum: :math:`m` with a fixed ``learning_rate``; ``learning_rate=None`` chooses it.
    factor_decay: :math:`\epsilon`, the factors' moving-average decay.
    factor_every: updates between factor estimates.
    inverse_every: updates between inverse refreshes (:math:`T_3`).
    data_like: one batch of data keyword arguments (arrays or ``jax.ShapeDtypeStruct``), so
      that ``init`` allocates the factors; without it the first update does (the state then
      changes structure once: fine under ``jit``, not inside ``lax`` loops or
      ``nnx.Optimizer``).
    seed: seed of the sampling key.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: ``update(grads, state, params, **data)``,
    whose state is a :class:`KFACState`.

  Raises:
    ValueError: for invalid options, or data keyword arguments no function declares.

  Examples:
    Linear least squares: with exact curvature K-FAC is Gauss-Newton, so the first step
    (learning rate and damping chosen by the quadratic model) solves it.

    >>> X, y = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]), jnp.array([[1.0], [0.0], [2.0]])
    >>> model_fn = lambda w, x: x @ w
    >>> loss_fn = lambda z, y: 0.5 * jnp.mean((z - y) ** 2)
    >>> tx = kfac(model_fn=model_fn, loss_fn=loss_fn, curvature="ggn", damping=1e-10)
    >>> w = jnp.zeros((2, 1))
    >>> g = jax.grad(lambda w: loss_fn(model_fn(w, X), y))(w)
    >>> updates, state = tx.update(g, tx.init(w), w, x=X, y=y)
    >>> np.allclose(w + updates, jnp.linalg.lstsq(X, y)[0], atol=1e-4)
    True
  """
  _checks.check_choice("curvature", curvature, kron.CURVATURES)
  _checks.check_choice("weight_sharing", weight_sharing, kron.WEIGHT_SHARINGS)
  if model_fn is None or loss_fn is None:
    raise ValueError(
      "kfac needs model_fn=(params, **data) -> outputs and loss_fn=(outputs, **data)."
    )
  problem = Problem.build("kfac", model_fn, loss_fn, module)
  model_fn = problem.model_fn
  _check_options(learning_rate, momentum, damping, damping_decay, num_samples)
  num_samples = 1 if num_samples is None else int(num_samples)
  opts = _Options(
    model_fn, loss_fn, learning_rate, momentum, curvature, num_samples, weight_sharing,
    adapt_damping, damping_every, damping_decay, factor_decay, factor_every, inverse_every,
  )  # fmt: skip
  lo, hi = damping_bounds

  def init_fn(params):
    problem.check_params(params)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    factors = None
    if data_like is not None:
      shapes = jax.eval_shape(
        lambda p, d: _estimate(opts, p, d, jax.random.key(0)), params, data_like
      )
      factors = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    nan = jnp.asarray(jnp.nan, dtype)
    return KFACState(
      count=jnp.zeros((), jnp.int32),
      key=jax.random.key(seed),
      factors=factors,
      inverse=factors,
      velocity=optax.tree.zeros_like(params),
      damping=jnp.asarray(damping, dtype),
      info=KFACInfo(nan, nan, nan, nan, nan),
    )

  def update_fn(
    updates, state, params=None, *positional, value=None, grad=None, value_fn=None, **data
  ):
    del grad, value_fn  # the step is computed from the incoming updates and model/loss
    if params is None:
      raise ValueError("kfac needs params: call update(grads, state, params, **data).")
    problem.check_update(positional, data, None)
    try:
      step, state = _update(opts, updates, state, params, value, data)
    except (TypeError, ValueError) as error:
      if not raised_by_curvopt(error):
        problem.diagnose(error, params, data)
      raise
    return step, state._replace(damping=jnp.clip(state.damping, lo, hi))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
