r"""Newton-CG / Hessian-free optimisation as an optax transformation, made of three parts.

Each update solves the damped Newton system :math:`(C + \lambda I)\, d = g` and returns the
direction :math:`d`. Three small values compose it (optimistix's descent / search / linear
solver split is the model), each validating only its own options:

* the **curvature** :math:`C` (:mod:`curvopt.optimizers.curvature_parts`): :class:`Hessian`,
  :class:`GGN`, :class:`Fisher` or a user :class:`CurvatureFn`;
* the **solver** of the damped system (:mod:`curvopt.linalg.solvers`): :class:`CG`
  (truncated, preconditioned), :class:`Dense` in parameter or sample space, or :class:`Auto`
  (the default), which picks one per update by a documented cost model;
* the **damping** policy (:class:`~curvopt.optimizers.damping.LevenbergMarquardt`): the
  acceptance test, the re-solves with raised damping inside the update, the adaptation.

The flat keywords of the SPEC (``damping``, ``adapt_damping``, ``cg_max_steps``, ``cg_tol``,
``warm_start``, ``preconditioner``) are shortcuts that build these values; a shortcut that
conflicts with an explicit part is a named error. Everything runs inside one compiled
program.

Conventions follow ``optax.lbfgs``: :func:`scale_by_newton_cg` returns a gradient-like
direction (multiply by ``-learning_rate``), :func:`newton_cg` chains it with the learning rate
and an optional optax line search, and per-step information arrives through optax's extra
arguments: ``update(grads, state, params, *, value=None, grad=None, value_fn=None, **data)``,
with the data keyword arguments routed to ``value_fn`` / ``model_fn`` / ``loss_fn`` by the
parameter names their signatures declare (:mod:`curvopt.optimizers.problem`).
"""

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks
from curvopt._typing import Params
from curvopt.linalg.flat import packing
from curvopt.linalg.solvers import CG, Auto, Dense, NystromPreconditioner, System
from curvopt.optimizers import curvature_parts, preconditioners
from curvopt.optimizers.curvature_parts import CurvatureFn, DiagonalFn, bind
from curvopt.optimizers.damping import LevenbergMarquardt, reduction_ratio
from curvopt.optimizers.problem import (
  Problem,
  check_number,
  raised_by_curvopt,
  value_fn_from_model,
)

CurvatureName = Literal["hessian", "ggn", "fisher"]
SolverName = Literal["auto", "cg", "nystrom", "dense", "dense_samples"]
PreconditionerName = Literal["martens", "nystrom", "kfac"]

__all__ = [
  "CurvatureFn",
  "DiagonalFn",
  "NewtonCGInfo",
  "NewtonCGState",
  "Trials",
  "newton_cg",
  "newton_cg_parts",
  "run_trials",
  "scale_by_newton_cg",
  "value_fn_from_model",
]


class NewtonCGInfo(NamedTuple):
  r"""Diagnostics of the last :func:`scale_by_newton_cg` update (not used by the algorithm).

  Attributes:
    rho: reduction ratio of the returned step (actual / predicted decrease of the step
      :math:`-d` on the same mini-batch), or of the last trial when every trial was rejected;
      ``-inf`` for a non-finite step, ``nan`` when no objective was available to measure it.
    loss: the objective at the parameters the update was computed at.
    cg_steps: curvature products spent in this update's solves, all trials together (``0``
      for a dense solve from per-example rows).
    cg_status: why the last solve stopped, a :class:`curvopt.linalg.status.SolverStatus`
      code (``SolverStatus.message(int(code))`` explains it).
    negative_curvature: whether the last solve met non-positive curvature.
    num_trials: solves in this update (``1`` + retries).
    num_rejected: total number of rejected trial steps so far (non-finite, or
      ``rho <= accept_ratio``); each was re-solved with a larger damping.
    num_failed: total number of updates that returned a zero step because every trial was
      rejected.
    solver: which solver the update used, a :class:`curvopt.linalg.solvers.SolverKind` code
      (what ``solver="auto"`` chose).
  """

  rho: jax.Array
  loss: jax.Array
  cg_steps: jax.Array
  cg_status: jax.Array
  negative_curvature: jax.Array
  num_trials: jax.Array
  num_rejected: jax.Array
  num_failed: jax.Array
  solver: jax.Array


