r"""Curvature-matrix-vector products: Hessian, generalised Gauss-Newton, empirical Fisher.

None of these forms a matrix. Each is a composition of one or two of JAX's primitive
transformations (``jvp``, ``vjp``, ``linearize``), so each costs a small constant multiple of
one gradient. The ``*_fn`` factories linearise once and return a matvec, cheaper when the
same curvature is applied to many vectors (inside conjugate gradient, Lanczos, Hutchinson).
"""

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _nnx
from curvopt._typing import Matvec, Params

HvpMode = Literal["fwd_rev", "rev_fwd", "rev_rev"]
HVP_MODES = ("fwd_rev", "rev_fwd", "rev_rev")
_MODULE_HINT = (
  "The point is an nnx.Module: tangents live in its differentiated state, "
  "nnx.state(model, nnx.Param) (or nnx.state(model, wrt) with wrt=)."
)


def _pure(f: Callable[..., Any], x: Any, wrt: Any) -> tuple[Callable[..., Any], Any, str]:
  """``(f, x)`` as a pure function of the params (for nnx Modules), and the error hint."""
  hint = _MODULE_HINT if _nnx.is_module(x) else ""
  f, x = _nnx.pure(f, x, wrt)
  return f, x, hint


def hvp(
  f: Callable[[Any], jax.Array], x: Any, v: Any, *, mode: HvpMode = "fwd_rev", wrt: Any = None
) -> Any:
  r"""Hessian-vector product :math:`\nabla^2 f(x)\, v` without forming the Hessian.

  ``"fwd_rev"`` pushes ``v`` forward through ``grad(f)`` (Pearlmutter 1994): one forward
  and one reverse pass, the cheapest and the default. ``"rev_fwd"`` differentiates the
  directional derivative :math:`x \mapsto \nabla f(x)^\top v` in reverse mode;
  ``"rev_rev"`` does the same with an inner gradient, the most memory-hungry.

  A flax ``nnx.Module`` can be the point: ``hvp(lambda m: loss(m, batch), model, v)``
  differentiates its ``nnx.Param`` state (or the state the nnx filter ``wrt`` selects, as in
  ``nnx.Optimizer``); ``v`` and the result are then ``nnx.State`` objects shaped like
  ``nnx.state(model, nnx.Param)``. Other state (BatchNorm statistics, Dropout RNG counts) is
  held fixed at its current value, and the Module is left untouched.

  Args:
    f: scalar function of one pytree (or of an nnx Module).
    x: point, any pytree of arrays, or an ``nnx.Module``.
    v: tangent with ``x``'s structure and leaf shapes (for a Module, its ``wrt`` state's).
    mode: ``"fwd_rev"``, ``"rev_fwd"`` or ``"rev_rev"``.
    wrt: for a Module ``x``, the nnx filter of the differentiated state (default
      ``nnx.Param``).

  Returns:
    A pytree shaped like ``x`` (an ``nnx.State`` for a Module).

  Raises:
    ValueError: for an unknown ``mode``, a ``v`` shaped unlike ``x`` or a non-scalar ``f``.
    TypeError: for a leaf of ``v`` whose dtype differs from ``x``'s (the message names the
      leaf and the cast that fixes it; Python scalars are cast to ``x``'s dtype).

  Examples:
    >>> float(hvp(lambda x: (x ** 3).sum(), jnp.array(2.0), jnp.array(1.0)))
    12.0

  References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
  """
  _checks.check_choice("mode", mode, HVP_MODES)
  f, x, hint = _pure(f, x, wrt)
  v = _checks.check_tangent("hvp", x, v, hint=hint)
  _checks.check_scalar_output("hvp", jax.eval_shape(f, x))
  if mode == "fwd_rev":
    return jax.jvp(jax.grad(f), (x,), (v,))[1]
  if mode == "rev_fwd":
    return jax.grad(lambda y: jax.jvp(f, (y,), (v,))[1])(x)
  return jax.grad(lambda y: optax.tree.vdot(jax.grad(f)(y), v))(x)


