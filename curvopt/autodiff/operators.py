r"""Differential operators of a function with respect to its inputs, batched over points.

Physics-informed losses need, at each of many collocation points :math:`x \in \mathbb{R}^d`,
second derivatives of a network :math:`u(x)` with respect to :math:`x`: the Laplacian
:math:`\Delta u = \operatorname{tr} \nabla^2 u`, single entries :math:`\partial^2 u/\partial x_i^2`
of the Hessian's diagonal, or the divergence :math:`\nabla \cdot F` of a vector field. Forming
the dense :math:`d \times d` Hessian per point (``jnp.trace(jax.hessian(u)(x))``) costs ``d``
forward-over-reverse passes and ``d^2`` memory per point and throws almost all of it away.

The functions here propagate only what the operator needs, in forward mode. For each basis
direction :math:`e_i` the second directional derivative
:math:`\partial^2 u/\partial x_i^2 = \tfrac{d^2}{dt^2} u(x + t e_i)|_{t=0}` is the second
Taylor coefficient of :math:`t \mapsto u(x + t e_i)`; all ``d`` directions are pushed through
the network together (``vmap`` over the basis), so the primal values are computed once and
only the first- and second-order streams are batched (Taylor mode, Griewank and Walther 2008,
ch. 13; Bettencourt, Johnson and Duvenaud 2019). Summing the second-order stream over the
directions gives the Laplacian; this is the "forward Laplacian" computation of Li et al.
(2023) with the sum taken at the output rather than layer by layer.

Conventions: ``f`` maps **one point** (an array of shape ``(d,)``) to an array (a scalar for
a solution :math:`u`, a ``(d,)`` vector for a flux); ``x`` has shape ``(*batch, d)`` and every
leading axis is a batch axis (``vmap``-ed, points are independent). Network parameters are
closed over, which keeps the operators differentiable in them (``jax.grad``, ``jax.jvp`` and
:func:`curvopt.ggn_fn` with respect to the parameters all work through them)::

  residual = lambda params, x: -laplacian(lambda p: net(params, p), x) - source(x)

References:
  Li, Ye, Wu, Chen, Cai, Wang, Ji, Zhu, Ren, Wang, Xiang, "A computational framework for neural
  network-based variational Monte Carlo with Forward Laplacian", Nature Machine Intelligence
  2024 (arXiv:2307.08214, 2023).
  Bettencourt, Johnson, Duvenaud, "Taylor-mode automatic differentiation for higher-order
  derivatives in JAX", NeurIPS 2019 Program Transformations workshop.
  Griewank and Walther, "Evaluating Derivatives", 2nd ed., SIAM 2008, ch. 13.
"""

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import jet

from curvopt import _checks
from curvopt.autodiff import capture

LaplacianMethod = Literal["forward_laplacian", "taylor", "forward"]
DiagonalMethod = Literal["forward", "taylor"]
LAPLACIAN_METHODS = ("forward_laplacian", "taylor", "forward")
DIAGONAL_METHODS = ("forward", "taylor")

PointFn = Callable[[jax.Array], jax.Array]


def _check_points(name: str, x: Any) -> jax.Array:
  """``x`` as an array of points ``(*batch, d)`` with a floating dtype."""
  if not hasattr(x, "shape") or jnp.ndim(x) < 1:
    raise TypeError(
      f"{name} needs x of shape (*batch, d): one point per row, its coordinates on the last "
      f"axis; got {type(x).__name__} of shape {jnp.shape(x)}. For a single point pass a "
      "(d,) array (e.g. jnp.atleast_1d(x))."
    )
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} needs floating-point points; got dtype {x.dtype}. Cast x first.")
  if x.shape[-1] == 0:
    raise ValueError(f"{name} needs points with at least one coordinate; got shape {x.shape}.")
  return x


