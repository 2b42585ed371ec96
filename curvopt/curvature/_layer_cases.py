r"""How each layer that :mod:`curvopt.autodiff.capture` finds becomes K-FAC's cases.

A *case* of a layer is one (example, position) pair: the layer's input there (a row of the
weight matrix's side, :math:`a`) and the cotangent of its output (the column side,
:math:`g`), both in the layout of the leaf's weight matrix (:class:`Index`). Dense products
give their data and output cotangents, convolutions their input patches (KFC), lookups their
one-hot rows (never materialised, :class:`Rows`), elementwise parameters a constant input 1
and their per-case gradient. :mod:`curvopt.curvature.kronecker` turns the cases into
factors.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from curvopt.autodiff import capture


def dtype_of(x: Any) -> Any:
  """Factors of half-precision models are accumulated in float32."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


class Index:
  """A static integer array (leaf entry of each matrix entry), usable as pytree metadata."""

  def __init__(self, array: np.ndarray):
    self.array = np.asarray(array)
    self._key = (self.array.shape, self.array.tobytes())
    flat = self.array.reshape(-1)
    self.identity = bool(np.array_equal(flat, np.arange(flat.size)))
    self.inverse = np.argsort(flat)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, Index) and self._key == other._key


class Use(NamedTuple):
  """A site of a leaf in the trace of group ``group``, in the leaf's block layout.

  Attributes:
    group: index of the example group whose trace holds the site.
    site: the site.
    index: the ``(groups, K, P)`` leaf index of the site's weight matrix.
    swapped: whether the site reads the block's matrix transposed (its cotangents are rows).
    split: for elementwise sites, ``(axes, cases, order)`` of :func:`_case_split`.
  """

  group: int
  site: capture.Site
  index: Index
  swapped: bool
  split: tuple | None


def uses_leaf(plan: capture.Plan, leaf: int) -> bool:
  return bool(plan.uses[leaf])


def leaf_layouts(leaves, plans, lives) -> tuple[dict[int, list[Use]], dict[int, str]]:
  """Per leaf, its sites in one common layout; or, for the diagonal block, the reason.

  Only sites that reach their group's outputs count (``lives``: the live equation keys).
  """
  layouts, diagonal = {}, {}
  for i, leaf in enumerate(leaves):
    uses = [
      (g, u)
      for g, (plan, live) in enumerate(zip(plans, lives, strict=True))
      for u in plan.uses[i]
      if not isinstance(u, capture.Site) or u.key in live
    ]
    if not uses:
      continue
    reasons = [u for _, u in uses if isinstance(u, str)]
    if reasons:
      diagonal[i] = reasons[0]
      continue
    found = [_site_use(g, site, jnp.shape(leaf)) for g, site in uses]
    if any(u is None for u in found):
      diagonal[i] = "an elementwise use that is not a broadcast"
      continue
    first = found[0].index.array
    for k, u in enumerate(found):
      same = np.array_equal(u.index.array, first)
      swapped = first.shape[0] == 1 and np.array_equal(u.index.array, first.transpose(0, 2, 1))
      if not (same or swapped):
        diagonal[i] = f"used {len(found)}x in different layouts"
        break
      found[k] = u._replace(index=found[0].index, swapped=not same)
    else:
      layouts[i] = found
  return layouts, diagonal


def _site_use(group: int, site: capture.Site, leaf_shape: tuple[int, ...]) -> Use | None:
  """The site's weight-matrix index: ``(groups, K, P)`` rows are inputs, columns outputs."""
  operand = site.leaf_index(leaf_shape)
  if site.kind == "dot":
    batch, contracting, free = capture.dot_param_axes(site)
    index = operand.transpose(*batch, *contracting, *free)
    size = lambda axes: math.prod(operand.shape[d] for d in axes)  # noqa: E731
    index = index.reshape(size(batch), size(contracting), size(free))
  elif site.kind == "conv":
    rhs_spec = site.eqn.params["dimension_numbers"].rhs_spec
    index = operand.transpose(rhs_spec[1], *rhs_spec[2:], rhs_spec[0])
    index = index.reshape(1, -1, operand.shape[rhs_spec[0]])
  elif site.kind == "gather":
    index = operand.reshape(1, operand.shape[0], -1)
  else:
    split = _case_split(site, leaf_shape)
    if split is None:
      return None
    index = np.arange(math.prod(leaf_shape)).reshape(1, 1, -1)
    return Use(group, site, Index(index), False, split)
  return Use(group, site, Index(index), False, None)


def _case_split(site: capture.Site, leaf_shape: tuple[int, ...]) -> tuple | None:
  """How an elementwise site's output splits into cases, each reading the whole leaf once.

  Returns ``(axes, cases, order)``: the output axes transposed to (case axes, leaf axes),
  the number of cases, and the permutation putting a case's entries in the leaf's flat order;
  ``None`` unless the operand is the leaf broadcast along some output axes.
  """
  index = np.broadcast_to(site.leaf_index(leaf_shape), site.out_aval.shape)
  shared = [ax for ax in range(index.ndim) if (np.ptp(index, axis=ax) == 0).all()]
  own = [ax for ax in range(index.ndim) if ax not in shared]
  size = math.prod(leaf_shape)
  rows = index.transpose(*shared, *own).reshape(-1, math.prod(index.shape[ax] for ax in own))
  if rows.shape[1] != size or not (rows == rows[0]).all():
    return None
  if not np.array_equal(np.sort(rows[0]), np.arange(size)):
    return None
  return (*shared, *own), rows.shape[0], np.argsort(rows[0])


