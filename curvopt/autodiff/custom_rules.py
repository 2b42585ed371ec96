r"""Custom differentiation rules: straight-through estimators, gradient clipping, stable softplus.

Each function changes *how* something is differentiated without changing what it computes:

* :func:`straight_through` keeps a function's exact value and replaces its derivative by the
  identity (the straight-through estimator for ``round``, ``sign``, quantisers);
* :func:`clip_gradient` is the identity forwards and clips the cotangent backwards
  (:func:`jax.custom_vjp`);
* :func:`log1pexp` computes :math:`\log(1 + e^x)` with a :func:`jax.custom_jvp` whose tangent
  rule stays finite for large inputs, under ``jit``, ``vmap`` and ``grad(grad)``.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def straight_through(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
  r"""Returns ``g`` with ``g(x) == f(x)`` exactly and an identity derivative.

  .. math:: g(x) = \underbrace{x - \mathrm{sg}(x)}_{=\,0} + \mathrm{sg}(f(x)),
     \qquad \partial g / \partial x = I.

  The first term is an exact floating-point zero (Sterbenz: the difference of two equal
  finite floats is exactly 0), so the value is bit-for-bit ``f(x)``; only ``x`` carries a
  derivative. Because it is built from ``stop_gradient`` rather than a custom rule, it works in
  forward and reverse mode and to any order (higher derivatives are 0). ``f`` must map ``x``
  to a pytree of the same structure and shapes (e.g. ``jnp.round``, ``jnp.sign``, a
  quantiser). Non-finite entries of ``x`` give ``nan`` (``inf - inf``).

  Args:
    f: function of one pytree of arrays, returning the same structure and shapes.

  Returns:
    The straight-through version of ``f``.

  Raises:
    ValueError: when called, if ``f(x)`` is shaped unlike ``x``.

  Examples:
    The tutorial's straight-through ``round``:

    >>> g = straight_through(jnp.round)
    >>> float(g(3.2)), float(jax.grad(g)(3.2))
    (3.0, 1.0)

  References:
    Bengio, Léonard and Courville, "Estimating or propagating gradients through stochastic
    neurons for conditional computation", arXiv:1308.3432, 2013.
  """

  def g(x):
    x = jax.tree.map(jnp.asarray, x)
    fx = f(x)
    x_def, f_def = jax.tree.structure(x), jax.tree.structure(fx)
    shapes_x = [jnp.shape(leaf) for leaf in jax.tree.leaves(x)]
    shapes_f = [jnp.shape(leaf) for leaf in jax.tree.leaves(fx)]
    if x_def != f_def or shapes_x != shapes_f:
      raise ValueError(
        "straight_through(f) needs f(x) shaped like x (the derivative is the identity); got "
        f"x: {x_def} with shapes {shapes_x}, f(x): {f_def} with shapes {shapes_f}."
      )
    sg = jax.lax.stop_gradient
    return jax.tree.map(lambda xi, fi: (xi - sg(xi)).astype(fi.dtype) + sg(fi), x, fx)

  return g


@jax.custom_vjp
def clip_gradient(lo: ArrayLike, hi: ArrayLike, x: Any) -> Any:
  r"""Identity forwards; the cotangent is clipped to ``[lo, hi]`` backwards.

  .. math:: \mathrm{clip\_gradient}(l, h, x) = x, \qquad
     \bar x = \mathrm{clip}(\bar y, l, h).

  ``lo`` and ``hi`` get zero cotangents. The backward rule is differentiable, so
  ``grad(grad(...))`` works (it differentiates the clip). Reverse mode only
  (:func:`jax.custom_vjp`): ``jax.jvp`` through it raises.

  Args:
    lo: lower bound for the cotangent (scalar or broadcastable to each leaf of ``x``).
    hi: upper bound for the cotangent.
    x: any pytree of arrays.

  Returns:
    ``x`` unchanged.

  Examples:
    >>> clip_sin = lambda x: jnp.sin(clip_gradient(-0.75, 0.75, x))
    >>> [round(float(jax.grad(clip_sin)(t)), 4) for t in (0.0, 1.2, 3.0)]  # clip(cos t)
    [0.75, 0.3624, -0.75]
  """
  del lo, hi
  return x


def _clip_gradient_fwd(lo, hi, x):
  return x, (lo, hi)


def _clip_gradient_bwd(res, x_bar):
  lo, hi = res
  lo_bar = jax.tree.map(jnp.zeros_like, lo)
  hi_bar = jax.tree.map(jnp.zeros_like, hi)
  return lo_bar, hi_bar, jax.tree.map(lambda g: jnp.clip(g, lo, hi), x_bar)


clip_gradient.defvjp(_clip_gradient_fwd, _clip_gradient_bwd)


@jax.custom_jvp
def log1pexp(x: ArrayLike) -> jax.Array:
  r""":math:`\log(1 + e^x)` (softplus) with a stable derivative rule.

  The value is computed as :math:`\max(x, 0) + \log(1 + e^{-|x|})`, which never overflows;
  the tangent rule is

  .. math:: \tfrac{d}{dx} \log(1 + e^x) = \sigma(x) = 1 - \frac{1}{1 + e^x},

  evaluated with :func:`jax.nn.sigmoid`, finite for every input (the naive autodiff of
  ``log(1 + exp(x))`` gives ``inf / inf = nan`` at ``x = 100``). The rule is written with
  differentiable operations, so higher derivatives (:math:`\sigma(1-\sigma)`, ...) are finite
  too.

  Args:
    x: array of floats.

  Returns:
    ``log(1 + exp(x))`` elementwise.

  Examples:
    The tutorial's check:

    >>> float(jax.grad(log1pexp)(100.0)), float(log1pexp(100.0))
    (1.0, 100.0)
  """
  x = jnp.asarray(x)
  return jnp.maximum(x, 0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@log1pexp.defjvp
def _log1pexp_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return log1pexp(x), jax.nn.sigmoid(x) * x_dot