def _check_output(name: str, f: PointFn, point: jax.Array, want: tuple[int, ...] | None) -> Any:
  out = jax.eval_shape(f, point)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(
      f"{name} needs f to return one array per point; f returned the pytree "
      f"{jax.tree.map(lambda s: s.shape, out)}. Apply {name} to each output separately."
    )
  if want is not None and out.shape != want:
    raise ValueError(
      f"{name} needs f to map a point of shape {point.shape} to a vector of the same shape "
      f"{want}; f returned shape {out.shape}."
    )
  return out


def _over_points(per_point: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Applies ``per_point`` to every point of ``x`` (``(*batch, d)``), ``vmap``-ed."""
  batch = x.shape[:-1]
  if not batch:
    return per_point(x)
  flat = x.reshape((-1, x.shape[-1]))
  out = jax.vmap(per_point)(flat)
  return out.reshape(batch + out.shape[1:])


def _check_method(method: str, methods: tuple[str, ...]) -> None:
  _checks.check_choice("method", method, methods)


def _second_directional(f: PointFn, point: jax.Array, v: jax.Array, method: str) -> jax.Array:
  r""":math:`\tfrac{d^2}{dt^2} f(x + t v)|_{t=0} = \nabla^2 f(x)[v, v]`, in forward mode."""
  if method == "taylor":
    # jet's series are derivative coefficients: the second term is f''[v, v].
    try:
      _, (_, second) = jet.jet(f, (point,), ((v, jnp.zeros_like(v)),))
    except (KeyError, NotImplementedError, jax.errors.UnexpectedTracerError) as err:
      raise ValueError(
        f"method='taylor': jax.experimental.jet has no rule for an operation of f ({err!r}; "
        "custom-JVP functions such as jax.nn.relu have none). Use method='forward' (or "
        "'forward_laplacian' for the Laplacian)."
      ) from None
    return second
  # Nested JVPs (forward over forward): the tangent of the tangent along the same direction.
  return jax.jvp(lambda y: jax.jvp(f, (y,), (v,))[1], (point,), (v,))[1]


def _directional_second_derivatives(
  f: PointFn, point: jax.Array, method: str, chunk_size: int | None
) -> jax.Array:
  """``[∂²f/∂x_i² for i < d]`` at one point, shape ``(d, *out)``, all directions batched."""
  basis = jnp.eye(point.shape[-1], dtype=point.dtype)
  second = lambda v: _second_directional(f, point, v, method)  # noqa: E731
  if chunk_size is None:
    return jax.vmap(second)(basis)
  return jax.lax.map(second, basis, batch_size=chunk_size)


def _check_chunk(chunk_size: int | None) -> None:
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")


# Primitives linear in their operands that depend on x (the others being constants): their
# second-order term vanishes, so the Laplacian stream is pushed through the linear map only.
_LINEAR = frozenset(
  """add sub neg reduce_sum reshape broadcast_in_dim transpose squeeze expand_dims slice
  dynamic_slice concatenate convert_element_type copy copy_p pad select_n gather
  dynamic_update_slice cumsum real imag rev reduce_precision add_any""".split()
)
# Bilinear primitives: linear when exactly one operand depends on x.
_BILINEAR = frozenset(("mul", "dot_general", "conv_general_dilated"))
# Elementwise primitives: with one x-dependent operand a of the output's shape,
# p''(a)[g, g] = p''(a) * g**2, so the curvature term is p''(a) * sum_i (d_i a)**2.
_ELEMENTWISE = frozenset(
  """abs acos acosh asin asinh atan atan2 atanh cbrt cos cosh digamma div erf erf_inv erfc exp
  exp2 expm1 integer_pow lgamma log log1p logistic max min mul pow rsqrt sin sinh sqrt square
  sub tan tanh""".split()
)


def _is_float(aval: Any) -> bool:
  return jnp.issubdtype(aval.dtype, jnp.inexact)


def _forward_laplacian_eval(jaxpr: Any, consts: list, args: list) -> list:
  """Evaluates ``jaxpr`` on triples ``(value, gradient, laplacian)`` (Li et al. 2023).

  ``gradient`` holds the ``d`` first-order tangents along the basis vectors stacked on a
  leading axis, ``laplacian`` the sum over the basis of the second-order tangents; both are
  ``None`` for values that do not depend on the input point. For ``y = p(a)``:
  :math:`\\nabla y = p'(a) \\nabla a` and
  :math:`\\Delta y = p'(a)\\, \\Delta a + \\sum_i p''(a)[\\partial_i a, \\partial_i a]`, the second
  term skipped for primitives linear in their dependent operands. ``jit`` calls on dependent
  values are evaluated in place (:data:`curvopt.autodiff.capture.CALLS`).
  """

  def descend(eqn, ins, key):
    del key
    dependent = any(g is not None for _, g, _ in ins)
    return capture.body(eqn, ("call",)) if dependent and _has_float_output(eqn) else None

  return capture.interpret(
    jaxpr, consts, args, _forward_laplacian_step, descend=descend, lift=lambda c: (c, None, None)
  )


def _has_float_output(eqn: Any) -> bool:
  return any(_is_float(v.aval) for v in eqn.outvars)


def _forward_laplacian_step(eqn: Any, ins: list, key: tuple[int, ...]) -> list:
  """One equation on triples; integer and boolean results carry no derivative streams."""
  del key
  dep = [i for i, (_, g, _) in enumerate(ins) if g is not None]
  if not dep or not _has_float_output(eqn):
    # constants, and integer/boolean results of x (comparisons): no derivative streams
    return [(o, None, None) for o in capture.bind(eqn, [val for val, _, _ in ins])]
  triples = _forward_laplacian_rule(eqn, ins, dep)
  return [
    t if _is_float(v.aval) else (t[0], None, None)
    for v, t in zip(eqn.outvars, triples, strict=True)
  ]


def _forward_laplacian_rule(eqn: Any, ins: list, dep: list[int]) -> list:
  """One primitive on triples: linearise once, push both streams, add the curvature term."""
  values = [val for val, _, _ in ins]

  def p(*dep_values):
    full = list(values)
    for i, val in zip(dep, dep_values, strict=True):
      full[i] = val
    out = capture.bind(eqn, full)
    return tuple(out) if eqn.primitive.multiple_results else out[0]

  dep_values = [values[i] for i in dep]
  grads = [ins[i][1] for i in dep]
  laps = [ins[i][2] for i in dep]
  out, lin = jax.linearize(p, *dep_values)
  out_grad = jax.vmap(lin)(*grads)
  out_lap = lin(*laps)
  name = eqn.primitive.name
  linear = name in _LINEAR or (name in _BILINEAR and len(dep) == 1)
  linear = linear or (name == "div" and dep == [0])
  elementwise = (
    name in _ELEMENTWISE
    and len(dep) == 1
    and not eqn.primitive.multiple_results
    and jnp.shape(dep_values[0]) == jnp.shape(out)
  )
  if not linear and elementwise:
    # p''(a) once, at the primal (unbatched): then one square-and-sum over the d tangents.
    ones = jnp.ones_like(dep_values[0])
    p2 = jax.jvp(lambda a: jax.jvp(p, (a,), (ones,))[1], (dep_values[0],), (ones,))[1]
    out_lap = out_lap + p2 * jnp.sum(grads[0] ** 2, axis=0)
  elif not linear:

    def second(*tangents):
      return jax.jvp(lambda *a: jax.jvp(p, a, tangents)[1], tuple(dep_values), tangents)[1]

    curvature = jax.vmap(second)(*grads)
    out_lap = jax.tree.map(lambda a, c: a + c.sum(0), out_lap, curvature)
  if not eqn.primitive.multiple_results:
    return [(out, out_grad, out_lap)]
  return list(zip(out, out_grad, out_lap, strict=True))


def _forward_laplacian(f: PointFn, point: jax.Array) -> jax.Array:
  """The Laplacian of ``f`` at one point by the forward-Laplacian interpreter."""
  closed = jax.make_jaxpr(f)(point)  # closed-over parameters (even tracers) become consts
  d = point.shape[-1]
  seed = (point, jnp.eye(d, dtype=point.dtype), jnp.zeros_like(point))
  ((value, _, lap),) = _forward_laplacian_eval(closed.jaxpr, closed.consts, [seed])
  return jnp.zeros_like(value) if lap is None else lap


def hessian_diagonal(
  f: PointFn,
  x: jax.Array,
  *,
  method: DiagonalMethod = "forward",
  chunk_size: int | None = None,
) -> jax.Array:
  r"""Diagonal of the input Hessian, :math:`\partial^2 f / \partial x_i^2`, at every point.

  Each entry is a second directional derivative along a basis vector,
  :math:`\partial^2 f/\partial x_i^2 = \tfrac{d^2}{dt^2} f(x + t e_i)|_{t=0}`, the second
  Taylor coefficient of :math:`f` along :math:`e_i`. The ``d`` directions travel together
  through one forward pass (``vmap`` over the basis shares the primal computation), so no
  :math:`d \times d` matrix and no reverse pass are formed.

  ``method``:

  * ``"forward"`` (default): forward over forward (``jax.jvp`` of ``jax.jvp``), for every
    differentiable JAX function (custom JVP rules included);
  * ``"taylor"``: second-order Taylor mode, ``jax.experimental.jet`` (one stream fewer, but
    ``jet`` lacks rules for custom-JVP functions such as ``jax.nn.relu`` and its ``tanh`` rule
    is slower on CPU; see ``benchmarks/operators.py``).

  Args:
    f: function of one point, ``(d,) -> (*out)`` (parameters closed over).
    x: points, shape ``(*batch, d)``; leading axes are batch axes.
    method: ``"forward"`` or ``"taylor"``.
    chunk_size: directions pushed together (``None``: all ``d``); bounds memory for large
      ``d``.

  Returns:
    Array of shape ``(*batch, *out, d)``.

  Examples:
    :math:`f(x) = x_0^2 x_1 + \sin x_1` has :math:`\partial_0^2 f = 2 x_1` and
    :math:`\partial_1^2 f = -\sin x_1`:

    >>> f = lambda x: x[0] ** 2 * x[1] + jnp.sin(x[1])
    >>> h = hessian_diagonal(f, jnp.array([[1.0, 1.0], [2.0, 3.0]]))
    >>> np.asarray(h, np.float64).round(4).tolist()
    [[2.0, -0.8415], [6.0, -0.1411]]
  """
  x = _check_points("hessian_diagonal", x)
  _check_chunk(chunk_size)
  point = x.reshape((-1, x.shape[-1]))[0]
  _check_output("hessian_diagonal", f, point, None)
  _check_method(method, DIAGONAL_METHODS)

  def per_point(p):
    return jnp.moveaxis(_directional_second_derivatives(f, p, method, chunk_size), 0, -1)

  return _over_points(per_point, x)


def laplacian(
  f: PointFn,
  x: jax.Array,
  *,
  method: LaplacianMethod = "forward_laplacian",
  chunk_size: int | None = None,
) -> jax.Array:
  r"""Laplacian :math:`\Delta f = \sum_i \partial^2 f/\partial x_i^2 = \operatorname{tr}\nabla^2 f`.

  The sum over ``i`` of the second directional derivatives along the basis vectors, in
  forward mode, instead of the ``d`` forward-over-reverse passes and :math:`d^2` entries of
  ``jnp.trace(jax.hessian(f)(x))``. For a vector-valued ``f`` the Laplacian of each output
  component is returned.

  ``method``:

  * ``"forward_laplacian"`` (default): the forward Laplacian of Li et al. (2023). ``f`` is
    traced to a jaxpr once, and each operation maps the triple (value, gradient
    :math:`\nabla a` as ``d`` stacked tangents, Laplacian :math:`\Delta a`) to its output's:
    :math:`\nabla y = p'(a)\nabla a`,
    :math:`\Delta y = p'(a)\,\Delta a + \sum_i p''(a)[\partial_i a, \partial_i a]`, the last
    term only for operations that are not linear in ``x`` (``tanh``, products of two
    ``x``-dependent factors, ...). Each layer thus carries ``1 + d + 1`` vectors, against
    ``1 + 2d`` for Taylor mode and about ``3d`` for ``jax.hessian``. The rules come from
    each primitive's own JVP, so any forward-differentiable function works (``custom_vjp``
    functions do not: use ``"forward"`` only if they have a JVP).
  * ``"forward"``: the sum of :func:`hessian_diagonal`'s nested JVPs.
  * ``"taylor"``: the same with ``jax.experimental.jet``.

  Args:
    f: function of one point, ``(d,) -> (*out)`` (parameters closed over).
    x: points, shape ``(*batch, d)``; leading axes are batch axes.
    method: ``"forward_laplacian"``, ``"forward"`` or ``"taylor"``.
    chunk_size: directions pushed together by ``"forward"``/``"taylor"`` (``None``: all
      ``d``); ignored by ``"forward_laplacian"``.

  Returns:
    Array of shape ``(*batch, *out)``.

  Examples:
    :math:`u(x) = \prod_i \sin(\pi x_i)` in two dimensions has
    :math:`\Delta u = -2\pi^2 u`:

    >>> u = lambda x: jnp.prod(jnp.sin(jnp.pi * x))
    >>> x = jnp.array([[0.5, 0.5], [0.25, 0.5]])
    >>> ratio = laplacian(u, x) / jax.vmap(u)(x) / (-2 * jnp.pi**2)
    >>> ratio.round(4).tolist()
    [1.0, 1.0]

  References:
    Li et al., "A computational framework for neural network-based variational Monte Carlo
    with Forward Laplacian", 2023 (arXiv:2307.08214).
  """
  x = _check_points("laplacian", x)
  _check_chunk(chunk_size)
  point = x.reshape((-1, x.shape[-1]))[0]
  _check_output("laplacian", f, point, None)
  _check_method(method, LAPLACIAN_METHODS)
  if method == "forward_laplacian":
    return _over_points(lambda p: _forward_laplacian(f, p), x)
  return _over_points(lambda p: _directional_second_derivatives(f, p, method, chunk_size).sum(0), x)


def divergence(f: PointFn, x: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
  r"""Divergence :math:`\nabla \cdot F = \sum_i \partial F_i/\partial x_i` of a vector field.

  The trace of the Jacobian of :math:`F: \mathbb{R}^d \to \mathbb{R}^d`, from ``d`` JVPs
  along the basis vectors pushed together (the primal is computed once), keeping only the
  diagonal entry of each: no reverse pass and no stored Jacobian. ``divergence(jax.grad(u),
  x)`` equals ``laplacian(u, x)`` (at reverse-over-forward cost).

  Args:
    f: vector field of one point, ``(d,) -> (d,)`` (parameters closed over).
    x: points, shape ``(*batch, d)``.
    chunk_size: directions pushed together (``None``: all ``d``).

  Returns:
    Array of shape ``(*batch,)``.

  Examples:
    :math:`F(x) = (x_0 x_1, x_1^2)` has :math:`\nabla \cdot F = x_1 + 2 x_1 = 3 x_1`:

    >>> F = lambda x: jnp.stack([x[0] * x[1], x[1] ** 2])
    >>> divergence(F, jnp.array([[1.0, 2.0], [5.0, -1.0]])).tolist()
    [6.0, -3.0]
  """
  x = _check_points("divergence", x)
  _check_chunk(chunk_size)
  point = x.reshape((-1, x.shape[-1]))[0]
  _check_output("divergence", f, point, point.shape)

  def per_point(p):
    basis = jnp.eye(p.shape[-1], dtype=p.dtype)
    # Entry i of the JVP along e_i is dF_i/dx_i; the primal is unbatched under vmap.
    entry = lambda v: jnp.vdot(v, jax.jvp(f, (p,), (v,))[1])  # noqa: E731
    if chunk_size is None:
      return jax.vmap(entry)(basis).sum(0)
    return jax.lax.map(entry, basis, batch_size=chunk_size).sum(0)

  return _over_points(per_point, x)
