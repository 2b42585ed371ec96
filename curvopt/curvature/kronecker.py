r"""Kronecker factors of the Gauss-Newton matrix, from the layers of the model's own program.

A layer whose weight :math:`W` (a :math:`K \times P` matrix after a fixed re-indexing) maps the
inputs :math:`a_{b,n} \in \mathbb{R}^K` at the positions :math:`n` of example :math:`b` to
:math:`y_{b,n} = W^\top a_{b,n}` (one position in an MLP, :math:`T` in a sequence model, the
output pixels of a convolution with :math:`a_{b,n}` its input patch) has the generalised
Gauss-Newton block

.. math::
  C_W = \sum_b \sum_m \operatorname{vec}\Big(\sum_n a_{b,n} g_{m,b,n}^\top\Big)
        \operatorname{vec}\Big(\sum_n a_{b,n} g_{m,b,n}^\top\Big)^\top,

where :math:`g_{m,b,n}` is the cotangent of :math:`y_{b,n}` when the output cotangent is the
column :math:`s_{m,b}` of a square root :math:`H_b = \sum_m s_{m,b} s_{m,b}^\top` of the loss
Hessian of example :math:`b`. K-FAC (Martens & Grosse 2015) approximates :math:`C_W` by
:math:`A \otimes G` (``left`` and ``right`` of a :class:`KroneckerBlock`), with the two
treatments of weight sharing of Eschenhagen et al. (2023):

* ``"expand"``: every (example, position) pair is a case, :math:`A = \frac1N \sum_{b,n} a a^\top`
  and :math:`G = \sum_m \sum_{b,n} g g^\top` over the :math:`N` cases;
* ``"reduce"``: positions are summed first, :math:`A = \frac1B \sum_b \bar a_b \bar a_b^\top`
  with :math:`\bar a_b = \frac1{N_b} \sum_n a_{b,n}` and
  :math:`G = \sum_m \sum_b \hat g_{m,b} \hat g_{m,b}^\top` with :math:`\hat g = \sum_n g`.

Both equal :math:`C_W` for one example at one position. The columns :math:`s_m`
(``curvature``) are: ``"ggn"``, the columns of the symmetric square root of each example's
output Hessian (one backward pass per output dimension: exact); ``"ggn_sampled"``,
:math:`H_b^{1/2} \epsilon_b` for ``num_samples`` Rademacher vectors :math:`\epsilon_b` (seeded
by ``key``; unbiased); ``"fisher"``, :math:`\sqrt{B}\, \nabla_{f_b} L`, which makes
:math:`A \otimes G` the empirical Fisher :math:`\frac1B \sum_b \nabla \ell_b \nabla \ell_b^\top`
of the batch-mean loss :math:`L = \frac1B \sum_b \ell_b`.

Layers are found in the jaxpr of ``model_fn`` (:mod:`curvopt.autodiff.capture`): dense
products (``dot_general``), convolutions (KFC, Grosse & Martens 2016: :math:`a` is the input
patch), embedding lookups (:math:`a` one-hot, so :math:`A` is the diagonal of row frequencies)
and elementwise parameters (biases, scales: :math:`A = 1` and :math:`G` the second moment of the
per-case gradient, the bias kept apart from its weight). A weight used at several layers of the
same layout pools their cases (a layer applied twice; a tied embedding and output projection,
whose projection reads the table transposed, so its cotangents join the row side). A parameter
in no recognised layer gets the diagonal of its GGN block, from exact per-example gradients,
and is named once in a warning.

Examples are defined by the outputs: every output leaf's leading axis indexes examples, and the
batch leaves with the same leading size hold those examples' data (several groups of
different sizes, e.g. a PINN's interior and boundary points, are traced separately; leaves of
any other size are shared by all examples). The loss must be a sum of per-example terms, and
layers must not mix examples (no batch statistics).

References:
  Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate curvature",
  ICML 2015. Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution
  layers", ICML 2016. Eschenhagen, Immer, Turner, Schneider & Hennig, "Kronecker-factored
  approximate curvature for modern neural network architectures", NeurIPS 2023.
"""

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from curvopt import _checks, _nnx
from curvopt._typing import Params
from curvopt.autodiff import capture, derivatives
from curvopt.curvature import _layer_cases as layer_cases

KroneckerCurvature = Literal["ggn", "ggn_sampled", "fisher"]
WeightSharing = Literal["expand", "reduce"]
CURVATURES = ("ggn", "ggn_sampled", "fisher")
WEIGHT_SHARINGS = ("expand", "reduce")


