"""Jaxpr analysis for ghost clipping: find where each parameter enters a layer.

:func:`find_sites` walks the jaxpr of a one-example loss and, for every parameter leaf, follows
the values derived from it by shape-only operations (reshape, transpose, dtype conversion,
broadcast) until the first operation that mixes it with the data. When that is the leaf's only
use and the operation is a dense product (``dot_general``), a convolution's kernel
(``conv_general_dilated``), an embedding lookup (``gather`` of rows) or an elementwise
``add``/``sub``/``mul``/``div`` (biases, scales), the leaf is *supported* and the operation is
its *site*. :func:`run_instrumented` re-evaluates the jaxpr, records the data operand of every
site and adds a zero "probe" to its output, so that the cotangent of the probe is the site's
output-cotangent δ. Calls (``jit``, ``closed_call``, ``checkpoint``) that receive a parameter are
inlined; custom-derivative calls and control flow are not, so a parameter passed into one of them
is unsupported (and handled exactly by the caller's per-example fallback).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jex_core

# Calls whose body is evaluated inline when a parameter flows into them. Inlining keeps values
# and derivatives unchanged (no custom rules), only the compilation boundary goes.
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_INLINE_REMAT = ("checkpoint", "remat", "remat2")
# Shape-only linear maps; all but broadcast_in_dim keep the Frobenius norm.
_STRUCTURAL = (
  "reshape",
  "transpose",
  "convert_element_type",
  "squeeze",
  "copy",
  "copy_p",
  "neg",
  "rev",
)
_BROADCAST = ("broadcast_in_dim",)
_ADDITIVE = ("add", "sub", "add_any")
_ELEMENTWISE = (*_ADDITIVE, "mul", "div")


@dataclasses.dataclass(frozen=True)
class _Tag:
  """A value derived from parameter ``leaf`` by the shape-only equations ``chain``."""

  leaf: int
  chain: tuple[Any, ...]
  norm_preserving: bool


@dataclasses.dataclass(frozen=True)
class Site:
  """The one place where a supported parameter leaf meets the data.

  Attributes:
    key: position of the equation (indices through inlined calls), unique in the jaxpr.
    leaf: index of the parameter leaf.
    chain: shape-only equations mapping the leaf to the operand ``param_pos`` of ``eqn``.
    eqn: the equation (``dot_general``, ``conv_general_dilated``, ``gather`` or elementwise).
    param_pos: operand index of the parameter-derived operand.
    kind: ``"dot"``, ``"conv"``, ``"gather"`` or ``"elementwise"``.
  """

  key: tuple[int, ...]
  leaf: int
  chain: tuple[Any, ...]
  eqn: Any
  param_pos: int
  kind: str

  @property
  def out_aval(self):
    return self.eqn.outvars[0].aval

  @property
  def needs_data(self) -> bool:
    """Whether the parameter's gradient depends on the other operands (not for a bias)."""
    return self.eqn.primitive.name not in _ADDITIVE

  def full_data(self, data, batch_size: int):
    """``data`` with operands a bias gradient ignores rebuilt as (free) zeros."""
    if self.needs_data:
      return data
    return [
      None if j == self.param_pos else jnp.zeros((batch_size, *v.aval.shape), v.aval.dtype)
      for j, v in enumerate(self.eqn.invars)
    ]

  def chain_fn(self, leaf_value):
    """Applies the shape-only chain to a value of the leaf."""
    x = leaf_value
    for eqn in self.chain:
      x = _bind(eqn, [x])
    return x

  def op_fn(self, data, operand):
    """The site's operation with ``data`` (all other operands) and the parameter operand."""
    args = list(data)
    args[self.param_pos] = operand
    return _bind(self.eqn, args)


def _bind(eqn, args):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  out = eqn.primitive.bind(*args, **bind_params)
  return out


def _inner_jaxpr(eqn):
  """(jaxpr, consts) of an inlinable call, or None."""
  name = eqn.primitive.name
  if name in _INLINE and _INLINE[name] in eqn.params:
    closed = eqn.params[_INLINE[name]]
  elif name in _INLINE_REMAT and "jaxpr" in eqn.params:
    closed = eqn.params["jaxpr"]
  else:
    return None
  if isinstance(closed, jex_core.ClosedJaxpr):
    return closed.jaxpr, closed.consts
  return closed, ()


