r"""Rows of a Gauss-Newton matrix: :math:`G = F^\top F` from per-example Jacobians.

The generalised Gauss-Newton matrix of ``loss(model(θ))`` is :math:`G = J^\top H J`, with
:math:`J` the Jacobian of the model's outputs and :math:`H` the Hessian of the loss with
respect to them. For a loss that is a sum (or mean) of per-example terms, as every standard
loss is, :math:`H` is block diagonal with one :math:`K \times K` block :math:`H_i` per output
row :math:`i` (:math:`K` outputs per example). Factoring each block,
:math:`H_i = L_i L_i^\top`, gives

.. math:: G = \sum_i J_i^\top L_i L_i^\top J_i = F^\top F, \qquad F_i = L_i^\top J_i,

with :math:`F` of shape :math:`(N K, P)`. Dense Gauss-Newton steps form :math:`F^\top F`
(:math:`P \times P`) or the kernel :math:`F F^\top` (:math:`NK \times NK`) from these rows,
instead of from :math:`P` curvature products. Each row block costs :math:`K` reverse passes
through one example (``vmap``-ed), so all rows together cost about :math:`K` gradients.

The loss gradient :math:`\nabla_z L` is carried along as :math:`r` with :math:`L_i r_i =
\nabla_{z_i} L`, so the gradient is :math:`J^\top \nabla_z L = F^\top r` (a least-squares
residual: for :math:`\tfrac12\|z - y\|^2`, :math:`r = z - y`).

**Which rows are examples.** ``model_fn(params, **data)`` is assumed to compute each output
row from the same row of the data arguments whose leading size equals the output's, and from
nothing else with that leading size (data arguments of other sizes are passed whole). The
outputs may have several leaves with different numbers of rows (a physics-informed network's
interior and boundary residuals, each from its own points): each leading size is a *group*,
and rows are found per group by calling the model on one-row slices. Models that couple the
examples of a batch (BatchNorm in training mode) break this assumption; use a solver built on
curvature products (CG) for them.

The block factors :math:`L_i` come from :math:`K` Hessian-vector products of the loss with
"comb" tangents (a one in output :math:`k` of every row), which is exact for a loss that is
block diagonal over rows.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvopt._typing import Params


class OutputGroup(NamedTuple):
  """The outputs computed from one group of data rows.

  Attributes:
    size: the group's number of rows :math:`N_g` (the data's and the outputs' leading size).
    data_keys: the data arguments sliced per row.
    leaves: indices (in ``jax.tree.leaves`` order) of the output leaves with ``size`` rows.
    widths: :math:`K_\\ell` (outputs per row) of each of those leaves.
  """

  size: int
  data_keys: tuple[str, ...]
  leaves: tuple[int, ...]
  widths: tuple[int, ...]

  @property
  def width(self) -> int:
    return sum(self.widths)


class GaussNewtonRows(NamedTuple):
  """Per-row pieces of a Gauss-Newton factor (see the module docstring).

  Attributes:
    groups: the :class:`OutputGroup` of each block of rows, in order.
    sqrt_blocks: per group, the factors :math:`L_i`, shape ``(N_g, K_g, K_g)``.
    residual: :math:`r` for all rows, shape ``(sum_g N_g K_g,)``, in the rows' order.
    row_fn: ``(group index, example indices) -> F`` rows of those examples, shape
      ``(len(indices) * K_g, P)`` with columns in ``jax.tree.leaves(params)`` order.
  """

  groups: tuple[OutputGroup, ...]
  sqrt_blocks: tuple[jax.Array, ...]
  residual: jax.Array
  row_fn: Callable[[int, jax.Array], jax.Array]

  @property
  def num_rows(self) -> int:
    return sum(g.size * g.width for g in self.groups)


def _leading_size(tree: Any) -> int | None:
  """The common leading size of a data argument's leaves, or ``None`` (scalar or mixed)."""
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
  return sizes.pop() if len(sizes) == 1 else None