class KroneckerBlock(NamedTuple):
  """One layer's block :math:`A \\otimes G` (per group of a batched product).

  Attributes:
    left: :math:`A`, ``(groups, K, K)``, or its diagonal ``(groups, K)`` for a row lookup.
    right: :math:`G`, ``(groups, P, P)``.
  """

  left: jax.Array
  right: jax.Array


class DiagonalBlock(NamedTuple):
  """The diagonal of a parameter's block, shaped like the parameter."""

  diagonal: jax.Array


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["blocks"], meta_fields=["indices"]
)
@dataclasses.dataclass(frozen=True)
class KroneckerFactors:
  """Kronecker factors (or their damped inverses) of every parameter leaf: a pytree.

  Attributes:
    blocks: one :class:`KroneckerBlock` or :class:`DiagonalBlock` per parameter leaf, in the
      order of ``jax.tree.leaves(params)``.
    indices: per leaf, the static ``(groups, K, P)`` array of the leaf's flat entry at each
      entry of the layer's weight matrix (``None`` for diagonal blocks).
  """

  blocks: tuple[KroneckerBlock | DiagonalBlock, ...]
  indices: tuple[layer_cases.Index | None, ...]


# --------------------------------------------------------------------- products and inverses


def kronecker_matvec(factors: KroneckerFactors, v: Params) -> Params:
  r"""The block-diagonal product :math:`\bigoplus_W (A_W \otimes G_W)\, v`.

  For a weight matrix :math:`V` (the leaf of ``v`` re-indexed), :math:`(A \otimes G)
  \operatorname{vec} V = \operatorname{vec}(A V G)`; a diagonal block multiplies entrywise.
  Applied to :func:`~curvopt.curvature.kronecker.damped_inverse` factors it is the K-FAC
  preconditioner.

  Args:
    factors: from :func:`kronecker_factors` or :func:`~curvopt.curvature.kronecker.damped_inverse`.
    v: a pytree shaped like the parameters.

  Returns:
    A pytree shaped like ``v``.
  """
  leaves, treedef = jax.tree.flatten(v)
  _check_layout(factors, leaves)
  out = []
  for leaf, block, index in zip(leaves, factors.blocks, factors.indices, strict=True):
    if isinstance(block, DiagonalBlock):
      out.append(block.diagonal.astype(leaf.dtype) * leaf)
      continue
    m = _to_matrix(leaf, index)
    left = block.left.astype(m.dtype)
    m = left[..., None] * m if left.ndim == 2 else jnp.einsum("gij,gjp->gip", left, m)
    m = jnp.einsum("gkp,gpq->gkq", m, block.right.astype(m.dtype))
    out.append(_from_matrix(m, index, jnp.shape(leaf)))
  return treedef.unflatten(out)


def _check_layout(factors: KroneckerFactors, leaves: list) -> None:
  sizes = [
    math.prod(b.diagonal.shape) if i is None else i.array.size
    for b, i in zip(factors.blocks, factors.indices, strict=True)
  ]
  if sizes != [math.prod(jnp.shape(x)) for x in leaves]:
    raise ValueError(
      f"The factors cover parameter leaves of sizes {sizes}, but the vector has leaves of "
      f"sizes {[math.prod(jnp.shape(x)) for x in leaves]}: pass a pytree shaped like the "
      "parameters the factors were computed for."
    )


def damped_inverse(factors: KroneckerFactors, damping: jax.typing.ArrayLike) -> KroneckerFactors:
  r"""The inverses of factored Tikhonov damping with the :math:`\pi`-correction.

  :math:`(A \otimes G + \lambda I)^{-1}` is approximated by
  :math:`(A + \pi \sqrt{\lambda} I)^{-1} \otimes (G + \frac{\sqrt{\lambda}}{\pi} I)^{-1}` with
  :math:`\pi = \sqrt{(\operatorname{tr} A / K) / (\operatorname{tr} G / P)}`, which balances the
  damping between the factors (Martens & Grosse 2015, §6.3; :math:`\pi = 1` when a trace is
  zero). Diagonal blocks are inverted exactly, :math:`1 / (d + \lambda)`.

  Args:
    factors: from :func:`kronecker_factors`.
    damping: :math:`\lambda > 0`.

  Returns:
    Factors with the same layout whose :func:`kronecker_matvec` is the damped inverse.

  Examples:
    One dense layer, :math:`A = 4`, :math:`G = 1`, :math:`\lambda = 1`: :math:`\pi = 2`, so
    the inverse is :math:`1/(4 + 2) \cdot 1/(1 + 1/2) = 1/9`.

    >>> f = kronecker_factors(lambda w, x: x @ w, lambda y, x: 0.5 * jnp.mean(y ** 2),
    ...                       jnp.ones((1, 1)), jnp.array([[2.0]]))
    >>> round(float(kronecker_matvec(damped_inverse(f, 1.0), jnp.ones((1, 1)))[0, 0]), 4)
    0.1111
  """
  blocks = []
  for block in factors.blocks:
    if isinstance(block, DiagonalBlock):
      blocks.append(DiagonalBlock(1.0 / (block.diagonal + damping)))
      continue
    left, right = block
    k, p = left.shape[-1], right.shape[-1]
    trace_left = left.sum(-1) if left.ndim == 2 else jnp.trace(left, axis1=1, axis2=2)
    trace_right = jnp.trace(right, axis1=1, axis2=2)
    ok = (trace_left > 0) & (trace_right > 0)
    pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, (trace_left / k) / (trace_right / p), 1.0)), 1.0)
    root = jnp.sqrt(damping)
    if left.ndim == 2:
      left_inv = 1.0 / (jnp.maximum(left, 0) + (pi * root)[:, None])
    else:
      left_inv = _shifted_inverse(left, pi * root)
    blocks.append(KroneckerBlock(left_inv, _shifted_inverse(right, root / pi)))
  return dataclasses.replace(factors, blocks=tuple(blocks))


def kronecker_inverse_fn(
  factors: KroneckerFactors, damping: jax.typing.ArrayLike
) -> Callable[[Params], Params]:
  """``v -> M^{-1} v``: the damped K-FAC inverse as a pytree map.

  See :func:`~curvopt.curvature.kronecker.damped_inverse`.
  """
  return functools.partial(kronecker_matvec, damped_inverse(factors, damping))


def _shifted_inverse(m: jax.Array, shift: jax.Array) -> jax.Array:
  """``(m + shift I)^{-1}`` for symmetric PSD ``m`` (``(G, n, n)``), per group.

  By Cholesky factorisation; where rounding makes that fail (a non-finite result), by the
  eigendecomposition with negative eigenvalues clipped to zero.
  """
  eye = jnp.eye(m.shape[-1], dtype=m.dtype)
  shifted = m + shift[:, None, None] * eye

  def cholesky_inverse(a):
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(a), True), eye)

  def eigen_inverse(_):
    w, q = jnp.linalg.eigh(m)
    w = 1.0 / (jnp.maximum(w, 0) + shift[:, None])
    return jnp.einsum("gik,gk,gjk->gij", q, w, q)

  inverse = jax.vmap(cholesky_inverse)(shifted)
  return lax.cond(jnp.all(jnp.isfinite(inverse)), lambda _: inverse, eigen_inverse, None)


def _to_matrix(leaf: jax.Array, index: layer_cases.Index) -> jax.Array:
  if index.identity:
    return jnp.reshape(leaf, index.array.shape)
  return jnp.reshape(leaf, -1)[index.array]


def _from_matrix(m: jax.Array, index: layer_cases.Index, shape: tuple[int, ...]) -> jax.Array:
  if index.identity:
    return jnp.reshape(m, shape)
  return jnp.reshape(m, -1)[index.inverse].reshape(shape)


# --------------------------------------------------------------------------- the factors


def kronecker_factors(
  model_fn: Callable[[Params, Any], Any],
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Params,
  batch: Any,
  *,
  curvature: KroneckerCurvature = "ggn",
  weight_sharing: WeightSharing = "expand",
  key: jax.Array | None = None,
  num_samples: int = 1,
) -> KroneckerFactors:
  r"""K-FAC's factors :math:`A` and :math:`G` of every layer, found in ``model_fn``'s jaxpr.

  See the module docstring for the formulas. One forward pass per group of examples records
  every layer's inputs; one backward pass per output column (the output dimensions for
  ``"ggn"``, ``num_samples`` for ``"ggn_sampled"``, one for ``"fisher"``) records their output
  cotangents; no parameter gradient is formed. Works under ``jit`` and on sharded batches
  (each factor is a sum over examples, which XLA all-reduces).

  Args:
    model_fn: ``model_fn(params, batch) -> outputs`` (any pytree whose leaves have a leading
      example axis).
    loss_fn: ``loss_fn(outputs, batch) -> scalar``, a sum (or mean) of per-example terms.
    params: pytree of arrays, or an ``nnx.Module`` (then ``model_fn(module, batch)``).
    batch: pytree of arrays; the leaves with an output leaf's leading size are split into
      examples, the others are shared.
    curvature: ``"ggn"`` (exact per output dimension), ``"ggn_sampled"`` or ``"fisher"``
      (empirical Fisher of a batch-mean loss).
    weight_sharing: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023). Embedding lookups
      and weights read in two layouts (tied embeddings) are always expanded.
    key: PRNG key of ``"ggn_sampled"``'s Rademacher vectors.
    num_samples: vectors per example for ``"ggn_sampled"``.

  Returns:
    :class:`KroneckerFactors` over ``params``' leaves (an ``nnx.State``'s for a Module).

  Raises:
    ValueError: for an unknown option, a missing key, or outputs without an example axis.

  Examples:
    A linear least-squares model: :math:`A = \frac1B \sum_b x_b x_b^\top` and :math:`G = 1`.

    >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> f = kronecker_factors(lambda w, x: x @ w, lambda y, x: 0.5 * jnp.mean(y ** 2),
    ...                       jnp.zeros((2, 1)), x)
    >>> f.blocks[0].left[0].tolist(), round(float(f.blocks[0].right[0, 0, 0]), 4)
    ([[1.0, 1.0], [1.0, 2.0]], 1.0)
  """
  _checks.check_choice("curvature", curvature, CURVATURES)
  _checks.check_choice("weight_sharing", weight_sharing, WEIGHT_SHARINGS)
  if curvature == "ggn_sampled" and key is None:
    raise ValueError("curvature='ggn_sampled' needs key=jax.random.key(seed) for its samples.")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}.")
  model_fn, params = _nnx.pure(model_fn, params)
  leaves, treedef = jax.tree.flatten(params)
  batch_leaves, batch_def = jax.tree.flatten(batch)
  out_spec = jax.eval_shape(model_fn, params, batch)
  out_leaves_spec, out_def = jax.tree.flatten(out_spec)
  groups = _example_groups(out_leaves_spec, batch_leaves)
  traces = [
    _trace_group(model_fn, leaves, treedef, batch_leaves, batch_def, out_def, g) for g in groups
  ]
  plans = [capture.find_sites(t.jaxpr, len(leaves)) for t in traces]
  lives = [capture.live_equations(t.jaxpr)[0] for t in traces]
  layouts, diagonal = layer_cases.leaf_layouts(leaves, plans, lives)
  _warn_diagonal(params, diagonal)
  captures = []
  for g, (group, closed, plan) in enumerate(zip(groups, traces, plans, strict=True)):
    sites = {u.site.key: u.site for uses in layouts.values() for u in uses if u.group == g}
    fallback = [i for i in diagonal if layer_cases.uses_leaf(plan, i)]
    examples = [batch_leaves[i] for i in group.data]
    captures.append((capture.capture(closed, leaves, examples, sites, fallback), fallback))
  outputs = [None] * len(out_leaves_spec)
  for group, (captured, _) in zip(groups, captures, strict=True):
    for j, out in zip(group.outputs, captured.outputs, strict=True):
      outputs[j] = out
  loss = lambda outs: loss_fn(out_def.unflatten(outs), batch)  # noqa: E731
  columns = [
    _output_columns(loss, outputs, group, curvature, _fold(key, g), num_samples)
    for g, group in enumerate(groups)
  ]
  cases, diagonals = layer_cases.record_cases(leaves, layouts, captures, columns)
  blocks = [
    _block(cases[i], weight_sharing)
    if i in layouts
    else DiagonalBlock(diagonals.get(i, jnp.zeros(jnp.shape(leaf), layer_cases.dtype_of(leaf))))
    for i, leaf in enumerate(leaves)
  ]
  indices = tuple(layouts[i][0].index if i in layouts else None for i in range(len(leaves)))
  return KroneckerFactors(tuple(blocks), indices)


def _warn_diagonal(params: Params, diagonal: dict[int, str]) -> None:
  if not diagonal:
    return
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  names = "; ".join(f"params{paths[i]} ({why})" for i, why in diagonal.items())
  warnings.warn(
    f"K-FAC found no dense, convolution, embedding or elementwise layer for {names}: these get "
    "a diagonal block (the GGN's diagonal, from per-example gradients).",
    stacklevel=3,
  )


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
  return None if key is None else jax.random.fold_in(key, i)


