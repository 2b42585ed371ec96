r"""Reading a model's program: the call primitives, an evaluator, and the layers in it.

Every curvopt feature that reads a jaxpr uses this module, so a JAX upgrade that renames or
re-shapes a call primitive is one repair here:

* :data:`CALLS`, the one table of call-like primitives (``jit``, ``closed_call``, remat,
  custom-derivative calls, ``scan``): where each keeps its body and what inlining that body
  preserves; :func:`body` and :func:`equations` read it.
* :func:`interpret`, an evaluator that applies a rule to each equation and descends into the
  calls its caller chooses, and :func:`bind`, which applies one equation's primitive. The
  convolution-layout rewrite (:mod:`curvopt.linalg.conv_layout`), the forward Laplacian
  (:mod:`curvopt.autodiff.operators`) and the layer capture below are rules for it.
* **Layer capture.** :func:`find_sites` follows every parameter leaf through shape-only
  operations (reshape, transpose, dtype conversion, broadcast) to the first operation that mixes
  it with the data: a dense product (``dot_general``), a convolution's kernel
  (``conv_general_dilated``), an embedding lookup (``gather`` of rows) or an elementwise
  ``add``/``sub``/``mul``/``div`` (biases, scales). That operation is the leaf's *site*.
  :func:`run_instrumented` re-evaluates the program, records the data operands of every site and
  adds a zero *probe* to its output, so that the cotangent of the probe is the site's output
  cotangent :math:`\delta`; :func:`capture` does this for a batch of examples and returns the
  map from output cotangents to every site's :math:`\delta`. Ghost clipping
  (:mod:`curvopt.privacy.ghost`) and the Kronecker factors of K-FAC
  (:mod:`curvopt.curvature.kronecker`) are built on them.

Calls that receive a parameter are inlined when that keeps values and derivatives (``jit``,
``closed_call``, remat); a parameter passed into a custom-derivative call or into control flow
has no site (its uses are reported, and callers treat that leaf exactly or diagonally).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

# ------------------------------------------------------------------------ call primitives

CallKind = Literal["call", "remat", "custom", "loop"]


class Call(NamedTuple):
  """How a call-like primitive holds its body.

  Attributes:
    param: the equation parameter holding the body (a ``Jaxpr`` or ``ClosedJaxpr``).
    kind: what inlining the body keeps. ``"call"``: values and derivatives (only a compilation
      boundary goes); ``"remat"``: values and derivatives (the recomputation policy goes);
      ``"custom"``: values only (a custom differentiation rule goes); ``"loop"``: the body
      runs once per iteration on slices of the operands, so it is read, never inlined.
  """

  param: str
  kind: CallKind


#: The call-like primitives, by name (older JAX names beside current ones).
CALLS: dict[str, Call] = {
  "jit": Call("jaxpr", "call"),
  "pjit": Call("jaxpr", "call"),
  "closed_call": Call("call_jaxpr", "call"),
  "core_call": Call("call_jaxpr", "call"),
  "checkpoint": Call("jaxpr", "remat"),
  "remat": Call("jaxpr", "remat"),
  "remat2": Call("jaxpr", "remat"),
  "custom_jvp_call": Call("call_jaxpr", "custom"),
  "custom_vjp_call": Call("call_jaxpr", "custom"),
  "scan": Call("jaxpr", "loop"),
}

#: Kinds whose body can replace the call with values and derivatives unchanged.
TRANSPARENT: tuple[CallKind, ...] = ("call", "remat")
#: Every kind whose body is evaluated once on the call's operands (all but loops).
INLINABLE: tuple[CallKind, ...] = ("call", "remat", "custom")


def body(eqn: Any, kinds: Sequence[CallKind]) -> tuple[Any, Sequence[Any]] | None:
  """``(jaxpr, consts)`` of a call whose kind is in ``kinds``, else ``None``.

  The body reads the call's *last* ``len(jaxpr.invars)`` operands (custom-derivative calls may
  pass leading constants to their rules only).
  """
  call = CALLS.get(eqn.primitive.name)
  if call is None or call.kind not in kinds or call.param not in eqn.params:
    return None
  sub = eqn.params[call.param]
  if isinstance(sub, jex_core.ClosedJaxpr):
    return sub.jaxpr, sub.consts
  return sub, ()


def equations(jaxpr: Any, kinds: Sequence[CallKind]):
  """Every equation of ``jaxpr`` and, recursively, of the bodies of calls of ``kinds``."""
  for eqn in jaxpr.eqns:
    yield eqn
    sub = body(eqn, kinds)
    if sub is not None:
      yield from equations(sub[0], kinds)


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
  """Applies ``eqn``'s primitive to ``invals`` (as ``jax.core.eval_jaxpr`` does): a list."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


