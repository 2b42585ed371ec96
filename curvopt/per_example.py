r"""Per-example gradients, per-example clipping and DP-SGD as optax transformations.

DP-SGD (Abadi et al. 2016) bounds each example's influence on an update by clipping its gradient
:math:`g_i` to norm at most :math:`C`, then adds Gaussian noise to the **sum**:

.. math::

  \tilde g = \frac{1}{\bar B}\Big(\sum_{i} \min\big(1, \tfrac{C}{\|g_i\|}\big)\, g_i
  + \mathcal N(0, \sigma^2 C^2 I)\Big),

with :math:`\bar B` the *expected* batch size (a constant, so the noise scale does not depend on
the data). Examples with a large norm are scaled **down**; examples with a norm below :math:`C`
are left alone.

Everything here is built from one function shape, shared with :mod:`curvopt.ghost`::

  <method>_clipped_sum(loss_fn, params, batch, weight_fn) -> (weighted_sum, sq_norms)

The method computes the per-example squared norms (a pytree of ``(B,)`` vectors, one per
parameter leaf), asks ``weight_fn`` for the per-example weights, and returns
:math:`\sum_i w_i g_i`. This module owns the clipping *policy* (clip factors, the
``is_padding`` mask, dropping non-finite examples, the final division); the method only
supplies norms and one weighted contraction. ``method="vmap"`` materialises the per-example
gradients with ``vmap(grad)`` and contracts them with ``tensordot(weights, grads)`` once per
leaf (scaling each example inside ``vmap`` and summing was measured 50x slower on XLA:CPU);
``method="ghost"`` never materialises them (see :mod:`curvopt.ghost`).

Fixed shapes for ``jit``: a Poisson-sampled batch varies in size, so it is padded to a static
size and passed with a boolean ``is_padding`` mask (see :func:`curvopt.privacy.poisson_sample`);
padded examples get weight 0 and nothing recompiles when the realised size changes.

NaN safety: an example whose gradient norm is not finite gets weight 0 (through ``jnp.where``,
never ``0 * nan``), is counted, and cannot poison the sum.

Two ways into DP-SGD (:func:`dp_sgd`, :func:`dp_aggregate`): pass per-example gradients (a
leading example axis, as optax's ``differentially_private_aggregate`` expects), or pass the
:class:`ClippedSum` that :func:`clipped_sum_fn` computes straight from ``loss_fn`` — with
``method="ghost"`` no per-example gradient is ever materialised. The transformation then only
adds the noise and divides, so the privacy-relevant steps are the same on both paths.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any
Batch = Any
LossFn = Callable[[Params, Any], jax.Array]
WeightFn = Callable[[Any], Any]
Method = Literal["vmap", "ghost"]
METHODS = ("vmap", "ghost")
PerLayer = bool | Literal["uniform", "size"]
PER_LAYER = (False, True, "uniform", "size")


# ------------------------------------------------------------------------------------------
# Argument checks.


def _batch_size(batch: Batch, name: str = "batch") -> int:
  """The common leading-axis size of ``batch``'s leaves; ``ValueError`` if they disagree."""
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError(f"{name} has no array leaves; pass a pytree of arrays with an example axis.")
  sizes = {}
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} is a scalar; every leaf of {name} needs a leading "
        "example axis."
      )
    sizes[jax.tree_util.keystr(path)] = shape[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(
      f"The leaves of {name} disagree on the leading (example) axis: {sizes}. Every leaf must "
      "have the same number of examples along axis 0."
    )
  return next(iter(sizes.values()))


def _check_nonnegative(name: str, value: Any) -> None:
  """``ValueError`` for a concrete negative (or NaN) ``value``; traced values pass."""
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if not v >= 0.0:
    raise ValueError(f"{name} must be >= 0; got {value!r}.")


def _check_is_padding(is_padding: Any, batch_size: int) -> jax.Array:
  is_padding = jnp.asarray(is_padding)
  if is_padding.shape != (batch_size,):
    raise ValueError(
      f"is_padding must have shape ({batch_size},) (one flag per example); got {is_padding.shape}."
    )
  if is_padding.dtype != jnp.bool_:
    raise TypeError(f"is_padding must be a boolean mask; got dtype {is_padding.dtype}.")
  return is_padding


def _per_layer_mode(per_layer: PerLayer) -> Literal["global", "uniform", "size"]:
  if per_layer is False:
    return "global"
  if per_layer is True or per_layer == "uniform":
    return "uniform"
  if per_layer == "size":
    return "size"
  raise ValueError(f"Unknown per_layer {per_layer!r}; expected one of {PER_LAYER}.")


# ------------------------------------------------------------------------------------------
# Per-example gradients.


def per_example_grads(
  loss_fn: LossFn, params: Params, batch: Batch, *, chunk_size: int | None = None
) -> Params:
  r"""Gradients :math:`g_i = \nabla_\theta \ell(\theta, x_i)` of every example of a batch.

  ``vmap(grad(loss_fn), in_axes=(None, 0))``: each leaf of the result has ``params``' leaf
  shape with a leading example axis. With ``chunk_size``, the batch is processed ``chunk_size``
  examples at a time by :func:`jax.lax.map` (a sequential loop over vmapped chunks, the last
  one possibly smaller), so the intermediate activations stay bounded; the result is the same.
  Wrap the call in :func:`jax.jit` for speed.

  Args:
    loss_fn: ``(params, example) -> scalar`` for ONE example (``example`` is ``batch`` without
      its leading axis).
    params: any pytree of arrays.
    batch: pytree of arrays sharing a leading example axis of size ``B``.
    chunk_size: optional number of examples processed at once.

  Returns:
    A pytree with ``params``' structure, leaves of shape ``(B, *leaf.shape)``.

  Raises:
    ValueError: if the leaves of ``batch`` disagree on the leading axis, or ``chunk_size < 1``.

  Examples:
    For :math:`\ell(w, x) = \tfrac12 (w \cdot x)^2` the gradient is :math:`(w \cdot x)\, x`.

    >>> X = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> per_example_grads(lambda w, x: 0.5 * (w @ x) ** 2, jnp.ones(2), X).tolist()
    [[1.0, 0.0], [3.0, 6.0]]
  """
  _batch_size(batch)
  grad_fn = jax.grad(loss_fn)
  if chunk_size is None:
    return jax.vmap(grad_fn, in_axes=(None, 0))(params, batch)
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")
  return jax.lax.map(lambda x: grad_fn(params, x), batch, batch_size=int(chunk_size))


# ------------------------------------------------------------------------------------------
# The method functions: (loss_fn, params, batch, weight_fn) -> (weighted_sum, sq_norms).


def _sq_norms_of(grads: Params) -> Params:
  """Per-example squared norms of each leaf of per-example gradients: leaves ``(B,)``."""
  return jax.tree.map(lambda g: jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1), grads)