def _gather_is_row_lookup(eqn) -> bool:
  """Whether ``gather(table, idx)`` takes whole rows of ``table`` (``jnp.take(table, idx, 0)``)."""
  dn = eqn.params["dimension_numbers"]
  table_ndim = eqn.invars[0].aval.ndim
  idx_aval = eqn.invars[1].aval
  out_ndim = eqn.outvars[0].aval.ndim
  return (
    table_ndim >= 1
    and tuple(dn.collapsed_slice_dims) == (0,)
    and tuple(dn.start_index_map) == (0,)
    and not tuple(dn.operand_batching_dims)
    and not tuple(dn.start_indices_batching_dims)
    and tuple(eqn.params["slice_sizes"]) == (1, *eqn.invars[0].aval.shape[1:])
    and tuple(dn.offset_dims) == tuple(range(out_ndim - table_ndim + 1, out_ndim))
    and idx_aval.ndim >= 1
    and idx_aval.shape[-1] == 1
  )


def _site_kind(eqn, pos: int, tag: _Tag) -> str | None:
  name = eqn.primitive.name
  if name == "dot_general" and tag.norm_preserving:
    return "dot"
  if (
    name == "conv_general_dilated"
    and pos == 1
    and tag.norm_preserving
    and eqn.params["feature_group_count"] == 1
    and eqn.params["batch_group_count"] == 1
  ):
    return "conv"
  if name == "gather" and pos == 0 and tag.norm_preserving and _gather_is_row_lookup(eqn):
    return "gather"
  if name in _ELEMENTWISE and len(eqn.invars) == 2 and (name != "div" or pos == 0):
    return "elementwise"
  return None


@dataclasses.dataclass
class Plan:
  """Result of :func:`find_sites`.

  Attributes:
    sites: one :class:`Site` per supported leaf, by leaf index.
    unsupported: indices of leaves that need the exact per-example fallback, with the reason.
    unused: indices of leaves the loss does not use (zero gradient).
    reused: leaves used at several dense-product sites that read them in the same coordinates
      (a layer applied twice), by leaf index: their per-example gradient is the sum over the
      sites, whose factors concatenate (see :func:`curvopt.privacy.ghost.ghost_clipped_sum`).
  """

  sites: dict[int, Site]
  unsupported: dict[int, str]
  unused: list[int]
  reused: dict[int, list[Site]] = dataclasses.field(default_factory=dict)


def _same_coordinates(uses: list[Any]) -> bool:
  """Whether every use is a ``dot`` site reading the leaf through the same chain and layout."""
  if len(uses) < 2 or not all(isinstance(u, Site) and u.kind == "dot" for u in uses):
    return False
  first = uses[0]

  def signature(site):
    eqn = site.eqn
    chain = tuple((e.primitive.name, str(e.params)) for e in site.chain)
    param_aval = eqn.invars[site.param_pos].aval
    return (
      site.param_pos,
      chain,
      str(eqn.params["dimension_numbers"]),
      param_aval.shape,
      eqn.invars[1 - site.param_pos].aval.ndim,
    )

  return all(signature(u) == signature(first) for u in uses[1:])


_LAYOUT_ONLY = ("transpose", "convert_element_type", "copy", "copy_p")


def leaf_axes(site: Site) -> tuple[int, ...] | None:
  """For a 2-D leaf read through transposes only: the leaf axis of each operand axis, else None."""
  perm = (0, 1)
  for eqn in site.chain:
    if eqn.primitive.name not in _LAYOUT_ONLY:
      return None
    if eqn.primitive.name == "transpose":
      perm = tuple(perm[i] for i in eqn.params["permutation"])
  return perm


def matrix_site(site: Site, leaf_ndim: int) -> bool:
  """Whether a site reads a 2-D leaf as a matrix whose per-example gradient is ``A^T D``.

  A row lookup (``gather``) or a dense product with one contracting and no batch dimension on the
  parameter side, through transposes and dtype conversions only (no sign flip, no reshape).
  """
  if leaf_ndim != 2 or site.kind not in ("dot", "gather") or leaf_axes(site) is None:
    return False
  if site.kind == "gather":
    return True
  (lhs_c, rhs_c), (lhs_b, _) = site.eqn.params["dimension_numbers"]
  p_c = lhs_c if site.param_pos == 0 else rhs_c
  return len(p_c) == 1 and not lhs_b