Rule = Callable[[Any, list, tuple[int, ...]], list]
Descend = Callable[[Any, list, tuple[int, ...]], tuple[Any, Sequence[Any]] | None]


def interpret(
  jaxpr: Any,
  consts: Sequence[Any],
  args: Sequence[Any],
  rule: Rule,
  *,
  descend: Descend | None = None,
  lift: Callable[[Any], Any] | None = None,
  prefix: tuple[int, ...] = (),
) -> list:
  """Evaluates ``jaxpr`` equation by equation, with values of the caller's choosing.

  Args:
    jaxpr: an open jaxpr.
    consts: values of its constvars (before ``lift``).
    args: values of its invars.
    rule: ``rule(eqn, invals, key) -> outvals`` for every equation not descended into.
    descend: ``descend(eqn, invals, key) -> (jaxpr, consts) | None``, usually
      :func:`body` of the kinds the caller inlines; the body is then evaluated in place with
      the same rule on the call's trailing operands.
    lift: maps a constant (literal or const) to the caller's value type; identity by default.
    prefix: the key of the enclosing call.

  Returns:
    The values of ``jaxpr``'s outvars. Equation keys are tuples of equation indices, one per
    level of inlined calls, so they are unique in the whole program.
  """
  lift = (lambda x: x) if lift is None else lift
  env: dict[Any, Any] = {}

  def read(v):
    return lift(v.val) if isinstance(v, jex_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts, strict=True):
    env[v] = lift(x)
  for v, x in zip(jaxpr.invars, args, strict=True):
    env[v] = x
  for k, eqn in enumerate(jaxpr.eqns):
    key = (*prefix, k)
    invals = [read(v) for v in eqn.invars]
    sub = None if descend is None else descend(eqn, invals, key)
    if sub is not None:
      inner, inner_consts = sub
      operands = invals[len(invals) - len(inner.invars) :]
      outs = interpret(inner, inner_consts, operands, rule, descend=descend, lift=lift, prefix=key)
    else:
      outs = rule(eqn, invals, key)
    for v, x in zip(eqn.outvars, outs, strict=True):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def live_equations(
  jaxpr: Any, used: Sequence[bool] | None = None, prefix: tuple[int, ...] = ()
) -> tuple[set[tuple[int, ...]], list[bool]]:
  """The keys of the equations whose results reach the used outputs (transparent calls read).

  Args:
    jaxpr: an open jaxpr.
    used: which of its outputs count (all by default).
    prefix: the key of the enclosing call.

  Returns:
    ``(keys, used_inputs)``: the keys (as :func:`interpret` numbers them, through
    :data:`TRANSPARENT` calls) of the live equations, and which invars they read.
  """
  used = [True] * len(jaxpr.outvars) if used is None else used
  live = {v for v, u in zip(jaxpr.outvars, used, strict=True) if u and _is_var(v)}
  keys: set[tuple[int, ...]] = set()
  for k in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[k]
    outs = [v in live for v in eqn.outvars]
    if not any(outs) and not eqn.effects:
      continue
    key = (*prefix, k)
    keys.add(key)
    sub = body(eqn, TRANSPARENT)
    if sub is None:
      live.update(v for v in eqn.invars if _is_var(v))
      continue
    inner_keys, inner_used = live_equations(sub[0], outs, key)
    keys |= inner_keys
    operands = eqn.invars[len(eqn.invars) - len(sub[0].invars) :]
    live.update(v for v, u in zip(operands, inner_used, strict=True) if u and _is_var(v))
  return keys, [v in live for v in jaxpr.invars]