def _weighted_sum(weights: Params, grads: Params) -> Params:
  """``Σ_i w_i g_i`` per leaf, one ``tensordot``; weight-0 examples contribute exactly 0."""

  def leaf_sum(w, g):
    w = w.astype(g.dtype)
    keep = (w != 0).reshape((-1,) + (1,) * (g.ndim - 1))
    return jnp.tensordot(w, jnp.where(keep, g, jnp.zeros((), g.dtype)), axes=1)

  return jax.tree.map(leaf_sum, weights, grads)


def _vmap_clipped_sum(
  loss_fn: LossFn, params: Params, batch: Batch, weight_fn: WeightFn
) -> tuple[Params, Params]:
  """The ``"vmap"`` method: materialise per-example gradients, then one contraction per leaf."""
  grads = per_example_grads(loss_fn, params, batch)
  sq_norms = _sq_norms_of(grads)
  return _weighted_sum(weight_fn(sq_norms), grads), sq_norms


def _chunked_clipped_sum(
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  weights_of: Callable[[Params, jax.Array], Params],
  is_padding: jax.Array,
  chunk_size: int,
) -> tuple[Params, Params]:
  """``"vmap"`` over chunks inside ``lax.scan``; only one chunk of gradients is ever live.

  The clipping weights of an example depend only on its own norms (and padding flag), so each
  chunk is weighted and summed on its own. The batch is padded to a multiple of ``chunk_size``
  by repeating its first example, flagged as padding.
  """
  size = _batch_size(batch)
  num_chunks = -(-size // chunk_size)
  extra = num_chunks * chunk_size - size

  def pad_and_split(x):
    if extra:
      x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra, *x.shape[1:]))])
    return x.reshape(num_chunks, chunk_size, *x.shape[1:])

  chunks = jax.tree.map(pad_and_split, batch)
  pad_chunks = jnp.concatenate([is_padding, jnp.ones((extra,), bool)]).reshape(num_chunks, -1)

  def body(total, chunk):
    x, pad = chunk
    grads = per_example_grads(loss_fn, params, x)
    sq_norms = _sq_norms_of(grads)
    total = optax.tree.add(total, _weighted_sum(weights_of(sq_norms, pad), grads))
    return total, sq_norms

  init = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
  total, sq_norms = jax.lax.scan(body, init, (chunks, pad_chunks))
  sq_norms = jax.tree.map(lambda s: s.reshape(-1)[:size], sq_norms)
  return total, sq_norms