class Rows(NamedTuple):
  """The one-hot rows of a lookup's indices, never materialised: ``(B, N)`` ids and mask."""

  ids: jax.Array
  valid: jax.Array
  rows: int
  dtype: Any


class Side(NamedTuple):
  """One side of a site's cases: activations ``(B, G, N, d)``, cotangents ``(M, B, G, N, d)``
  (``cotangent=True``) or one-hot rows."""

  x: Any
  cotangent: bool


class Case(NamedTuple):
  """A site's cases in its block's layout: ``rows`` side (:math:`A`), ``cols`` side
  (:math:`G`), and the example group it came from."""

  group: int
  rows: Side
  cols: Side


def record_cases(leaves, layouts, captures, columns):
  """Every block's cases ``(group, rows side, columns side)`` and the diagonal blocks."""
  cases: dict[int, list] = {i: [] for i in layouts}
  diagonals: dict[int, jax.Array] = {}
  for g, ((captured, fallback), cols) in enumerate(zip(captures, columns, strict=True)):
    fb_grads, deltas = jax.vmap(captured.vjp)(cols)
    for i, grads in zip(fallback, fb_grads, strict=True):
      sq = jnp.sum(jnp.square(grads.astype(dtype_of(grads))), axis=(0, 1))
      diagonals[i] = diagonals.get(i, 0) + sq
    for i, uses in layouts.items():
      for use in uses:
        if use.group == g:
          data = captured.data[use.site.key]
          left, right = _sides(use, data, deltas[use.site.key], leaves[i])
          cases[i].append(Case(g, right, left) if use.swapped else Case(g, left, right))
  return cases, diagonals


def _sides(use: Use, data: list, delta: jax.Array, leaf: jax.Array) -> tuple[Side, Side]:
  """The site's cases: its inputs (rows of the weight) and output cotangents (columns)."""
  site = use.site
  delta = delta.astype(dtype_of(delta))
  if site.kind == "dot":
    a, _ = capture.dot_factors(site, data, delta[0])
    d = jax.vmap(lambda dm: capture.dot_factors(site, data, dm)[1])(delta)
    return Side(a.astype(delta.dtype), False), Side(d, True)
  if site.kind == "conv":
    return _conv_sides(site, data, delta)
  if site.kind == "gather":
    return _lookup_sides(site, data, delta)
  return _elementwise_sides(site, data, delta, leaf, use.split)


def _conv_sides(site, data, delta):
  """Input patches ``(B, 1, N, C_in * taps)`` (KFC) and output cotangents per position."""
  params = site.eqn.params
  dn = params["dimension_numbers"]
  m, b = delta.shape[:2]
  x = jnp.moveaxis(data[0].astype(delta.dtype), 0, dn.lhs_spec[0])  # examples, then images
  x = x.reshape(*x.shape[: dn.lhs_spec[0]], -1, *x.shape[dn.lhs_spec[0] + 2 :])
  kernel_shape = site.eqn.invars[1].aval.shape
  patches = lax.conv_general_dilated_patches(
    x,
    [kernel_shape[d] for d in dn.rhs_spec[2:]],
    params["window_strides"],
    params["padding"],
    params["lhs_dilation"],
    params["rhs_dilation"],
    dn,
  )
  out_order = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
  patches = jnp.transpose(patches, out_order)
  patches = patches.reshape(b, 1, -1, patches.shape[-1])
  d = jnp.transpose(delta, (0, 1, *(2 + d for d in out_order)))
  return Side(patches, False), Side(d.reshape(m, b, 1, -1, d.shape[-1]), True)


def _lookup_sides(site, data, delta):
  """One-hot rows of the looked-up ids (out-of-range ``fill`` lookups read none)."""
  m, b = delta.shape[:2]
  rows = site.eqn.invars[0].aval.shape[0]
  ids = data[1].reshape(b, -1)
  if "FILL_OR_DROP" in str(site.eqn.params["mode"]):
    valid = (ids >= 0) & (ids < rows)
  else:
    valid = jnp.ones(ids.shape, bool)
  d = delta.reshape(m, b, 1, ids.shape[1], -1) * valid[None, :, None, :, None]
  rows_side = Rows(jnp.clip(ids, 0, rows - 1), valid, rows, d.dtype)
  return Side(rows_side, False), Side(d, True)


def _elementwise_sides(site, data, delta, leaf, split):
  """A bias or scale: input 1, and the per-case gradient (``∂out/∂operand`` times δ)."""
  axes, num_cases, order = split
  m, b = delta.shape[:2]
  data = site.full_data(data, b)
  operand = site.chain_fn(leaf)

  def slope(d):  # ∂ out / ∂ operand, entrywise (the operation is elementwise)
    return jax.jvp(lambda p: site.op_fn(d, p), (operand,), (jnp.ones_like(operand),))[1]

  in_axes = ([None if x is None else 0 for x in data],)
  u = jax.vmap(slope, in_axes=in_axes)(data).astype(delta.dtype)[None] * delta
  u = jnp.transpose(u, (0, 1, *(2 + ax for ax in axes))).reshape(m, b, num_cases, -1)
  ones = jnp.ones((b, 1, num_cases, 1), delta.dtype)
  return Side(ones, False), Side(u[..., order][:, :, None], True)