class NewtonCGState(NamedTuple):
  r"""State of :func:`scale_by_newton_cg`: the algorithm's state and a :class:`NewtonCGInfo`.

  The diagnostics are also readable as attributes of the state (``state.rho`` is
  ``state.info.rho``). :func:`newton_cg` returns a chain-like transformation whose state is
  a tuple with this state first (``state[0].info.rho``). Through ``flax.nnx.Optimizer`` every
  leaf is wrapped in an ``OptArray`` variable: read ``optimizer.opt_state[0].info.rho[...]``.

  Attributes:
    count: number of updates so far.
    direction: the last returned direction :math:`d` (zero after a failed update), the warm
      start of the next solve.
    damping: the current :math:`\lambda` (already adapted for the next step).
    solver_state: what the solver keeps between updates (e.g. a Nyström sketch).
    info: the diagnostics of the last update.
  """

  count: jax.Array
  direction: Params
  damping: jax.Array
  solver_state: Any
  info: NewtonCGInfo

  rho = property(lambda self: self.info.rho)
  loss = property(lambda self: self.info.loss)
  cg_steps = property(lambda self: self.info.cg_steps)
  cg_status = property(lambda self: self.info.cg_status)
  negative_curvature = property(lambda self: self.info.negative_curvature)
  num_trials = property(lambda self: self.info.num_trials)
  num_rejected = property(lambda self: self.info.num_rejected)
  num_failed = property(lambda self: self.info.num_failed)
  solver = property(lambda self: self.info.solver)


# --------------------------------------------------------------------------- the parts

_SOLVER_NAMES = ("auto", "cg", "nystrom", "dense", "dense_samples")

#: Options of earlier versions and the part that now owns each.
_MOVED = {
  "damping_bounds": "damping=curvopt.LevenbergMarquardt(bounds=...)",
  "damping_increase": "damping=curvopt.LevenbergMarquardt(increase=...)",
  "damping_decrease": "damping=curvopt.LevenbergMarquardt(decrease=...)",
  "accept_ratio": "damping=curvopt.LevenbergMarquardt(accept_ratio=...)",
  "max_retries": "damping=curvopt.LevenbergMarquardt(max_retries=...)",
  "cg_progress_tol": "solver=curvopt.CG(progress_tol=...)",
  "cg_backtracking": "solver=curvopt.CG(backtracking=...)",
  "nystrom_rank": "preconditioner=curvopt.NystromPreconditioner(rank=...)",
  "nystrom_refresh": "preconditioner=curvopt.NystromPreconditioner(refresh=...)",
  "preconditioner_exponent": "preconditioner=curvopt.MartensDiagonal(exponent=...)",
  "preconditioner_batch_size": "preconditioner=curvopt.MartensDiagonal(batch_size=...)",
  "hvp_mode": "curvature=curvopt.Hessian(mode=...)",
  "curvature_batch_size": "curvature=curvopt.GGN(batch_size=...) (or Fisher)",
}