def _method_fn(method: Method) -> Callable[..., tuple[Params, Params]]:
  if method == "vmap":
    return _vmap_clipped_sum
  try:
    from curvopt.ghost import ghost_clipped_sum  # noqa: PLC0415 (lazy: ghost is optional)
  except ImportError as e:
    raise NotImplementedError(
      "method='ghost' needs curvopt.ghost.ghost_clipped_sum, which is not available in this "
      f"installation ({e}). Use method='vmap'."
    ) from e
  return ghost_clipped_sum


# ------------------------------------------------------------------------------------------
# The clipping policy.


class ClippedSum(NamedTuple):
  """The result of clipping a batch, before any division or noise.

  Attributes:
    sum: :math:`\\sum_i w_i g_i` over the real, finite examples, with ``params``' structure.
    norms: per-example gradient norms, shape ``(B,)`` (global clipping), or a pytree with
      ``params``' structure of per-leaf ``(B,)`` norms (per-layer clipping). Padded examples
      report 0; a non-finite example reports its non-finite norm.
    num_examples: number of real (non-padding) examples, int32.
    num_dropped: real examples dropped because their gradient norm was not finite, int32.
    num_clipped: real, finite examples scaled down (in at least one layer), int32.
  """

  sum: Params
  norms: Any
  num_examples: jax.Array
  num_dropped: jax.Array
  num_clipped: jax.Array


def _clip_norms(l2_norm_clip: Any, params: Params, mode: str) -> Params:
  """Per-leaf clip norms: ``C`` (global), ``C/√K`` (uniform) or ``C·√(D_k/D)`` (size)."""
  leaves = jax.tree.leaves(params)
  if mode == "uniform":
    return jax.tree.map(lambda _: l2_norm_clip / len(leaves) ** 0.5, params)
  if mode == "size":
    total = sum(jnp.size(p) for p in leaves)
    return jax.tree.map(lambda p: l2_norm_clip * (jnp.size(p) / total) ** 0.5, params)
  return l2_norm_clip


def _factor(norm: jax.Array, clip: Any) -> jax.Array:
  """``min(1, C/‖g‖)`` written so that C=0, C=inf and ‖g‖=0 need no special case."""
  clip = jnp.asarray(clip, norm.dtype)
  return jnp.where(norm > clip, clip / jnp.where(norm > clip, norm, 1), jnp.ones((), norm.dtype))


def _policy(
  sq_norms: Params, is_padding: jax.Array, l2_norm_clip: Any, mode: str, params: Params
) -> tuple[Params, Any, jax.Array, jax.Array]:
  """Clip weights from per-leaf squared norms: ``(weights, norms, dropped, clipped)`` masks."""
  leaf_norms = jax.tree.map(
    lambda s: jnp.sqrt(s.astype(jnp.promote_types(s.dtype, jnp.float32))), sq_norms
  )
  total_sq = sum(
    s.astype(jnp.promote_types(s.dtype, jnp.float32)) for s in jax.tree.leaves(sq_norms)
  )
  finite = jnp.isfinite(total_sq)
  keep = finite & ~is_padding
  if mode == "global":
    norms = jnp.sqrt(total_sq)
    factor = jnp.where(keep, _factor(norms, l2_norm_clip), 0)
    weights = jax.tree.map(lambda _: factor, sq_norms)
    clipped = keep & (factor < 1)
    norms = jnp.where(is_padding, 0, norms)
  else:
    clips = _clip_norms(l2_norm_clip, params, mode)
    weights = jax.tree.map(lambda n, c: jnp.where(keep, _factor(n, c), 0), leaf_norms, clips)
    clipped = keep & jnp.any(jnp.stack([w < 1 for w in jax.tree.leaves(weights)]), axis=0)
    norms = jax.tree.map(lambda n: jnp.where(is_padding, 0, n), leaf_norms)
  dropped = ~finite & ~is_padding
  return weights, norms, dropped, clipped