def _is_var(v: Any) -> bool:
  return not isinstance(v, jex_core.Literal)


# ------------------------------------------------------------------------ layer sites

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
SiteKind = Literal["dot", "conv", "gather", "elementwise"]


@dataclasses.dataclass(frozen=True)
class _Tag:
  """A value derived from parameter ``leaf`` by the shape-only equations ``chain``."""

  leaf: int
  chain: tuple[Any, ...]
  norm_preserving: bool


@dataclasses.dataclass(frozen=True)
class Site:
  """The one place where a supported parameter leaf meets the data: a layer.

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
  kind: SiteKind

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
      (x,) = bind(eqn, [x])
    return x

  def op_fn(self, data, operand):
    """The site's operation with ``data`` (all other operands) and the parameter operand."""
    args = list(data)
    args[self.param_pos] = operand
    return bind(self.eqn, args)[0]

  def leaf_index(self, leaf_shape: tuple[int, ...]) -> np.ndarray:
    """Which leaf entry (flat index) each entry of the parameter operand reads.

    Computed on the host from the static chain: an integer array shaped like the operand
    (signs of ``neg`` dropped, broadcasts repeated).
    """
    index = np.arange(int(np.prod(leaf_shape, dtype=np.int64))).reshape(leaf_shape)
    for eqn in self.chain:
      index = _move_index(eqn, index)
    return index


def _move_index(eqn: Any, index: np.ndarray) -> np.ndarray:
  """One shape-only equation applied to an index array (its values are entry labels)."""
  name, params = eqn.primitive.name, eqn.params
  if name == "reshape":
    return index.reshape(params["new_sizes"])
  if name == "transpose":
    return index.transpose(params["permutation"])
  if name == "squeeze":
    return index.squeeze(tuple(params["dimensions"]))
  if name == "rev":
    return np.flip(index, tuple(params["dimensions"]))
  if name == "broadcast_in_dim":
    shape, dims = params["shape"], params["broadcast_dimensions"]
    expanded = np.expand_dims(index, [d for d in range(len(shape)) if d not in dims])
    return np.broadcast_to(expanded, shape)
  return index  # dtype conversions, copies, negation: same entries


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


