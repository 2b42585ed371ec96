r"""Per-example clipping: the clipping policy, its methods (``vmap`` and ghost) and optax transform.

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
leaf (much faster on XLA:CPU than scaling each example inside ``vmap`` and summing);
``method="ghost"`` never materialises them (see :mod:`curvopt.ghost`).

Fixed shapes for ``jit``: a Poisson-sampled batch varies in size, so it is padded to a static
size and passed with a boolean ``is_padding`` mask (see :func:`curvopt.privacy.poisson_sample`);
padded examples get weight 0 and nothing recompiles when the realised size changes.

NaN safety, for every method, dtype and chunk size: a non-finite example is dropped (weight 0,
through ``jnp.where``, never ``0 * nan``), counted, and cannot poison the sum or another example's
norm. Weighting it by 0 after the batched pass is not enough, because XLA may mix examples inside
one batched operation (``vmap(grad)`` of a float64 convolution on CPU spreads one example's NaN
to every example's kernel gradient). So padded rows and rows with a NaN input are replaced by a
copy of a real example *before* the pass; if a non-finite value still arises inside the model
(an overflow, a NaN gradient), that batch's clipped sum is recomputed one example at a time (see
:func:`guarded_pass`). When every example is finite the guard costs one elementwise pass over the
inputs.

Two ways into DP-SGD (:func:`dp_sgd`, :func:`dp_aggregate`): pass per-example gradients (a
leading example axis, as optax's ``differentially_private_aggregate`` expects), or pass the
:class:`ClippedSum` that :func:`clipped_sum_fn` computes straight from ``loss_fn`` — with
``method="ghost"`` no per-example gradient is ever materialised. The transformation then only
adds the noise and divides, so the privacy-relevant steps are the same on both paths.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _nnx
from curvopt._typing import Batch, LossFn, Params
from curvopt.privacy.ghost import ghost_clipped_sum, norm_dtype
from curvopt.privacy.per_example import per_example_grads

WeightFn = Callable[[Any], Any]
Method = Literal["vmap", "ghost"]
METHODS = ("vmap", "ghost")
PerLayer = bool | Literal["uniform", "size"]
PER_LAYER = (False, True, "uniform", "size")


# ------------------------------------------------------------------------------------------
# Argument checks.


def _check_is_padding(is_padding: Any, batch_size: int) -> jax.Array:
  is_padding = jnp.asarray(is_padding)
  if is_padding.shape != (batch_size,):
    raise ValueError(
      f"is_padding must have shape ({batch_size},) (one flag per example); got {is_padding.shape}."
    )
  if is_padding.dtype != jnp.bool_:
    raise TypeError(f"is_padding must be a boolean mask; got dtype {is_padding.dtype}.")
  return is_padding


def per_layer_mode(per_layer: PerLayer) -> Literal["global", "uniform", "size"]:
  if per_layer is False:
    return "global"
  if per_layer is True or per_layer == "uniform":
    return "uniform"
  if per_layer == "size":
    return "size"
  raise ValueError(f"Unknown per_layer {per_layer!r}; expected one of {PER_LAYER}.")


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
  size = _checks.batch_size(batch)
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
  return _vmap_clipped_sum if method == "vmap" else ghost_clipped_sum


# ------------------------------------------------------------------------------------------
# Non-finite examples: found and masked before the batched pass, so none can poison another.


def _nan_rows(batch: Batch, size: int) -> jax.Array:
  """``(B,)`` mask of examples with a NaN in a floating input (``inf`` is allowed: masks)."""
  bad = jnp.zeros((size,), bool)
  for x in jax.tree.leaves(batch):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact) and x.size:
      bad = bad | jnp.any(jnp.isnan(x.reshape(size, -1)), axis=1)
  return bad


def _replace_rows(batch: Batch, drop: jax.Array) -> Batch:
  """``batch`` with every ``drop`` row replaced by the first kept row (unchanged if none).

  A dropped row's values never reach the batched pass: XLA may mix examples inside one batched
  operation (``vmap(grad)`` of a float64 convolution on CPU spreads one example's NaN to every
  example), so weighting it by 0 afterwards is not enough. A copy of a real example has a finite
  loss wherever that example has one, which zeros (e.g. under an input normalisation) need not.
  """
  if drop.shape[0] == 0:
    return batch
  donor = jnp.argmax(~drop)

  def leaf(x):
    x = jnp.asarray(x)
    mask = drop.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(mask, jax.lax.dynamic_index_in_dim(x, donor, keepdims=True), x)

  return jax.tree.map(leaf, batch)


def _total_sq(sq_norms: Params) -> jax.Array:
  return sum(s.astype(jnp.promote_types(s.dtype, jnp.float32)) for s in jax.tree.leaves(sq_norms))


def _one_at_a_time(
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  drop: jax.Array,
  weights_of: Callable[[Params, jax.Array], Params],
) -> tuple[Params, Params, jax.Array]:
  """The clipped sum by ``lax.scan`` over single examples: no example can touch another.

  Returns ``(weighted_sum, sq_norms, bad)`` with ``bad`` the examples whose loss or gradient
  is not finite (they get weight 0).
  """

  def body(total, xs):
    example, dropped = xs
    loss, grad = jax.value_and_grad(loss_fn)(params, example)
    sq = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(norm_dtype(g))))[None], grad)
    bad = ~jnp.isfinite(loss) | ~jnp.isfinite(_total_sq(sq))
    weights = weights_of(sq, dropped[None] | bad)
    total = jax.tree.map(
      lambda t, w, g: t + jnp.where(w[0] != 0, w[0].astype(g.dtype) * g, jnp.zeros((), g.dtype)),
      total,
      weights,
      grad,
    )
    return total, (jax.tree.map(lambda x: x[0], sq), bad[0])

  init = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
  total, (sq, bad) = jax.lax.scan(body, init, (batch, drop))
  return total, sq, bad & ~drop


def guarded_pass(
  run: Callable[[Batch, jax.Array], tuple[Params, Params]],
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  is_padding: jax.Array,
  weights_of: Callable[[Params, jax.Array], Params],
) -> tuple[Params, Params, jax.Array]:
  r"""Runs a batched clipping pass with every non-finite example kept out of it.

  ``run(batch, drop) -> (weighted_sum, sq_norms)`` is a method pass that gives the ``drop``
  rows weight 0. Padded rows and rows with a NaN input are replaced by a copy of a kept example
  *before* the pass (``_replace_rows``), so nothing non-finite enters it. When every kept
  example then has a finite norm (the usual case) that pass is the result, and the guard has cost
  one elementwise pass over the inputs.

  Otherwise a non-finite value arose inside the model (an overflow, a NaN gradient) and may have
  spread to other examples of the batched pass, so its norms cannot say which example is at
  fault. Then (``lax.cond``; eagerly, only then) the clipped sum is recomputed one example at a
  time (``lax.scan`` of ``value_and_grad``): exact, no example can touch another, and the
  examples whose loss or gradient is non-finite are dropped. That costs ``B`` single-example
  gradients, once per batch that needs it; its compiled code is a single-example gradient.

  Args:
    run: the method pass.
    loss_fn: ``(params, example) -> scalar``.
    params: the parameters.
    batch: the batch, leading example axis.
    is_padding: ``(B,)`` boolean padding mask.
    weights_of: ``(sq_norms, drop) -> weights``, the clipping policy's weights.

  Returns:
    ``(weighted_sum, sq_norms, bad)``: the clipped sum over the finite real examples, the
    squared norms with those of the dropped examples set to NaN, and the ``(B,)`` mask of the
    dropped real examples.
  """
  size = is_padding.shape[0]
  bad = _nan_rows(batch, size) & ~is_padding
  drop = is_padding | bad
  clean = _replace_rows(batch, drop)
  total, sq = run(clean, drop)

  def one_at_a_time(_):
    seq_total, seq_sq, seq_bad = _one_at_a_time(loss_fn, params, clean, drop, weights_of)
    seq_sq = jax.tree.map(lambda a, b: a.astype(b.dtype), seq_sq, sq)
    return seq_total, seq_sq, bad | seq_bad

  needs_fix = jnp.any(~drop & ~jnp.isfinite(_total_sq(sq)))
  try:
    if bool(needs_fix):  # concrete values (no jit): the rare path is only traced when needed
      total, sq, bad = one_at_a_time(None)
  except jax.errors.ConcretizationTypeError:
    total, sq, bad = jax.lax.cond(needs_fix, one_at_a_time, lambda _: (total, sq, bad), None)
  sq = jax.tree.map(lambda s: jnp.where(bad, jnp.nan, s), sq)
  return total, sq, bad


# ------------------------------------------------------------------------------------------
# The clipping policy.


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ClipRecord:
  """How a :class:`ClippedSum` was clipped: the clip that DP-SGD's noise must be calibrated to.

  A static pytree node (hashable, no array leaves), so it survives ``jit`` (in and out),
  ``vmap``, ``lax.scan`` and, wrapped in an ``nnx.Param``, the ``wrt`` filter of
  ``nnx.Optimizer``: :func:`curvopt.dp_aggregate` checks it while tracing, before any noise is
  drawn.

  Attributes:
    l2_norm_clip: the clip norm :math:`C` as a Python float; ``None`` if it was a traced value
      (then unknown while ``dp_sgd`` is traced, which refuses such a sum).
    mode: ``"global"``, ``"uniform"`` (:math:`C_k = C/\\sqrt K`) or ``"size"``
      (:math:`C_k = C\\sqrt{D_k/D}`); see :func:`clipped_grad`.
    batch_size: the static number of rows of the batch (padding included).
    padded: whether an ``is_padding`` mask was applied.
  """

  l2_norm_clip: float | None
  mode: Literal["global", "uniform", "size"]
  batch_size: int
  padded: bool


class ClippedSum(NamedTuple):
  """The result of clipping a batch, before any division or noise.

  Attributes:
    sum: :math:`\\sum_i w_i g_i` over the real, finite examples, with ``params``' structure.
    norms: per-example gradient norms, shape ``(B,)`` (global clipping), or a pytree with
      ``params``' structure of per-leaf ``(B,)`` norms (per-layer clipping). Padded examples
      report 0; a dropped (non-finite) example reports NaN.
    num_examples: number of real (non-padding) examples, int32.
    num_dropped: real examples dropped because their gradient norm was not finite, int32.
    num_clipped: real, finite examples scaled down (in at least one layer), int32.
    clipping: the :class:`ClipRecord` of the clip applied (static), wrapped in an
      ``nnx.Param`` when the parameters are an ``nnx.Module`` (so that ``nnx.Optimizer``'s
      filter keeps it); ``None`` for a ``ClippedSum`` built by hand, which
      :func:`curvopt.dp_sgd` refuses.
  """

  sum: Params
  norms: Any
  num_examples: jax.Array
  num_dropped: jax.Array
  num_clipped: jax.Array
  clipping: Any = None


def static_value(value: Any, name: str = "l2_norm_clip") -> float | None:
  """``value`` as a Python float, or ``None`` when it is traced (unknown while tracing).

  Raises:
    ValueError: if ``value`` is not one number.
  """
  try:
    return float(value)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None
  except TypeError:
    raise ValueError(f"{name} must be one number; got {value!r}.") from None


def clip_record(clipping: Any) -> ClipRecord | None:
  """The :class:`ClipRecord` in a ``ClippedSum.clipping`` field (unwrapping an ``nnx.Param``)."""
  if clipping is None or isinstance(clipping, ClipRecord):
    return clipping
  value = getattr(clipping, "get_value", None)  # an nnx Variable
  return clip_record(value()) if callable(value) else None


def _record(l2_norm_clip: Any, mode: str, size: int, padded: bool, module: bool) -> Any:
  record = ClipRecord(static_value(l2_norm_clip), mode, size, padded)  # type: ignore[arg-type]
  if not module:
    return record
  from flax import nnx  # noqa: PLC0415 (flax is optional: imported only for Modules)

  return nnx.Param(record)


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
  sum of per-example gradients. The ``ClippedSum`` records the clip norm and mode applied here
  (:class:`ClipRecord`, static) and ``dp_sgd`` refuses one that differs from its own, so the
  noise is calibrated to the clip actually applied. Pass ``l2_norm_clip`` as a Python number
  (a sum clipped at a traced norm is refused by ``dp_sgd``).

  Args:
    loss_fn: ``(params, example) -> scalar`` for ONE example.
    l2_norm_clip: the clip norm :math:`C \ge 0` (``inf`` disables clipping).
    method: ``"vmap"`` (materialise per-example gradients) or ``"ghost"`` (ghost clipping,
      :mod:`curvopt.ghost`).
    per_layer: ``False`` for global clipping; ``True``/``"uniform"`` or ``"size"`` for
      per-layer clipping (see :func:`clipped_grad`).
    chunk_size: with ``method="vmap"``, process this many examples at a time (bounded memory).

  Returns:
    A function ``(params, batch, is_padding=None) -> ClippedSum``. ``params`` is a pytree or a
    flax ``nnx.Module`` (then ``loss_fn(module, example)``; the gradients are taken with respect
    to its ``nnx.Param`` state, other state such as BatchNorm statistics and RNG counts is held
    constant, and ``sum`` is an ``nnx.State``).
  """
  _checks.check_nonnegative("l2_norm_clip", l2_norm_clip)
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
  mode = per_layer_mode(per_layer)
  if chunk_size is not None:
    if method != "vmap":
      raise ValueError(f"chunk_size is only supported with method='vmap'; got method={method!r}.")
    if int(chunk_size) < 1:
      raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")
  method_fn = _method_fn(method)

  def fn(params: Params, batch: Batch, is_padding: Any = None) -> ClippedSum:
    size = _checks.batch_size(batch)
    record = _record(l2_norm_clip, mode, size, is_padding is not None, _nnx.is_module(params))
    f, params = _nnx.pure(loss_fn, params)
    if is_padding is None:
      is_padding = jnp.zeros((size,), bool)
    is_padding = _check_is_padding(is_padding, size)

    def weights_of(sq_norms, pad):
      return _policy(sq_norms, pad, l2_norm_clip, mode, params)[0]

    def run(clean_batch, drop):
      if chunk_size is None:
        return method_fn(f, params, clean_batch, lambda s: weights_of(s, drop))
      return _chunked_clipped_sum(f, params, clean_batch, weights_of, drop, int(chunk_size))

    total, sq_norms, _ = guarded_pass(run, f, params, batch, is_padding, weights_of)
    _, norms, dropped, clipped = _policy(sq_norms, is_padding, l2_norm_clip, mode, params)
    count = lambda m: jnp.sum(m, dtype=jnp.int32)
    return ClippedSum(total, norms, count(~is_padding), count(dropped), count(clipped), record)

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
  contribute nor count. A non-finite example (a NaN input, or a non-finite loss or gradient)
  contributes 0 (it still counts in :math:`n`), shows up as NaN in ``norms``, and never changes
  another example's result, whatever the method, dtype or ``chunk_size``.

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
    ``fn(params, batch, is_padding=None)`` returning ``(mean, norms)``; ``params`` is a pytree
    or an ``nnx.Module`` (see :func:`clipped_sum_fn`). ``mean`` has ``params``' structure (an
    ``nnx.State`` for a Module); ``norms`` is the ``(B,)`` vector of per-example global gradient
    norms (before clipping), or with per-layer clipping a pytree with ``params``' structure of
    per-leaf ``(B,)`` norms. Padded examples have norm 0.

  Raises:
    ValueError: for a negative clip, an unknown ``method``/``per_layer``, or (when called) a
      ``batch`` whose leaves disagree on the leading axis, a ``loss_fn`` that does not return one
      scalar per example, or a mis-shaped ``is_padding``.

  Examples:
    Gradients of :math:`w \cdot x` are the examples; ``(3, 4)`` has norm 5 and is scaled down
    to norm 1, ``(0.6, 0)`` is left alone.

    >>> X = jnp.array([[3.0, 4.0], [0.6, 0.0]])
    >>> mean, norms = clipped_grad(lambda w, x: w @ x, 1.0)(jnp.zeros(2), X)
    >>> rounded = lambda a: np.round(np.asarray(a, float), 4).tolist()
    >>> rounded(mean), rounded(norms)
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