def clipped_sum_fn(
  loss_fn: LossFn,
  l2_norm_clip: Any,
  *,
  method: Method = "vmap",
  per_layer: PerLayer = False,
  chunk_size: int | None = None,
) -> Callable[..., ClippedSum]:
  r"""Returns ``fn(params, batch, is_padding=None) -> ClippedSum``: the clipped *sum*.

  The building block of :func:`clipped_grad` and of :func:`dp_sgd` without per-example
  gradients in memory: ``dp_sgd(...).update(clipped_sum_fn(loss_fn, C, method="ghost")(params,
  batch, is_padding), state, params)`` noises this sum exactly as it would noise the clipped
  sum of per-example gradients. Use the same ``l2_norm_clip`` in both (the privacy guarantee is
  that of the clip actually applied here).

  Args:
    loss_fn: ``(params, example) -> scalar`` for ONE example.
    l2_norm_clip: the clip norm :math:`C \ge 0` (``inf`` disables clipping).
    method: ``"vmap"`` (materialise per-example gradients) or ``"ghost"`` (ghost clipping,
      :mod:`curvopt.ghost`).
    per_layer: ``False`` for global clipping; ``True``/``"uniform"`` or ``"size"`` for
      per-layer clipping (see :func:`clipped_grad`).
    chunk_size: with ``method="vmap"``, process this many examples at a time (bounded memory).

  Returns:
    A function ``(params, batch, is_padding=None) -> ClippedSum``.
  """
  _check_nonnegative("l2_norm_clip", l2_norm_clip)
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
  mode = _per_layer_mode(per_layer)
  if chunk_size is not None:
    if method != "vmap":
      raise ValueError(f"chunk_size is only supported with method='vmap'; got method={method!r}.")
    if int(chunk_size) < 1:
      raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")
  method_fn = _method_fn(method)

  def fn(params: Params, batch: Batch, is_padding: Any = None) -> ClippedSum:
    size = _batch_size(batch)
    if is_padding is None:
      is_padding = jnp.zeros((size,), bool)
    is_padding = _check_is_padding(is_padding, size)

    def weights_of(sq_norms, pad):
      return _policy(sq_norms, pad, l2_norm_clip, mode, params)[0]

    if chunk_size is None:
      total, sq_norms = method_fn(loss_fn, params, batch, lambda s: weights_of(s, is_padding))
    else:
      total, sq_norms = _chunked_clipped_sum(
        loss_fn, params, batch, weights_of, is_padding, int(chunk_size)
      )
    _, norms, dropped, clipped = _policy(sq_norms, is_padding, l2_norm_clip, mode, params)
    count = lambda m: jnp.sum(m, dtype=jnp.int32)
    return ClippedSum(total, norms, count(~is_padding), count(dropped), count(clipped))

  return fn


def clipped_grad(
  loss_fn: LossFn,
  l2_norm_clip: Any,
  *,
  method: Method = "vmap",
  per_layer: PerLayer = False,
  chunk_size: int | None = None,
) -> Callable[..., tuple[Params, Any]]:
  r"""Returns ``fn(params, batch, is_padding=None) -> (mean clipped gradient, norms)``.

  .. math::

    \bar g = \frac{1}{n} \sum_{i:\ \text{real}} \min\Big(1, \frac{C}{\|g_i\|}\Big) g_i,

  where :math:`n` is the number of real (non-padding) examples: padded examples neither
  contribute nor count. An example whose gradient norm is not finite contributes 0 (it still
  counts in :math:`n`) and shows up as a non-finite entry of ``norms``.

  Per-layer clipping (``per_layer=True`` or ``"uniform"``) clips each parameter leaf of each
  example on its own to :math:`C_k = C/\sqrt{K}` for :math:`K` leaves; ``"size"`` uses
  :math:`C_k = C\sqrt{D_k/D}` with :math:`D_k` the leaf's size. Either way
  :math:`\sum_k C_k^2 = C^2`, so the concatenated clipped gradient still has norm at most
  :math:`C` and the DP sensitivity is unchanged (the split of optax's
  ``per_example_layer_norm_clip`` and of McMahan et al. 2018; Opacus's per-layer mode takes
  the per-layer clips from the user instead).

  Args:
    loss_fn: ``(params, example) -> scalar`` for ONE example (``example`` is ``batch``
      without its leading axis).
    l2_norm_clip: the clip norm :math:`C \ge 0` (``jnp.inf`` gives the plain mean gradient).
    method: ``"vmap"`` or ``"ghost"`` (norms without materialising per-example gradients;
      :mod:`curvopt.ghost`).
    per_layer: ``False`` (global clipping), ``True``/``"uniform"`` or ``"size"``.
    chunk_size: with ``method="vmap"``, the number of examples processed at once.

  Returns:
    ``fn(params, batch, is_padding=None)`` returning ``(mean, norms)``: ``mean`` has
    ``params``' structure; ``norms`` is the ``(B,)`` vector of per-example global gradient norms
    (before clipping), or with per-layer clipping a pytree with ``params``' structure of
    per-leaf ``(B,)`` norms. Padded examples have norm 0.

  Raises:
    ValueError: for a negative clip, an unknown ``method``/``per_layer``, or (when called) a
      ``batch`` whose leaves disagree on the leading axis or a mis-shaped ``is_padding``.
    NotImplementedError: for ``method="ghost"`` when :mod:`curvopt.ghost` is missing.

  Examples:
    Gradients of :math:`w \cdot x` are the examples; ``(3, 4)`` has norm 5 and is scaled down
    to norm 1, ``(0.6, 0)`` is left alone.

    >>> X = jnp.array([[3.0, 4.0], [0.6, 0.0]])
    >>> mean, norms = clipped_grad(lambda w, x: w @ x, 1.0)(jnp.zeros(2), X)
    >>> mean.round(4).tolist(), norms.round(4).tolist()
    ([0.6, 0.4], [5.0, 0.6])

  References:
    Abadi et al., "Deep learning with differential privacy", CCS 2016.
    McMahan et al., "Learning differentially private recurrent language models", ICLR 2018.
  """
  sum_fn = clipped_sum_fn(
    loss_fn, l2_norm_clip, method=method, per_layer=per_layer, chunk_size=chunk_size
  )

  def fn(params: Params, batch: Batch, is_padding: Any = None) -> tuple[Params, Any]:
    result = sum_fn(params, batch, is_padding)
    n = jnp.maximum(result.num_examples, 1)
    mean = jax.tree.map(lambda s: s / n.astype(s.dtype), result.sum)
    return mean, result.norms

  return fn


def _clip_sum_grads(grads: Params, is_padding: Any, l2_norm_clip: Any, mode: str) -> ClippedSum:
  """The clipping policy applied to given per-example gradients."""
  size = _batch_size(grads, "updates (per-example gradients)")
  if is_padding is None:
    is_padding = jnp.zeros((size,), bool)
  is_padding = _check_is_padding(is_padding, size)
  sq_norms = _sq_norms_of(grads)
  like = jax.tree.map(lambda g: g[0], grads)
  weights, norms, dropped, clipped = _policy(sq_norms, is_padding, l2_norm_clip, mode, like)
  count = lambda m: jnp.sum(m, dtype=jnp.int32)
  total = _weighted_sum(weights, grads)
  return ClippedSum(total, norms, count(~is_padding), count(dropped), count(clipped))


# ------------------------------------------------------------------------------------------
# optax transformations.


class ClipPerExampleState(NamedTuple):
  """State of :func:`clip_per_example`: diagnostics only.

  Attributes:
    num_dropped: non-finite examples dropped so far (all steps), int32.
    num_clipped: examples scaled down at the last step, int32.
  """

  num_dropped: jax.Array
  num_clipped: jax.Array


def clip_per_example(
  l2_norm_clip: Any, *, per_layer: PerLayer = False
) -> optax.GradientTransformationExtraArgs:
  r"""Optax transformation: per-example gradients in, mean of clipped gradients out.

  The input ``updates`` carry a leading example axis on every leaf (``vmap(grad)`` output, or
  :func:`per_example_grads`); the output is
  :math:`\frac1n \sum_i \min(1, C/\|g_i\|)\, g_i` over the ``n`` real examples (see
  :func:`clipped_grad` for the per-layer split). Pass ``is_padding=`` to ``update`` for padded
  batches. It must come first in an ``optax.chain``.

  This does not call ``optax.per_example_global_norm_clip`` because that maps a NaN clip
  factor to 1: one example with a non-finite gradient would poison the whole sum. Here such an
  example gets weight 0 and is counted in the state.

  Args:
    l2_norm_clip: the clip norm :math:`C \ge 0`.
    per_layer: ``False``, ``True``/``"uniform"`` or ``"size"``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update(updates, state,
    params=None, *, is_padding=None)`` returns the clipped mean.

  Examples:
    >>> tx = clip_per_example(1.0)
    >>> g = {"w": jnp.array([[3.0, 4.0], [0.6, 0.0]])}
    >>> out, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    >>> out["w"].round(4).tolist(), int(state.num_clipped)
    ([0.6, 0.4], 1)
  """
  _check_nonnegative("l2_norm_clip", l2_norm_clip)
  mode = _per_layer_mode(per_layer)

  def init_fn(params):
    del params
    return ClipPerExampleState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, is_padding=None, **extra_args):
    del params, extra_args
    result = _clip_sum_grads(updates, is_padding, l2_norm_clip, mode)
    n = jnp.maximum(result.num_examples, 1)
    mean = jax.tree.map(lambda s: s / n.astype(s.dtype), result.sum)
    return mean, ClipPerExampleState(state.num_dropped + result.num_dropped, result.num_clipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DPSGDState(NamedTuple):
  """State of :func:`dp_aggregate` (the first element of :func:`dp_sgd`'s state).

  Attributes:
    key: the PRNG key for the next step's noise.
    count: number of steps taken, int32.
    num_dropped: non-finite examples dropped so far (all steps), int32.
    last_num_dropped: non-finite examples dropped at the last step, int32.
    last_num_clipped: examples scaled down at the last step, int32.
  """

  key: jax.Array
  count: jax.Array
  num_dropped: jax.Array
  last_num_dropped: jax.Array
  last_num_clipped: jax.Array


def _as_key(key: Any) -> jax.Array:
  if isinstance(key, int):
    return jax.random.key(key)
  if not isinstance(key, jax.Array):
    raise TypeError(f"key must be a jax.random key or an int seed; got {type(key).__name__}.")
  return key


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
  dropped and counted in :class:`DPSGDState`.

  Args:
    l2_norm_clip: the clip norm :math:`C \ge 0`.
    noise_multiplier: :math:`\sigma \ge 0`.
    key: a ``jax.random`` key (or an int seed); it lives in the state and is split each step.
    expected_batch_size: :math:`\bar B > 0`; ``None`` uses the input's leading-axis size.
    per_layer: ``False``, ``True``/``"uniform"`` or ``"size"`` (see :func:`clipped_grad`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with :class:`DPSGDState`.

  Examples:
    With :math:`\sigma = 0` it is the clipped sum over :math:`\bar B`:

    >>> tx = dp_aggregate(1.0, 0.0, key=0, expected_batch_size=4)
    >>> g = jnp.array([[3.0, 4.0], [0.6, 0.0]])
    >>> out, state = tx.update(g, tx.init(jnp.zeros(2)))
    >>> out.round(4).tolist()
    [0.3, 0.2]

  References:
    Abadi et al., "Deep learning with differential privacy", CCS 2016.
  """
  _check_nonnegative("l2_norm_clip", l2_norm_clip)
  _check_nonnegative("noise_multiplier", noise_multiplier)
  if expected_batch_size is not None and not expected_batch_size > 0:
    raise ValueError(
      f"expected_batch_size must be > 0 (sample_rate * num_examples); got {expected_batch_size!r}."
    )
  key = _as_key(key)
  mode = _per_layer_mode(per_layer)

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.int32)
    return DPSGDState(key, zero, zero, zero, zero)

  def update_fn(updates, state, params=None, *, is_padding=None, **extra_args):
    del params, extra_args
    if isinstance(updates, ClippedSum):
      result = updates
      size = jnp.shape(jax.tree.leaves(result.norms)[0])[0]
    else:
      result = _clip_sum_grads(updates, is_padding, l2_norm_clip, mode)
      size = _batch_size(updates, "updates (per-example gradients)")
    denominator = size if expected_batch_size is None else expected_batch_size
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
      state.count + 1,
      state.num_dropped + result.num_dropped,
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
    >>> updates.round(4).tolist()
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
