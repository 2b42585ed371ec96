r"""Preconditioners of Newton-CG's CG that read the optimiser's problem.

Each is a :class:`~curvopt.linalg.solvers.Preconditioner` value (``init``, ``prepare`` once per
update, ``apply`` at each trial's damping) that reads the update's
:class:`PreconditionerContext` (the parameters, the model/loss split, the curvature's data):

* :class:`MartensDiagonal`: Martens' (2010 §4.7) diagonal of per-example squared gradients;
* :class:`DiagonalPreconditioner`: any user :class:`~curvopt.optimizers.curvature_parts.DiagonalFn`;
* :class:`KFACPreconditioner`: K-FAC's Kronecker factors (Martens & Grosse 2015), found in the
  model's jaxpr (:mod:`curvopt.curvature.kronecker`), inverted with factored Tikhonov damping
  and the :math:`\pi`-correction at each trial's damping.

The data-free preconditioner (:class:`~curvopt.linalg.solvers.NystromPreconditioner`) lives
with the solvers in :mod:`curvopt.linalg.solvers`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax

from curvopt._typing import Params
from curvopt.curvature import kronecker
from curvopt.optimizers import damping as damping_lib
from curvopt.optimizers.curvature_parts import (
  CurvatureOperator,
  batch_chunk,
  per_example,
  positive_int_or_none,
)
from curvopt.optimizers.problem import Problem, route

__all__ = [
  "DiagonalPreconditioner",
  "KFACPreconditioner",
  "MartensDiagonal",
  "PreconditionerContext",
]


class PreconditionerContext(NamedTuple):
  """What Newton-CG hands to its preconditioners (:attr:`curvopt.linalg.solvers.System.context`).

  Attributes:
    params: the parameters (a pytree).
    problem: the :class:`~curvopt.optimizers.problem.Problem` (model/loss split).
    value_fn: the objective ``(params, **data) -> loss`` or ``None``.
    curvature: the update's :class:`~curvopt.optimizers.curvature_parts.CurvatureOperator` (its
      data and objective).
    pack: pytree -> the solver's tuple of vectors.
    unpack: the inverse of ``pack``.
  """

  params: Params
  problem: Problem
  value_fn: Callable | None
  curvature: CurvatureOperator
  pack: Callable[[Any], Any]
  unpack: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class DiagonalPreconditioner:
  r""":math:`M = (\mathrm{diagonal} + \lambda)^\alpha` from a :class:`DiagonalFn`.

  Attributes:
    fn: ``(params, objective, data) -> diagonal`` (non-negative, shaped like ``params``).
    exponent: :math:`\alpha`.
  """

  fn: Callable[..., Params]
  exponent: float = 0.75

  def init(self, like):
    del like
    return ()

  def diagonal(self, context: PreconditionerContext) -> Params:
    c = context.curvature
    return self.fn(context.params, c.objective, c.data)

  def prepare(self, system, state, count):
    del count
    return state, system.context.pack(self.diagonal(system.context))

  def apply(self, work, damping):
    return damping_lib.diagonal_preconditioner(work, damping, self.exponent)


@dataclasses.dataclass(frozen=True)
class MartensDiagonal:
  r"""Martens' (2010 §4.7) :math:`M = (\mathrm{diag}(\frac1B\sum_i g_i^2) + \lambda)^\alpha`.

  Needs per-example gradients, so every data argument needs a leading example axis.

  Attributes:
    exponent: :math:`\alpha` (Martens uses 0.75).
    batch_size: if set, the diagonal uses only the first this many examples of the
      curvature's batch (128 of a 600-example chunk cost a fifth and precondition about as
      well).
  """

  exponent: float = 0.75
  batch_size: int | None = None

  def __post_init__(self):
    positive_int_or_none("MartensDiagonal.batch_size", self.batch_size)

  def init(self, like):
    del like
    return ()

  def prepare(self, system, state, count):
    del count
    context = system.context
    data = batch_chunk(
      context.problem.name,
      context.curvature.data,
      self.batch_size,
      0,
      "MartensDiagonal.batch_size",
    )
    loss, examples = per_example(
      context.problem.name, context.value_fn, data, "preconditioner='martens'"
    )
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(context.params, examples)
    return state, context.pack(damping_lib.martens_diagonal(grads))

  def apply(self, work, damping):
    return damping_lib.diagonal_preconditioner(work, damping, self.exponent)


@dataclasses.dataclass(frozen=True)
class KFACPreconditioner:
  r"""K-FAC (Martens & Grosse 2015) as CG's preconditioner: :math:`M^{-1} = \bigoplus_W
  (A_W + \pi\sqrt\lambda I)^{-1} \otimes (G_W + \tfrac{\sqrt\lambda}{\pi} I)^{-1}`.

  The factors are found in the model's jaxpr (no layer registration) at every update, on the
  curvature's data, from one forward pass and ``num_samples`` backward passes per example
  (:func:`curvopt.curvature.kronecker.kronecker_factors`; about one gradient's cost with the
  default sampled curvature), and inverted at each trial's damping with Martens & Grosse's
  :math:`\pi`-correction (:func:`curvopt.curvature.kronecker.damped_inverse`). Parameters in
  no recognised layer get their GGN diagonal. Needs ``model_fn``/``loss_fn``.

  Attributes:
    curvature: the factors' curvature, ``"ggn_sampled"``, ``"ggn"`` (one backward pass per
      output dimension) or ``"fisher"``.
    num_samples: samples per example of ``"ggn_sampled"``.
    weight_sharing: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023).
    seed: seed of the samples (folded with the update count).
  """

  curvature: Literal["ggn_sampled", "ggn", "fisher"] = "ggn_sampled"
  num_samples: int = 1
  weight_sharing: Literal["expand", "reduce"] = "expand"
  seed: int = 0

  def __post_init__(self):
    if self.curvature not in kronecker.CURVATURES:
      raise ValueError(
        f"KFACPreconditioner.curvature must be one of {kronecker.CURVATURES}; "
        f"got {self.curvature!r}."
      )
    if self.weight_sharing not in kronecker.WEIGHT_SHARINGS:
      raise ValueError(
        f"KFACPreconditioner.weight_sharing must be one of {kronecker.WEIGHT_SHARINGS}; "
        f"got {self.weight_sharing!r}."
      )
    positive_int_or_none("KFACPreconditioner.num_samples", self.num_samples)

  def init(self, like):
    del like
    return ()

  def prepare(self, system, state, count):
    context = system.context
    problem = context.problem
    if problem.model_fn is None:
      raise ValueError(
        f"{problem.name}(preconditioner='kfac') needs model_fn=(params, **data) -> outputs and "
        "loss_fn=(outputs, **data) -> loss at construction (K-FAC's factors come from the "
        "model's layers)."
      )
    factors = kronecker.kronecker_factors(
      lambda p, d: problem.model_fn(p, **route(problem.model_fn, d)),
      lambda z, d: problem.loss_fn(z, **route(problem.loss_fn, d)),
      context.params,
      context.curvature.data,
      curvature=self.curvature,
      weight_sharing=self.weight_sharing,
      key=jax.random.fold_in(jax.random.key(self.seed), count),
      num_samples=self.num_samples,
    )
    return state, (factors, context.pack, context.unpack)

  def apply(self, work, damping):
    factors, pack, unpack = work
    inverse = kronecker.damped_inverse(factors, damping)
    return lambda r: pack(kronecker.kronecker_matvec(inverse, unpack(r)))
