r"""DP-SGD (Abadi et al. 2016) as optax transformations: clip, sum, noise, divide.

.. math::

  \tilde g = \frac{1}{\bar B}\Big(\sum_{i} \min\big(1, \tfrac{C}{\|g_i\|}\big)\, g_i
  + \mathcal N(0, \sigma^2 C^2 I)\Big),

with :math:`\bar B` the *expected* batch size (a constant, so the noise scale does not depend on
the data). Two ways in: per-example gradients (a leading example axis, as optax's
``differentially_private_aggregate`` expects), or the :class:`~curvopt.privacy.clipping.ClippedSum`
that :func:`~curvopt.privacy.clipping.clipped_sum_fn` computes straight from ``loss_fn`` (with
``method="ghost"`` no per-example gradient is ever materialised). Either way the
privacy-relevant steps (noise on the sum, division by the expected batch size) are the same.
The privacy spent is :func:`curvopt.privacy.epsilon`.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks
from curvopt.privacy.clipping import ClippedSum, PerLayer, clip_sum_grads, per_layer_mode


class DPSGDState(NamedTuple):
  """State of :func:`dp_aggregate` (the first element of :func:`dp_sgd`'s state).

  Attributes:
    key: the PRNG key for the next step's noise.
    count: number of steps taken, int32.
    num_dropped: non-finite examples dropped so far (all steps), int32.
    last_num_dropped: non-finite examples dropped at the last step, int32; -1 when unknown
      (a :class:`ClippedSum` passed through ``nnx.Optimizer(..., wrt=...)``, whose filter drops
      the counts: read them from the ``ClippedSum`` itself).
    last_num_clipped: examples scaled down at the last step, int32; -1 when unknown.
  """

  key: jax.Array
  count: jax.Array
  num_dropped: jax.Array
  last_num_dropped: jax.Array
  last_num_clipped: jax.Array


def _as_clipped_sum(updates: Any, params: Any) -> ClippedSum | None:
  """``updates`` as a :class:`ClippedSum`, or ``None`` for per-example gradients.

  ``nnx.Optimizer.update`` passes its gradients through ``nnx.state(grads, wrt)``, which turns
  a :class:`ClippedSum` into a ``State`` mapping of its fields, keeping only the fields that
  ``wrt`` selects (``sum``, and per-layer ``norms``; the counts are plain arrays and go). Such a
  mapping is recognised by its keys and by its ``sum`` having ``params``' structure (which a
  model with a top-level parameter called ``sum`` would not).
  """
  if isinstance(updates, ClippedSum):
    return updates
  if params is None or not isinstance(updates, Mapping):
    return None
  keys = set(updates.keys())
  if "sum" not in keys or not keys <= set(ClippedSum._fields):
    return None
  if jax.tree.structure(updates["sum"]) != jax.tree.structure(params):
    return None
  unknown = jnp.full((), -1, jnp.int32)
  return ClippedSum(
    updates["sum"],
    updates.get("norms"),
    updates.get("num_examples", unknown),
    updates.get("num_dropped", unknown),
    updates.get("num_clipped", unknown),
  )


def _check_matches_params(tree: Any, params: Any, what: str, leading_axis: bool) -> None:
  """``ValueError`` naming the leaf unless ``tree`` (less a leading axis) is shaped like params."""
  like = jax.tree.map(
    lambda g: jax.ShapeDtypeStruct(jnp.shape(g)[1:] if leading_axis else jnp.shape(g), g.dtype),
    tree,
  )
  try:
    _checks.check_same_structure(params, like, "params", what)
  except ValueError as e:
    raise ValueError(
      f"{e} dp_sgd's update needs {what} for every parameter leaf"
      + (", with a leading example axis" if leading_axis else "")
      + "; compute them from the same params that are passed to update()."
    ) from None


def dp_aggregate(
  l2_norm_clip: Any,
  noise_multiplier: Any,
  key: jax.Array | int,
  *,
  expected_batch_size: int | None = None,
  per_layer: PerLayer = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Optax transformation: clip per example, sum, add Gaussian noise, divide (DP-SGD's core).

  .. math::

    \tilde g = \frac{1}{\bar B}\Big(\sum_i w_i g_i + \sigma C\, \xi\Big),\qquad
    w_i = \min\big(1, C/\|g_i\|\big),\quad \xi \sim \mathcal N(0, I).

  The noise is added to the **sum** (its standard deviation :math:`\sigma C` is the
  sensitivity times the noise multiplier) and then divided, with everything else, by
  :math:`\bar B` = ``expected_batch_size``: under Poisson sampling, dividing by the realised
  batch size would make the noise scale depend on the data. ``expected_batch_size=None``
  divides by the static leading-axis size ``B`` of the input (the padded size with padding:
  data-independent, but for Poisson sampling pass ``sample_rate * num_examples``). The noise
  is drawn and added in (at least) float32, then cast to the gradient's dtype.

  ``update(updates, state, params=None, *, is_padding=None)`` takes either per-example
  gradients (a leading example axis on every leaf, as ``optax.contrib.
  differentially_private_aggregate``), or a :class:`ClippedSum` from :func:`clipped_sum_fn`
  (e.g. with ``method="ghost"``, never materialising per-example gradients); ``is_padding`` is
  ignored for a :class:`ClippedSum`, which already applied it (as were its own clip and
  ``per_layer``: build it with the same ``l2_norm_clip``). Non-finite examples are
  dropped and counted in :class:`DPSGDState`. When ``params`` is passed, the gradients (less
  their example axis) or the ``ClippedSum``'s ``sum`` must have its structure and leaf shapes,
  or a ``ValueError`` names the leaf.

  Through ``flax.nnx.Optimizer(model, dp_sgd(...), wrt=nnx.Param)``, pass the ``ClippedSum``
  itself: ``optimizer.update(model, clipped_sum_fn(loss_fn, C, method="ghost")(model, batch))``.
  nnx hands it over as a ``State`` holding only the fields its filter keeps (the ``sum``, and
  per-layer ``norms``), which is recognised; the dropped and clipped counts are then reported as
  -1 (unknown) and a global-clipping ``ClippedSum`` needs ``expected_batch_size``. Read the counts
  from the ``ClippedSum``, and the state's fields through ``optimizer.opt_state[0].<field>``
  (an ``nnx.OptArray``; ``field[...]`` gives the array).

  Args:
    l2_norm_clip: the clip norm :math:`C \ge 0`.
    noise_multiplier: :math:`\sigma \ge 0`.
    key: a ``jax.random`` key, a raw ``uint32[2]`` key or an int seed; it lives in the state
      and is split each step.
    expected_batch_size: :math:`\bar B > 0`; ``None`` uses the input's leading-axis size.
    per_layer: ``False``, ``True``/``"uniform"`` or ``"size"`` (see :func:`clipped_grad`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with :class:`DPSGDState`.

  Examples:
    With :math:`\sigma = 0` it is the clipped sum over :math:`\bar B`:

    >>> tx = dp_aggregate(1.0, 0.0, key=0, expected_batch_size=4)
    >>> g = jnp.array([[3.0, 4.0], [0.6, 0.0]])
    >>> out, state = tx.update(g, tx.init(jnp.zeros(2)))
    >>> np.round(np.asarray(out, float), 4).tolist()
    [0.3, 0.2]

  References:
    Abadi et al., "Deep learning with differential privacy", CCS 2016.
  """
  _checks.check_nonnegative("l2_norm_clip", l2_norm_clip)
  _checks.check_nonnegative("noise_multiplier", noise_multiplier)
  if expected_batch_size is not None and not expected_batch_size > 0:
    raise ValueError(
      f"expected_batch_size must be > 0 (sample_rate * num_examples); got {expected_batch_size!r}."
    )
  key = _checks.as_key(key)
  mode = per_layer_mode(per_layer)

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.int32)
    return DPSGDState(key, zero, zero, zero, zero)

  def update_fn(updates, state, params=None, *, is_padding=None, **extra_args):
    del extra_args
    result = _as_clipped_sum(updates, params)
    if result is not None:
      if params is not None:
        _check_matches_params(result.sum, params, "the ClippedSum's sum", leading_axis=False)
      size = None if result.norms is None else jnp.shape(jax.tree.leaves(result.norms)[0])[0]
    else:
      size = _checks.batch_size(updates, "updates (per-example gradients)")
      if params is not None:
        _check_matches_params(updates, params, "per-example gradients", leading_axis=True)
      result = clip_sum_grads(updates, is_padding, l2_norm_clip, mode)
    if expected_batch_size is not None:
      denominator = expected_batch_size
    elif size is not None:
      denominator = size
    else:
      raise ValueError(
        "dp_sgd got a ClippedSum without its norms (nnx.Optimizer(..., wrt=...) keeps only the "
        "fields its filter selects), so the batch size is unknown: pass expected_batch_size= to "
        "dp_sgd (with Poisson sampling, sample_rate * num_examples)."
      )
    next_key, noise_key = jax.random.split(state.key)
    keys = optax.tree.split_key_like(noise_key, result.sum)

    def noisy_mean(s, k):
      dtype = jnp.promote_types(s.dtype, jnp.float32)
      noise = jax.random.normal(k, s.shape, dtype)
      out = (s.astype(dtype) + (noise_multiplier * l2_norm_clip) * noise) / denominator
      return out.astype(s.dtype)

    if isinstance(noise_multiplier, int | float) and noise_multiplier == 0:
      out = jax.tree.map(lambda s: s / jnp.asarray(denominator, s.dtype), result.sum)
    else:
      out = jax.tree.map(noisy_mean, result.sum, keys)
    new_state = DPSGDState(
      next_key,
      optax.safe_increment(state.count),
      state.num_dropped + jnp.maximum(result.num_dropped, 0),  # -1: unknown (see below)
      result.num_dropped,
      result.num_clipped,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_sgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  l2_norm_clip: Any,
  noise_multiplier: Any,
  key: jax.Array | int,
  expected_batch_size: int | None = None,
  momentum: float | None = None,
  nesterov: bool = False,
  per_layer: PerLayer = False,
) -> optax.GradientTransformationExtraArgs:
  r"""DP-SGD: :func:`dp_aggregate` followed by SGD (optionally with momentum).

  ``optax.chain(dp_aggregate(...), optax.sgd(learning_rate, momentum, nesterov))``; the state
  is a tuple whose first element is :class:`DPSGDState` (noise key, step count, dropped and
  clipped counts). ``update`` takes per-example gradients (leading example axis) or a
  :class:`ClippedSum`, and the ``is_padding=`` mask as an extra argument. The privacy spent
  is :func:`curvopt.privacy.epsilon` with ``sample_rate = expected_batch_size / N`` and the
  number of steps taken; that accounting assumes Poisson sampling
  (:func:`curvopt.privacy.poisson_sample`).

  Args:
    learning_rate: a float or an optax schedule.
    l2_norm_clip: the clip norm :math:`C \ge 0`.
    noise_multiplier: :math:`\sigma \ge 0`.
    key: a ``jax.random`` key or an int seed for the noise.
    expected_batch_size: :math:`\bar B`; ``None`` uses the leading-axis size.
    momentum: optional heavy-ball momentum (``None`` for plain SGD).
    nesterov: use Nesterov momentum.
    per_layer: ``False``, ``True``/``"uniform"`` or ``"size"``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> opt = dp_sgd(0.5, l2_norm_clip=1.0, noise_multiplier=0.0, key=0)
    >>> params = jnp.zeros(2)
    >>> g = jnp.array([[3.0, 4.0], [0.6, 0.0]])
    >>> updates, state = opt.update(g, opt.init(params), params)
    >>> np.round(np.asarray(updates, float), 4).tolist()
    [-0.3, -0.2]

  References:
    Abadi et al., "Deep learning with differential privacy", CCS 2016.
  """
  return optax.chain(
    dp_aggregate(
      l2_norm_clip,
      noise_multiplier,
      key,
      expected_batch_size=expected_batch_size,
      per_layer=per_layer,
    ),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )
