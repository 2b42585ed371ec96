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
import logging
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt import _checks

FixedPointFn = Callable[[Any, Any], Any]
OnFailure = Literal["warn", "raise", "ignore"]
ON_FAILURE = ("warn", "raise", "ignore")


class NonConvergenceWarning(RuntimeWarning):
  """Issued by :func:`fixed_point` when a solve stops before meeting its tolerance.

  Filter it like any warning, e.g. ``warnings.simplefilter("error", NonConvergenceWarning)``,
  or pass ``on_failure="ignore"`` (or ``"raise"``) to the call.
  """


class NonConvergenceError(RuntimeError):
  """Raised by :func:`fixed_point` with ``on_failure="raise"`` when a solve does not converge.

  Under ``jax.jit`` JAX re-raises it as a ``jax.errors.JaxRuntimeError`` (also a
  ``RuntimeError``) whose message carries this one.
  """


class _DropOwnCallbackLog(logging.Filter):
  """Drops JAX's "jax.debug.callback failed" log record when the failure is our own error."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, NonConvergenceError)


# The error already reaches the caller; JAX would also log it with a traceback.
logging.getLogger("jax._src.debugging").addFilter(_DropOwnCallbackLog())


class FixedPointSolution(NamedTuple):
  r"""Result of :func:`fixed_point_solve`.

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


def _report(on_failure, solve, tol, max_iter, done, num_iters, err):
  """Host side of the status check: warn or raise when the solve failed.

  Under ``vmap`` JAX calls it once per batch element.
  """
  if np.all(done):
    return
  num_iters, err = int(np.max(num_iters)), float(np.max(err))
  if np.isfinite(err):
    how = (
      f"it stopped after max_iter={max_iter} evaluations with a last step of {err:.3g} "
      f"(tol={tol:g}, relative)"
    )
  else:
    how = f"it reached a non-finite value after {num_iters} evaluations"
  message = (
    f"fixed_point: the {solve} did not converge: {how}. Raise max_iter (or tol), check that "
    "f(a, .) is a contraction near the solution, or pass on_failure='ignore' and read the "
    "status from fixed_point_solve."
  )
  if on_failure == "raise":
    raise NonConvergenceError(message)
  warnings.warn(message, NonConvergenceWarning, stacklevel=2)


def _check_status(on_failure, solve, tol, max_iter, done, num_iters, err):
  if on_failure != "ignore":
    callback = functools.partial(_report, on_failure, solve, tol, max_iter)
    jax.debug.callback(callback, done, num_iters, err)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _fixed_point(f, tol, max_iter, on_failure, solve, a, x_init):
  num_iters, x_star, done, err = _iterate(f, tol, max_iter, a, x_init)
  _check_status(on_failure, solve, tol, max_iter, done, num_iters, err)
  return x_star, num_iters, done, err


def _fixed_point_fwd(f, tol, max_iter, on_failure, solve, a, x_init):
  out = _fixed_point(f, tol, max_iter, on_failure, solve, a, x_init)
  return out, (a, out[0], x_init)


def _rev_iter(f, packed, u):
  # u -> x_bar + u^T ∂f/∂x (a, x*): the adjoint fixed-point map. Written with vjp, so it is
  # differentiable and the backward pass can itself be differentiated.
  a, x_star, x_bar = packed
  _, vjp_x = jax.vjp(lambda x: f(a, x), x_star)
  return optax.tree.add(x_bar, vjp_x(u)[0])


def _fixed_point_bwd(f, tol, max_iter, on_failure, solve, res, cotangents):
  del solve
  a, x_star, x_init = res
  x_bar = cotangents[0]
  _, vjp_a = jax.vjp(lambda a: f(a, x_star), a)
  adjoint = functools.partial(_rev_iter, f)
  u = _fixed_point(
    adjoint, tol, max_iter, on_failure, "adjoint (backward) solve", (a, x_star, x_bar), x_bar
  )[0]
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