def clip_sum_grads(grads: Params, is_padding: Any, l2_norm_clip: Any, mode: str) -> ClippedSum:
  """The clipping policy applied to given per-example gradients."""
  size = _checks.batch_size(grads, "updates (per-example gradients)")
  record = _record(l2_norm_clip, mode, size, is_padding is not None, module=False)
  if is_padding is None:
    is_padding = jnp.zeros((size,), bool)
  is_padding = _check_is_padding(is_padding, size)
  sq_norms = _sq_norms_of(grads)
  like = jax.tree.map(lambda g: g[0], grads)
  weights, norms, dropped, clipped = _policy(sq_norms, is_padding, l2_norm_clip, mode, like)
  count = lambda m: jnp.sum(m, dtype=jnp.int32)
  total = _weighted_sum(weights, grads)
  return ClippedSum(total, norms, count(~is_padding), count(dropped), count(clipped), record)


# ------------------------------------------------------------------------------------------
# The optax transformation.


class ClipPerExampleState(NamedTuple):
  """State of :func:`clip_per_example`: diagnostics only (the fields of :class:`DPSGDState`).

  Attributes:
    num_dropped: non-finite examples dropped so far (all steps), int32.
    last_num_dropped: non-finite examples dropped at the last step, int32.
    last_num_clipped: examples scaled down at the last step, int32.
  """

  num_dropped: jax.Array
  last_num_dropped: jax.Array
  last_num_clipped: jax.Array


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
    >>> np.round(np.asarray(out["w"], float), 4).tolist(), int(state.last_num_clipped)
    ([0.6, 0.4], 1)
  """
  _checks.check_nonnegative("l2_norm_clip", l2_norm_clip)
  mode = per_layer_mode(per_layer)

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.int32)
    return ClipPerExampleState(zero, zero, zero)

  def update_fn(updates, state, params=None, *, is_padding=None, **extra_args):
    del params, extra_args
    result = clip_sum_grads(updates, is_padding, l2_norm_clip, mode)
    n = jnp.maximum(result.num_examples, 1)
    mean = jax.tree.map(lambda s: s / n.astype(s.dtype), result.sum)
    return mean, ClipPerExampleState(
      state.num_dropped + result.num_dropped, result.num_dropped, result.num_clipped
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
