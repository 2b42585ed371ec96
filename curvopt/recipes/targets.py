r"""Stop-gradient targets for temporal-difference learning.

In semi-gradient TD learning the bootstrapped target :math:`r_t + \gamma_t v(s_t)` is treated
as a constant: differentiating the squared error only through the prediction
:math:`v(s_{t-1})` makes ``-grad`` of the loss equal to the classic TD(0) update
:math:`\delta_t \nabla_\theta v(s_{t-1})`. The target therefore goes through
:func:`jax.lax.stop_gradient`. Names follow rlax's time-indexing convention: ``*_tm1`` at time
``t-1``, ``*_t`` at time ``t``.

Everything here is a pure function of arrays, so ``jax.vmap`` gives the batched version and
``jax.jit(jax.vmap(jax.grad(td0_loss...)))`` gives per-transition gradients in one program.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from curvopt._typing import Params

ValueFn = Callable[[Params, Any], jax.Array]


def td_target(r_t: ArrayLike, discount_t: ArrayLike, v_t: ArrayLike) -> jax.Array:
  r"""One-step bootstrapped target :math:`r_t + \gamma_t v_t`, with gradients stopped.

  Args:
    r_t: reward at time ``t``.
    discount_t: discount :math:`\gamma_t` at time ``t`` (0 at a terminal transition).
    v_t: value estimate of the state at time ``t``.

  Returns:
    ``stop_gradient(r_t + discount_t * v_t)``, broadcast over the inputs.

  Examples:
    >>> float(td_target(1.0, 0.5, 4.0))
    3.0
    >>> float(jax.grad(lambda v: td_target(1.0, 0.5, v))(4.0))
    0.0

  References:
    Sutton, "Learning to predict by the methods of temporal differences", Machine Learning 1988.
  """
  return jax.lax.stop_gradient(jnp.asarray(r_t) + jnp.asarray(discount_t) * jnp.asarray(v_t))


def td0_loss(
  value_fn: ValueFn,
  params: Params,
  s_tm1: Any,
  r_t: ArrayLike,
  s_t: Any,
  discount: ArrayLike = 1.0,
) -> jax.Array:
  r"""Semi-gradient TD(0) loss :math:`\tfrac12 (r_t + \gamma v_\theta(s_t) - v_\theta(s_{t-1}))^2`.

  The target is stop-gradiented (:func:`td_target`), so

  .. math:: -\nabla_\theta \mathcal L = \delta_t\, \nabla_\theta v_\theta(s_{t-1}),
     \qquad \delta_t = r_t + \gamma v_\theta(s_t) - v_\theta(s_{t-1}),

  which is the TD(0) update. For a batch of transitions, ``jax.vmap`` over
  ``(s_tm1, r_t, s_t)`` (and ``discount`` if it varies), keeping ``params`` unbatched.

  Args:
    value_fn: ``(params, state) -> scalar`` value estimate.
    params: parameters of ``value_fn``, any pytree.
    s_tm1: state at time ``t-1`` (the one whose value is updated).
    r_t: reward received on the transition to ``s_t``.
    s_t: state at time ``t``.
    discount: discount :math:`\gamma` (0 for a terminal ``s_t``).

  Returns:
    A scalar loss.

  Examples:
    The advanced-autodiff tutorial's linear value function:

    >>> value_fn = lambda theta, s: theta @ s
    >>> theta = jnp.array([0.1, -0.1, 0.0])
    >>> s_tm1, s_t = jnp.array([1.0, 2.0, -1.0]), jnp.array([2.0, 1.0, 0.0])
    >>> update = -jax.grad(td0_loss, argnums=1)(value_fn, theta, s_tm1, 1.0, s_t)
    >>> np.round(np.asarray(update, float), 6).tolist()
    [1.2, 2.4, -1.2]

  References:
    Sutton and Barto, "Reinforcement Learning: An Introduction", 2nd ed. 2018, §9.3
    (semi-gradient methods).
  """
  v_tm1 = value_fn(params, s_tm1)
  target = td_target(r_t, discount, value_fn(params, s_t))
  return 0.5 * (target - v_tm1) ** 2


def lambda_returns(
  r_t: ArrayLike, discount_t: ArrayLike, v_t: ArrayLike, lambda_: ArrayLike = 1.0
) -> jax.Array:
  r"""TD(λ) returns of a trajectory (time-major), with gradients stopped.

  Computed backwards in time with :func:`jax.lax.scan`:

  .. math:: G_t = r_t + \gamma_t \big[(1 - \lambda_t) v_t + \lambda_t G_{t+1}\big],
     \qquad G_{T} := v_{T-1} \ \text{(bootstrap from the last value)}.

  ``lambda_=0`` gives one-step TD targets :math:`r_t + \gamma_t v_t`; ``lambda_=1`` gives
  Monte-Carlo returns bootstrapped from ``v_t[-1]``. ``v_t[i]`` is the value of the state
  reached *after* reward ``r_t[i]`` (rlax's convention). Batch with
  ``jax.vmap(lambda_returns, in_axes=1, out_axes=1)`` for ``[T, B]`` inputs.

  Args:
    r_t: rewards, shape ``[T]``.
    discount_t: discounts, shape ``[T]`` (0 where the episode terminates).
    v_t: bootstrap values, shape ``[T]``.
    lambda_: scalar or ``[T]`` mixing coefficients in ``[0, 1]``.

  Returns:
    The returns :math:`G_0, \dots, G_{T-1}`, shape ``[T]``, stop-gradiented.

  Raises:
    ValueError: if the inputs are not 1-D arrays of one length.

  Examples:
    >>> r_t, discount_t, v_t = jnp.ones(3), jnp.full(3, 0.5), jnp.array([0.0, 0.0, 8.0])
    >>> lambda_returns(r_t, discount_t, v_t, lambda_=1.0).tolist()   # 1 + .5(1 + .5(1 + .5*8))
    [2.75, 3.5, 5.0]
    >>> lambda_returns(r_t, discount_t, v_t, lambda_=0.0).tolist()   # r + γ v
    [1.0, 1.0, 5.0]

  References:
    Sutton and Barto, "Reinforcement Learning: An Introduction", 2nd ed. 2018, §12.1.
  """
  r_t, discount_t, v_t = jnp.asarray(r_t), jnp.asarray(discount_t), jnp.asarray(v_t)
  if r_t.ndim != 1 or r_t.shape != discount_t.shape or r_t.shape != v_t.shape:
    raise ValueError(
      "lambda_returns takes time-major 1-D r_t, discount_t, v_t of one length; got shapes "
      f"{r_t.shape}, {discount_t.shape}, {v_t.shape}. Use jax.vmap for batches."
    )
  dtype = jnp.result_type(r_t, discount_t, v_t)
  lambda_t = jnp.broadcast_to(jnp.asarray(lambda_, dtype), r_t.shape)

  def step(g_tp1, xs):
    r, discount, v, lam = xs
    g = r + discount * ((1.0 - lam) * v + lam * g_tp1)
    return g, g

  _, returns = jax.lax.scan(
    step, v_t[-1].astype(dtype), (r_t, discount_t, v_t, lambda_t), reverse=True
  )
  return jax.lax.stop_gradient(returns.astype(dtype))