def _one_row(tree: Any, i: Any) -> Any:
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1, axis=0), tree)


def output_groups(model_fn: Callable[..., Any], params: Params, data: dict) -> tuple | None:
  """The :class:`OutputGroup` s of ``model_fn``, or ``None`` if it is not row-separable.

  Separability is checked on shapes: with every per-row data argument sliced to one row,
  every output leaf must have one row.
  """
  outputs = jax.eval_shape(lambda p: model_fn(p, **data), params)
  leaves = jax.tree.leaves(outputs)
  sizes = [leaf.shape[0] if leaf.ndim else None for leaf in leaves]
  if not leaves or None in sizes:
    return None
  keys_of = {}
  for key, value in data.items():
    size = _leading_size(value)
    if size in sizes:
      keys_of.setdefault(size, []).append(key)
  if set(keys_of) != set(sizes):
    return None
  sliced = {k: (_one_row(v, 0) if k in sum(keys_of.values(), []) else v) for k, v in data.items()}
  one = jax.tree.leaves(jax.eval_shape(lambda p: model_fn(p, **sliced), params))
  if [leaf.shape[:1] for leaf in one] != [(1,)] * len(leaves):
    return None
  groups = []
  for size in dict.fromkeys(sizes):  # first-appearance order
    idx = tuple(i for i, s in enumerate(sizes) if s == size)
    widths = tuple(int(np.prod(leaves[i].shape[1:])) for i in idx)
    groups.append(OutputGroup(size, tuple(keys_of[size]), idx, widths))
  return tuple(groups)


def _row_outputs(outputs: Any, group: OutputGroup) -> jax.Array:
  """The group's outputs as ``(N_g, K_g)``."""
  leaves = jax.tree.leaves(outputs)
  return jnp.concatenate([leaves[i].reshape(group.size, -1) for i in group.leaves], axis=1)


def _comb(outputs: Any, groups: tuple[OutputGroup, ...], k: int) -> Any:
  """The tangent with a one in per-row output ``k`` of every row of every group."""
  leaves, treedef = jax.tree.flatten(outputs)
  tangent = [jnp.zeros_like(leaf) for leaf in leaves]
  for group in groups:
    offset = 0
    for i, width in zip(group.leaves, group.widths, strict=True):
      if offset <= k < offset + width:
        flat = tangent[i].reshape(group.size, width).at[:, k - offset].set(1)
        tangent[i] = flat.reshape(leaves[i].shape)
      offset += width
  return jax.tree.unflatten(treedef, tangent)


def _sqrt_and_residual(blocks: jax.Array, grads: jax.Array) -> tuple[jax.Array, jax.Array]:
  r""":math:`L_i` with :math:`H_i = L_i L_i^\top` (PSD part) and :math:`r_i = L_i^{+} g_i`."""
  if blocks.shape[-1] == 1:
    root = jnp.sqrt(jnp.maximum(blocks, 0.0))
    safe = jnp.where(root > 0, root, 1.0)
    return root, jnp.where(root[..., 0] > 0, grads / safe[..., 0], 0.0)
  w, v = jnp.linalg.eigh(0.5 * (blocks + jnp.swapaxes(blocks, -1, -2)))
  tau = w.shape[-1] * jnp.finfo(w.dtype).eps * jnp.max(jnp.abs(w), axis=-1, keepdims=True)
  keep = w > tau
  root_w = jnp.where(keep, jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0)
  coefficients = jnp.einsum("nkj,nk->nj", v, grads)
  residual = jnp.where(keep, coefficients / jnp.where(keep, root_w, 1.0), 0.0)
  return v * root_w[:, None, :], residual


