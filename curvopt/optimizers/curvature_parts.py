r"""The curvature part of Newton-CG: which matrix :math:`C` the damped system uses.

A curvature is a small immutable value with one method,
``operator(params, problem, value_fn, data, count) ->`` :class:`CurvatureOperator`, called
inside each compiled update. The operator carries the product ``v -> Cv`` and, where the
curvature is a Gram matrix :math:`C = F^\top F` with rows that can be formed (the
Gauss-Newton matrix of a per-example loss, the empirical Fisher), a
:class:`~curvopt.linalg.solvers.GramFactor` for the dense solvers. Built-in values:

* :class:`Hessian` (its product mode) of the objective ``value_fn``;
* :class:`GGN`: the generalised Gauss-Newton of ``model_fn``/``loss_fn`` (Schraudolph 2002),
  optionally on a rotating chunk of the batch (Martens 2010 §4.2);
* :class:`Fisher`: the empirical Fisher of per-example losses;
* :class:`CustomCurvature`: any function following the :class:`CurvatureFn` protocol.

The preconditioners of Newton-CG's CG that need the optimiser's objective live in
:mod:`curvopt.optimizers.preconditioners`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from curvopt._typing import Matvec, Params
from curvopt.curvature import cost, gram, products
from curvopt.linalg.solvers import GramFactor
from curvopt.optimizers.problem import Problem, check_same_length, route

__all__ = [
  "GGN",
  "CurvatureFn",
  "CurvatureOperator",
  "CustomCurvature",
  "DiagonalFn",
  "Fisher",
  "Hessian",
]


class CurvatureFn(Protocol):
  """Protocol of a user curvature for Newton-CG: ``(params, objective, data) -> matvec``.

  Called once per update, inside the compiled step, where ``objective`` is ``params -> loss``
  on this step's mini-batch (the data already bound; ``None`` when neither ``value_fn`` nor
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
  CG is preconditioned with :math:`(\\mathrm{diagonal} + \\lambda)^\\alpha`
  (:func:`curvopt.optimizers.damping.diagonal_preconditioner`).
  """

  def __call__(
    self, params: Params, objective: Callable[[Params], jax.Array] | None, data: dict
  ) -> Params: ...


class CurvatureOperator(NamedTuple):
  """One update's curvature.

  Attributes:
    matvec: ``v -> C v`` on pytrees shaped like the parameters (undamped).
    factor: a :class:`~curvopt.linalg.solvers.GramFactor` of :math:`C` (columns in
      ``jax.tree.leaves`` order), or ``None``.
    product_cost: floating-point operations of one product, or ``None``.
    data: the data the curvature was formed on (a chunk of the batch, or all of it).
    objective: ``params -> loss`` on ``data``, or ``None``.
  """

  matvec: Matvec
  factor: GramFactor | None
  product_cost: float | None
  data: dict
  objective: Callable[[Params], jax.Array] | None


def positive_int_or_none(name: str, value: Any) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"{name} must be a positive int or None; got {value!r}.")


def bind(value_fn: Callable | None, data: dict) -> Callable[[Params], jax.Array] | None:
  """``params -> value_fn(params, **data)`` with the data ``value_fn`` names."""
  if value_fn is None:
    return None
  bound = route(value_fn, data)
  return lambda p: value_fn(p, **bound)


def batch_chunk(name: str, data: dict, size: int | None, count: Any, what: str) -> dict:
  """Rows ``[j s, (j + 1) s)`` of every data argument, ``j = count mod (n // s)``.

  The curvature mini-batch of Martens (2010): a different contiguous chunk of the step's
  examples at every update, cycling through the batch, with static shapes (no recompilation).
  """
  if size is None or not data:
    return data
  n = check_same_length(name, data, what)
  if size > n:
    raise ValueError(
      f"{name}: {what}={size} exceeds the {n} examples it is drawn from; use at most {n} "
      "(or None for the whole batch)."
    )
  start = (count % (n // size)) * size
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), data)


def per_example(name: str, value_fn: Callable | None, data: dict, what: str):
  """``(params, example) -> loss`` from a batch-mean ``value_fn``, and the batch of examples."""
  if value_fn is None:
    raise ValueError(
      f"{name}: {what} needs value_fn=(params, **data) -> mean loss in update() (or "
      "model_fn/loss_fn at construction), and the mini-batch as data keyword arguments with a "
      "leading example axis."
    )
  examples = route(value_fn, data)
  if not examples:
    raise ValueError(
      f"{name}: {what} needs per-example losses: pass the mini-batch to update() as data "
      "keyword arguments that value_fn (or model_fn/loss_fn) names, each with a leading "
      "example axis."
    )
  check_same_length(name, examples, what)
  loss = lambda p, ex: value_fn(p, **jax.tree.map(lambda a: jnp.expand_dims(a, 0), ex))
  return loss, examples


# ------------------------------------------------------------------------- gram factors


def _flat(tree: Any) -> jax.Array:
  """A pytree with a leading row axis as ``(rows, n)``, columns in leaves order."""
  leaves = jax.tree.leaves(tree)
  return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def _gram_of_rows(rows: gram.GaussNewtonRows, chunk: int | None) -> jax.Array:
  """:math:`F^\\top F`, accumulated over chunks of about ``chunk`` rows."""
  total = None
  for g, group in enumerate(rows.groups):
    per = group.size if chunk is None else max(1, min(group.size, chunk // group.width))
    num = -(-group.size // per)

    def body(j, acc, g=g, group=group, per=per):
      idx = j * per + jnp.arange(per)
      valid = (idx < group.size).repeat(group.width)[:, None]
      f = jnp.where(valid, rows.row_fn(g, jnp.minimum(idx, group.size - 1)), 0.0)
      return acc + jnp.matmul(f.T, f, precision=jax.lax.Precision.HIGHEST)

    if total is None:
      n = jax.eval_shape(lambda: rows.row_fn(g, jnp.zeros(1, jnp.int32))).shape[1]
      dtype = rows.residual.dtype
      total = jnp.zeros((n, n), dtype)
    total = jax.lax.fori_loop(0, num, body, total) if num > 1 else body(0, total)
  return total


def _matrix_of_rows(rows: gram.GaussNewtonRows, chunk: int | None) -> jax.Array:
  """:math:`F`, formed ``chunk`` rows at a time (``lax.map`` over example batches)."""
  blocks = []
  for g, group in enumerate(rows.groups):
    idx = jnp.arange(group.size)
    if chunk is None or chunk >= group.size * group.width:
      blocks.append(rows.row_fn(g, idx))
    else:
      per = max(1, chunk // group.width)
      block = jax.lax.map(lambda i, g=g: rows.row_fn(g, i[None]), idx, batch_size=per)
      blocks.append(block.reshape(-1, block.shape[-1]))
  return jnp.concatenate(blocks, axis=0)


def gauss_newton_factor(
  build: Callable[[], gram.GaussNewtonRows], num_rows: int, rows_cost: float
) -> GramFactor:
  """The :class:`~curvopt.linalg.solvers.GramFactor` of the rows ``build()`` returns.

  The rows are traced only if a solver asks for them (a CG update never does).
  """
  cache = []

  def rows() -> gram.GaussNewtonRows:
    if not cache:
      cache.append(build())
    return cache[0]

  return GramFactor(
    num_rows=num_rows,
    matrix=lambda chunk: _matrix_of_rows(rows(), chunk),
    gram=lambda chunk: _gram_of_rows(rows(), chunk),
    residual=lambda: rows().residual,
    rows_cost=rows_cost,
  )


# -------------------------------------------------------------------------- curvatures


@dataclasses.dataclass(frozen=True)
class Hessian:
  r"""The Hessian :math:`\nabla^2 f` of the objective ``value_fn`` (required in ``update``).

  Attributes:
    mode: forward/reverse composition of the products (:func:`curvopt.hvp_fn`).
  """

  mode: products.HvpMode = "fwd_rev"

  def __post_init__(self):
    if self.mode not in products.HVP_MODES:
      raise ValueError(f"Unknown Hessian mode {self.mode!r}; expected one of {products.HVP_MODES}.")

  def operator(self, params, problem: Problem, value_fn, data, count) -> CurvatureOperator:
    del count
    objective = bind(value_fn, data)
    if objective is None:
      raise ValueError(
        f"{problem.name}(curvature='hessian') needs value_fn=(params, **data) -> loss in "
        "update(), e.g. tx.update(grads, state, params, value_fn=loss_fn, x=x, y=y); or "
        "model_fn/loss_fn at construction."
      )
    forward = cost.flops(value_fn, params, **route(value_fn, data))
    matvec = products.hvp_fn(objective, params, mode=self.mode)
    return CurvatureOperator(
      matvec, None, None if forward is None else 4 * forward, data, objective
    )


@dataclasses.dataclass(frozen=True)
class GGN:
  r"""The generalised Gauss-Newton :math:`J^\top \nabla^2_z L\, J` of ``model_fn``/``loss_fn``.

  Products by :func:`curvopt.ggn_fn`; for the dense solvers, the rows
  :math:`F_i = L_i^\top J_i` from per-example Jacobians (:mod:`curvopt.curvature.gram`).

  Attributes:
    batch_size: if set, the curvature uses only this many examples of the step's batch
      (Martens 2010 §4.2), rows ``[j s, (j + 1) s)`` with ``j = count mod (n // s)``, while
      the gradient and the reduction ratio use all of it. Every data argument then needs the
      same leading example axis, and the objective must be a mean over examples.
  """

  batch_size: int | None = None

  def __post_init__(self):
    positive_int_or_none("GGN.batch_size", self.batch_size)

  def operator(self, params, problem: Problem, value_fn, data, count) -> CurvatureOperator:
    if problem.model_fn is None:
      raise ValueError(
        f"{problem.name}(curvature='ggn') needs model_fn=(params, **data) -> outputs and "
        "loss_fn=(outputs, **data) -> loss at construction; or use curvature='hessian' and "
        "pass value_fn= to update()."
      )
    data = batch_chunk(problem.name, data, self.batch_size, count, "GGN.batch_size")
    model_data, loss_data = route(problem.model_fn, data), route(problem.loss_fn, data)
    model = lambda p: problem.model_fn(p, **model_data)
    loss = lambda z: problem.loss_fn(z, **loss_data)
    matvec = products.ggn_fn(model, loss, params)
    forward = cost.flops(lambda p: loss(model(p)), params)
    factor = None
    groups = gram.output_groups(problem.model_fn, params, model_data)
    if groups is not None and forward is not None:
      build = lambda: gram.gauss_newton_rows(problem.model_fn, loss, params, model_data, groups)
      width = max(g.width for g in groups)
      num_rows = sum(g.size * g.width for g in groups)
      factor = gauss_newton_factor(build, num_rows, (2 * width + 1) * forward)
    product_cost = None if forward is None else 3 * forward
    return CurvatureOperator(matvec, factor, product_cost, data, bind(value_fn, data))


@dataclasses.dataclass(frozen=True)
class Fisher:
  r"""The empirical Fisher :math:`\frac1B \sum_i g_i g_i^\top` of per-example losses.

  The per-example losses are the objective on one-example slices of the data keyword
  arguments, so every data argument needs a leading example axis and the objective must be
  a mean over the batch. Its rows :math:`g_i / \sqrt B` serve the dense solvers.

  Attributes:
    batch_size: as for :class:`GGN`.
  """

  batch_size: int | None = None

  def __post_init__(self):
    positive_int_or_none("Fisher.batch_size", self.batch_size)

  def operator(self, params, problem: Problem, value_fn, data, count) -> CurvatureOperator:
    data = batch_chunk(problem.name, data, self.batch_size, count, "Fisher.batch_size")
    loss, examples = per_example(problem.name, value_fn, data, "curvature='fisher'")
    matvec = products.empirical_fisher_fn(loss, params, examples)
    forward = cost.flops(value_fn, params, **route(value_fn, data))
    num = jax.tree.leaves(examples)[0].shape[0]
    rows_dtype = jnp.result_type(*jax.tree.leaves(params))

    def rows(chunk):
      grads = jax.lax.map(lambda ex: jax.grad(loss)(params, ex), examples, batch_size=chunk)
      return _flat(grads) / jnp.sqrt(jnp.asarray(num, rows_dtype))

    factor = None
    if forward is not None:
      residual = lambda: jnp.full((num,), 1.0 / jnp.sqrt(num), rows_dtype)
      factor = GramFactor(
        num, rows, lambda chunk: _gram(rows(chunk)), residual, rows_cost=3 * forward
      )
    product_cost = None if forward is None else 3 * forward
    return CurvatureOperator(matvec, factor, product_cost, data, bind(value_fn, data))


def _gram(f: jax.Array) -> jax.Array:
  return jnp.matmul(f.T, f, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class CustomCurvature:
  """A user's :class:`CurvatureFn` ``(params, objective, data) -> matvec`` as a curvature."""

  fn: Callable[..., Matvec]

  def operator(self, params, problem: Problem, value_fn, data, count) -> CurvatureOperator:
    del problem, count
    objective = bind(value_fn, data)
    return CurvatureOperator(self.fn(params, objective, data), None, None, data, objective)


#: Built-in curvatures by name.
CURVATURES: dict[str, Callable[[], Any]] = {"hessian": Hessian, "ggn": GGN, "fisher": Fisher}


def as_curvature(curvature: Any) -> Any:
  """A curvature value from a name, a value, or a :class:`CurvatureFn`."""
  if isinstance(curvature, str):
    if curvature not in CURVATURES:
      raise ValueError(
        f"Unknown curvature {curvature!r}; expected one of {tuple(CURVATURES)}, a curvature "
        "value (curvopt.GGN(...), curvopt.Hessian(...), curvopt.Fisher(...)) or a CurvatureFn."
      )
    return CURVATURES[curvature]()
  if hasattr(curvature, "operator"):
    return curvature
  if callable(curvature):
    return CustomCurvature(curvature)
  raise TypeError(f"curvature must be a name, a curvature value or a callable; got {curvature!r}.")