# ------------------------------------------------------------------------------ examples


class _Group(NamedTuple):
  """Examples of one size: the output leaves and batch leaves with that leading axis."""

  size: int
  outputs: tuple[int, ...]
  data: tuple[int, ...]


def _example_groups(out_leaves: list, batch_leaves: list) -> list[_Group]:
  """Groups the outputs and the batch by the leading (example) size of the outputs."""
  if any(len(o.shape) == 0 for o in out_leaves):
    shapes = [o.shape for o in out_leaves]
    raise ValueError(
      f"K-FAC needs model_fn outputs with a leading example axis; got output shapes {shapes}. "
      "Return per-example outputs (e.g. logits of shape (batch, classes)) and reduce them in "
      "loss_fn."
    )
  groups = []
  for size in sorted({o.shape[0] for o in out_leaves}):
    outputs = tuple(j for j, o in enumerate(out_leaves) if o.shape[0] == size)
    data = tuple(i for i, x in enumerate(batch_leaves) if jnp.ndim(x) and x.shape[0] == size)
    if not data:
      raise ValueError(
        f"model_fn returns outputs with {size} examples, but no leaf of the batch has a leading "
        f"axis of size {size}; K-FAC splits the batch into examples along the outputs' leading "
        "axis. Pass the data as batch leaves with a leading example axis."
      )
    groups.append(_Group(size, outputs, data))
  return groups


def _trace_group(model_fn, leaves, treedef, batch_leaves, batch_def, out_def, group):
  """The jaxpr of ONE example of ``group``: ``(param leaves, example leaves) -> its outputs``.

  The example's data are a batch of one; every other batch leaf is a constant (the other
  groups' layers do not reach this group's outputs, see :func:`_leaf_layouts`).
  """

  def one_example(flat_params, example):
    data = list(batch_leaves)
    for i, x in zip(group.data, example, strict=True):
      data[i] = x[None]
    out = out_def.flatten_up_to(model_fn(treedef.unflatten(flat_params), batch_def.unflatten(data)))
    return [out[j][0] for j in group.outputs]

  leaf_spec = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
  example_spec = [
    jax.ShapeDtypeStruct(jnp.shape(batch_leaves[i])[1:], jnp.result_type(batch_leaves[i]))
    for i in group.data
  ]
  return jax.make_jaxpr(one_example)(leaf_spec, example_spec)


# ------------------------------------------------------------------------ output columns


def _output_columns(loss, outputs, group, curvature, key, num_samples) -> list[jax.Array]:
  r"""The output cotangents :math:`s_m` of ``group``: per output leaf, ``(M, B, *shape)``."""
  group_out = [outputs[j] for j in group.outputs]
  b = group.size
  splits = np.cumsum([math.prod(o.shape[1:]) for o in group_out])[:-1]
  flat = lambda outs: jnp.concatenate([o.reshape(b, -1) for o in outs], axis=1)  # noqa: E731

  def split(values):  # (B, C) -> the group's leaves (no split op for one leaf: elementwise)
    return jnp.split(values, splits, axis=1) if len(group_out) > 1 else [values]

  def gradient(values):  # the group's outputs, (B, C) -> the loss gradient there, (B, C)
    full = list(outputs)
    for j, part, o in zip(group.outputs, split(values), group_out, strict=True):
      full[j] = part.reshape(o.shape).astype(o.dtype)
    grads = jax.grad(loss)(full)
    return flat([grads[j] for j in group.outputs])

  x = flat(group_out).astype(layer_cases.dtype_of(group_out[0]))
  if curvature == "fisher":
    cols = jnp.sqrt(b) * gradient(x)[None]
  else:
    root = _hessian_root(gradient, x)
    if curvature == "ggn" and root.ndim == 2:
      cols = jnp.eye(x.shape[1], dtype=x.dtype)[:, None, :] * root[None]
    elif curvature == "ggn":
      cols = jnp.transpose(root, (2, 0, 1))
    else:
      signs = jax.random.rademacher(key, (num_samples, *x.shape), x.dtype)
      if root.ndim == 3:
        signs = jnp.einsum("bij,mbj->mbi", root, signs)
      cols = (signs * root[None] if root.ndim == 2 else signs) / jnp.sqrt(num_samples)
  return [
    p.reshape(p.shape[0], *o.shape).astype(o.dtype)
    for p, o in zip(jax.vmap(split)(cols), group_out, strict=True)
  ]