def _refuse_moved(fn: Callable) -> Callable:
  """Names the new home of an option that moved to a part, instead of a bare TypeError."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    moved = [name for name in kwargs if name in _MOVED]
    if moved:
      raise TypeError(
        f"{fn.__name__}: option(s) {moved} moved to the part that owns them; pass "
        + "; ".join(f"{name} -> {_MOVED[name]}" for name in moved)
        + "."
      )
    return fn(*args, **kwargs)

  return wrapper


def _as_preconditioner(preconditioner: Any) -> Any:
  if preconditioner is None or hasattr(preconditioner, "apply"):
    return preconditioner
  if preconditioner == "martens":
    return preconditioners.MartensDiagonal()
  if preconditioner == "nystrom":
    return NystromPreconditioner()
  if preconditioner == "kfac":
    return preconditioners.KFACPreconditioner()
  if callable(preconditioner):
    return preconditioners.DiagonalPreconditioner(preconditioner)
  raise ValueError(
    f"Unknown preconditioner {preconditioner!r}; expected 'martens', 'nystrom', 'kfac', a "
    "preconditioner value (curvopt.MartensDiagonal(...), curvopt.NystromPreconditioner(...), "
    "curvopt.KFACPreconditioner(...)) or a DiagonalFn."
  )


def _as_solver(solver: Any, cg_options: dict, preconditioner: Any) -> Any:
  """The solver value from ``solver`` and the CG shortcuts (a conflict is a named error)."""
  shortcuts = sorted({f"cg_{k}" if k != "warm_start" else k for k in cg_options})
  shortcuts += ["preconditioner"] if preconditioner is not None else []
  if not isinstance(solver, str):
    if shortcuts:
      raise ValueError(
        f"{shortcuts} conflict with the explicit solver={solver!r}: set them on the solver "
        "value instead, e.g. solver=curvopt.CG(tol=..., max_steps=..., preconditioner=...)."
      )
    return solver
  _checks.check_choice("solver", solver, _SOLVER_NAMES)
  if solver.startswith("dense"):
    if shortcuts:
      raise ValueError(
        f"{shortcuts} apply to CG, but solver={solver!r} solves the damped system exactly; "
        "drop them, or use solver='cg'."
      )
    return Dense(space="samples" if solver == "dense_samples" else "params")
  if solver == "nystrom":
    if preconditioner is not None:
      raise ValueError(
        "solver='nystrom' is CG with a Nyström preconditioner; it conflicts with "
        f"preconditioner={preconditioner!r}. Use solver='cg' with your preconditioner."
      )
    preconditioner = NystromPreconditioner()
  elif solver == "auto" and not shortcuts:
    return Auto()
  # solver='cg', or 'auto' with CG options: they say CG is wanted.
  return CG(**cg_options, preconditioner=preconditioner)


def newton_cg_parts(
  curvature: Any = "ggn",
  solver: Any = "auto",
  damping: Any = 1.0,
  *,
  adapt_damping: bool | None = None,
  cg_max_steps: int | None = None,
  cg_tol: float | Literal["forcing"] | None = None,
  warm_start: float | None = None,
  preconditioner: Any = None,
) -> tuple[Any, Any, LevenbergMarquardt]:
  """The ``(curvature, solver, damping)`` values that the shortcuts stand for.

  Names become values (``"ggn"`` -> ``GGN()``, ``"auto"`` -> ``Auto()``, a number ``λ`` ->
  ``LevenbergMarquardt(init=λ)``); the CG shortcuts build a :class:`~curvopt.linalg.solvers.CG`
  (with ``solver="auto"`` too: options of CG ask for CG). A shortcut that conflicts with an
  explicit part raises a ``ValueError`` that says where the option belongs.

  Examples:
    >>> curvature, solver, damping = newton_cg_parts("hessian", cg_tol=1e-6, damping=0.1)
    >>> type(curvature).__name__, type(solver).__name__, solver.tol, damping.init
    ('Hessian', 'CG', 1e-06, 0.1)
    >>> type(newton_cg_parts("ggn")[1]).__name__
    'Auto'
  """
  curvature = curvature_parts.as_curvature(curvature)
  if isinstance(damping, LevenbergMarquardt):
    if adapt_damping is not None:
      raise ValueError(
        f"adapt_damping={adapt_damping!r} conflicts with the explicit damping={damping!r}; "
        "set LevenbergMarquardt(adapt=...) instead."
      )
    policy = damping
  else:
    check_number("damping", damping, lambda v: v >= 0, ">= 0 (or a LevenbergMarquardt value)")
    adapt = True if adapt_damping is None else adapt_damping
    policy = LevenbergMarquardt(init=damping, adapt=adapt)
  options = {"max_steps": cg_max_steps, "tol": cg_tol, "warm_start": warm_start}
  options = {k: v for k, v in options.items() if v is not None}
  return curvature, _as_solver(solver, options, _as_preconditioner(preconditioner)), policy


# ------------------------------------------------------------------------- the update


class Trials(NamedTuple):
  """The carry of the trial loop: the last trial's solve, its test, and the running totals."""

  k: jax.Array
  lam: jax.Array
  d: Any
  rho: jax.Array
  accept: jax.Array
  steps: jax.Array
  status: jax.Array
  negative: jax.Array
  min_curvature: jax.Array


