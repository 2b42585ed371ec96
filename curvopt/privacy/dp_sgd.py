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

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks
from curvopt.privacy.clipping import (
  ClippedSum,
  ClipRecord,
  PerLayer,
  clip_record,
  clip_sum_grads,
  per_layer_mode,
  static_value,
)


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
    updates.get("clipping"),
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


def _check_constant(name: str, value: Any, *, zero_ok: bool = False, fix: str = "") -> None:
  """``ValueError`` unless a concrete ``value`` is finite and > 0 (>= 0 with ``zero_ok``).

  Traced values (``optax.inject_hyperparams`` under ``jit``) cannot be checked and pass.
  """
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, not a bool; got {value!r}.{fix}")
  v = static_value(value, name)
  if v is not None and not (math.isfinite(v) and (v >= 0 if zero_ok else v > 0)):
    bound = ">= 0" if zero_ok else "> 0"
    raise ValueError(f"{name} must be {bound} and finite; got {value!r}.{fix}")


def _check_record(result: ClippedSum, clip: float | None, mode: str, is_padding: Any) -> ClipRecord:
  """The ``ClippedSum``'s :class:`ClipRecord`, or a ``ValueError`` unless it is dp_sgd's clip.

  Static: raised while tracing, before any noise is drawn.
  """
  record = clip_record(result.clipping)
  if record is None:
    raise ValueError(
      "dp_sgd got a ClippedSum that does not record the clip it was built with (built by hand, "
      "or its 'clipping' field was dropped), so its noise cannot be checked against the clip "
      "actually applied. Build it with clipped_sum_fn(loss_fn, l2_norm_clip, ...), or pass "
      "per-example gradients, which dp_sgd clips itself."
    )
  if record.l2_norm_clip is None:
    raise ValueError(
      "dp_sgd got a ClippedSum built with a traced l2_norm_clip (an argument of a jitted or "
      "transformed function), so the clip it applied is unknown while dp_sgd is traced and the "
      "noise cannot be checked against it. Pass l2_norm_clip to clipped_sum_fn as a Python "
      "number."
    )
  if clip is None:
    raise ValueError(
      "dp_sgd's l2_norm_clip is a traced value (e.g. under optax.inject_hyperparams), so it "
      f"cannot be checked against the ClippedSum's clip ({record.l2_norm_clip}) while update is "
      "traced. Make it static (inject_hyperparams(dp_sgd, static_args=('key', 'l2_norm_clip'))) "
      "or pass per-example gradients, which dp_sgd clips itself."
    )
  if not math.isclose(record.l2_norm_clip, clip, rel_tol=1e-6):
    raise ValueError(
      f"dp_sgd(l2_norm_clip={clip}) got a ClippedSum clipped at {record.l2_norm_clip}: the noise "
      f"N(0, sigma^2 C^2) would be calibrated to C = {clip} while one example can move the sum "
      f"by up to {record.l2_norm_clip}, so privacy.epsilon(noise_multiplier, ...) would not be "
      "the privacy spent. Build the ClippedSum and dp_sgd with the same l2_norm_clip."
    )
  if record.mode != mode:
    raise ValueError(
      f"dp_sgd ({mode} clipping) got a ClippedSum built with {record.mode} clipping; build both "
      "with the same per_layer."
    )
  if is_padding is not None:
    if not record.padded:
      raise ValueError(
        "dp_sgd got is_padding= with a ClippedSum built without it: its padded rows were clipped "
        "and summed as real examples (poisson_sample pads with copies of example 0, which then "
        "counts several times). Pass is_padding to the clipped_sum_fn call instead."
      )
    if jnp.shape(is_padding) != (record.batch_size,):
      raise ValueError(
        f"is_padding has shape {jnp.shape(is_padding)} but the ClippedSum's batch has "
        f"{record.batch_size} rows."
      )
  return record


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
  differentially_private_aggregate``), which it clips itself, or a :class:`ClippedSum` from
  :func:`clipped_sum_fn` (e.g. with ``method="ghost"``, never materialising per-example
  gradients). Non-finite examples are dropped and counted in :class:`DPSGDState`. When
  ``params`` is passed, the gradients (less their example axis) or the ``ClippedSum``'s ``sum``
  must have its structure and leaf shapes, or a ``ValueError`` names the leaf.

  **The noise follows the clip actually applied.** A ``ClippedSum`` records its clip norm, mode
  and batch (:class:`~curvopt.privacy.clipping.ClipRecord`, a static value), and ``update``
  refuses, while tracing (eagerly, under ``jit`` and through ``nnx.Optimizer``) and so before
  any noise is drawn, one whose clip norm or ``per_layer`` mode differs from this
  transformation's, one without a record, one clipped at a traced norm (or a traced
  ``l2_norm_clip`` here against a ``ClippedSum``), and ``is_padding=`` given with a
  ``ClippedSum`` built without it (its padded rows were summed as examples).

  Through ``flax.nnx.Optimizer(model, dp_sgd(...), wrt=nnx.Param)``, pass the ``ClippedSum``
  itself: ``optimizer.update(model, clipped_sum_fn(loss_fn, C, method="ghost")(model, batch))``.
  nnx hands it over as a ``State`` holding only the fields its filter keeps (the ``sum``, the
  record, which is an ``nnx.Param`` for a Module, and per-layer ``norms``), which is recognised;
  the dropped and clipped counts are then reported as -1 (unknown). Read the counts from the
  ``ClippedSum``, and the state's fields through ``optimizer.opt_state[0].<field>`` (an
  ``nnx.OptArray``; ``field[...]`` gives the array).

  Args:
    l2_norm_clip: the clip norm :math:`C > 0`, finite.
    noise_multiplier: :math:`\sigma \ge 0`, finite.
    key: a ``jax.random`` key, a raw ``uint32[2]`` key or an int seed; it lives in the state
      and is split each step.
    expected_batch_size: :math:`\bar B > 0`; ``None`` uses the input's leading-axis size.
    per_layer: ``False``, ``True``/``"uniform"`` or ``"size"`` (see :func:`clipped_grad`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with :class:`DPSGDState`.

  Raises:
    ValueError: at construction, for a negative, zero or infinite ``l2_norm_clip``, a negative
      or infinite ``noise_multiplier`` or a non-finite or non-positive ``expected_batch_size``;
      in ``update``, for the mismatches above.

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
  _check_constant("l2_norm_clip", l2_norm_clip, fix=" The noise is calibrated to it.")
  _check_constant("noise_multiplier", noise_multiplier, zero_ok=True)
  if expected_batch_size is not None:
    _check_constant("expected_batch_size", expected_batch_size, fix=" (sample_rate * N)")
  key = _checks.as_key(key)
  mode = per_layer_mode(per_layer)
  clip = static_value(l2_norm_clip)

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
      record = _check_record(result, clip, mode, is_padding)
      size = record.batch_size
      noise_clip = max(clip, record.l2_norm_clip)  # never below the clip actually applied
    else:
      size = _checks.batch_size(updates, "updates (per-example gradients)")
      if params is not None:
        _check_matches_params(updates, params, "per-example gradients", leading_axis=True)
      result = clip_sum_grads(updates, is_padding, l2_norm_clip, mode)
      noise_clip = l2_norm_clip
    denominator = size if expected_batch_size is None else expected_batch_size
    next_key, noise_key = jax.random.split(state.key)
    keys = optax.tree.split_key_like(noise_key, result.sum)

    def noisy_mean(s, k):
      dtype = jnp.promote_types(s.dtype, jnp.float32)
      noise = jax.random.normal(k, s.shape, dtype)
      out = (s.astype(dtype) + (noise_multiplier * noise_clip) * noise) / denominator
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


def _check_momentum(momentum: Any, nesterov: bool) -> None:
  m = None if momentum is None else static_value(momentum, "momentum")
  if m is not None and not 0.0 <= m < 1.0:
    raise ValueError(f"momentum must be in [0, 1) (or None for plain SGD); got {momentum!r}.")
  if nesterov and momentum is None:
    raise ValueError("nesterov=True needs momentum (e.g. momentum=0.9); got momentum=None.")


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
    learning_rate: a float > 0 or an optax schedule.
    l2_norm_clip: the clip norm :math:`C > 0`.
    noise_multiplier: :math:`\sigma \ge 0`.
    key: a ``jax.random`` key or an int seed for the noise.
    expected_batch_size: :math:`\bar B`; ``None`` uses the leading-axis size.
    momentum: optional heavy-ball momentum in :math:`[0, 1)` (``None`` for plain SGD).
    nesterov: use Nesterov momentum (needs ``momentum``).
    per_layer: ``False``, ``True``/``"uniform"`` or ``"size"``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a constant ``learning_rate`` that is not finite and > 0, a ``momentum``
      outside :math:`[0, 1)`, ``nesterov`` without ``momentum``, or what :func:`dp_aggregate`
      refuses.

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
  if not callable(learning_rate):
    _check_constant("learning_rate", learning_rate, fix=" (or pass an optax schedule)")
  _check_momentum(momentum, nesterov)
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