def _hessian_root(gradient: Callable, x: jax.Array) -> jax.Array:
  r"""A square root of each example's output Hessian :math:`H_b = R_b R_b^\top`.

  ``gradient`` maps the outputs ``(B, C)`` to the loss gradient. When it is elementwise (read
  from its jaxpr: squared error, logistic losses) :math:`H_b` is diagonal, one
  Hessian-vector product with ones gives it, and the root is its square root ``(B, C)``.
  Otherwise :math:`H_b` is read column by column from ``C`` products with the same basis
  vector in every example (the loss is a sum over examples, so the Hessian is block diagonal)
  and the symmetric root ``(B, C, C)`` comes from its eigendecomposition.
  """
  if derivatives.is_elementwise(gradient, x):
    diagonal = jax.jvp(gradient, (x,), (jnp.ones_like(x),))[1]
    return jnp.sqrt(jnp.maximum(diagonal, 0))
  basis = jnp.eye(x.shape[1], dtype=x.dtype)
  hvp = lambda e: jax.jvp(gradient, (x,), (jnp.broadcast_to(e, x.shape),))[1]  # noqa: E731
  hessian = jnp.transpose(jax.vmap(hvp)(basis), (1, 2, 0))
  w, q = jnp.linalg.eigh(0.5 * (hessian + jnp.swapaxes(hessian, 1, 2)))
  return q * jnp.sqrt(jnp.maximum(w, 0))[:, None, :]


# ------------------------------------------------------------------------------ the blocks


def _block(cases: list[layer_cases.Case], weight_sharing: WeightSharing) -> KroneckerBlock:
  """One leaf's :math:`A` and :math:`G` from its cases (module docstring's formulas)."""
  plain = all(not c.rows.cotangent and not isinstance(c.rows.x, layer_cases.Rows) for c in cases)
  if weight_sharing == "reduce" and plain:
    return _reduced_block(cases)
  num_cases = sum(_num_cases(c.rows) for c in cases)
  left = _sum_grams([_gram(c.rows) for c in cases]) / num_cases
  right = _sum_grams([_gram(c.cols) for c in cases])
  return KroneckerBlock(left, right)


def _reduced_block(cases: list[layer_cases.Case]) -> KroneckerBlock:
  """K-FAC-reduce: per example, inputs averaged and cotangents summed over all positions."""
  left, right, examples = 0.0, 0.0, 0
  for g in sorted({c.group for c in cases}):
    group = [(c.rows.x, c.cols.x) for c in cases if c.group == g]
    positions = sum(a.shape[2] for a, _ in group)
    a_bar = sum(a.sum(axis=2) for a, _ in group) / positions  # (B, G, K)
    g_hat = sum(d.sum(axis=3) for _, d in group)  # (M, B, G, P)
    left = left + jnp.einsum("bgk,bgl->gkl", a_bar, a_bar)
    right = right + jnp.einsum("mbgp,mbgq->gpq", g_hat, g_hat)
    examples += a_bar.shape[0]
  return KroneckerBlock(left / examples, right)


def _num_cases(side: layer_cases.Side) -> int:
  if isinstance(side.x, layer_cases.Rows):
    return side.x.ids.size
  shape = side.x.shape[1:] if side.cotangent else side.x.shape
  return shape[0] * shape[2]


def _gram(side: layer_cases.Side) -> jax.Array:
  """:math:`\\sum x x^\\top` over the side's cases (and output columns): ``(G, d, d)``, or the
  diagonal ``(1, rows)`` of one-hot rows (their counts)."""
  x = side.x
  if isinstance(x, layer_cases.Rows):
    counts = jnp.zeros((x.rows,), x.dtype).at[x.ids.reshape(-1)].add(x.valid.reshape(-1))
    return counts[None]
  if side.cotangent:
    return jnp.einsum("mbgnk,mbgnl->gkl", x, x)
  return jnp.einsum("bgnk,bgnl->gkl", x, x)


def _sum_grams(grams: list[jax.Array]) -> jax.Array:
  if all(g.ndim == 2 for g in grams):
    return sum(grams)
  dense = [g for g in grams if g.ndim == 3]
  total = sum(dense)
  for g in grams:
    if g.ndim == 2:
      total = total + g[:, :, None] * jnp.eye(g.shape[1], dtype=total.dtype)
  return total