def find_sites(jaxpr, num_leaves: int, leaf_ndims: Sequence[int] | None = None) -> Plan:
  """Finds the site(s) of every parameter leaf; ``jaxpr.invars[:num_leaves]`` are the leaves.

  With ``leaf_ndims``, a 2-D leaf read at several row lookups and dense products (a tied
  embedding and output projection) is ``reused`` too (see :func:`matrix_site`).
  """
  uses: dict[int, list[Site | str]] = {i: [] for i in range(num_leaves)}
  in_tags = [_Tag(i, (), True) for i in range(num_leaves)]
  in_tags += [None] * (len(jaxpr.invars) - num_leaves)
  out_tags = _walk(jaxpr, in_tags, (), uses)
  for tag in out_tags:
    if tag is not None:
      uses[tag.leaf].append("returned as an output")
  sites, unsupported, unused, reused = {}, {}, [], {}
  for leaf, leaf_uses in uses.items():
    if not leaf_uses:
      unused.append(leaf)
    elif len(leaf_uses) == 1 and isinstance(leaf_uses[0], Site):
      sites[leaf] = leaf_uses[0]
    elif _same_coordinates(leaf_uses) or (
      leaf_ndims is not None
      and all(isinstance(u, Site) and matrix_site(u, leaf_ndims[leaf]) for u in leaf_uses)
    ):
      reused[leaf] = list(leaf_uses)
    else:
      reasons = [u.eqn.primitive.name if isinstance(u, Site) else u for u in leaf_uses]
      unsupported[leaf] = ", ".join(reasons) if len(reasons) == 1 else f"used {len(reasons)}x"
  return Plan(sites, unsupported, unused, reused)


def _walk(jaxpr, in_tags, prefix, uses):
  env: dict[Any, _Tag | None] = {}

  def read(v):
    return None if isinstance(v, jex_core.Literal) else env.get(v)

  for v, t in zip(jaxpr.invars, in_tags, strict=True):
    env[v] = t
  for k, eqn in enumerate(jaxpr.eqns):
    key = (*prefix, k)
    tags = [read(v) for v in eqn.invars]
    tagged = [j for j, t in enumerate(tags) if t is not None]
    outs: list[_Tag | None] = [None] * len(eqn.outvars)
    name = eqn.primitive.name
    inner = _inner_jaxpr(eqn) if tagged else None
    if not tagged:
      pass
    elif inner is not None:
      outs = _walk(inner[0], tags[len(eqn.invars) - len(inner[0].invars) :], key, uses)
    elif name in _STRUCTURAL + _BROADCAST and len(eqn.invars) == 1:
      t = tags[0]
      keeps = t.norm_preserving and name not in _BROADCAST
      outs = [_Tag(t.leaf, (*t.chain, eqn), keeps)]
    elif len(tagged) == 1 and (kind := _site_kind(eqn, tagged[0], tags[tagged[0]])) is not None:
      t = tags[tagged[0]]
      uses[t.leaf].append(Site(key, t.leaf, t.chain, eqn, tagged[0], kind))
    else:
      for j in tagged:
        uses[tags[j].leaf].append(f"enters {name!r}")
    for v, t in zip(eqn.outvars, outs, strict=True):
      env[v] = t
  return [read(v) for v in jaxpr.outvars]


def run_instrumented(
  jaxpr, consts: Sequence[Any], args: Sequence[Any], sites: dict[tuple[int, ...], Site], probes
):
  """Evaluates ``jaxpr`` with a probe added to each site's output.

  Args:
    jaxpr: the (open) jaxpr analysed by :func:`find_sites`.
    consts: values of its constvars.
    args: values of its invars.
    sites: the sites to instrument, by key.
    probes: zero arrays shaped like each site's output, by key.

  Returns:
    ``(outputs, data)``: the jaxpr's outputs and, by key, the list of each site's operands with
    the parameter operand replaced by ``None``.
  """
  data: dict[tuple[int, ...], list[Any]] = {}
  outs = _run(jaxpr, consts, args, (), sites, probes, data)
  return outs, data


def _run(jaxpr, consts, args, prefix, sites, probes, data):
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts, strict=True):
    env[v] = x
  for v, x in zip(jaxpr.invars, args, strict=True):
    env[v] = x
  for k, eqn in enumerate(jaxpr.eqns):
    key = (*prefix, k)
    invals = [read(v) for v in eqn.invars]
    inner = _inner_jaxpr(eqn)
    if key in sites:
      site = sites[key]
      out = _bind(eqn, invals) + probes[key]
      data[key] = [
        None if j == site.param_pos or not site.needs_data else x for j, x in enumerate(invals)
      ]
      outs = [out]
    elif inner is not None and _contains_site(key, sites):
      n_extra = len(eqn.invars) - len(inner[0].invars)
      outs = _run(inner[0], inner[1], invals[n_extra:], key, sites, probes, data)
    else:
      out = _bind(eqn, invals)
      outs = out if eqn.primitive.multiple_results else [out]
    for v, x in zip(eqn.outvars, outs, strict=True):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _contains_site(prefix, sites) -> bool:
  n = len(prefix)
  return any(key[:n] == prefix and len(key) > n for key in sites)