def _adopt_weak_dtypes(x_init: Any, fx: Any) -> Any:
  """Python-scalar leaves of ``x_init`` (weakly typed) take the dtype ``f`` returns for them."""
  if jax.tree.structure(x_init) != jax.tree.structure(fx):
    return x_init

  def adopt(x, out):
    weak = getattr(getattr(x, "aval", None), "weak_type", False) or isinstance(x, int | float)
    return jnp.asarray(x, out.dtype) if weak and jnp.shape(x) == out.shape else x

  return jax.tree.map(adopt, x_init, fx)


def fixed_point_solve(
  f: FixedPointFn,
  a: Any,
  x_init: Any,
  *,
  tol: float = 1e-6,
  max_iter: int = 1000,
  on_failure: OnFailure = "warn",
) -> FixedPointSolution:
  r"""Solves :math:`x = f(a, x)` like :func:`fixed_point`, and also returns the solver status.

  The same solve and the same implicit-function-theorem gradient as :func:`fixed_point` (see
  there for the maths); only the return value differs. Only ``value`` is differentiable; the
  status fields are constants to ``jax.grad``.

  Args:
    f: ``(a, x) -> x``, mapping ``x_init``'s pytree structure, shapes and dtypes to itself.
    a: parameters, any pytree of arrays.
    x_init: starting point, any pytree of floating arrays.
    tol: relative stopping tolerance (positive).
    max_iter: maximal number of evaluations of ``f`` per solve (positive int).
    on_failure: what a solve that stops unconverged does, as in :func:`fixed_point`:
      ``"warn"`` (default), ``"raise"`` or ``"ignore"`` (when you read ``converged``).

  Returns:
    A :class:`FixedPointSolution` ``(value, num_iters, converged, error)`` of the forward solve.

  Examples:
    A divergent map, reported in the status (and not warned about, on request):

    >>> sol = fixed_point_solve(
    ...     lambda a, x: 2.0 * x + a, 1.0, 1.0, max_iter=50, on_failure="ignore")
    >>> bool(sol.converged), int(sol.num_iters)
    (False, 50)
    >>> sol = fixed_point_solve(lambda a, x: 0.5 * x + a, 1.0, 0.0)
    >>> bool(sol.converged), round(float(sol.value), 4)
    (True, 2.0)
  """
  if not (isinstance(tol, int | float) and not isinstance(tol, bool) and tol > 0):
    raise ValueError(f"fixed_point needs a positive float tol; got tol={tol!r}.")
  if not (isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter > 0):
    raise ValueError(f"fixed_point needs a positive int max_iter; got max_iter={max_iter!r}.")
  _checks.check_choice("on_failure", on_failure, ON_FAILURE)
  x_init = jax.tree.map(jnp.asarray, x_init)
  x_init = _adopt_weak_dtypes(x_init, jax.eval_shape(f, a, x_init))
  _check_same_shapes(x_init, jax.eval_shape(f, a, x_init))
  tol = float(tol)
  converted, consts = jax.closure_convert(f, a, x_init)
  forward = "forward solve"
  if consts:
    # Traced values closed over by f become explicit differentiable parameters.
    consts = tuple(consts)
    f_explicit = lambda ac, x: converted(ac[0], x, *ac[1])
    out = _fixed_point(f_explicit, tol, max_iter, on_failure, forward, (a, consts), x_init)
  else:
    out = _fixed_point(converted, tol, max_iter, on_failure, forward, a, x_init)
  x_star, num_iters, done, err = out
  return FixedPointSolution(x_star, num_iters, done, jax.lax.stop_gradient(err))


