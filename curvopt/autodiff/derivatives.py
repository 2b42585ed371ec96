r"""Jacobians and Hessians computed the cheap way.

The functions here choose among JAX's transformations by the shape of the problem:

* :func:`jacobian` picks forward mode for tall Jacobians (more outputs than inputs) and
  reverse mode for wide ones, at trace time; the two differ by 10x and more.
* :func:`batch_jacobian` / :func:`batch_hessian` exploit row independence of batched
  functions (the "sum over the batch" trick) and never compute the ``B x B`` blocks of zeros.
* :func:`jacobian_diagonal` finds elementwise-separable functions by reading their jaxpr and
  then needs a single forward pass.
* :func:`jmp`, :func:`mjp`, :func:`jacobian_gram` and :func:`empirical_ntk` are products with
  Jacobians that never materialise them.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from curvopt import _checks, _nnx
from curvopt.autodiff import capture

JacobianMode = Literal["auto", "fwd", "rev"]
HessianMode = Literal["fwd_rev", "rev_rev", "fwd_fwd", "rev_fwd"]
NtkMethod = Literal["auto", "jacobian_contraction", "ntk_vector_products"]
JACOBIAN_MODES = ("auto", "fwd", "rev")
HESSIAN_MODES = ("fwd_rev", "rev_rev", "fwd_fwd", "rev_fwd")
NTK_METHODS = ("auto", "jacobian_contraction", "ntk_vector_products")


def _num_elements(tree: Any) -> int:
  return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def _select(args: Sequence[Any], argnums: int | Sequence[int]) -> Any:
  if isinstance(argnums, int):
    return args[argnums]
  return tuple(args[i] for i in argnums)


def jacobian(
  f: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  *,
  mode: JacobianMode = "auto",
  has_aux: bool = False,
  holomorphic: bool = False,
  wrt: Any = None,
) -> Callable[..., Any]:
  r"""Returns a function computing the Jacobian of ``f``, in the cheaper mode by default.

  Forward mode builds the Jacobian one input direction at a time (``n`` JVPs), reverse mode
  one output direction at a time (``m`` VJPs). ``mode="auto"`` therefore picks ``jax.jacfwd``
  when the output has more elements than the differentiated inputs (a tall Jacobian) and
  ``jax.jacrev`` otherwise. The choice is made from shapes only (``jax.eval_shape``), at
  trace time, so it costs nothing under ``jit``.

  The result has the structure of ``jax.jacrev(f, argnums)``'s, whichever mode runs.

  A differentiated argument may be a flax ``nnx.Module``: the Jacobian is then taken with
  respect to its ``nnx.Param`` state (or the state the nnx filter ``wrt`` selects), other
  state held fixed, and its trailing structure is that ``nnx.State``'s.

  Args:
    f: function of pytrees to differentiate.
    argnums: which positional argument(s) to differentiate with respect to.
    mode: ``"auto"``, ``"fwd"`` or ``"rev"``.
    has_aux: whether ``f`` returns ``(output, aux)``.
    holomorphic: whether ``f`` is holomorphic (as in ``jax.jacrev``).
    wrt: for Module arguments, the nnx filter of the differentiated state (default
      ``nnx.Param``).

  Returns:
    A function with ``f``'s signature returning the Jacobian (and ``aux`` if ``has_aux``).

  Examples:
    >>> jac = jacobian(lambda x: jnp.stack([x[0] * x[1], x[0] ** 2, x[1]]))  # 2 -> 3: fwd
    >>> jac(jnp.array([2.0, 3.0])).tolist()
    [[3.0, 2.0], [4.0, 0.0], [0.0, 1.0]]
  """
  _checks.check_choice("mode", mode, JACOBIAN_MODES)
  kwargs = dict(argnums=argnums, has_aux=has_aux, holomorphic=holomorphic)

  def build(g, args, f_kwargs):
    if mode == "fwd":
      return jax.jacfwd(g, **kwargs)
    if mode == "rev":
      return jax.jacrev(g, **kwargs)
    out = jax.eval_shape(g, *args, **f_kwargs)
    if has_aux:
      out = out[0]
    tall = _num_elements(out) > _num_elements(_select(args, argnums))
    return (jax.jacfwd if tall else jax.jacrev)(g, **kwargs)

  @functools.wraps(f)
  def jacobian_fn(*args, **f_kwargs):
    g, args = _nnx.pure_argnums(f, args, argnums, wrt)
    return build(g, args, f_kwargs)(*args, **f_kwargs)

  return jacobian_fn


def hessian(
  f: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  *,
  mode: HessianMode = "fwd_rev",
  has_aux: bool = False,
  holomorphic: bool = False,
  wrt: Any = None,
) -> Callable[..., Any]:
  r"""Returns a function computing the Hessian of ``f`` by a chosen composition of modes.

  ``mode`` names the outer then the inner transformation: ``"fwd_rev"`` is
  ``jacfwd(jacrev(f))`` (what ``jax.hessian`` does, and usually the fastest: the gradient is
  cheap in reverse mode, and its square Jacobian is built by forward mode without storing a
  second tape), ``"rev_rev"``, ``"fwd_fwd"`` and ``"rev_fwd"`` the other three.

  A differentiated argument may be a flax ``nnx.Module``, as in :func:`jacobian`.

  Args:
    f: scalar function to differentiate twice.
    argnums: which positional argument(s) to differentiate with respect to.
    mode: ``"fwd_rev"``, ``"rev_rev"``, ``"fwd_fwd"`` or ``"rev_fwd"``.
    has_aux: whether ``f`` returns ``(output, aux)``.
    holomorphic: whether ``f`` is holomorphic.
    wrt: for Module arguments, the nnx filter of the differentiated state (default
      ``nnx.Param``).

  Returns:
    A function with ``f``'s signature returning the Hessian, structured like
    ``jax.hessian(f, argnums)``'s.

  Examples:
    >>> hessian(lambda x: x[0] ** 2 * x[1])(jnp.array([1.0, 2.0])).tolist()
    [[4.0, 2.0], [2.0, 0.0]]
  """
  _checks.check_choice("mode", mode, HESSIAN_MODES)
  outer, inner = (jax.jacfwd if part == "fwd" else jax.jacrev for part in mode.split("_"))
  kwargs = dict(argnums=argnums, has_aux=has_aux, holomorphic=holomorphic)

  @functools.wraps(f)
  def hessian_fn(*args, **f_kwargs):
    g, args = _nnx.pure_argnums(f, args, argnums, wrt)
    return outer(inner(g, **kwargs), **kwargs)(*args, **f_kwargs)

  return hessian_fn


def _check_batched_array(name: str, x: Any) -> None:
  if not isinstance(x, jax.Array | np.ndarray) or jnp.ndim(x) < 1:
    raise TypeError(
      f"{name} needs an array with a leading batch axis; got {type(x).__name__} of shape "
      f"{jnp.shape(x) if hasattr(x, 'shape') else '()'}. For pytrees, use jax.vmap(jacobian(f))."
    )


def batch_jacobian(
  f: Callable[[jax.Array], jax.Array], x: jax.Array, *, mode: JacobianMode = "auto"
) -> jax.Array:
  r"""Per-row Jacobians of a row-independent batched function, without the ``B x B`` blocks.

  For ``f: (B, *in) -> (B, *out)`` whose row ``b`` of output depends only on row ``b`` of
  input, the full Jacobian is block diagonal and ``B`` times larger than needed. Since
  :math:`\partial f_b / \partial x_b = \partial (\sum_{b'} f_{b'}) / \partial x_b`, the
  Jacobian of the batch sum has exactly the blocks we want: a ``(*out, B, *in)`` array whose
  cost is that of one row's Jacobian, batched.

  Row independence is the caller's promise (it fails for batch normalisation, attention
  across the batch, ...); it is not checked, and a violating ``f`` gives sums of blocks.

  Args:
    f: batched function ``(B, *in) -> (B, *out)``.
    x: input array with leading batch axis.
    mode: ``"auto"`` (by the per-row shapes), ``"fwd"`` or ``"rev"``.

  Returns:
    Array of shape ``(B, *out, *in)``.

  Examples:
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> batch_jacobian(lambda x: x ** 2, x).tolist()
    [[[2.0, 0.0], [0.0, 4.0]], [[6.0, 0.0], [0.0, 8.0]]]
  """
  _checks.check_choice("mode", mode, JACOBIAN_MODES)
  _check_batched_array("batch_jacobian", x)
  out = jax.eval_shape(f, x)
  if not hasattr(out, "shape") or out.ndim < 1 or out.shape[0] != x.shape[0]:
    raise ValueError(
      f"batch_jacobian needs f to return an array with the input's batch size {x.shape[0]} "
      f"leading; f returned {jax.tree.map(lambda s: s.shape, out)}."
    )
  out_rank = out.ndim - 1
  jac = jacobian(lambda y: f(y).sum(0), mode=mode)(x)  # (*out, B, *in)
  return jnp.moveaxis(jac, out_rank, 0)


def batch_hessian(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  r"""Per-row Hessians of a row-independent batched function.

  ``f: (B, *in) -> (B,)`` or ``(B, *out)`` with each row depending on its own input row. The
  row-wise gradient map is itself row independent, so the Hessian is the
  :func:`batch_jacobian` of the :func:`batch_jacobian`: neither step forms ``B x B`` blocks.

  Args:
    f: batched function ``(B, *in) -> (B, *out)``.
    x: input with leading batch axis.

  Returns:
    Array of shape ``(B, *out, *in, *in)``.

  Examples:
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> batch_hessian(lambda x: x[:, 0] ** 2 * x[:, 1], x).tolist()
    [[[4.0, 2.0], [2.0, 0.0]], [[8.0, 6.0], [6.0, 0.0]]]
  """
  _check_batched_array("batch_hessian", x)
  return batch_jacobian(lambda y: batch_jacobian(f, y, mode="rev"), x, mode="fwd")


# Primitives whose every output element depends only on the same-index elements of its
# (same-shaped) operands. A function built only of these is elementwise separable.
_ELEMENTWISE_PRIMITIVES = frozenset(
  """abs acos acosh add add_any asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
  copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
  is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not pow real
  reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh
  and or xor""".split()
)


def _is_elementwise(jaxpr: Any, dependent: Sequence[bool], shape: tuple[int, ...]) -> bool:
  """Whether the outputs of ``jaxpr`` depend elementwise on its ``dependent`` inputs.

  Equations whose results reach no output (the loss value inside a gradient) are skipped.
  """
  depends = {}
  for var, dep in zip(jaxpr.invars, dependent, strict=True):
    depends[var] = dep
  live, _ = capture.live_equations(jaxpr)
  for k, eqn in enumerate(jaxpr.eqns):
    if (k,) not in live:
      continue
    in_deps = [not isinstance(v, jex_core.Literal) and depends.get(v, False) for v in eqn.invars]
    if any(in_deps):
      for v, dep in zip(eqn.invars, in_deps, strict=True):
        if dep and v.aval.shape != shape:
          return False
      if eqn.primitive.name not in _ELEMENTWISE_PRIMITIVES:
        # A call (or a scan: its body iterated) is elementwise when its body is.
        sub = capture.body(eqn, (*capture.INLINABLE, "loop"))
        if sub is None or len(sub[0].invars) != len(eqn.invars):
          return False
        if not _is_elementwise(sub[0], in_deps, shape):
          return False
      if any(out.aval.shape != shape for out in eqn.outvars):
        return False
    for out in eqn.outvars:
      depends[out] = any(in_deps)
  return all(
    isinstance(v, jex_core.Literal) or not depends.get(v, False) or v.aval.shape == shape
    for v in jaxpr.outvars
  )


def is_elementwise(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> bool:
  """Whether ``f`` is elementwise separable at ``x``'s shape, read from its jaxpr.

  ``True`` means every output element ``f(x)[i]`` is a function of ``x[i]`` alone (and of
  constants), so the Jacobian is diagonal. ``False`` is conservative: it only means the
  jaxpr uses an operation not known to be elementwise.

  Examples:
    >>> is_elementwise(jnp.tanh, jnp.ones(3)), is_elementwise(jnp.cumsum, jnp.ones(3))
    (True, False)
  """
  closed = jax.make_jaxpr(f)(x)
  if len(closed.jaxpr.outvars) != 1:
    return False
  return _is_elementwise(closed.jaxpr, [True], tuple(jnp.shape(x)))


def jacobian_diagonal(
  f: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  *,
  batch_dims: int = 0,
  chunk_size: int | None = 256,
) -> jax.Array:
  r"""Exact diagonal of the Jacobian of ``f: R^{shape} -> R^{shape}``, the cheap way.

  Three strategies, the cheapest that is exact:

  1. ``f`` elementwise separable (detected from its jaxpr, see :func:`is_elementwise`):
     the Jacobian is diagonal, so one JVP with a tangent of ones returns the diagonal.
  2. ``batch_dims=k > 0``: the caller promises that ``f`` is row independent over the first
     ``k`` axes (a network applied to a batch). Then only the per-row diagonals are needed,
     and one JVP per within-row coordinate, with all rows pushed together, recovers them:
     ``prod(shape[k:])`` JVPs instead of ``prod(shape)``.
  3. Otherwise, one JVP per coordinate (as many as the full Jacobian takes), keeping only
     the diagonal entry of each, ``chunk_size`` at a time so memory stays ``O(n)``.

  Args:
    f: function whose output has the same shape as its input.
    x: input array.
    batch_dims: number of leading axes over which ``f`` is row independent.
    chunk_size: JVPs batched together in strategies 2 and 3 (``None``: all at once).

  Returns:
    Array of ``x``'s shape: ``∂f(x)[i] / ∂x[i]``.

  Examples:
    >>> jacobian_diagonal(jnp.sin, jnp.array([0.0, jnp.pi])).tolist()
    [1.0, -1.0]
  """
  x = jnp.asarray(x)
  out = jax.eval_shape(f, x)
  if not hasattr(out, "shape") or out.shape != x.shape:
    raise ValueError(
      "jacobian_diagonal needs f's output to have its input's shape "
      f"{x.shape}; got {jax.tree.map(lambda s: s.shape, out)}."
    )
  if not 0 <= batch_dims <= x.ndim:
    raise ValueError(f"batch_dims={batch_dims} must be between 0 and x.ndim={x.ndim}.")
  if is_elementwise(f, x):
    return jax.jvp(f, (x,), (jnp.ones_like(x),))[1]

  row_shape = x.shape[batch_dims:]
  num_row = math.prod(row_shape)

  def diagonal_entries(index):
    tangent = jnp.zeros(num_row, x.dtype).at[index].set(1).reshape(row_shape)
    tangent = jnp.broadcast_to(tangent, x.shape)
    column = jax.jvp(f, (x,), (tangent,))[1]
    return column.reshape(x.shape[:batch_dims] + (num_row,))[..., index]

  diag = jax.lax.map(diagonal_entries, jnp.arange(num_row), batch_size=chunk_size)
  return jnp.moveaxis(diag, 0, -1).reshape(x.shape)


def jmp(f: Callable[[Any], Any], x: Any, matrix: Any) -> Any:
  r"""Jacobian-matrix product: ``J(x) m_k`` for every row ``m_k`` of ``matrix``.

  ``matrix`` is a batch of tangents (``x``'s structure with one extra leading axis of size
  ``K``). ``f`` is linearised once and the linear map is ``vmap``-ed over the ``K`` rows:
  one forward pass plus ``K`` batched tangent passes, not ``K`` separate JVPs.

  Args:
    f: function of one pytree.
    x: point.
    matrix: tangents, ``x``'s structure with a leading axis ``K`` on every leaf.

  Returns:
    ``f``'s output structure with a leading axis ``K``.

  Examples:
    >>> jmp(lambda x: x ** 2, jnp.array([1.0, 2.0]), jnp.eye(2)).tolist()
    [[2.0, 0.0], [0.0, 4.0]]
  """
  _, f_jvp = jax.linearize(f, x)
  _checks.check_same_structure(x, jax.tree.map(lambda m: m[0], matrix), "x", "matrix rows")
  return jax.vmap(f_jvp)(matrix)


def mjp(f: Callable[[Any], Any], x: Any, matrix: Any) -> Any:
  r"""Matrix-Jacobian product: ``m_kᵀ J(x)`` for every row ``m_k`` of ``matrix``.

  ``matrix`` is a batch of cotangents (``f(x)``'s structure with a leading axis ``K``).
  ``f``'s VJP is built once and ``vmap``-ed over the rows.

  Args:
    f: function of one pytree.
    x: point.
    matrix: cotangents, ``f(x)``'s structure with a leading axis ``K`` on every leaf.

  Returns:
    ``x``'s structure with a leading axis ``K``.

  Examples:
    >>> mjp(lambda x: x ** 2, jnp.array([1.0, 2.0]), jnp.ones((1, 2))).tolist()
    [[2.0, 4.0]]
  """
  out, f_vjp = jax.vjp(f, x)
  _checks.check_same_structure(out, jax.tree.map(lambda m: m[0], matrix), "f(x)", "matrix rows")
  return jax.vmap(lambda m: f_vjp(m)[0])(matrix)


def jacobian_gram(f: Callable[[Any], jax.Array], x1: Any, x2: Any) -> jax.Array:
  r"""``J(x1) J(x2)ᵀ`` for ``f: R^N -> R^M`` without materialising either ``M x N`` Jacobian.

  For ``M <= N`` the product is built column by column: ``J(x2)ᵀ e_m`` by a VJP at ``x2``,
  then ``J(x1) (J(x2)ᵀ e_m)`` by a JVP at ``x1``, ``vmap``-ed over the ``M`` basis vectors.
  For ``M > N`` (more outputs than inputs) it is cheaper to form both Jacobians by forward
  mode (``2N`` JVPs) and multiply.

  Args:
    f: function of one pytree returning an array (any shape).
    x1: first point.
    x2: second point, ``x1``'s structure.

  Returns:
    Array of shape ``(*out, *out)``.

  Examples:
    >>> A = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    >>> jacobian_gram(lambda x: A @ x, jnp.zeros(3), jnp.ones(3)).tolist()
    [[5.0, 2.0], [2.0, 2.0]]
  """
  _checks.check_same_structure(x1, x2, "x1", "x2")
  out = jax.eval_shape(f, x1)
  if not hasattr(out, "shape"):
    raise TypeError("jacobian_gram needs f to return one array.")
  num_out, num_in = math.prod(out.shape), _num_elements(x1)
  if num_out > num_in:
    jac1 = jax.jacfwd(f)(x1)
    jac2 = jax.jacfwd(f)(x2)
    in_axes = [tuple(range(out.ndim, jnp.ndim(leaf))) for leaf in jax.tree.leaves(jac1)]
    terms = [
      jnp.tensordot(a, b, axes=(axes, axes))
      for a, b, axes in zip(jax.tree.leaves(jac1), jax.tree.leaves(jac2), in_axes, strict=True)
    ]
    return sum(terms)
  _, vjp2 = jax.vjp(f, x2)
  _, jvp1 = jax.linearize(f, x1)
  basis = jnp.eye(num_out, dtype=out.dtype).reshape((num_out, *out.shape))
  columns = jax.vmap(lambda e: jvp1(vjp2(e)[0]))(basis)  # (num_out, *out): J1 J2ᵀ e_m
  return jnp.moveaxis(
    columns.reshape(out.shape + out.shape),
    tuple(range(out.ndim)),
    tuple(range(out.ndim, 2 * out.ndim)),
  )


def empirical_ntk(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  params: Any,
  x1: jax.Array,
  x2: jax.Array,
  *,
  method: NtkMethod = "auto",
  wrt: Any = None,
) -> jax.Array:
  r"""Empirical neural tangent kernel ``Θ[i, j] = J_θ f(x1_i) J_θ f(x2_j)ᵀ``.

  ``apply_fn(params, x)`` maps a batch ``(B, ...)`` to outputs ``(B, *out)``, row
  independently. Two strategies, as in Novak et al. 2022:

  * ``"jacobian_contraction"``: per-example parameter Jacobians of both batches (by
    ``vmap`` of ``jacrev``), contracted over parameters. Best for scalar outputs.
  * ``"ntk_vector_products"``: no Jacobian of ``x1`` is ever formed. For each example and
    output of ``x2`` the VJP gives ``J(x2_j)ᵀ e_o``; pushing it through the linearised
    network at ``x1`` gives a whole column ``Θ[:, j, :, o]``. Cheaper once the output has
    more than a couple of entries.

  ``"auto"`` uses the contraction for scalar outputs and the products otherwise.

  ``params`` may be a flax ``nnx.Module`` (with ``apply_fn(module, batch)``): the kernel is
  then taken over its ``nnx.Param`` state, or the state the nnx filter ``wrt`` selects. Put a
  model with BatchNorm in evaluation mode (``model.eval()``) first, so that each example's
  output depends on that example only.

  Args:
    apply_fn: ``(params, batch) -> outputs`` with leading batch axis.
    params: any pytree, or an ``nnx.Module``.
    x1: first batch, ``(B1, ...)``.
    x2: second batch, ``(B2, ...)``.
    method: ``"auto"``, ``"jacobian_contraction"`` or ``"ntk_vector_products"``.
    wrt: for a Module, the nnx filter of the differentiated state (default ``nnx.Param``).

  Returns:
    ``(B1, B2, *out, *out)``, or ``(B1, B2)`` when each example's output is a scalar.

  Examples:
    For a linear model the NTK is the Gram matrix of the inputs.

    >>> X = jnp.array([[1.0, 2.0], [0.0, 1.0]])
    >>> empirical_ntk(lambda w, x: x @ w, jnp.zeros(2), X, X).tolist()
    [[5.0, 2.0], [2.0, 1.0]]

  References:
    Jacot, Gabriel and Hongler, "Neural tangent kernel", NeurIPS 2018. Novak, Sohl-Dickstein
    and Schoenholz, "Fast finite width neural tangent kernel", ICML 2022.
  """
  _checks.check_choice("method", method, NTK_METHODS)
  _check_batched_array("empirical_ntk", x1)
  _check_batched_array("empirical_ntk", x2)
  apply_fn, params = _nnx.pure(apply_fn, params, wrt)
  out = jax.eval_shape(apply_fn, params, x1)
  out_shape = tuple(out.shape[1:])
  if method == "auto":
    method = "jacobian_contraction" if math.prod(out_shape) == 1 else "ntk_vector_products"

  def single(p, x):
    return apply_fn(p, x[None])[0]

  if method == "jacobian_contraction":
    jac1 = jax.vmap(jax.jacrev(single), (None, 0))(params, x1)  # (B1, *out, *p)
    jac2 = jax.vmap(jax.jacrev(single), (None, 0))(params, x2)
    rank = len(out_shape)

    def contract(a, b):
      p_axes = tuple(range(1 + rank, a.ndim))
      return jnp.tensordot(a, b, axes=(p_axes, p_axes))  # (B1, *out, B2, *out)

    ntk = sum(
      contract(a, b) for a, b in zip(jax.tree.leaves(jac1), jax.tree.leaves(jac2), strict=True)
    )
    ntk = jnp.moveaxis(ntk, 1 + rank, 1)  # (B1, B2, *out, *out)
  else:
    num_out = math.prod(out_shape)
    basis = jnp.eye(num_out, dtype=out.dtype).reshape((num_out, *out_shape))
    # (B2, num_out, *p): J(x2_j)ᵀ e_o for every example j and output o.
    cotangent_params = jax.vmap(
      lambda x: jax.vmap(jax.vjp(lambda p: single(p, x), params)[1])(basis)[0]
    )(x2)
    _, jvp1 = jax.linearize(lambda p: apply_fn(p, x1), params)
    columns = jax.vmap(jax.vmap(jvp1))(cotangent_params)  # (B2, num_out, B1, *out)
    columns = columns.reshape((x2.shape[0], *out_shape, x1.shape[0], *out_shape))
    rank = len(out_shape)
    # -> (B1, B2, *out1, *out2)
    perm = (1 + rank, 0, *range(2 + rank, 2 + 2 * rank), *range(1, 1 + rank))
    ntk = jnp.transpose(columns, perm)
  if math.prod(out_shape) == 1:
    ntk = ntk.reshape(x1.shape[0], x2.shape[0])
  return ntk
