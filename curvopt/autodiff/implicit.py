r"""Fixed points differentiated by the implicit function theorem.

For :math:`x^\star(a)` defined by :math:`x^\star = f(a, x^\star)`, differentiating the identity
gives :math:`\partial x^\star/\partial a = (I - \partial_x f)^{-1} \partial_a f`, so the
vector-Jacobian product with a cotangent :math:`\bar x` is

.. math:: \bar a = u^\top \partial_a f(a, x^\star), \qquad
   u = \bar x + u^\top \partial_x f(a, x^\star),

where :math:`u` is *itself* the fixed point of an affine map with the same contraction factor
as the forward iteration. :func:`fixed_point` solves both with :func:`jax.lax.while_loop`, so
reverse mode stores only :math:`(a, x^\star)` (no per-iteration tape), and because the backward
solve calls the same differentiable solver, ``grad(grad(...))`` works too.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

FixedPointFn = Callable[[Any, Any], Any]


class FixedPointSolution(NamedTuple):
  r"""Result of :func:`fixed_point`.

  Attributes:
    value: the fixed point :math:`x^\star` (``x_init``'s structure), differentiable in ``a``.
    num_iters: number of evaluations of ``f`` made by the forward solve (int32).
    converged: whether the stopping rule was met within ``max_iter`` evaluations (bool).
    error: the last step size :math:`\max_i |f(a, x)_i - x_i|` (not differentiated).
  """

  value: Any
  num_iters: jax.Array
  converged: jax.Array
  error: jax.Array


def _max_abs(tree: Any) -> jax.Array:
  return optax.tree.norm(tree, ord=jnp.inf)


def _iterate(f, tol, max_iter, a, x_init):
  """Runs ``x <- f(a, x)`` until a relative step of ``tol``; returns (x, num_iters, done, err)."""
  dtype = jnp.result_type(*jax.tree.leaves(x_init))

  def cond(carry):
    k, _, done, err = carry
    return (k < max_iter) & ~done & jnp.isfinite(err)

  def body(carry):
    k, x, _, _ = carry
    fx = f(a, x)
    err = _max_abs(optax.tree.sub(fx, x)).astype(dtype)
    done = err <= tol * jnp.maximum(1.0, _max_abs(fx).astype(dtype))
    return k + 1, fx, done, err

  init = (jnp.asarray(0, jnp.int32), x_init, jnp.asarray(False), jnp.zeros((), dtype))
  return jax.lax.while_loop(cond, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fixed_point(f, tol, max_iter, a, x_init):
  num_iters, x_star, done, err = _iterate(f, tol, max_iter, a, x_init)
  return x_star, num_iters, done, err


def _fixed_point_fwd(f, tol, max_iter, a, x_init):
  out = _fixed_point(f, tol, max_iter, a, x_init)
  return out, (a, out[0], x_init)


def _rev_iter(f, packed, u):
  # u -> x_bar + u^T ∂f/∂x (a, x*): the adjoint fixed-point map. Written with vjp, so it is
  # differentiable and the backward pass can itself be differentiated.
  a, x_star, x_bar = packed
  _, vjp_x = jax.vjp(lambda x: f(a, x), x_star)
  return optax.tree.add(x_bar, vjp_x(u)[0])


def _fixed_point_bwd(f, tol, max_iter, res, cotangents):
  a, x_star, x_init = res
  x_bar = cotangents[0]
  _, vjp_a = jax.vjp(lambda a: f(a, x_star), a)
  u = _fixed_point(functools.partial(_rev_iter, f), tol, max_iter, (a, x_star, x_bar), x_bar)[0]
  (a_bar,) = vjp_a(u)
  return a_bar, optax.tree.zeros_like(x_init)


_fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def _check_same_shapes(x_init: Any, fx: Any) -> None:
  x_def, f_def = jax.tree.structure(x_init), jax.tree.structure(fx)
  x_avals = [(jnp.shape(v), jnp.result_type(v)) for v in jax.tree.leaves(x_init)]
  f_avals = [(v.shape, v.dtype) for v in jax.tree.leaves(fx)]
  if x_def != f_def or x_avals != f_avals:
    raise ValueError(
      "fixed_point needs f(a, x) to return x's structure, shapes and dtypes; got "
      f"x_init: {x_def} {x_avals} but f(a, x_init): {f_def} {f_avals}. Cast x_init to the "
      "dtype f returns (e.g. jnp.asarray(x_init, jnp.float32))."
    )


def fixed_point(
  f: FixedPointFn, a: Any, x_init: Any, *, tol: float = 1e-6, max_iter: int = 1000
) -> FixedPointSolution:
  r"""Solves :math:`x = f(a, x)` by iteration, differentiably in ``a``.

  Forward: :math:`x_{k+1} = f(a, x_k)` from ``x_init`` inside :func:`jax.lax.while_loop`,
  stopping when :math:`\max_i |x_{k+1} - x_k|_i \le \mathrm{tol}\cdot\max(1, \max_i
  |x_{k+1}|_i)`, after ``max_iter`` evaluations, or at a non-finite step. Reverse mode uses
  the implicit function theorem (module docstring): the cotangent of ``a`` is
  :math:`u^\top \partial_a f` with :math:`u = \bar x + u^\top \partial_x f` solved by the
  same iteration, so memory does not grow with the number of iterations and
  ``jax.grad(jax.grad(...))`` works. ``x_init`` receives a zero cotangent (the fixed point
  does not depend on it). Forward-mode (``jvp``) differentiation is not defined.

  The solve converges when :math:`f(a, \cdot)` is a contraction near :math:`x^\star`; the
  adjoint iteration then contracts at the same rate. Check ``converged`` (or ``error``):
  the forward solve never fails silently. The backward solve uses the same ``tol`` and
  ``max_iter``; its iteration count is not reported.

  Parameters of ``f`` that you differentiate should be passed through ``a``. Values that
  ``f`` closes over and that are being traced (e.g. a weight matrix that an outer
  ``jax.grad`` differentiates) are found with :func:`jax.closure_convert` and passed across
  the custom-derivative boundary with ``a``, so their gradients are correct too, instead of
  the classic silent zero.

  Args:
    f: ``(a, x) -> x``, mapping ``x_init``'s pytree structure, shapes and dtypes to itself.
    a: parameters, any pytree of arrays.
    x_init: starting point, any pytree of floating arrays.
    tol: relative stopping tolerance (positive).
    max_iter: maximal number of evaluations of ``f`` (positive int).

  Returns:
    A :class:`FixedPointSolution` ``(value, num_iters, converged, error)``.

  Raises:
    ValueError: for a non-positive ``tol`` or ``max_iter``, or if ``f(a, x_init)`` is not
      shaped like ``x_init``.

  Examples:
    The tutorial's Newton square root, :math:`x = (x + a/x)/2`, so
    :math:`x^\star = \sqrt a`, :math:`\tfrac{d}{da}\sqrt a = 1/(2\sqrt a)` and
    :math:`\tfrac{d^2}{da^2}\sqrt a = -1/(4 a^{3/2})`:

    >>> newton_sqrt = lambda a: fixed_point(lambda a, x: 0.5 * (x + a / x), a, a).value
    >>> a = jnp.float32(2.0)
    >>> [round(float(v), 6) for v in (newton_sqrt(a), jax.grad(newton_sqrt)(a))]
    [1.414214, 0.353553]
    >>> round(float(jax.grad(jax.grad(newton_sqrt))(a)), 6)
    -0.088388
    >>> sol = fixed_point(lambda a, x: 2.0 * x + a, 1.0, jnp.float32(1.0), max_iter=50)
    >>> bool(sol.converged), int(sol.num_iters)   # diverges: reported, not silent
    (False, 50)

  References:
    Blondel et al., "Efficient and modular implicit differentiation", NeurIPS 2022.
    JAX documentation, "Custom derivative rules" (``fixed_point`` and ``rev_iter``).
  """
  if not (isinstance(tol, int | float) and tol > 0):
    raise ValueError(f"fixed_point needs a positive float tol; got tol={tol!r}.")
  if not (isinstance(max_iter, int) and max_iter > 0):
    raise ValueError(f"fixed_point needs a positive int max_iter; got max_iter={max_iter!r}.")
  x_init = jax.tree.map(jnp.asarray, x_init)
  _check_same_shapes(x_init, jax.eval_shape(f, a, x_init))
  converted, consts = jax.closure_convert(f, a, x_init)
  if consts:
    # Traced values closed over by f become explicit differentiable parameters.
    consts = tuple(consts)
    f_explicit = lambda ac, x: converted(ac[0], x, *ac[1])
    x_star, num_iters, done, err = _fixed_point(f_explicit, tol, max_iter, (a, consts), x_init)
  else:
    x_star, num_iters, done, err = _fixed_point(converted, tol, max_iter, a, x_init)
  return FixedPointSolution(x_star, num_iters, done, jax.lax.stop_gradient(err))