def run_trials(
  solve: Callable[[jax.Array, Any], Any],
  measure: Callable[[Any], tuple[jax.Array, jax.Array]],
  policy: LevenbergMarquardt,
  damping: jax.Array,
  x0: Any,
  rhs: Any,
) -> Trials:
  """Solves at ``damping``; while the trial is rejected, raises it and re-solves.

  All inside one ``lax.while_loop``: at most ``1 + policy.max_retries`` solves, each
  warm-started from the previous (rejected) direction.

  Args:
    solve: ``(damping, x0) -> CGResult``.
    measure: ``(CGResult, damping) -> (rho, finite)``.
    policy: the damping policy (acceptance test and retry rule).
    damping: the damping of the first trial.
    x0: the first trial's warm start (vectors shaped like ``rhs``).
    rhs: the right-hand side (the gradient).

  Returns:
    The final :class:`Trials` carry (``accept`` false when every trial was rejected).
  """
  dtype = damping.dtype

  def body(c: Trials) -> Trials:
    result = solve(c.lam, c.d)
    rho, finite = measure(result, c.lam)
    accept = policy.accepts(rho, finite)
    min_curvature = jnp.asarray(result.min_curvature, dtype)
    negative = jnp.asarray(result.negative_curvature, bool)
    raised = policy.retry(c.lam, c.k, result.x, rhs, negative, min_curvature)
    return Trials(
      k=c.k + 1,
      lam=jnp.where(accept, c.lam, raised).astype(dtype),
      d=optax.tree.cast_like(result.x, rhs),
      rho=rho,
      accept=accept,
      steps=c.steps + jnp.asarray(result.num_steps, jnp.int32),
      status=jnp.asarray(result.status, jnp.int32),
      negative=negative,
      min_curvature=min_curvature,
    )

  start = Trials(
    k=jnp.zeros((), jnp.int32),
    lam=damping,
    d=optax.tree.cast_like(x0, rhs),
    rho=jnp.asarray(jnp.nan, dtype),
    accept=jnp.zeros((), bool),
    steps=jnp.zeros((), jnp.int32),
    status=jnp.zeros((), jnp.int32),
    negative=jnp.zeros((), bool),
    min_curvature=jnp.asarray(jnp.inf, dtype),
  )
  return jax.lax.while_loop(lambda c: ~c.accept & (c.k <= policy.max_retries), body, start)


def _measure(objective, params, unpack, loss, dtype) -> Callable:
  r"""``(result, damping) -> (rho, finite)``: the reduction ratio of the step :math:`-d`.

  The prediction is the *undamped* quadratic model's,
  :math:`m(-d) - m(0) = -g^\top d + \tfrac12 d^\top C d = \phi(d) - \tfrac\lambda2 \|d\|^2`
  with :math:`\phi` the damped model the solver minimised (Martens 2010 §4.1; the gain
  ratio of Levenberg-Marquardt, Madsen, Nielsen and Tingleff 2004): damping is how the step
  is found, not part of the objective's model.
  """

  def measure(result, damping):
    d = result.x
    finite = optax.tree.norm(d) < jnp.inf  # False for inf and nan.
    if objective is None:
      return jnp.asarray(jnp.nan, dtype), finite
    safe = optax.tree.where(finite, d, optax.tree.zeros_like(d))
    new_loss = objective(optax.tree.sub(params, unpack(safe))).astype(dtype)
    finite = finite & jnp.isfinite(loss) & jnp.isfinite(new_loss)
    damped = jnp.asarray(result.quadratic_value, dtype)
    predicted = damped - 0.5 * damping * jnp.real(optax.tree.vdot(safe, safe)).astype(dtype)
    rho = reduction_ratio(new_loss - loss, predicted)
    return jnp.where(finite, rho, -jnp.inf).astype(dtype), finite

  return measure


class _Config(NamedTuple):
  problem: Problem
  curvature: Any
  solver: Any
  policy: LevenbergMarquardt


def _system(config: _Config, params, updates, value_fn, data, count):
  """The update's :class:`~curvopt.linalg.solvers.System` on packed vectors, and the layout."""
  op = config.curvature.operator(params, config.problem, value_fn, data, count)
  pack, unpack = packing(updates)
  context = preconditioners.PreconditionerContext(
    params, config.problem, value_fn, op, pack, unpack
  )
  system = System(
    matvec=lambda v: pack(op.matvec(unpack(v))),
    like=pack(params),
    factor=op.factor,
    product_cost=op.product_cost,
    context=context,
  )
  return system, pack, unpack


