r"""Ghost clipping: per-example gradient norms without per-example gradients.

For a dense layer :math:`y = x W` applied to one example's rows :math:`x_i \in
\mathbb{R}^{N\times K}` (``N = 1`` for a vector, ``N = T`` for a sequence), the example's
gradient is :math:`x_i^\top \delta_i` with :math:`\delta_i = \partial \ell_i / \partial y_i`,
and its squared Frobenius norm needs neither that matrix nor any other example's:

.. math::
  \|x_i^\top \delta_i\|_F^2 = \langle x_i x_i^\top, \delta_i \delta_i^\top \rangle
  \;(= \|x_i\|^2 \|\delta_i\|^2 \text{ when } N = 1).

The Gram form costs :math:`N^2 (K + P)`, the direct product :math:`N K P`; the cheaper is used.
A convolution is the same identity on its unfolded input patches, an embedding lookup uses
:math:`\sum_{t,s} [\mathrm{id}_t = \mathrm{id}_s] \langle \delta_t, \delta_s \rangle`, and
elementwise parameters (biases, scales) have gradients the size of the parameter, summed from
:math:`\delta_i` directly.

:func:`ghost_clipped_sum` finds those layers by tracing the one-example loss to a jaxpr (see
:mod:`curvopt.autodiff.capture`), gets every :math:`x_i` and :math:`\delta_i` from one batched
forward pass and one backward pass through the activations (no parameter gradient is formed),
computes the per-example squared norms, asks the caller for per-example weights, and forms
:math:`\sum_i w_i x_i^\top \delta_i` as one weight-gradient contraction per layer. The total is
an ordinary gradient plus the norms; for convolutions the per-example products are batched
products on unfolded patches (measured costs: ``benchmarks/per_example.py`` and the README).

Memory: with global clipping every layer's weight depends on every layer's norm, so all
:math:`\delta` are alive at once (a plain backward pass frees each after its layer).

A weight read at several dense products in the same layout (a layer applied twice) stacks the
factors of its sites, which includes the cross terms between the uses. Parameters used any other
way (tied across different kinds of layer, inside a custom-derivative call or control flow,
through a nonlinearity) get exact per-example gradients for those leaves only, with one warning
per trace that names them.
"""

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from curvopt import _nnx
from curvopt._typing import Batch, Params
from curvopt.autodiff import capture

_ghost_jaxpr = capture  # the name tests/test_ghost.py reads

WeightFn = Callable[[Any], Any]


