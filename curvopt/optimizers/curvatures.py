r"""Curvature and diagonal registries of Newton-CG: one function and one entry per method.

A **curvature** follows the public :class:`CurvatureFn` protocol,
``curvature(params, objective, data) -> matvec``; a **diagonal** (for the preconditioner)
follows :class:`DiagonalFn`, ``diagonal(params, objective, data) -> pytree``. The built-in
ones need construction options (``model_fn``/``loss_fn`` for the GGN, ``hvp_mode`` for the
Hessian) and the update's unbound ``value_fn`` (per-example losses for the Fisher), so the
registries hold *builders* ``builder(spec: CurvatureSpec) -> CurvatureFn`` that
:func:`~curvopt.optimizers.newton_cg.scale_by_newton_cg` calls inside each update. Adding a
built-in curvature is one builder and one entry in :data:`CURVATURES`; a user passes a
:class:`CurvatureFn` directly.
"""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from curvopt._typing import Matvec, Params
from curvopt.curvature import products
from curvopt.optimizers import damping as damping_lib


class CurvatureFn(Protocol):
  """Protocol of a curvature for :func:`~curvopt.optimizers.newton_cg.scale_by_newton_cg`.

  Called once per update, inside the compiled step, as
  ``curvature(params, objective, data) -> matvec`` where ``objective`` is ``params -> loss`` on
  this step's mini-batch (the data already bound; ``None`` when neither ``value_fn`` nor
  ``model_fn``/``loss_fn`` is available) and ``data`` is the dict of data keyword arguments
  given to ``update``. The returned ``matvec: v -> Cv`` must be linear and symmetric on
  pytrees shaped like ``params``; positive semi-definite unless you rely on the Steihaug exit.
  Damping is added by the optimiser: return the undamped curvature.
  """

  def __call__(
    self, params: Params, objective: Callable[[Params], jax.Array] | None, data: dict
  ) -> Matvec: ...


class DiagonalFn(Protocol):
  """Protocol of a preconditioner diagonal: ``(params, objective, data) -> pytree``.

  The returned non-negative pytree (shaped like ``params``) estimates :math:`\\mathrm{diag}\\,C`;
  the optimiser preconditions CG with :math:`(\\mathrm{diagonal} + \\lambda)^\\alpha`
  (:func:`curvopt.optimizers.damping.diagonal_preconditioner`).
  """

  def __call__(
    self, params: Params, objective: Callable[[Params], jax.Array] | None, data: dict
  ) -> Params: ...


class CurvatureSpec(NamedTuple):
  """What a built-in curvature builder may use.

  Attributes:
    model_fn: ``model_fn(params, **data) -> outputs`` or ``None``.
    loss_fn: ``loss_fn(outputs, **data) -> loss`` or ``None``.
    value_fn: the update's unbound objective ``value_fn(params, **data) -> loss`` or ``None``.
    hvp_mode: forward/reverse composition of Hessian products.
  """

  model_fn: Callable[..., Any] | None
  loss_fn: Callable[..., jax.Array] | None
  value_fn: Callable[..., jax.Array] | None
  hvp_mode: products.HvpMode = "fwd_rev"


def arg_names(fn: Callable) -> list[str]:
  """Names ``fn`` accepts as keywords, excluding ``*args``/``**kwargs`` (optax's rule)."""
  return [
    name
    for name, p in inspect.signature(fn).parameters.items()
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
  ]


def route(fn: Callable, data: dict) -> dict:
  """The data keyword arguments that ``fn``'s signature names, as optax's line searches do."""
  names = arg_names(fn)
  return {k: v for k, v in data.items() if k in names}


def per_example(value_fn: Callable | None, data: dict, what: str):
  """``(params, example) -> loss`` from a batch-mean ``value_fn``, and the batch of examples."""
  if value_fn is None:
    raise ValueError(
      f"{what} needs value_fn=(params, **data) -> mean loss in update() (or model_fn/loss_fn at "
      "construction), and the mini-batch as data keyword arguments with a leading example axis."
    )
  examples = route(value_fn, data)
  if not examples:
    raise ValueError(
      f"{what} needs per-example losses: pass the mini-batch to update() as data keyword "
      "arguments that value_fn (or model_fn/loss_fn) names, each with a leading example axis."
    )
  loss = lambda p, ex: value_fn(p, **jax.tree.map(lambda a: jnp.expand_dims(a, 0), ex))
  return loss, examples


# ------------------------------------------------------------------------------ curvatures


def hessian(spec: CurvatureSpec) -> CurvatureFn:
  r"""The Hessian :math:`\nabla^2 f` of the objective by :func:`curvopt.products.hvp_fn`."""

  def curvature(params, objective, data):
    del data
    if objective is None:
      raise ValueError(
        "newton_cg(curvature='hessian') needs value_fn=(params, **data) -> loss in update(), "
        "e.g. tx.update(grads, state, params, value_fn=loss_fn, x=x, y=y)."
      )
    return products.hvp_fn(objective, params, mode=spec.hvp_mode)

  return curvature


def ggn(spec: CurvatureSpec) -> CurvatureFn:
  r"""The generalised Gauss-Newton :math:`J^\top \nabla^2 L\, J` (Schraudolph 2002)."""
  model_fn, loss_fn = spec.model_fn, spec.loss_fn

  def curvature(params, objective, data):
    del objective
    model_data, loss_data = route(model_fn, data), route(loss_fn, data)
    return products.ggn_fn(
      lambda p: model_fn(p, **model_data), lambda z: loss_fn(z, **loss_data), params
    )

  return curvature


def fisher(spec: CurvatureSpec) -> CurvatureFn:
  r"""The empirical Fisher :math:`\frac1B \sum_i g_i g_i^\top` of per-example losses."""

  def curvature(params, objective, data):
    del objective
    loss, examples = per_example(spec.value_fn, data, "curvature='fisher'")
    return products.empirical_fisher_fn(loss, params, examples)

  return curvature


#: Built-in curvatures by name: ``builder(spec) -> CurvatureFn``.
CURVATURES: dict[str, Callable[[CurvatureSpec], CurvatureFn]] = {
  "hessian": hessian,
  "ggn": ggn,
  "fisher": fisher,
}

#: Curvatures that need ``model_fn`` and ``loss_fn`` at construction.
NEEDS_MODEL = ("ggn",)


# ------------------------------------------------------------------------------- diagonals


def martens(spec: CurvatureSpec) -> DiagonalFn:
  r"""Martens' diagonal :math:`\frac1B \sum_i g_i^2` from per-example gradients (§4.7)."""

  def diagonal(params, objective, data):
    del objective
    loss, examples = per_example(spec.value_fn, data, "preconditioner='martens'")
    grads_i = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, examples)
    return damping_lib.martens_diagonal(grads_i)

  return diagonal


#: Built-in preconditioner diagonals by name: ``builder(spec) -> DiagonalFn``.
DIAGONALS: dict[str, Callable[[CurvatureSpec], DiagonalFn]] = {"martens": martens}