def _update(config: _Config, updates, state: NewtonCGState, params, value, value_fn, data):
  """One Newton-CG update (the body of ``update_fn``)."""
  _checks.check_same_structure(params, updates, "params", "updates")
  _check_dtypes(params, updates)
  objective = bind(value_fn, data)
  if objective is None and config.policy.needs_objective:
    raise ValueError(
      "newton_cg needs the objective to adapt damping or accept steps: pass value_fn= to "
      "update() (or model_fn/loss_fn at construction), or use damping="
      "curvopt.LevenbergMarquardt(adapt=False, accept_ratio=None)."
    )
  system, pack, unpack = _system(config, params, updates, value_fn, data, state.count)
  solver = config.solver.resolve(system)
  solver_state, work = solver.prepare(system, state.solver_state, state.count)
  dtype = state.damping.dtype
  if objective is None or value is not None:
    loss = jnp.asarray(jnp.nan if value is None else value, dtype)
  else:
    loss = jnp.asarray(objective(params), dtype)
  b = pack(updates)
  x0 = solver.initial_guess(pack(state.direction))
  x0 = optax.tree.zeros_like(b) if x0 is None else x0
  backtrack = None if objective is None else lambda d: objective(optax.tree.sub(params, unpack(d)))

  def solve(lam, x):
    return solver.solve(system, work, b, lam, x, backtrack_fn=backtrack)

  measure = _measure(objective, params, unpack, loss, dtype)
  c = run_trials(solve, measure, config.policy, state.damping, x0, b)
  policy = config.policy
  next_lam = policy.next(
    c.lam, c.rho, c.accept, c.negative, c.min_curvature, state.damping, state.info.rho
  )
  out = unpack(optax.tree.where(c.accept, c.d, optax.tree.zeros_like(b)))
  info = NewtonCGInfo(
    rho=c.rho,
    loss=loss,
    cg_steps=c.steps,
    cg_status=c.status,
    negative_curvature=c.negative,
    num_trials=c.k,
    num_rejected=state.info.num_rejected + c.k - c.accept.astype(jnp.int32),
    num_failed=state.info.num_failed + (~c.accept).astype(jnp.int32),
    solver=jnp.asarray(int(solver.kind), jnp.int32),
  )
  count = optax.safe_increment(state.count)
  return out, NewtonCGState(count, out, next_lam.astype(dtype), solver_state, info)


def _check_dtypes(params: Params, updates: Params) -> None:
  for (path, p), u in zip(
    jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(updates), strict=True
  ):
    if jnp.result_type(p) != jnp.result_type(u):
      raise TypeError(
        f"newton_cg: the update (gradient){jax.tree_util.keystr(path)} has dtype "
        f"{jnp.result_type(u)} but params{jax.tree_util.keystr(path)} has dtype "
        f"{jnp.result_type(p)}; compute the gradient at params of the same dtype, or cast it "
        "with optax.tree.cast_like(grads, params)."
      )


def _init_state(config: _Config, params: Params) -> NewtonCGState:
  config.problem.check_params(params)
  leaves = jax.tree.leaves(params)
  dtype = jnp.result_type(*[jnp.real(leaf).dtype for leaf in leaves]) if leaves else float
  zero = jnp.zeros((), jnp.int32)
  return NewtonCGState(
    count=zero,
    direction=optax.tree.zeros_like(params),
    damping=jnp.asarray(config.policy.init, dtype),
    solver_state=config.solver.init(packing(params).pack(params)),
    info=NewtonCGInfo(
      rho=jnp.asarray(jnp.nan, dtype),
      loss=jnp.asarray(jnp.nan, dtype),
      cg_steps=zero,
      cg_status=zero,
      negative_curvature=jnp.zeros((), bool),
      num_trials=zero,
      num_rejected=zero,
      num_failed=zero,
      solver=zero,
    ),
  )


# ------------------------------------------------------------------------- the transform


