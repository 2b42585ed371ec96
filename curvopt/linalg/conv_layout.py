"""Rewrite convolutions to XLA:CPU's canonical layout, for operators applied inside loops.

XLA:CPU runs a convolution with Eigen's fast kernel only when its dimension numbers are
canonical (input ``(batch, spatial..., feature)``, kernel ``(spatial..., in, out)``, output
``(batch, spatial..., feature)``). Its ``ConvCanonicalization`` pass inserts the transposes
that make other convolutions canonical, but it visits the entry computation only: a
convolution inside a ``while`` body keeps its dimension numbers and is emitted as a naive loop
nest. Reverse-mode derivatives of convolutions are non-canonical (the weight gradient treats
features as the batch, ``f01b_i01o->01bf``; the input gradient swaps the kernel's features,
``01oi``), so a GGN or Hessian product of a CNN runs about 5-10x slower inside
``lax.while_loop`` than in straight-line code (see ``benchmarks/cg_loop.py``).

:func:`canonical_convolutions` traces a function to a jaxpr and re-emits every
``conv_general_dilated`` with canonical dimension numbers between explicit transposes, the same
rewrite XLA performs on the entry computation, so it also happens inside loop bodies.
"""

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from curvopt.autodiff import capture


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  num_spatial = len(lhs_spec) - 2
  lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
  rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
  out_perm = (out_spec[0], *out_spec[2:], out_spec[1])
  identity = tuple(range(num_spatial + 2))
  canonical_rhs = (*range(num_spatial), num_spatial, num_spatial + 1)
  if lhs_perm == identity and rhs_perm == canonical_rhs and out_perm == identity:
    return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
  spatial = tuple(range(1, num_spatial + 1))
  dimension_numbers = lax.ConvDimensionNumbers(
    lhs_spec=(0, num_spatial + 1, *spatial),
    rhs_spec=(num_spatial + 1, num_spatial, *range(num_spatial)),
    out_spec=(0, num_spatial + 1, *spatial),
  )
  out = lax.conv_general_dilated_p.bind(
    jnp.transpose(lhs, lhs_perm),
    jnp.transpose(rhs, rhs_perm),
    **{**params, "dimension_numbers": dimension_numbers},
  )
  inverse = [0] * len(out_perm)
  for canonical_axis, original_axis in enumerate(out_perm):
    inverse[original_axis] = canonical_axis
  return jnp.transpose(out, inverse)


def _canonical_rule(eqn: Any, invals: list, key: tuple[int, ...]) -> list[Any]:
  """One equation of :func:`canonical_convolutions`: convolutions re-emitted, the rest bound."""
  del key
  if eqn.primitive is lax.conv_general_dilated_p:
    return [_canonical_conv(*invals, **eqn.params)]
  return capture.bind(eqn, invals)


def _inline_calls(eqn: Any, invals: list, key: tuple[int, ...]):
  del invals, key
  return capture.body(eqn, ("call",))


def canonical_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
  r"""``fn`` with every convolution in XLA:CPU's canonical layout: same values, fast in loops.

  Each ``lax.conv_general_dilated`` of ``fn`` (also inside nested ``jit``) whose dimension
  numbers are not ``(batch, spatial..., feature)`` / ``(spatial..., in, out)`` /
  ``(batch, spatial..., feature)`` becomes a transpose of both operands, the canonical
  convolution and a transpose back. Strides, padding, dilations and groups are kept, so the
  result is the same up to floating-point summation order. Wrap an operator with it before
  applying it inside ``lax.while_loop``/``scan``/``fori_loop`` on CPU
  (:func:`~curvopt.linalg.cg.conjugate_gradient` does this by default).

  ``fn`` is traced to a jaxpr once per call (at trace time under ``jit``). If it has no
  convolution, ``fn`` itself is called. Convolutions inside control flow or custom-derivative
  rules of ``fn`` are left as they are.

  Args:
    fn: any function of arrays / pytrees.

  Returns:
    A function with ``fn``'s signature and values.

  Examples:
    The weight gradient of a convolution (non-canonical ``f01b_i01o->01bf``) is unchanged:

    >>> x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    >>> conv = lambda w: jax.lax.conv_general_dilated(
    ...     x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
    >>> g, g_canonical = jax.grad(conv)(w), canonical_convolutions(jax.grad(conv))(w)
    >>> bool(jnp.allclose(g, g_canonical)), float(g[1, 1, 0, 0])
    (True, 50.0)
  """

  def wrapped(*args: Any) -> Any:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    eqns = capture.equations(closed.jaxpr, ("call",))
    if not any(eqn.primitive is lax.conv_general_dilated_p for eqn in eqns):
      return fn(*args)
    flat_args = jax.tree.leaves(args)
    flat_out = capture.interpret(
      closed.jaxpr, closed.consts, flat_args, _canonical_rule, descend=_inline_calls
    )
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat_out)

  return wrapped


ConvLayout = Literal["auto", "canonical", "as_is"]
CONV_LAYOUTS = ("auto", "canonical", "as_is")


def with_conv_layout(
  fn: Callable[..., Any], conv_layout: ConvLayout = "auto"
) -> Callable[..., Any]:
  """``canonical_convolutions(fn)`` for ``"canonical"``, and for ``"auto"`` on the CPU backend.

  Raises:
    ValueError: for an unknown ``conv_layout``.
  """
  if conv_layout not in CONV_LAYOUTS:
    raise ValueError(f"Unknown conv_layout {conv_layout!r}; expected one of {CONV_LAYOUTS}.")
  if conv_layout == "canonical" or (conv_layout == "auto" and jax.default_backend() == "cpu"):
    return canonical_convolutions(fn)
  return fn