def hvp_fn(
  f: Callable[[Any], jax.Array], x: Any, *, mode: HvpMode = "fwd_rev", wrt: Any = None
) -> Matvec:
  r"""Returns ``v -> ∇²f(x) v``, linearising at ``x`` once.

  ``"fwd_rev"`` uses :func:`jax.linearize` on ``grad(f)``: the forward and reverse passes
  through ``f`` run once, and each product then replays only the linear (tangent) part.
  ``"rev_rev"`` takes :func:`jax.vjp` of ``grad(f)`` once, relying on the symmetry of the
  Hessian. ``"rev_fwd"`` has nothing to share between products and recomputes
  :func:`hvp` each call.

  ``x`` may be an ``nnx.Module``, as in :func:`hvp`; the matvec then maps ``nnx.State``
  tangents (shaped like ``nnx.state(model, nnx.Param)``) to ``nnx.State``.

  Args:
    f: scalar function of one pytree (or of an nnx Module).
    x: point, any pytree of arrays, or an ``nnx.Module``.
    mode: ``"fwd_rev"``, ``"rev_fwd"`` or ``"rev_rev"``.
    wrt: for a Module ``x``, the nnx filter of the differentiated state (default
      ``nnx.Param``).

  Returns:
    A linear function mapping a tangent shaped like ``x`` to ``∇²f(x) v``.

  Examples:
    >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    >>> matvec = hvp_fn(lambda x: 0.5 * x @ A @ x, jnp.zeros(2))
    >>> matvec(jnp.array([1.0, 0.0])).tolist()
    [2.0, 1.0]
  """
  _checks.check_choice("mode", mode, HVP_MODES)
  f, x, hint = _pure(f, x, wrt)
  _checks.check_scalar_output("hvp_fn", jax.eval_shape(f, x))
  if mode == "fwd_rev":
    _, matvec = jax.linearize(jax.grad(f), x)
  elif mode == "rev_rev":
    _, vjp = jax.vjp(jax.grad(f), x)
    matvec = lambda v: vjp(v)[0]
  else:
    matvec = lambda v: hvp(f, x, v, mode="rev_fwd")

  def checked_matvec(v):
    return matvec(_checks.check_tangent("hvp_fn's matvec", x, v, hint=hint))

  return checked_matvec


def ggn_fn(
  model_fn: Callable[[Params], Any],
  loss_fn: Callable[[Any], jax.Array],
  params: Params,
  *,
  wrt: Any = None,
) -> Matvec:
  r"""Returns the generalised Gauss-Newton matvec ``v -> Jᵀ H_L J v``, linearising once.

  With outputs :math:`z = m(\theta)` and loss :math:`L(z)`, the GGN is
  :math:`G = J_m^\top \nabla^2_z L\, J_m` (Schraudolph 2002). It is positive semi-definite
  whenever :math:`L` is convex in :math:`z`, which makes it the curvature of choice for
  Hessian-free optimisation (Martens 2010). Each product is one Jacobian-vector product
  through the linearised model, one Hessian-vector product of the (cheap) loss, and one
  transpose: no second-order derivative of the model is ever taken.

  ``params`` may be an ``nnx.Module`` (with ``model_fn(module) -> outputs``), as in
  :func:`hvp`: tangents are then ``nnx.State`` objects of its ``wrt`` state.

  Args:
    model_fn: ``params -> outputs`` (any pytree).
    loss_fn: ``outputs -> scalar``.
    params: point of linearisation, any pytree, or an ``nnx.Module``.
    wrt: for a Module, the nnx filter of the differentiated state (default ``nnx.Param``).

  Returns:
    A linear function mapping a tangent shaped like ``params`` to ``G v``.

  Examples:
    Linear least squares: the GGN of ``0.5‖Xw‖²`` is exactly ``XᵀX``.

    >>> X = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> G = ggn_fn(lambda w: X @ w, lambda z: 0.5 * z @ z, jnp.zeros(2))
    >>> G(jnp.array([1.0, 0.0])).tolist()
    [10.0, 14.0]

  References:
    Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
    Neural Computation 2002. Martens, "Deep learning via Hessian-free optimization", ICML 2010.
  """
  model_fn, params, hint = _pure(model_fn, params, wrt)
  outputs, model_jvp = jax.linearize(model_fn, params)
  _checks.check_scalar_output("ggn_fn's loss_fn", jax.eval_shape(loss_fn, outputs))
  model_vjp = jax.linear_transpose(model_jvp, params)
  _, loss_hvp = jax.linearize(jax.grad(loss_fn), outputs)

  def matvec(v):
    v = _checks.check_tangent("ggn_fn's matvec", params, v, "params", "v", hint)
    (gv,) = model_vjp(loss_hvp(model_jvp(v)))
    return gv

  return matvec