@_refuse_moved
def scale_by_newton_cg(
  curvature: CurvatureName | Any = "ggn",
  *,
  solver: SolverName | Any = "auto",
  damping: float | LevenbergMarquardt = 1.0,
  model_fn: Callable[..., Any] | None = None,
  loss_fn: Callable[..., jax.Array] | None = None,
  module: Any = None,
  adapt_damping: bool | None = None,
  cg_max_steps: int | None = None,
  cg_tol: float | Literal["forcing"] | None = None,
  warm_start: float | None = None,
  preconditioner: PreconditionerName | Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Newton-CG direction :math:`d \approx (C + \lambda I)^{-1} g` (Hessian-free, Martens 2010).

  Each update forms this step's curvature :math:`C` (the ``curvature`` part), solves the
  damped system for the incoming update :math:`g` (the gradient) with the ``solver`` part,
  and tests the trial step :math:`-d` with the ``damping`` part: a rejected trial is
  re-solved with a larger :math:`\lambda` inside the same compiled update
  (:func:`run_trials`), and :math:`\lambda` adapts from the reduction ratio between updates
  (:class:`~curvopt.optimizers.damping.LevenbergMarquardt`). Like every optax ``scale_by_*``
  it returns a gradient-like direction: scale it by ``-learning_rate`` (:func:`newton_cg`
  does).

  **Defaults.** ``solver="auto"`` picks, per update and at trace time, the exact dense step
  in parameter space for small models (a few thousand parameters: the Gauss-Newton /
  energy-natural-gradient step), the sample-space (Woodbury) step when there are more
  parameters than residuals, and truncated CG otherwise; the choice is in ``state.solver``
  (:class:`~curvopt.linalg.solvers.Auto` documents the cost model).

  Args:
    curvature: ``"ggn"`` (default; needs ``model_fn``/``loss_fn``), ``"hessian"`` (of
      ``value_fn``), ``"fisher"``, a value (:class:`~curvopt.optimizers.curvature_parts.GGN`,
      :class:`~curvopt.optimizers.curvature_parts.Hessian`,
      :class:`~curvopt.optimizers.curvature_parts.Fisher`) or a
      :class:`~curvopt.optimizers.curvature_parts.CurvatureFn`.
    solver: ``"auto"`` (default), ``"cg"``, ``"nystrom"`` (CG with a Nyström preconditioner),
      ``"dense"`` (parameter space), ``"dense_samples"`` (sample space), or a solver value
      (:class:`~curvopt.linalg.solvers.CG`, :class:`~curvopt.linalg.solvers.Dense`,
      :class:`~curvopt.linalg.solvers.Auto`, or any class following
      :class:`~curvopt.linalg.solvers.Solver`).
    damping: the initial :math:`\lambda \ge 0`, or a
      :class:`~curvopt.optimizers.damping.LevenbergMarquardt` policy.
    model_fn: ``model_fn(params, **data) -> outputs`` (``"ggn"``; optional otherwise, then
      used with ``loss_fn`` as the objective when no ``value_fn`` is given).
    loss_fn: ``loss_fn(outputs, **data) -> scalar``.
    module: a flax ``nnx.Module`` (optional). Then ``model_fn(module, **data)`` receives the
      Module rebuilt from the parameters being optimised (its ``nnx.Param`` state, as
      ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` passes them) and the rest of its state as
      it was here. State the Module updates in the forward pass (BatchNorm running averages
      in training mode) is discarded inside curvature products.
    adapt_damping: shortcut for ``LevenbergMarquardt(adapt=...)`` (default ``True``).
    cg_max_steps: shortcut for ``CG(max_steps=...)`` (default 100).
    cg_tol: shortcut for ``CG(tol=...)``: a relative residual or ``"forcing"`` (default
      ``"forcing"``).
    warm_start: shortcut for ``CG(warm_start=...)`` (default 0.95).
    preconditioner: shortcut for ``CG(preconditioner=...)``: ``"martens"``
      (:class:`~curvopt.optimizers.preconditioners.MartensDiagonal`), ``"kfac"``
      (:class:`~curvopt.optimizers.preconditioners.KFACPreconditioner`), ``"nystrom"``
      (:class:`~curvopt.linalg.solvers.NystromPreconditioner`), a preconditioner value or a
      :class:`~curvopt.optimizers.curvature_parts.DiagonalFn`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`NewtonCGState`.

  Raises:
    ValueError: at construction for an unknown part name, a shortcut that conflicts with an
      explicit part, ``"ggn"`` without ``model_fn``/``loss_fn``, or invalid numbers (traced
      numbers, e.g. from ``optax.inject_hyperparams``, are not checked); in ``update`` when a
      needed ``value_fn`` is missing or a data argument is declared by no function.
    TypeError: for an option of earlier versions (the message says which part owns it now),
      non-floating parameters, data passed positionally or missing (the message lists them).

  Examples:
    On :math:`f(x) = \tfrac12 x^\top A x - b^\top x` one undamped Newton step lands on
    :math:`A^{-1} b`:

    >>> A, b = jnp.array([[3.0, 1.0], [1.0, 2.0]]), jnp.array([1.0, 1.0])
    >>> f = lambda x: 0.5 * x @ A @ x - b @ x
    >>> tx = scale_by_newton_cg("hessian", damping=0.0, adapt_damping=False)
    >>> x = jnp.zeros(2)
    >>> d, state = tx.update(jax.grad(f)(x), tx.init(x), x, value_fn=f)
    >>> np.allclose(x - d, jnp.linalg.solve(A, b), atol=1e-6)
    True
    >>> round(float(state.rho), 4), int(state.info.num_trials)
    (1.0, 1)
    >>> curvopt.SolverKind(int(state.solver)).name  # what solver="auto" chose
    'DENSE_PARAMS'

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    Martens and Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", Neural Networks: Tricks of the Trade, 2012.
    Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
    Neural Computation 2002. Nocedal and Wright, "Numerical Optimization", ch. 4 and 7, 2006.
    Guzmán-Cordero, Dangel, Goldshlager and Zeinhofer, "Improving energy natural gradient
    descent through Woodbury, momentum, and randomization", 2025.
  """
  curvature, solver, policy = newton_cg_parts(
    curvature,
    solver,
    damping,
    adapt_damping=adapt_damping,
    cg_max_steps=cg_max_steps,
    cg_tol=cg_tol,
    warm_start=warm_start,
    preconditioner=preconditioner,
  )
  problem = Problem.build("newton_cg", model_fn, loss_fn, module)
  if isinstance(curvature, curvature_parts.GGN) and problem.model_fn is None:
    raise ValueError(
      "newton_cg(curvature='ggn') needs model_fn=(params, **data) -> outputs and "
      "loss_fn=(outputs, **data) -> loss at construction; or use curvature='hessian' and pass "
      "value_fn= to update()."
    )
  config = _Config(problem, curvature, solver, policy)
  derived_value_fn = problem.value_fn

  def update_fn(
    updates, state, params=None, *positional, value=None, grad=None, value_fn=None, **data
  ):
    del grad  # The direction solves against the incoming updates (the gradient).
    if params is None:
      raise ValueError("scale_by_newton_cg needs params: call update(grads, state, params, ...).")
    value_fn = derived_value_fn if value_fn is None else value_fn
    problem.check_update(positional, data, value_fn)
    try:
      return _update(config, updates, state, params, value, value_fn, data)
    except (TypeError, ValueError) as error:
      if not raised_by_curvopt(error):
        problem.diagnose(error, params, data)
      raise

  return optax.GradientTransformationExtraArgs(functools.partial(_init_state, config), update_fn)


# -------------------------------------------------------------------------- the optimiser


@_refuse_moved
def newton_cg(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  *,
  curvature: CurvatureName | Any = "ggn",
  solver: SolverName | Any = "auto",
  damping: float | LevenbergMarquardt = 1.0,
  model_fn: Callable[..., Any] | None = None,
  loss_fn: Callable[..., jax.Array] | None = None,
  module: Any = None,
  adapt_damping: bool | None = None,
  cg_max_steps: int | None = None,
  cg_tol: float | Literal["forcing"] | None = None,
  warm_start: float | None = None,
  preconditioner: PreconditionerName | Any = None,
  linesearch: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Newton-CG / Hessian-free optimiser: :func:`scale_by_newton_cg`, learning rate, line search.

  The update is :math:`-\eta\, d` with :math:`d \approx (C + \lambda I)^{-1} g` (see
  :func:`scale_by_newton_cg` for the three parts and every option but ``learning_rate`` and
  ``linesearch``), then optionally an optax line search
  (``optax.scale_by_backtracking_linesearch`` or ``optax.scale_by_zoom_linesearch``) exactly
  as ``optax.lbfgs`` builds it. For the line search this wrapper supplies what the caller did
  not: ``grad`` (the incoming gradient), ``value`` (the loss the direction step computed) and,
  with ``model_fn``/``loss_fn``, a ``value_fn`` whose signature names their data arguments.

  Args:
    learning_rate: :math:`\eta > 0`, a float or an optax schedule.
    curvature: see :func:`scale_by_newton_cg`.
    solver: see :func:`scale_by_newton_cg`.
    damping: see :func:`scale_by_newton_cg`.
    model_fn: see :func:`scale_by_newton_cg`.
    loss_fn: see :func:`scale_by_newton_cg`.
    module: see :func:`scale_by_newton_cg`.
    adapt_damping: see :func:`scale_by_newton_cg`.
    cg_max_steps: see :func:`scale_by_newton_cg`.
    cg_tol: see :func:`scale_by_newton_cg`.
    warm_start: see :func:`scale_by_newton_cg`.
    preconditioner: see :func:`scale_by_newton_cg`.
    linesearch: optional optax line search chained after the scaled direction.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, value_fn=..., **data)`` (``value_fn`` optional with
    ``model_fn``/``loss_fn``). Its state is ``(NewtonCGState, scale state[, line-search
    state])``.

  Examples:
    Linear least squares with the Gauss-Newton curvature converges in one step:

    >>> X, y = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]]), jnp.array([1.0, 0.0, 2.0])
    >>> model_fn = lambda w, x: x @ w
    >>> loss_fn = lambda z, y: 0.5 * jnp.sum((z - y) ** 2)
    >>> tx = newton_cg(model_fn=model_fn, loss_fn=loss_fn, damping=0.0, adapt_damping=False)
    >>> w = jnp.zeros(2)
    >>> g = jax.grad(lambda w: loss_fn(model_fn(w, X), y))(w)
    >>> updates, state = tx.update(g, tx.init(w), w, x=X, y=y)
    >>> w = optax.apply_updates(w, updates)
    >>> np.allclose(w, jnp.linalg.lstsq(X, y)[0], atol=1e-5)
    True

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
  """
  check_number(
    "newton_cg: learning_rate",
    learning_rate,
    lambda v: v > 0,
    "> 0 (the step is -learning_rate * d; a Newton step has learning_rate=1)",
  )
  direction = scale_by_newton_cg(
    curvature,
    solver=solver,
    damping=damping,
    model_fn=model_fn,
    loss_fn=loss_fn,
    module=module,
    adapt_damping=adapt_damping,
    cg_max_steps=cg_max_steps,
    cg_tol=cg_tol,
    warm_start=warm_start,
    preconditioner=preconditioner,
  )
  problem = Problem.build("newton_cg", model_fn, loss_fn, module)
  return _chain(direction, optax.scale_by_learning_rate(learning_rate), linesearch, problem)


def _chain(direction, scaling, linesearch, problem: Problem):
  """``direction``, then ``scaling``, then the optional line search (given what it needs)."""
  parts = (direction, scaling) if linesearch is None else (direction, scaling, linesearch)
  linesearch = None if linesearch is None else optax.with_extra_args_support(linesearch)
  derived_value_fn = problem.value_fn

  def init_fn(params):
    return tuple(part.init(params) for part in parts)

  def update_fn(
    updates, state, params=None, *positional, value=None, grad=None, value_fn=None, **data
  ):
    if positional:
      problem.check_update(positional, data, value_fn)
    d, direction_state = direction.update(
      updates, state[0], params, value=value, grad=grad, value_fn=value_fn, **data
    )
    scaled, scaling_state = scaling.update(d, state[1], params)
    if linesearch is None:
      return scaled, (direction_state, scaling_state)
    value_fn = derived_value_fn if value_fn is None else value_fn
    if value_fn is None:
      raise ValueError(
        "newton_cg(linesearch=...) needs value_fn=(params, **data) -> loss in update() "
        "(or model_fn/loss_fn at construction)."
      )
    new_updates, linesearch_state = linesearch.update(
      scaled,
      state[2],
      params,
      value=direction_state.info.loss if value is None else value,
      grad=updates if grad is None else grad,
      value_fn=value_fn,
      **data,
    )
    return new_updates, (direction_state, scaling_state, linesearch_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