def _site_kind(eqn, pos: int, tag: _Tag) -> SiteKind | None:
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
    uses: every use of every leaf: a :class:`Site`, or a string saying where it went instead.
  """

  sites: dict[int, Site]
  unsupported: dict[int, str]
  unused: list[int]
  reused: dict[int, list[Site]] = dataclasses.field(default_factory=dict)
  uses: dict[int, list[Site | str]] = dataclasses.field(default_factory=dict)


def same_coordinates(uses: list[Any]) -> bool:
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

  def descend(eqn, tags, key):
    del key
    return body(eqn, TRANSPARENT) if any(t is not None for t in tags) else None

  out_tags = interpret(
    jaxpr,
    [None] * len(jaxpr.constvars),
    in_tags,
    lambda eqn, tags, key: _propagate(eqn, tags, key, uses),
    descend=descend,
    lift=lambda x: None,
  )
  for tag in out_tags:
    if tag is not None:
      uses[tag.leaf].append("returned as an output")
  sites, unsupported, unused, reused = {}, {}, [], {}
  for leaf, leaf_uses in uses.items():
    if not leaf_uses:
      unused.append(leaf)
    elif len(leaf_uses) == 1 and isinstance(leaf_uses[0], Site):
      sites[leaf] = leaf_uses[0]
    elif same_coordinates(leaf_uses) or (
      leaf_ndims is not None
      and all(isinstance(u, Site) and matrix_site(u, leaf_ndims[leaf]) for u in leaf_uses)
    ):
      reused[leaf] = list(leaf_uses)
    else:
      reasons = [u.eqn.primitive.name if isinstance(u, Site) else u for u in leaf_uses]
      unsupported[leaf] = ", ".join(reasons) if len(reasons) == 1 else f"used {len(reasons)}x"
  return Plan(sites, unsupported, unused, reused, uses)


def _propagate(eqn, tags, key, uses) -> list:
  """One equation of :func:`find_sites`: the tags of its outputs; records sites and escapes."""
  tagged = [j for j, t in enumerate(tags) if t is not None]
  outs: list[_Tag | None] = [None] * len(eqn.outvars)
  name = eqn.primitive.name
  if not tagged:
    return outs
  if name in _STRUCTURAL + _BROADCAST and len(eqn.invars) == 1:
    t = tags[0]
    keeps = t.norm_preserving and name not in _BROADCAST
    return [_Tag(t.leaf, (*t.chain, eqn), keeps)]
  if len(tagged) == 1 and (kind := _site_kind(eqn, tagged[0], tags[tagged[0]])) is not None:
    t = tags[tagged[0]]
    uses[t.leaf].append(Site(key, t.leaf, t.chain, eqn, tagged[0], kind))
    return outs
  for j in tagged:
    uses[tags[j].leaf].append(f"enters {name!r}")
  return outs


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

  def descend(eqn, invals, key):
    del invals
    n = len(key)
    inside = any(k[:n] == key and len(k) > n for k in sites)
    return body(eqn, TRANSPARENT) if inside else None

  def rule(eqn, invals, key):
    if key not in sites:
      return bind(eqn, invals)
    site = sites[key]
    data[key] = [
      None if j == site.param_pos or not site.needs_data else x for j, x in enumerate(invals)
    ]
    return [bind(eqn, invals)[0] + probes[key]]

  outs = interpret(jaxpr, consts, args, rule, descend=descend)
  return outs, data


class Capture(NamedTuple):
  """What :func:`capture` records of a batch.

  Attributes:
    outputs: the program's outputs, each with a leading example axis.
    data: by site key, the site's operands with a leading example axis (``None`` for the
      parameter operand, and for every operand of a bias, whose gradient needs none).
    vjp: ``cotangents -> (fallback_grads, deltas)``: for cotangents shaped like ``outputs``,
      the per-example gradients of the ``fallback`` leaves (leading example axis) and, by site
      key, the cotangent of each site's output (leading example axis). Linear, so it can be
      ``vmap``-ped over several cotangents.
  """

  outputs: list
  data: dict
  vjp: Callable[[list], tuple[list, dict]]


def capture(
  closed: Any,
  leaves: Sequence[Any],
  examples: Sequence[Any],
  sites: dict[tuple[int, ...], Site],
  fallback: Sequence[int] = (),
) -> Capture:
  """Runs a one-example program over a batch, recording its sites' inputs and cotangents.

  ``closed`` is the ``ClosedJaxpr`` of ``f(leaves, example)`` for ONE example, whose invars
  are the parameter leaves followed by the example's leaves. It is evaluated for every example
  (``vmap``) with a zero probe added to each site's output; one reverse pass then gives every
  site's output cotangent, without forming any parameter gradient. The ``fallback`` leaves
  (those without a site) get one copy per example, so their per-example gradients come back
  exactly.

  Args:
    closed: the one-example program.
    leaves: the parameter leaves (shared by all examples).
    examples: the example leaves, each with a leading example axis ``B``.
    sites: the sites to instrument, by key (from :func:`find_sites`).
    fallback: indices of leaves whose per-example gradients are wanted.

  Returns:
    A :class:`Capture`.
  """
  fallback = list(fallback)
  num_examples = jnp.shape(examples[0])[0]

  def one_example(fb_leaves, example, probes):
    flat = list(leaves)
    for i, x in zip(fallback, fb_leaves, strict=True):
      flat[i] = x
    return run_instrumented(closed.jaxpr, closed.consts, [*flat, *example], sites, probes)

  probes = {
    key: jnp.zeros((num_examples, *s.out_aval.shape), s.out_aval.dtype) for key, s in sites.items()
  }
  fb_copies = [jnp.broadcast_to(leaves[i], (num_examples, *jnp.shape(leaves[i]))) for i in fallback]
  outputs, vjp_fn, data = jax.vjp(
    lambda fb, pr: jax.vmap(one_example)(fb, list(examples), pr), fb_copies, probes, has_aux=True
  )
  return Capture(outputs, data, lambda cotangents: vjp_fn(list(cotangents)))


def dot_factors(site: Site, data, delta):
  """Data and cotangent of a ``dot_general`` site as ``(B, G, N, K)`` and ``(B, G, N, P)``.

  ``B`` is the example axis of ``data``/``delta``, ``G`` the product of the product's batch
  dimensions, ``N`` of the data operand's free dimensions (positions sharing the weight), ``K``
  of the contracting and ``P`` of the parameter's free dimensions, in the order of
  :func:`dot_param_axes`.
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = site.eqn.params["dimension_numbers"]
  a_pos = 1 - site.param_pos
  a = data[a_pos]
  a_c, a_b = (lhs_c, lhs_b) if a_pos == 0 else (rhs_c, rhs_b)
  p_c = rhs_c if a_pos == 0 else lhs_c
  a_ndim = a.ndim - 1
  p_ndim = site.eqn.invars[site.param_pos].aval.ndim
  a_free = [i for i in range(a_ndim) if i not in a_c and i not in a_b]
  n_batch, n_a_free = len(a_b), len(a_free)
  n_p_free = p_ndim - len(p_c) - n_batch
  out_a = list(range(n_batch, n_batch + n_a_free))
  out_p = list(range(n_batch + n_a_free, n_batch + n_a_free + n_p_free))
  if a_pos == 1:  # parameter on the left: its free dimensions come first in the output
    out_p = list(range(n_batch, n_batch + n_p_free))
    out_a = list(range(n_batch + n_p_free, n_batch + n_p_free + n_a_free))
  b = a.shape[0]
  a = jnp.transpose(a, [0, *(1 + i for i in (*a_b, *a_free, *a_c))])
  g = _size(a.shape[1 : 1 + n_batch])
  n = _size(a.shape[1 + n_batch : 1 + n_batch + n_a_free])
  a = a.reshape(b, g, n, -1)
  d = jnp.transpose(delta, [0, *(1 + i for i in (*range(n_batch), *out_a, *out_p))])
  d = d.reshape(b, g, n, -1)
  return a, d


def dot_param_axes(site: Site) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """The parameter operand's (batch, contracting, free) axes of a ``dot_general`` site.

  In the order of :func:`dot_factors`: ``G``, ``K`` and ``P`` are their sizes' products, the
  contracting axes pair with the data's in the dimension numbers' order, and the free axes
  keep their order in the output.
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = site.eqn.params["dimension_numbers"]
  p_c, p_b = (lhs_c, lhs_b) if site.param_pos == 0 else (rhs_c, rhs_b)
  p_ndim = site.eqn.invars[site.param_pos].aval.ndim
  p_free = [i for i in range(p_ndim) if i not in p_c and i not in p_b]
  return tuple(p_b), tuple(p_c), tuple(p_free)


def _size(shape):
  out = 1
  for s in shape:
    out *= s
  return out