def ggn_vp(
  model_fn: Callable[[Params], Any],
  loss_fn: Callable[[Any], jax.Array],
  params: Params,
  v: Params,
  *,
  wrt: Any = None,
) -> Params:
  r"""Generalised Gauss-Newton-vector product :math:`J^\top \nabla^2_z L\, J v`.

  One-off version of :func:`ggn_fn`; see there for the maths.

  Args:
    model_fn: ``params -> outputs`` (any pytree).
    loss_fn: ``outputs -> scalar``.
    params: point, any pytree, or an ``nnx.Module`` (as in :func:`ggn_fn`).
    v: tangent with ``params``' structure (for a Module, an ``nnx.State`` of its ``wrt``
      state).
    wrt: for a Module, the nnx filter of the differentiated state (default ``nnx.Param``).

  Returns:
    ``G v``, shaped like ``params``.

  Examples:
    >>> X = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> ggn_vp(lambda w: X @ w, lambda z: 0.5 * z @ z, jnp.zeros(2), jnp.ones(2)).tolist()
    [24.0, 34.0]
  """
  model_fn, params, hint = _pure(model_fn, params, wrt)
  v = _checks.check_tangent("ggn_vp", params, v, "params", "v", hint)
  return ggn_fn(model_fn, loss_fn, params)(v)


def empirical_fisher_fn(
  loss_fn: Callable[[Params, Any], jax.Array], params: Params, batch: Any, *, wrt: Any = None
) -> Matvec:
  r"""Returns the empirical Fisher matvec ``v -> (1/B) Σ_i g_i (g_iᵀ v)``.

  :math:`g_i = \nabla_\theta \ell(\theta, x_i)` is the gradient of the loss of example
  :math:`i`. The per-example gradients are never materialised: with
  :math:`\ell(\theta) = (\ell(\theta, x_1), \dots, \ell(\theta, x_B))`, the product is
  :math:`\tfrac1B J_\ell^\top (J_\ell v)`, one linearised forward pass and one transpose.

  ``params`` may be an ``nnx.Module`` (with ``loss_fn(module, example)``), as in :func:`hvp`.

  Args:
    loss_fn: ``(params, example) -> scalar`` for a single example.
    params: point, any pytree, or an ``nnx.Module``.
    batch: pytree of arrays whose leaves share a leading example axis.
    wrt: for a Module, the nnx filter of the differentiated state (default ``nnx.Param``).

  Returns:
    A linear function mapping a tangent shaped like ``params`` to ``F v``.

  Examples:
    For ``ℓ(w, x) = w·x`` the gradients are the examples, so ``F = XᵀX / B``.

    >>> X = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> F = empirical_fisher_fn(lambda w, x: w @ x, jnp.zeros(2), X)
    >>> F(jnp.array([1.0, 1.0])).tolist()
    [2.0, 3.0]

  References:
    Kunstner, Hennig and Balles, "Limitations of the empirical Fisher approximation for
    natural gradient descent", NeurIPS 2019 (what it is, and when not to use it).
  """
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      "batch leaves must share one leading example axis; got leading sizes "
      f"{jax.tree.map(lambda a: jnp.shape(a)[:1], batch)}."
    )
  (num_examples,) = sizes
  loss_fn, params, hint = _pure(loss_fn, params, wrt)
  losses_fn = lambda p: jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
  losses, losses_jvp = jax.linearize(losses_fn, params)
  if losses.shape != (num_examples,):
    raise ValueError(
      f"loss_fn must return a scalar per example; vmapped it returned shape {losses.shape}."
    )
  losses_vjp = jax.linear_transpose(losses_jvp, params)

  def matvec(v):
    v = _checks.check_tangent("empirical_fisher_fn's matvec", params, v, "params", "v", hint)
    (fv,) = losses_vjp(losses_jvp(v) / num_examples)
    return fv

  return matvec