def fixed_point(
  f: FixedPointFn,
  a: Any,
  x_init: Any,
  *,
  tol: float = 1e-6,
  max_iter: int = 1000,
  on_failure: OnFailure = "warn",
) -> Any:
  r"""The solution of :math:`x = f(a, x)`, by iteration, differentiable in ``a``.

  Forward: :math:`x_{k+1} = f(a, x_k)` from ``x_init`` inside :func:`jax.lax.while_loop`,
  stopping when :math:`\max_i |x_{k+1} - x_k|_i \le \mathrm{tol}\cdot\max(1, \max_i
  |x_{k+1}|_i)`, after ``max_iter`` evaluations, or at a non-finite step. Reverse mode uses
  the implicit function theorem (module docstring): the cotangent of ``a`` is
  :math:`u^\top \partial_a f` with :math:`u = \bar x + u^\top \partial_x f` solved by the
  same iteration, so memory does not grow with the number of iterations and
  ``jax.grad(jax.grad(...))`` works. ``x_init`` receives a zero cotangent (the fixed point
  does not depend on it). Forward-mode (``jvp``) differentiation is not defined.

  The solve converges when :math:`f(a, \cdot)` is a contraction near :math:`x^\star`; the
  adjoint iteration then contracts at the same rate, with the same ``tol`` and ``max_iter``.

  **Non-convergence is reported, never silent.** A forward or adjoint (backward) solve that
  stops before its tolerance (``max_iter`` reached, or a non-finite value) triggers, through
  :func:`jax.debug.callback` (so also under ``jit``, ``vmap`` and ``grad``), with
  ``on_failure="warn"`` (default) a :class:`NonConvergenceWarning`; with ``"raise"`` a
  :class:`NonConvergenceError` (under ``jit`` JAX re-raises it as a
  ``jax.errors.JaxRuntimeError`` carrying the message; both are ``RuntimeError``); with
  ``"ignore"`` nothing. (This is the runtime-error style of ``equinox.error_if`` and
  ``jax.experimental.checkify``, without the need to wrap the caller.) To read the status
  (``converged``, ``num_iters``, ``error``) as arrays, call :func:`fixed_point_solve`, which
  runs the same solve.

  Parameters of ``f`` that you differentiate should be passed through ``a``. Values that
  ``f`` closes over and that are being traced (e.g. a weight matrix that an outer
  ``jax.grad`` differentiates) are found with :func:`jax.closure_convert` and passed across
  the custom-derivative boundary with ``a``, so their gradients are correct too, instead of
  the classic silent zero.

  Args:
    f: ``(a, x) -> x``, mapping ``x_init``'s pytree structure, shapes and dtypes to itself.
    a: parameters, any pytree of arrays.
    x_init: starting point, any pytree of floating arrays (Python scalars take the dtype
      ``f`` returns).
    tol: relative stopping tolerance (positive).
    max_iter: maximal number of evaluations of ``f`` per solve (positive int).
    on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``: what an unconverged solve
      does (see above).

  Returns:
    The fixed point :math:`x^\star`, a pytree shaped like ``x_init``.

  Raises:
    ValueError: for a non-positive ``tol`` or ``max_iter``, an unknown ``on_failure``, or if
      ``f(a, x_init)`` is not shaped like ``x_init``.

  Examples:
    The JAX tutorial's Newton square root, as the tutorial writes it:
    :math:`x = (x + a/x)/2`, so :math:`x^\star = \sqrt a`,
    :math:`\tfrac{d}{da}\sqrt a = 1/(2\sqrt a)` and
    :math:`\tfrac{d^2}{da^2}\sqrt a = -1/(4 a^{3/2})`:

    >>> def newton_sqrt(a):
    ...   update = lambda a, x: 0.5 * (x + a / x)
    ...   return fixed_point(update, a, a)
    >>> round(float(newton_sqrt(2.)), 6)
    1.414214
    >>> round(float(jax.grad(newton_sqrt)(2.)), 6)
    0.353553
    >>> round(float(jax.grad(jax.grad(newton_sqrt))(2.)), 6)
    -0.088388
    >>> jax.jit(jax.vmap(newton_sqrt))(jnp.array([1., 4., 9.])).round(6).tolist()
    [1.0, 2.0, 3.0]

    A map that does not contract is reported:

    >>> fixed_point(  # doctest: +IGNORE_EXCEPTION_DETAIL
    ...     lambda a, x: 2.0 * x + a, 1.0, 1.0, max_iter=50, on_failure="raise")
    Traceback (most recent call last):
    NonConvergenceError: fixed_point: the forward solve did not converge: it stopped after ...

  References:
    Blondel et al., "Efficient and modular implicit differentiation", NeurIPS 2022.
    JAX documentation, "Custom derivative rules" (``fixed_point`` and ``rev_iter``).
  """
  return fixed_point_solve(f, a, x_init, tol=tol, max_iter=max_iter, on_failure=on_failure).value