def loss_hessian_blocks(
  loss_fn: Callable[[Any], jax.Array], outputs: Any, groups: tuple[OutputGroup, ...]
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Per group, the loss Hessian blocks ``(N_g, K_g, K_g)`` and gradients ``(N_g, K_g)``.

  ``max K_g`` forward-over-reverse products of ``loss_fn`` with comb tangents.
  """
  width = max(g.width for g in groups)
  tangents = [_comb(outputs, groups, k) for k in range(width)]
  stacked = jax.tree.map(lambda *t: jnp.stack(t), *tangents)
  grad_fn = jax.grad(loss_fn)
  grads, columns = jax.vmap(lambda t: jax.jvp(grad_fn, (outputs,), (t,)))(stacked)
  grads = jax.tree.map(lambda g: g[0], grads)
  blocks, gradients = [], []
  for group in groups:
    cols = jax.vmap(lambda c, group=group: _row_outputs(c, group))(columns)[: group.width]
    blocks.append(jnp.moveaxis(cols, 0, -1))  # (N, K, K): [i, :, k] = H_i e_k
    gradients.append(_row_outputs(grads, group))
  return blocks, gradients


def gauss_newton_rows(
  model_fn: Callable[..., Any],
  loss_fn: Callable[[Any], jax.Array],
  params: Params,
  data: dict,
  groups: tuple[OutputGroup, ...] | None = None,
) -> GaussNewtonRows | None:
  r"""The per-row factor of the Gauss-Newton matrix of ``loss_fn(model_fn(params, **data))``.

  Args:
    model_fn: ``(params, **data) -> outputs`` (a pytree of arrays with leading row axes).
    loss_fn: ``outputs -> scalar``, a sum or mean of per-row terms.
    params: the point.
    data: the model's data keyword arguments.
    groups: :func:`output_groups` of the model, if already known.

  Returns:
    A :class:`GaussNewtonRows`, or ``None`` when ``model_fn`` is not row-separable by shapes
    (see the module docstring).

  Examples:
    Least squares :math:`\tfrac12\|Xw - y\|^2`: the rows are those of :math:`X`, and
    :math:`r = Xw - y`.

    >>> x, y = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), jnp.array([1.0, 0.0, 1.0])
    >>> rows = gauss_newton_rows(lambda w, x: x @ w, lambda z: 0.5 * jnp.sum((z - y) ** 2),
    ...                          jnp.array([1.0, 0.0]), {"x": x})
    >>> rows.row_fn(0, jnp.arange(3)).tolist(), rows.residual.tolist()
    ([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [0.0, 3.0, 4.0])
  """
  groups = output_groups(model_fn, params, data) if groups is None else groups
  if groups is None:
    return None
  outputs = model_fn(params, **data)
  blocks, gradients = loss_hessian_blocks(loss_fn, outputs, groups)
  sqrt_blocks, residuals = zip(
    *[_sqrt_and_residual(b, g) for b, g in zip(blocks, gradients, strict=True)], strict=True
  )
  batched = [key for g in groups for key in g.data_keys]

  def rows_of(index: int, i: jax.Array) -> jax.Array:
    """The rows :math:`L_i^\\top J_i` of example ``i`` of group ``index``, ``(K_g, P)``."""
    group = groups[index]
    sliced = {
      k: (_one_row(v, i if k in group.data_keys else 0) if k in batched else v)
      for k, v in data.items()
    }

    def f(p):
      out = jax.tree.leaves(model_fn(p, **sliced))
      return jnp.concatenate([out[j].reshape(-1) for j in group.leaves])

    _, vjp = jax.vjp(f, params)
    flat = lambda cot: jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(vjp(cot)[0])])
    return jax.vmap(flat)(sqrt_blocks[index][i].T)

  def row_fn(index: int, indices: jax.Array) -> jax.Array:
    rows = jax.vmap(lambda i: rows_of(index, i))(indices)
    return rows.reshape(-1, rows.shape[-1])

  residual = jnp.concatenate([r.reshape(-1) for r in residuals])
  return GaussNewtonRows(groups, tuple(sqrt_blocks), residual, row_fn)