def ghost_clipped_sum(
  loss_fn: Callable[[Params, Any], jax.Array],
  params: Params,
  batch: Batch,
  weight_fn: WeightFn,
) -> tuple[Params, Params]:
  r"""Per-example squared gradient norms and the weighted gradient sum, by ghost clipping.

  With :math:`g_i = \nabla_\theta \ell(\theta, z_i)` for the examples :math:`z_i` of
  ``batch``, returns, leaf by leaf, :math:`s_i = \|g_i\|^2` and :math:`\sum_i w_i g_i` with
  ``w = weight_fn(s)``, without materialising any :math:`g_i` for dense, convolution,
  embedding and elementwise (bias, scale) parameters. Used by
  ``curvopt.clipped_grad(..., method="ghost")``, which supplies the clipping
  weights; an example whose weight is 0 contributes exactly 0, even if its values are NaN.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example.
    params: pytree of arrays, or an ``nnx.Module`` (then ``loss_fn(module, example)``, and the
      results are ``nnx.State`` objects of its ``nnx.Param`` state).
    batch: pytree whose leaves all have the same leading (example) axis ``B``.
    weight_fn: maps the squared norms (``params``' structure, leaves of shape ``(B,)``) to
      weights of the same structure and shapes.

  Returns:
    ``(weighted_sum, sq_norms)``: ``weighted_sum`` has ``params``' structure;
    ``sq_norms`` has ``params``' structure with leaves of shape ``(B,)``.

  Raises:
    ValueError: if the batch leaves disagree on the leading axis or ``loss_fn`` is not scalar.

  Examples:
    A linear model :math:`\ell_i = x_i^\top w`: :math:`g_i = x_i`, so the squared norms are
    :math:`\|x_i\|^2` and unit weights give :math:`\sum_i x_i`.

    >>> x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    >>> total, sq = ghost_clipped_sum(
    ...   lambda w, xi: xi @ w, jnp.zeros(2), x, lambda s: jax.tree.map(jnp.ones_like, s))
    >>> sq.tolist(), total.tolist()
    ([25.0, 1.0], [4.0, 4.0])

  References:
    Goodfellow, "Efficient per-example gradient computations", arXiv:1510.01799, 2015.
    Li, Tramèr, Liang, Hashimoto, "Large language models can be strong differentially private
    learners", ICLR 2022. Bu, Mao, Xu, "Scalable and efficient training of large convolutional
    neural networks with differential privacy" (book-keeping), NeurIPS 2022.
  """
  loss_fn, params = _nnx.pure(loss_fn, params)
  leaves, treedef = jax.tree.flatten(params)
  batch_leaves = jax.tree.leaves(batch)
  if not batch_leaves:
    raise ValueError("ghost_clipped_sum needs a batch with at least one array leaf.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in batch_leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      f"Every leaf of batch needs the same leading (example) axis; got leading sizes {sizes}."
    )
  (num_examples,) = sizes

  def flat_loss(flat_params, example):
    return loss_fn(jax.tree.unflatten(treedef, flat_params), example)

  example_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
  leaf_spec = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
  closed, out_shape = jax.make_jaxpr(flat_loss, return_shape=True)(leaf_spec, example_spec)
  if out_shape.shape != ():
    raise ValueError(
      f"loss_fn must return one scalar per example; it returned shape {out_shape.shape}. "
      "loss_fn(params, example) sees ONE example (no batch axis): reduce its output (e.g. .sum() "
      "or .mean()) over the example's own axes."
    )
  plan = capture.find_sites(closed.jaxpr, len(leaves), [jnp.ndim(x) for x in leaves])
  if plan.unsupported:
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    names = "; ".join(f"params{paths[i]} ({why})" for i, why in plan.unsupported.items())
    warnings.warn(
      f"ghost clipping has no norm rule for {names}: their per-example gradients are computed "
      "exactly (as by vmap), which costs memory and time per example for those leaves only.",
      stacklevel=2,
    )
  sites = {site.key: site for site in plan.sites.values()}
  sites.update({site.key: site for leaf_sites in plan.reused.values() for site in leaf_sites})
  fallback = sorted(plan.unsupported)

  captured = capture.capture(closed, leaves, jax.tree.leaves(batch), sites, fallback)
  (losses,), data = captured.outputs, captured.data
  fb_grads, deltas = captured.vjp([jnp.ones_like(losses)])

  sq = [jnp.zeros((num_examples,), norm_dtype(leaf)) for leaf in leaves]
  data = {key: site.full_data(data[key], num_examples) for key, site in sites.items()}
  for leaf, site in plan.sites.items():
    sq[leaf] = _site_sq_norm(site, data[site.key], deltas[site.key], leaves[leaf])
  for leaf, leaf_sites in plan.reused.items():
    sq[leaf] = _reused_sq_norm(leaf_sites, data, deltas)
  for i, g in zip(fallback, fb_grads, strict=True):
    sq[i] = jnp.sum(jnp.square(_at_least_f32(g)).reshape(num_examples, -1), axis=1)
  sq_norms = jax.tree.unflatten(treedef, sq)

  weights = jax.tree.leaves(weight_fn(sq_norms))
  if len(weights) != len(leaves):
    raise ValueError(
      f"weight_fn must return a pytree with params' structure; it returned {len(weights)} "
      f"leaves for {len(leaves)} parameter leaves."
    )
  total = [jnp.zeros_like(leaf) for leaf in leaves]
  for leaf, site in plan.sites.items():
    total[leaf] = _site_weighted_sum(
      site, data[site.key], deltas[site.key], weights[leaf], leaves[leaf], sq[leaf]
    )
  for leaf, leaf_sites in plan.reused.items():
    for site in leaf_sites:
      total[leaf] = total[leaf] + _site_weighted_sum(
        site, data[site.key], deltas[site.key], weights[leaf], leaves[leaf], sq[leaf]
      )
  for i, g in zip(fallback, fb_grads, strict=True):
    w = weights[i]
    keep = _expand(w != 0, g.ndim)
    g = jnp.where(keep, g, 0)
    total[i] = jnp.tensordot(jnp.where(w != 0, w, 0).astype(g.dtype), g, axes=1)
  return jax.tree.unflatten(treedef, total), sq_norms


def norm_dtype(leaf: Any) -> Any:
  """The dtype norms of ``leaf`` are accumulated in: at least float32."""
  dtype = jnp.result_type(leaf)
  return (
    jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
  )


def _at_least_f32(x):
  """Norms of half-precision models are accumulated in float32."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _expand(mask, ndim):
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _clean(data, keep):
  return [None if x is None else jnp.where(_expand(keep, jnp.ndim(x)), x, 0) for x in data]


def _batched_op(site, data):
  """``operand -> [site.op_fn(data_i, operand) for each example i]``, one batched call."""
  axes = [None if x is None else 0 for x in data]

  def op(operand):
    return jax.vmap(lambda d: site.op_fn(d, operand), in_axes=(axes,))(data)

  return op


def _site_weighted_sum(site, data, delta, w, leaf, sq):
  r""":math:`\sum_i w_i g_i` for one leaf, as one transposed (weight-gradient) contraction.

  An example with :math:`w_i = 0` must add exactly 0: its cotangent is zeroed with the
  weighting (one pass, needed anyway). Its data operand needs zeroing only when non-finite,
  and the site norm ``sq[i]`` is computed from the same entries the contraction reads, so it is
  then non-finite too: the copy that zeroes the data runs (``lax.cond``) only in that case.
  """
  keep = w != 0
  w_delta = jnp.where(
    _expand(keep, delta.ndim), _expand(w.astype(delta.dtype), delta.ndim) * delta, 0
  )
  needs_clean = jnp.any(~keep & ~jnp.isfinite(sq))
  data = lax.cond(needs_clean, lambda d: _clean(d, keep), lambda d: d, data)
  op = _batched_op(site, data)
  _, vjp_fn = jax.vjp(lambda p: op(site.chain_fn(p)), leaf)
  return vjp_fn(w_delta)[0]


def _site_sq_norm(site, data, delta, leaf):
  if site.kind == "dot":
    a, d = capture.dot_factors(site, data, delta)
  elif site.kind == "conv":
    return _conv_sq_norm(site, data, delta)
  elif site.kind == "gather":
    return _gather_sq_norm(site, data, delta, leaf)
  else:  # biases and scales: the per-example gradient is the size of the parameter
    return _per_example_sq_norm(site, data, delta, leaf)
  return _product_sq_norm(a, d)


def _reused_sq_norm(leaf_sites, data, deltas):
  r"""A leaf read at several dense-product sites in the same coordinates, cross terms included.

  Its per-example gradient is :math:`\sum_s a_s^\top \delta_s = A^\top D` with
  :math:`A = [a_1; a_2; \dots]` and :math:`D = [\delta_1; \delta_2; \dots]` stacked along
  the rows, so its squared norm :math:`\sum_{s,t} \langle a_s a_t^\top, \delta_s
  \delta_t^\top\rangle` is the single-site identity on the stacked factors (Gram or direct,
  whichever is cheaper): no per-example gradient of the leaf is formed.
  """
  if capture.same_coordinates(leaf_sites):
    factors = [capture.dot_factors(site, data[site.key], deltas[site.key]) for site in leaf_sites]
  else:
    factors = [_matrix_factors(site, data[site.key], deltas[site.key]) for site in leaf_sites]
  if any(isinstance(f, _OneHot) for pair in factors for f in pair):
    return _blockwise_gram_sq_norm(factors)
  a = jnp.concatenate([_at_least_f32(a) for a, _ in factors], axis=2)
  d = jnp.concatenate([_at_least_f32(d) for _, d in factors], axis=2)
  return _product_sq_norm(a, d, stacked=True)


class _OneHot:
  """The one-hot rows of a lookup's indices, ``(B, N, rows)``, never materialised.

  Attributes:
    ids: ``(B, N)`` row indices (clipped into range).
    valid: ``(B, N)`` whether each index reads a row (out-of-range ``FILL_OR_DROP`` reads none).
  """

  def __init__(self, ids: jax.Array, valid: jax.Array):
    self.ids, self.valid = ids, valid


def _block_gram(u: Any, v: Any) -> jax.Array:
  r"""``u vᵀ`` per example, ``(B, N_u, N_v)``, for dense ``(B, 1, N, K)`` or one-hot factors.

  Two lookups give the id-equality matrix :math:`[\mathrm{id}_t = \mathrm{id}_s]`; a lookup
  against a dense factor :math:`M` gives :math:`M_{s, \mathrm{id}_t}` (a gather); only two dense
  factors cost a product over the :math:`K` (vocabulary) axis.
  """
  if isinstance(u, _OneHot) and isinstance(v, _OneHot):
    same = u.ids[:, :, None] == v.ids[:, None, :]
    return (same & u.valid[:, :, None] & v.valid[:, None, :]).astype(jnp.float32)
  if isinstance(u, _OneHot):
    return jnp.swapaxes(_block_gram(v, u), 1, 2)
  if isinstance(v, _OneHot):
    dense = _at_least_f32(u[:, 0])  # (B, N_u, K)
    picked = jax.vmap(lambda m, ids: m[:, ids])(dense, v.ids)  # (B, N_u, N_v)
    return jnp.where(v.valid[:, None, :], picked, 0)
  u, v = _at_least_f32(u[:, 0]), _at_least_f32(v[:, 0])
  return jnp.einsum("bnk,bmk->bnm", u, v)


def _blockwise_gram_sq_norm(factors: list[tuple[Any, Any]]) -> jax.Array:
  r""":math:`\sum_{s,t} \langle a_s a_t^\top, \delta_s \delta_t^\top \rangle` block by block.

  The Gram form of :func:`_reused_sq_norm` for a leaf read by a lookup (a tied embedding and
  output projection): the lookup's one-hot factor enters only through index equalities and
  gathers, so no ``(N, vocabulary)`` one-hot matrix is formed.
  """
  sq = 0.0
  for (a_s, d_s), (a_t, d_t) in itertools.product(factors, repeat=2):
    sq = sq + jnp.sum(_block_gram(a_s, a_t) * _block_gram(d_s, d_t), axis=(1, 2))
  return sq


def _matrix_factors(site, data, delta):
  r"""``(A, D)``, shapes ``(B, 1, N, rows)`` and ``(B, 1, N, cols)``: the example's gradient of
  a 2-D leaf read at ``site`` is :math:`A^\top D` in the leaf's own (rows, cols) layout.

  A dense product gives its data and cotangent factors, swapped when the parameter operand's
  contracting axis is the leaf's column axis (``h @ E.T``); a row lookup gives the one-hot rows
  of its indices (a lazy :class:`_OneHot`) and its cotangent rows (swapped if the table is the
  transposed leaf).
  """
  axes = capture.leaf_axes(site)
  if site.kind == "dot":
    a, d = capture.dot_factors(site, data, delta)
    (lhs_c, rhs_c), _ = site.eqn.params["dimension_numbers"]
    p_c = (lhs_c if site.param_pos == 0 else rhs_c)[0]
    return (a, d) if axes[p_c] == 0 else (d, a)
  idx = data[1]
  b = idx.shape[0]
  table_rows = site.eqn.invars[0].aval.shape[0]
  ids = idx.reshape(b, -1)
  d = delta.reshape(b, ids.shape[1], -1)
  if "FILL_OR_DROP" in str(site.eqn.params["mode"]):
    valid = (ids >= 0) & (ids < table_rows)
  else:
    valid = jnp.ones(ids.shape, bool)
  a = _OneHot(jnp.clip(ids, 0, table_rows - 1), valid)
  d = jnp.where(valid[..., None], d, 0)[:, None]
  return (a, d) if axes[0] == 0 else (d, a)


def _product_sq_norm(a, d, stacked=False):
  r""":math:`\sum_g \|a_g^\top d_g\|_F^2` per example, ``a: (B, G, N, K)``, ``d: (B, G, N, P)``."""
  a, d = _at_least_f32(a), _at_least_f32(d)
  n, k, p = a.shape[2], a.shape[3], d.shape[3]
  if n == 1 and not stacked:
    sq = jnp.sum(jnp.square(a), axis=(2, 3)) * jnp.sum(jnp.square(d), axis=(2, 3))
  elif n * (k + p) < k * p:
    gram_a = jnp.einsum("bgnk,bgmk->bgnm", a, a)
    gram_d = jnp.einsum("bgnp,bgmp->bgnm", d, d)
    sq = jnp.sum(gram_a * gram_d, axis=(2, 3))
  else:
    sq = jnp.sum(jnp.square(jnp.einsum("bgnk,bgnp->bgkp", a, d)), axis=(2, 3))
  return jnp.sum(sq, axis=1)


def _size(shape):
  out = 1
  for s in shape:
    out *= s
  return out


# Largest unfolded-patch tensor (bytes) formed at once, and the fewest examples worth unfolding
# together; below that, the norms go one kernel offset at a time.
_UNFOLD_BYTES = 1 << 18
_MIN_UNFOLD_CHUNK = 8


def _unfold_chunk(batch_size, bytes_per_example):
  """Largest divisor of ``batch_size`` whose patches fit in ``_UNFOLD_BYTES``, or 0."""
  most = min(batch_size, _UNFOLD_BYTES // max(bytes_per_example, 1))
  chunk = next(c for c in range(max(most, 1), 0, -1) if batch_size % c == 0)
  return chunk if chunk >= min(_MIN_UNFOLD_CHUNK, batch_size) else 0


def _conv_sq_norm(site, data, delta):
  r"""Kernel of a convolution: the dense identity on input patches.

  The entries of all patches at kernel offset :math:`o` form one strided slice :math:`X_o`
  (output positions x input channels) of the padded, dilated input, so with output cotangents
  :math:`\Delta` (positions x output channels) the example's squared norm is
  :math:`\sum_o \|X_o^\top \Delta\|^2` (direct, :math:`N K P`) or
  :math:`\langle \sum_o X_o X_o^\top, \Delta \Delta^\top \rangle` (Gram,
  :math:`N^2 (K + P)`), whichever is cheaper. The slices are concatenated into patches
  :math:`(N, K)` for a chunk of examples at a time (at most ``_UNFOLD_BYTES``, ``lax.map`` over
  chunks) and contracted in one batched product: on CPU, XLA's batched product is much faster
  once :math:`K`-wide than as one :math:`C_{in}`-wide product per offset, and the chunk bound
  keeps the memory at that of the offset loop. Where even
  ``_MIN_UNFOLD_CHUNK`` examples' patches would exceed the bound, a ``fori_loop`` over offsets
  keeps one slice alive instead. Unfolding with ``conv_general_dilated_patches`` (a convolution
  with an identity kernel) or per-example kernel gradients by a grouped convolution are slower
  still.
  """
  params = site.eqn.params
  dn = params["dimension_numbers"]
  kernel_shape = site.eqn.invars[1].aval.shape
  filter_shape = [kernel_shape[i] for i in dn.rhs_spec[2:]]
  out_shape = site.eqn.outvars[0].aval.shape
  out_spatial = [out_shape[i] for i in dn.out_spec[2:]]
  strides = list(params["window_strides"])
  lhs, delta = _at_least_f32(data[0]), _at_least_f32(delta)
  b = lhs.shape[0]
  # (B, n, *spatial, C_in) and (B, N = n * prod(out_spatial), C_out).
  x = jnp.transpose(lhs, [0, *(1 + i for i in (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))])
  d = jnp.transpose(
    delta, [0, *(1 + i for i in (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))]
  )
  d = d.reshape(b, -1, d.shape[-1])
  n, c_in, p = d.shape[1], x.shape[-1], d.shape[-1]
  k = _size(filter_shape) * c_in
  gram = n * (k + p) < k * p
  pads = [
    (lo, hi, dil - 1)
    for (lo, hi), dil in zip(params["padding"], params["lhs_dilation"], strict=True)
  ]
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (0, 0, 0), *pads, (0, 0, 0)])
  offsets = [
    [o * dil for o, dil in zip(offset, params["rhs_dilation"], strict=True)]
    for offset in itertools.product(*(range(s) for s in filter_shape))
  ]
  window = [(m - 1) * s + 1 for m, s in zip(out_spatial, strides, strict=True)]
  out_dtype = jnp.result_type(x, d)
  chunk = _unfold_chunk(b, n * len(offsets) * c_in * x.dtype.itemsize)
  if chunk:
    # Unfold the patches, (chunk, N, K), a chunk of examples at a time (bounded memory): XLA's
    # CPU batched product is much faster once K-wide than len(offsets) times C_in-wide.
    def chunk_sq_norm(xd):
      x_c, d_c = xd
      x_p = jnp.concatenate([_offset_slice(x_c, o, window, strides, n) for o in offsets], -1)
      if gram:
        gram_x = jnp.einsum("bnk,bmk->bnm", x_p, x_p)
        return jnp.sum(gram_x * jnp.einsum("bnp,bmp->bnm", d_c, d_c), axis=(1, 2))
      return jnp.sum(jnp.square(jnp.einsum("bnp,bnk->bpk", d_c, x_p)), axis=(1, 2))

    if chunk == b:
      return chunk_sq_norm((x, d))
    xd = (x.reshape(b // chunk, chunk, *x.shape[1:]), d.reshape(b // chunk, chunk, *d.shape[1:]))
    return lax.map(chunk_sq_norm, xd).reshape(b)

  offsets = jnp.array(offsets, jnp.int32)
  zero = jnp.zeros((), jnp.int32)

  def body(i, acc):
    start = [zero, zero, *offsets[i], zero]
    x_o = lax.dynamic_slice(x, start, [b, x.shape[1], *window, c_in])
    x_o = lax.slice(x_o, [0] * x.ndim, x_o.shape, [1, 1, *strides, 1]).reshape(b, n, c_in)
    if gram:
      return acc + jnp.einsum("bnc,bmc->bnm", x_o, x_o)
    return acc + jnp.sum(jnp.square(jnp.einsum("bnp,bnc->bpc", d, x_o)), axis=(1, 2))

  init = jnp.zeros((b, n, n) if gram else (b,), out_dtype)
  acc = lax.fori_loop(0, offsets.shape[0], body, init)
  if gram:
    return jnp.sum(acc * jnp.einsum("bnp,bmp->bnm", d, d), axis=(1, 2))
  return acc


def _offset_slice(x, offset, window, strides, n):
  """The input entries at one kernel offset of every patch, as ``(B, N, C_in)``."""
  start = [0, 0, *offset, 0]
  limit = [
    x.shape[0],
    x.shape[1],
    *(o + w for o, w in zip(offset, window, strict=True)),
    x.shape[-1],
  ]
  x_o = lax.slice(x, start, limit, [1, 1, *strides, 1])
  return x_o.reshape(x.shape[0], n, x.shape[-1])


def _gather_sq_norm(site, data, delta, leaf):
  r"""Embedding rows: :math:`\sum_{t,s} [id_t = id_s] \langle \delta_t, \delta_s \rangle`."""
  idx = data[1]
  b = idx.shape[0]
  table_rows = site.eqn.invars[0].aval.shape[0]
  ids = idx.reshape(b, -1)
  d = _at_least_f32(delta).reshape(b, ids.shape[1], -1)
  mode = site.eqn.params["mode"]
  if "FILL_OR_DROP" in str(mode):
    valid = (ids >= 0) & (ids < table_rows)
  else:
    ids = jnp.clip(ids, 0, table_rows - 1)
    valid = jnp.ones_like(ids, dtype=bool)
  d = jnp.where(valid[..., None], d, 0)
  same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  gram_d = jnp.einsum("btp,bsp->bts", d, d)
  return jnp.sum(jnp.where(same, gram_d, 0), axis=(1, 2)).astype(norm_dtype(leaf))


def _per_example_sq_norm(site, data, delta, leaf):
  """Forms each example's gradient of ``leaf`` (used where that is as cheap as any identity)."""

  def grad_i(data_i, delta_i):
    _, vjp_fn = jax.vjp(lambda p: site.op_fn(data_i, site.chain_fn(p)), leaf)
    return vjp_fn(delta_i)[0]

  axes = [None if x is None else 0 for x in data]
  g = _at_least_f32(jax.vmap(grad_i, in_axes=(axes, 0))(data, delta))
  return jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
