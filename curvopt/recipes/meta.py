r"""Meta-gradients: MAML through the inner updates, first-order MAML, and implicit MAML.

Model-agnostic meta-learning (Finn et al. 2017) adapts meta-parameters :math:`\theta` to a task
with a few gradient steps on the task's *support* set and scores the adapted parameters
:math:`\phi(\theta)` on its *query* set:

.. math:: \mathcal L_{\mathrm{meta}}(\theta) = L_{\mathrm{query}}(\phi(\theta)), \qquad
   \phi_{k+1} = \phi_k + \mathrm{update}(\nabla L_{\mathrm{support}}(\phi_k)), \ \phi_0 = \theta.

:func:`maml_loss` builds :math:`\mathcal L_{\mathrm{meta}}` so that ``jax.grad`` of it is
the meta-gradient. Three ways to differentiate it:

* default: backpropagate through the inner loop (second-order: Hessian-vector products of
  the support loss appear automatically); memory grows linearly with ``inner_steps``;
* ``first_order=True`` (FOMAML): treat the inner updates as constants, so the meta-gradient
  is :math:`\nabla L_{\mathrm{query}}(\phi)`;
* ``implicit=True`` (iMAML, Rajeswaran et al. 2019): the inner problem is proximally
  regularised, :math:`\phi^\star = \arg\min_\phi L_{\mathrm{support}}(\phi) +
  \tfrac\lambda2 \|\phi - \theta\|^2`, whose solution satisfies
  :math:`\partial\phi^\star/\partial\theta = (I + H/\lambda)^{-1}` with
  :math:`H = \nabla^2 L_{\mathrm{support}}(\phi^\star)`; the meta-gradient
  :math:`(I + H/\lambda)^{-1} \nabla L_{\mathrm{query}}(\phi^\star)` is solved by
  :func:`curvopt.linalg.cg.conjugate_gradient` on :func:`curvopt.curvature.products.hvp_fn`
  products (its residual and status are reported in :class:`MamlAux`), and memory does not
  depend on ``inner_steps``.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt._typing import Batch, Params
from curvopt.curvature.products import hvp_fn
from curvopt.linalg.cg import CGResult, conjugate_gradient

TaskLossFn = Callable[[Params, Batch], jax.Array]
MetaLossFn = Callable[[Params, Batch, Batch], Any]


class MamlAux(NamedTuple):
  r"""Auxiliary output of ``meta_loss`` when ``maml_loss(..., has_aux=True)``.

  Attributes:
    adapted_params: the task-adapted parameters :math:`\phi`.
    inner_grad_norm: :math:`\|\nabla_\phi\|_2` of the inner objective at :math:`\phi`
      (the support loss, plus the proximal term for iMAML), stop-gradiented: the stationarity
      residual. iMAML's meta-gradient is exact only when it is near 0; check it.
    implicit_solve: iMAML only (``None`` otherwise): the :class:`~curvopt.linalg.cg.CGResult`
      of the conjugate-gradient solve :math:`(I + H/\lambda)\,u = \nabla
      L_{\mathrm{query}}(\phi^\star)`, the same system (up to the scale of the outer
      cotangent) that the backward pass of ``jax.grad(meta_loss)`` solves. ``x`` is this task's
      implicit meta-gradient; ``relative_residual``, ``num_steps`` and ``status`` (a
      :class:`~curvopt.linalg.status.SolverStatus` code) show whether ``cg_steps`` sufficed,
      and ``min_curvature <= 0`` flags :math:`I + H/\lambda` not positive definite (the
      implicit formula then does not hold). Stop-gradiented; costs one more solve in the
      forward pass.
  """

  adapted_params: Params
  inner_grad_norm: jax.Array
  implicit_solve: CGResult | None = None


def _inner_loop(
  objective: Callable[[Params], jax.Array],
  params: Params,
  optimizer: optax.GradientTransformation,
  inner_steps: int,
  first_order: bool,
) -> Params:
  """Runs ``inner_steps`` optimiser steps on ``objective`` from ``params`` in one ``lax.scan``."""
  extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)
  # Line searches (optax.lbfgs's zoom) evaluate trial points at float64 step sizes under
  # jax_enable_x64: cast them back to the parameters' dtypes.
  value_fn = lambda p: objective(jax.tree.map(lambda a, r: a.astype(r.dtype), p, params))

  def step(carry, _):
    phi, opt_state = carry
    value, grad = jax.value_and_grad(objective)(phi)
    if extra_args:
      updates, opt_state = optimizer.update(
        grad, opt_state, phi, value=value, grad=grad, value_fn=value_fn
      )
    else:
      updates, opt_state = optimizer.update(grad, opt_state, phi)
    if first_order:
      updates = jax.lax.stop_gradient(updates)
    return (optax.apply_updates(phi, updates), opt_state), None

  (phi, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=inner_steps)
  return phi


def _aux(objective: Callable[[Params], jax.Array], phi: Params) -> MamlAux:
  grad_norm = optax.tree.norm(jax.grad(objective)(jax.lax.stop_gradient(phi)))
  return MamlAux(phi, jax.lax.stop_gradient(grad_norm))


def _proximal_objective(loss_fn, proximal_lambda, params, support):
  return lambda phi: (
    loss_fn(phi, support)
    + 0.5 * proximal_lambda * optax.tree.norm(optax.tree.sub(phi, params), squared=True)
  )


def _zero_cotangent(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _negate(tree: Any) -> Any:
  return jax.tree.map(lambda g: g if g.dtype == jax.dtypes.float0 else -g, tree)


#: Relative-residual tolerance of the iMAML solve.
_CG_TOL = 1e-10


def _implicit_solve(
  support_loss: Callable[[Params], jax.Array],
  phi: Params,
  rhs: Params,
  proximal_lambda: float,
  cg_steps: int,
) -> CGResult:
  r"""CG for :math:`(I + H/\lambda)u = \mathrm{rhs}`, :math:`H = \nabla^2` support loss at φ.

  Plain CG (no Steihaug exit), as iMAML prescribes: ``min_curvature`` reports an indefinite
  system instead of stopping on it.
  """
  hessian_vp = hvp_fn(support_loss, phi)
  matvec = lambda v: optax.tree.scale(1.0 / proximal_lambda, hessian_vp(v))
  return conjugate_gradient(
    matvec, rhs, damping=1.0, max_steps=cg_steps, tol=_CG_TOL, steihaug=False
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _imaml_adapt(
  loss_fn, solve_fn, proximal_lambda, cg_steps, params, support, loss_consts, solve_consts
):
  """φ* of the proximal inner problem, with the iMAML implicit VJP.

  ``loss_fn(p, s, *loss_consts)`` and ``solve_fn(p, s, loss_consts, *solve_consts)`` are
  closure-converted: every traced value they use arrives as an argument, so values that an
  outer transformation differentiates are never closed over by the custom rule.
  """
  del loss_fn, proximal_lambda, cg_steps
  return solve_fn(params, support, loss_consts, *solve_consts)


def _imaml_adapt_fwd(loss_fn, solve_fn, proximal_lambda, cg_steps, *args):
  phi = _imaml_adapt(loss_fn, solve_fn, proximal_lambda, cg_steps, *args)
  _, support, loss_consts, solve_consts = args
  # Only φ* and the data are kept: nothing from the inner iterations.
  return phi, (phi, support, loss_consts, solve_consts)


def _imaml_adapt_bwd(loss_fn, solve_fn, proximal_lambda, cg_steps, res, phi_bar):
  del solve_fn
  phi, support, loss_consts, solve_consts = res
  loss = lambda p, s, consts: loss_fn(p, s, *consts)
  # u = (I + H/λ)⁻¹ φ̄ is the cotangent of θ (∂φ*/∂θ = (I + H/λ)⁻¹, symmetric).
  support_loss = lambda p: loss(p, support, loss_consts)
  u = _implicit_solve(support_loss, phi, phi_bar, proximal_lambda, cg_steps).x
  # Data cotangents from the same solve: ∂φ*/∂s = -(H + λI)⁻¹ ∂_s ∇_φ L(φ*, s), and the same
  # for values the loss closes over.
  _, vjp_data = jax.vjp(lambda s, c: jax.grad(loss)(phi, s, c), support, loss_consts)
  support_bar, loss_consts_bar = vjp_data(optax.tree.scale(1.0 / proximal_lambda, u))
  # The minimiser does not depend on the inner optimiser's hyper-parameters.
  solve_consts_bar = tuple(jax.tree.map(_zero_cotangent, solve_consts))
  return u, _negate(support_bar), _negate(loss_consts_bar), solve_consts_bar


_imaml_adapt.defvjp(_imaml_adapt_fwd, _imaml_adapt_bwd)


def maml_loss(
  loss_fn: TaskLossFn,
  *,
  inner_lr: float | None = None,
  inner_optimizer: optax.GradientTransformation | None = None,
  inner_steps: int = 1,
  first_order: bool = False,
  implicit: bool = False,
  proximal_lambda: float | None = None,
  cg_steps: int = 20,
  has_aux: bool = False,
) -> MetaLossFn:
  r"""Returns ``meta_loss(params, support, query)``, whose gradient is the MAML meta-gradient.

  ``meta_loss`` adapts ``params`` on ``support`` with ``inner_steps`` steps of SGD at
  ``inner_lr`` (or of any optax ``inner_optimizer``, run inside :func:`jax.lax.scan`) and
  returns ``loss_fn(adapted, query)``. It is a pure function of one task: ``jax.vmap`` it over
  a batch of tasks (``in_axes=(None, 0, 0)``) and take the mean; it is ``jit``-able.

  * Default (MAML): ``jax.grad(meta_loss)`` differentiates through every inner update,
    :math:`\prod_k (I - \alpha \nabla^2 L_{\mathrm{support}}(\phi_k))\,
    \nabla L_{\mathrm{query}}(\phi_K)` for SGD.
  * ``first_order=True`` (FOMAML): the inner updates are stop-gradiented, so the
    meta-gradient is :math:`\nabla L_{\mathrm{query}}(\phi_K)`.
  * ``implicit=True`` (iMAML): the inner loop minimises the proximal objective
    :math:`L_{\mathrm{support}}(\phi) + \tfrac\lambda2\|\phi-\theta\|^2` from
    :math:`\phi_0 = \theta`, and the meta-gradient is
    :math:`(I + H/\lambda)^{-1}\nabla L_{\mathrm{query}}(\phi^\star)`, :math:`H` the
    support Hessian at :math:`\phi^\star`, solved with ``cg_steps`` conjugate-gradient
    iterations on Hessian-vector products (:func:`jax.custom_vjp`: only :math:`\phi^\star`
    is stored, so memory is flat in ``inner_steps``). The formula is exact at the minimiser:
    use enough inner steps to reach it and check ``MamlAux.inner_grad_norm`` (``has_aux``).
    Away from it the result is not the meta-gradient: fixed-step SGD diverges when
    ``inner_lr`` exceeds :math:`2/(\lambda_{\max}(H) + \lambda)`, and with a small
    :math:`\lambda` the minimiser lies far from :math:`\theta`; an inner optimiser with a
    line search (``optax.lbfgs()``) adapts to the curvature. CG assumes
    :math:`I + H/\lambda` positive definite (:math:`H \succ -\lambda I`). The support data,
    and traced values that ``loss_fn`` closes over (found with :func:`jax.closure_convert`),
    receive their implicit cotangents too; the inner optimiser's hyper-parameters get zero
    (the minimiser does not depend on them) and ``proximal_lambda`` is a constant. With the
    default and first-order modes, everything, ``inner_lr`` included, is differentiated by
    ordinary autodiff (Meta-SGD).

  Args:
    loss_fn: ``(params, batch) -> scalar`` task loss.
    inner_lr: SGD step size of the inner loop (give this or ``inner_optimizer``).
    inner_optimizer: any optax transformation, used as ``updates, state = update(grads,
      state, params)`` (with ``value``, ``grad``, ``value_fn`` extra arguments for
      ``GradientTransformationExtraArgs``); its state is initialised per task.
    inner_steps: number of inner updates (``>= 1``).
    first_order: drop the second-order terms (FOMAML).
    implicit: use the implicit (iMAML) meta-gradient; needs ``proximal_lambda``.
    proximal_lambda: :math:`\lambda > 0`, strength of the pull towards ``params``.
    cg_steps: maximum conjugate-gradient iterations for the iMAML solve (it stops earlier
      at a relative residual of ``1e-10``).
    has_aux: if true, ``meta_loss`` returns ``(loss, MamlAux(adapted_params,
      inner_grad_norm, implicit_solve))``, to use with ``jax.grad(..., has_aux=True)``; the
      inner-loop residual shows whether adaptation converged and, for iMAML, the CG result
      whether the implicit solve did.

  Returns:
    ``meta_loss(params, support, query) -> scalar`` (or ``(scalar, MamlAux)``).

  Raises:
    ValueError: for a missing or doubled inner optimiser, ``inner_steps < 1``, or
      inconsistent implicit options.

  Examples:
    One SGD step on :math:`L(w) = \tfrac12 (w - c)^2`: :math:`\phi = w - \alpha(w - c_s)`,
    so :math:`d\mathcal L/dw = (1 - \alpha)(\phi - c_q)`:

    >>> loss_fn = lambda w, c: 0.5 * (w - c) ** 2
    >>> meta_loss = maml_loss(loss_fn, inner_lr=0.25)
    >>> float(jax.grad(meta_loss)(2.0, 0.0, 1.0))    # φ = 1.5, (1 - .25)(1.5 - 1)
    0.375
    >>> fo = maml_loss(loss_fn, inner_lr=0.25, first_order=True)
    >>> float(jax.grad(fo)(2.0, 0.0, 1.0))
    0.5

    iMAML on the same loss with :math:`\lambda = 1`:
    :math:`\phi^\star = (c_s + \lambda w)/(1 + \lambda) = 1` (one step at rate 1/2 reaches
    it) and :math:`d\phi^\star/dw = (1 + 1/\lambda)^{-1}`:

    >>> imaml = maml_loss(loss_fn, inner_lr=0.5, implicit=True, proximal_lambda=1.0)
    >>> float(jax.grad(imaml)(2.0, 0.0, 0.0))    # (1 + 1)⁻¹ (φ* - 0)
    0.5

  References:
    Finn, Abbeel and Levine, "Model-agnostic meta-learning for fast adaptation of deep
    networks", ICML 2017. Rajeswaran, Finn, Kakade and Levine, "Meta-learning with implicit
    gradients", NeurIPS 2019.
  """
  if (inner_lr is None) == (inner_optimizer is None):
    raise ValueError(
      "maml_loss needs exactly one of inner_lr (for SGD) or inner_optimizer (an optax "
      f"transformation); got inner_lr={inner_lr!r}, inner_optimizer={inner_optimizer!r}."
    )
  if not (isinstance(inner_steps, int) and inner_steps >= 1):
    raise ValueError(f"inner_steps must be an int >= 1; got {inner_steps!r}.")
  optimizer = optax.sgd(inner_lr) if inner_optimizer is None else inner_optimizer
  if not implicit:
    if proximal_lambda is not None:
      raise ValueError(
        f"proximal_lambda={proximal_lambda!r} is only used by implicit MAML; pass implicit=True."
      )

    def meta_loss(params: Params, support: Batch, query: Batch) -> Any:
      objective = lambda phi: loss_fn(phi, support)
      phi = _inner_loop(objective, params, optimizer, inner_steps, first_order)
      if has_aux:
        return loss_fn(phi, query), _aux(objective, phi)
      return loss_fn(phi, query)

    return meta_loss

  if first_order:
    raise ValueError("first_order=True and implicit=True are exclusive; choose one.")
  if proximal_lambda is None or not proximal_lambda > 0:
    raise ValueError(
      "implicit MAML needs proximal_lambda > 0 (the proximal regulariser); got "
      f"{proximal_lambda!r}."
    )
  if not (isinstance(cg_steps, int) and cg_steps >= 1):
    raise ValueError(f"cg_steps must be an int >= 1; got {cg_steps!r}.")
  proximal_lambda = float(proximal_lambda)

  def imaml_loss(params: Params, support: Batch, query: Batch) -> Any:
    loss_c, loss_consts = jax.closure_convert(loss_fn, params, support)
    loss_consts = tuple(loss_consts)

    def solve(p, s, lc):
      objective = _proximal_objective(lambda q, t: loss_c(q, t, *lc), proximal_lambda, p, s)
      return _inner_loop(objective, p, optimizer, inner_steps, first_order=False)

    solve_c, solve_consts = jax.closure_convert(solve, params, support, loss_consts)
    phi = _imaml_adapt(
      loss_c, solve_c, proximal_lambda, cg_steps, params, support, loss_consts, tuple(solve_consts)
    )
    if has_aux:
      objective = _proximal_objective(loss_fn, proximal_lambda, params, support)
      fixed = jax.lax.stop_gradient((phi, support, query))
      support_loss = lambda p: loss_fn(p, fixed[1])
      query_grad = jax.grad(loss_fn)(fixed[0], fixed[2])
      solve = _implicit_solve(support_loss, fixed[0], query_grad, proximal_lambda, cg_steps)
      return loss_fn(phi, query), _aux(objective, phi)._replace(implicit_solve=solve)
    return loss_fn(phi, query)

  return imaml_loss
