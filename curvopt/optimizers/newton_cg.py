r"""Newton-CG / Hessian-free optimisation as an optax transformation.

Each step solves the damped Newton system :math:`(C + \lambda I)\, d = g` approximately
(truncated CG by default, :mod:`curvopt.optimizers.solvers`), with :math:`C` a curvature
matrix seen only through products (Hessian, generalised Gauss-Newton, empirical Fisher, or
your own, :mod:`curvopt.optimizers.curvatures`), and returns the direction :math:`d`. The
damping :math:`\lambda` follows the Levenberg-Marquardt rule of Martens (2010)
(:mod:`curvopt.optimizers.damping`); a trial step that fails the reduction-ratio test is
re-solved with a larger :math:`\lambda` inside the same compiled update. Everything runs inside
one compiled program.

Conventions follow ``optax.lbfgs``: :func:`scale_by_newton_cg` returns a gradient-like
direction (multiply by ``-learning_rate``), :func:`newton_cg` chains it with the learning rate
and an optional optax line search, and per-step information arrives through optax's extra
arguments: ``update(grads, state, params, *, value=None, grad=None, value_fn=None, **data)``,
with the data keyword arguments routed to ``value_fn`` / ``model_fn`` / ``loss_fn`` by the
parameter names their signatures declare (as optax's line searches route them).
"""

import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks, _nnx
from curvopt._typing import Params
from curvopt.curvature import products
from curvopt.linalg.flat import FlatLayout, flat_layout
from curvopt.optimizers import curvatures as curvatures_lib
from curvopt.optimizers import damping as damping_lib
from curvopt.optimizers import solvers as solvers_lib
from curvopt.optimizers.curvatures import CurvatureFn, DiagonalFn, arg_names, route

CurvatureName = Literal["hessian", "ggn", "fisher"]
SolverName = Literal["cg", "nystrom", "dense"]

#: Defaults of the options that fix array shapes (``None`` in the signatures so that
#: ``optax.inject_hyperparams`` leaves them static).
DEFAULT_CG_MAX_STEPS = 100
DEFAULT_NYSTROM_RANK = 20

__all__ = [
  "CurvatureFn",
  "DiagonalFn",
  "NewtonCGInfo",
  "NewtonCGState",
  "newton_cg",
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
    cg_steps: curvature products spent in this update's solves, all trials together.
    cg_status: why the last solve stopped, a :class:`curvopt.linalg.status.SolverStatus`
      code (``SolverStatus.message(int(code))`` explains it).
    negative_curvature: whether the last solve met non-positive curvature.
    num_trials: solves in this update (``1`` + retries).
    num_rejected: total number of rejected trial steps so far (non-finite, or
      ``rho <= accept_ratio``); each was re-solved with a larger damping.
    num_failed: total number of updates that returned a zero step because every trial was
      rejected.
  """

  rho: jax.Array
  loss: jax.Array
  cg_steps: jax.Array
  cg_status: jax.Array
  negative_curvature: jax.Array
  num_trials: jax.Array
  num_rejected: jax.Array
  num_failed: jax.Array


class NewtonCGState(NamedTuple):
  r"""State of :func:`scale_by_newton_cg`: the algorithm's state and a :class:`NewtonCGInfo`.

  The diagnostics are also readable as attributes of the state (``state.rho`` is
  ``state.info.rho``). :func:`newton_cg` returns a chain, so its state is a tuple whose first
  element is this state (``state[0].info.rho``). Through ``flax.nnx.Optimizer`` every leaf is
  wrapped in an ``OptArray`` variable: read ``optimizer.opt_state[0].info.rho[...]`` (or
  ``.value``).

  Attributes:
    count: number of updates so far.
    direction: the last returned direction :math:`d` (zero after a failed update), the warm
      start of the next solve.
    damping: the current :math:`\lambda` (already adapted for the next step).
    solver_state: what the linear solver keeps between updates (e.g. a Nyström sketch).
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


def value_fn_from_model(
  model_fn: Callable[..., Any], loss_fn: Callable[..., jax.Array]
) -> Callable[..., jax.Array]:
  """Returns ``value_fn(params, **data) = loss_fn(model_fn(params, ...), ...)``.

  The returned function's signature names exactly the data arguments of ``model_fn`` and
  ``loss_fn`` (after their first argument), so optax's line searches, which pass only the
  keyword arguments a ``value_fn`` declares, route the mini-batch to it correctly.

  Args:
    model_fn: ``model_fn(params, **data) -> outputs``.
    loss_fn: ``loss_fn(outputs, **data) -> scalar``.

  Returns:
    The composed objective with an explicit signature ``(params, *, <data names>)``.

  Examples:
    >>> f = value_fn_from_model(lambda w, x: x @ w, lambda z, y: ((z - y) ** 2).sum())
    >>> str(inspect.signature(f))
    '(params, *, x, y)'
    >>> float(f(jnp.ones(2), x=jnp.eye(2), y=jnp.zeros(2)))
    2.0
  """
  names = []
  for fn in (model_fn, loss_fn):
    for name in arg_names(fn)[1:]:
      if name not in names:
        names.append(name)

  def value_fn(params, **data):
    outputs = model_fn(params, **route(model_fn, data))
    return loss_fn(outputs, **route(loss_fn, data))

  value_fn.__signature__ = inspect.Signature(
    [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
  )
  return value_fn


def _curvature_chunk(
  data: dict, size: int | None, count: jax.Array | int, name: str = "curvature_batch_size"
) -> dict:
  """Rows ``[j s, (j + 1) s)`` of every data argument, ``j = count mod (n // s)``.

  The curvature mini-batch of Martens (2010): a different contiguous chunk of the step's
  examples at every update, cycling through the batch, with static shapes (no recompilation).
  """
  if size is None or not data:
    return data
  leaves = jax.tree.leaves(data)
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      f"{name} needs every data keyword argument to have the same leading example "
      f"axis; got leading sizes {sorted(map(str, sizes))}. Pass non-batch constants through "
      "model_fn/loss_fn closures instead."
    )
  (n,) = sizes
  if size > n:
    raise ValueError(
      f"{name}={size} exceeds the {n} examples it is drawn from; use at most "
      f"{n} (or None for the whole batch)."
    )
  start = (count % (n // size)) * size
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), data)


# ------------------------------------------------------------------- construction checks


def _concrete(value: Any) -> Any:
  """``value`` as a Python number, or ``None`` when it is traced (then checks are skipped)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _check(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
  v = _concrete(value)
  if v is not None and not ok(v):
    raise ValueError(f"{name} must be {requirement}; got {value!r}.")


def _static_int(name: str, value: Any, default: int, minimum: int) -> int:
  """A shape-fixing option as a Python int, with a named error when it is traced."""
  if value is None:
    return default
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{name} fixes array shapes and must be a Python int, but it is traced (e.g. by "
      f"optax.inject_hyperparams); pass optax.inject_hyperparams(newton_cg, "
      f"static_args=({name!r},)) or leave it at its default."
    )
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum} (or None); got {value!r}.")
  return int(value)


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


def _check_data_names(data: dict, fns: list[Callable]) -> None:
  accepted = []
  for fn in fns:
    for name in arg_names(fn)[1:]:
      if name not in accepted:
        accepted.append(name)
  unused = [name for name in data if name not in accepted]
  if unused:
    raise ValueError(
      f"newton_cg.update got data keyword argument(s) {unused} that no function declares; "
      f"value_fn/model_fn/loss_fn accept {accepted}. Rename the argument (or add it to the "
      "function's signature)."
    )


def _module_model_fn(model_fn: Callable[..., Any], module: Any) -> Callable[..., Any]:
  """``(params, **data) -> model_fn(module rebuilt from params, **data)``, same data names."""
  _, merge = _nnx.split(module)

  def pure_model_fn(params, **data):
    return model_fn(merge(params), **data)

  pure_model_fn.__signature__ = inspect.signature(model_fn)
  return pure_model_fn


def _identity_layout(tree: Any) -> FlatLayout:
  """The layout that keeps pytrees as they are (for a user's solver)."""
  del tree
  return FlatLayout(lambda t: t, lambda t: t)


def _make_solver(
  solver: Any, max_steps: int, progress_tol: Any, rank: int, refresh_every: Any
) -> solvers_lib.LinearSolver:
  options = solvers_lib.SolverOptions(
    max_steps=max_steps, progress_tol=progress_tol, rank=rank, refresh_every=refresh_every
  )
  if isinstance(solver, solvers_lib.LinearSolver):
    return solver
  if callable(solver):
    return solvers_lib.from_solve_fn(solver, options)
  _checks.check_choice("solver", solver, tuple(solvers_lib.SOLVERS))
  return solvers_lib.SOLVERS[solver](options)


# ------------------------------------------------------------------------- the transform


def scale_by_newton_cg(
  curvature: CurvatureName | CurvatureFn = "ggn",
  *,
  model_fn: Callable[..., Any] | None = None,
  loss_fn: Callable[..., jax.Array] | None = None,
  module: Any = None,
  damping: float = 1.0,
  adapt_damping: bool = True,
  damping_bounds: tuple[float, float] = (1e-8, 1e8),
  damping_increase: float = 1.5,
  damping_decrease: float = 1.0 / 3.0,
  accept_ratio: float | None = 0.0,
  max_retries: int = 8,
  solver: SolverName | solvers_lib.LinearSolver | Callable[..., Any] = "cg",
  cg_max_steps: int | None = None,
  cg_tol: float | Literal["forcing"] = 1e-4,
  cg_progress_tol: float | None = 5e-4,
  warm_start: float = 0.95,
  preconditioner: Literal["martens"] | DiagonalFn | None = None,
  preconditioner_exponent: float = 0.75,
  nystrom_rank: int | None = None,
  nystrom_refresh: int = 10,
  cg_backtracking: bool = False,
  hvp_mode: products.HvpMode = "fwd_rev",
  curvature_batch_size: int | None = None,
  preconditioner_batch_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Newton-CG direction :math:`d \approx (C + \lambda I)^{-1} g` (Hessian-free, Martens 2010).

  Each update solves :math:`(C + \lambda I) d = g`, where :math:`g` is the incoming update (the
  gradient), by the chosen ``solver`` (truncated CG by default, warm-started from
  ``warm_start`` times the previous solution and stopped on relative residual ``cg_tol``,
  Martens' progress rule ``cg_progress_tol``, non-positive curvature (Steihaug) or
  ``cg_max_steps``). Like every optax ``scale_by_*`` it returns a gradient-like direction:
  scale it by ``-learning_rate`` (:func:`newton_cg` does).

  **Step acceptance** (trust-region style, inside the update). With the damped quadratic model
  :math:`q(p) = g^\top p + \tfrac12 p^\top (C + \lambda I) p` and the trial step
  :math:`p = -d`, the reduction ratio :math:`\rho = (f(\theta - d) - f(\theta)) / q(-d)` is
  measured on the same mini-batch (:func:`~curvopt.optimizers.damping.reduction_ratio`). A
  trial is rejected when :math:`d` or the loss is non-finite, or (unless ``accept_ratio`` is
  ``None``) when :math:`\rho \le` ``accept_ratio``; it is then re-solved, warm-started from
  the rejected :math:`d`, with :math:`\lambda` raised by
  :func:`~curvopt.optimizers.damping.retry_damping` (factor ``damping_increase``
  :math:`\cdot 2^k` at the :math:`k`-th retry, and at least the curvature along the rejected
  step), up to ``max_retries`` times, all within one ``lax.while_loop``. Only when every trial
  is rejected does the update return zero (counted in ``num_failed``), so outer line searches
  and ``optimistix`` termination tests see real steps. With ``accept_ratio=0`` the loss on
  the step's mini-batch never increases.

  **Damping** (Levenberg-Marquardt, Martens 2010 §4.1). After an accepted trial,
  :math:`\lambda \leftarrow \gamma_+ \lambda` if :math:`\rho < \tfrac14` and
  :math:`\lambda \leftarrow \gamma_- \lambda` if :math:`\rho > \tfrac34`
  (:func:`~curvopt.optimizers.damping.levenberg_marquardt`, :math:`\gamma_\pm` =
  ``damping_increase``/``damping_decrease``), clipped to ``damping_bounds`` (when
  ``adapt_damping``; otherwise retries raise :math:`\lambda` for the current update only).
  When the solver meets non-positive damped curvature :math:`\mu` along a direction,
  :math:`\lambda` is raised to at least :math:`\gamma_+ (\lambda - \mu)`
  (:func:`~curvopt.optimizers.damping.negative_curvature_damping`).

  **Curvature** :math:`C` (registry :data:`curvopt.optimizers.curvatures.CURVATURES`):

  * ``"hessian"``: :math:`\nabla^2 f` by forward-over-reverse products
    (:func:`curvopt.products.hvp_fn`) of ``value_fn`` (required in ``update``).
  * ``"ggn"``: the generalised Gauss-Newton :math:`J^\top \nabla^2 L\, J`
    (:func:`curvopt.products.ggn_fn`) of ``model_fn(params, **data) -> outputs`` and
    ``loss_fn(outputs, **data) -> loss``, both given here. ``value_fn`` is then optional
    (:func:`value_fn_from_model` builds it).
  * ``"fisher"``: the empirical Fisher :math:`\frac1B \sum_i g_i g_i^\top`
    (:func:`curvopt.products.empirical_fisher_fn`). The per-example losses are the objective
    evaluated on one-example slices of the data keyword arguments, so every data argument
    must have a leading example axis and the objective must be a mean over the batch.
  * any :class:`~curvopt.optimizers.curvatures.CurvatureFn`
    ``(params, objective, data) -> matvec``.

  **Solver** (registry :data:`curvopt.optimizers.solvers.SOLVERS`): ``"cg"``; ``"nystrom"``,
  CG preconditioned by a rank-``nystrom_rank`` randomized Nyström approximation of :math:`C`
  refreshed every ``nystrom_refresh`` updates (Frangella, Tropp and Udell 2023); ``"dense"``,
  the exact solve from the dense curvature (small models: the Gauss-Newton /
  Levenberg-Marquardt step); a :class:`~curvopt.optimizers.solvers.LinearSolver`; or any
  solver following :mod:`curvopt.linalg.solve`'s protocol (e.g.
  ``curvopt.linalg.dense.dense_solve``).

  **Preconditioner** (``"cg"`` only): ``"martens"`` uses
  :math:`M = (\mathrm{diag}(\frac1B \sum_i g_i^2) + \lambda)^{\alpha}` with
  :math:`\alpha` = ``preconditioner_exponent`` (Martens 2010 §4.7), which needs per-example
  gradients, hence the same data requirement as ``"fisher"``; a
  :class:`~curvopt.optimizers.curvatures.DiagonalFn` ``(params, objective, data) -> diagonal``
  gives :math:`M = (\mathrm{diagonal} + \lambda)^{\alpha}`.

  Args:
    curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or a ``CurvatureFn``.
    model_fn: ``model_fn(params, **data) -> outputs`` (``"ggn"``; optional otherwise, then
      used with ``loss_fn`` as the objective when no ``value_fn`` is given).
    loss_fn: ``loss_fn(outputs, **data) -> scalar`` (``"ggn"``).
    module: a flax ``nnx.Module`` (optional). Then ``model_fn(module, **data)`` receives the
      Module rebuilt from the parameters being optimised (its ``nnx.Param`` state, as
      ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` passes them) and the rest of its state
      (BatchNorm statistics, RNG counts) as it was here, so no ``split``/``merge`` is
      needed in user code. State the Module updates in the forward pass (BatchNorm running
      averages in training mode) is discarded inside curvature products.
    damping: initial :math:`\lambda \ge 0`.
    adapt_damping: adapt :math:`\lambda` from :math:`\rho` between updates.
    damping_bounds: ``(min, max)`` of :math:`\lambda`.
    damping_increase: :math:`\gamma_+ \ge 1`, applied when :math:`\rho < 1/4`, on negative
      curvature, and (times :math:`2^k`) at the :math:`k`-th retry.
    damping_decrease: :math:`\gamma_- \in (0, 1]`, applied when :math:`\rho > 3/4`.
    accept_ratio: trials with :math:`\rho \le` ``accept_ratio`` are rejected and re-solved;
      ``None`` accepts every finite trial.
    max_retries: re-solves per update after rejected trials (``0``: none).
    solver: ``"cg"``, ``"nystrom"``, ``"dense"``, a ``LinearSolver`` or a ``curvopt.linalg``
      ``SolveFn``.
    cg_max_steps: CG iterations per solve at most (static; ``None`` means 100).
    cg_tol: relative residual tolerance, or ``"forcing"`` for the superlinear forcing sequence
      :math:`\min(\tfrac12, \sqrt{\|g\|})` of scipy's Newton-CG (Nocedal and Wright, 7.1).
    cg_progress_tol: Martens' progress tolerance; ``None`` disables the test.
    warm_start: decay of the previous direction used as the CG starting point.
    preconditioner: ``None``, ``"martens"`` or a ``DiagonalFn``.
    preconditioner_exponent: the exponent :math:`\alpha`.
    nystrom_rank: Nyström sketch size (static; ``None`` means 20).
    nystrom_refresh: updates between Nyström sketches.
    cg_backtracking: return the best saved CG iterate by the true mini-batch loss
      (Martens 2010 §4.6) rather than the last one; costs a few loss evaluations and the
      memory of about ``log(cg_max_steps) / log(1.3)`` directions.
    hvp_mode: forward/reverse composition of Hessian products (``"hessian"`` only).
    curvature_batch_size: if set, curvature products and the preconditioner use only this
      many examples of the step's batch (Martens 2010 §4.2), while the gradient and
      :math:`\rho` use all of it. The chunk is rows ``[j s, (j + 1) s)`` of every data
      keyword argument with ``j = count mod (n // s)``, so it changes at every update with
      static shapes; every data argument needs the same leading example axis, and the
      objective must be a mean over examples. Shuffle the batch between updates so that the
      chunks are representative.
    preconditioner_batch_size: if set, the preconditioner's diagonal uses only the first this
      many examples of the curvature batch (Martens' diagonal needs one gradient per example,
      so 128 of a 600-example curvature chunk cost a fifth and precondition about as well).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`NewtonCGState`.

  Raises:
    ValueError: at construction for an unknown curvature, solver or preconditioner, ``"ggn"``
      without ``model_fn``/``loss_fn``, or invalid numbers (traced numbers, e.g. from
      ``optax.inject_hyperparams``, are not checked); in ``update`` when a needed
      ``value_fn`` or data argument is missing, or a data argument is declared by no function.
    TypeError: in ``update`` when the gradient's dtype differs from the parameters'.

  Examples:
    On :math:`f(x) = \tfrac12 x^\top A x - b^\top x` one undamped Newton step lands on
    :math:`A^{-1} b`:

    >>> A, b = jnp.array([[3.0, 1.0], [1.0, 2.0]]), jnp.array([1.0, 1.0])
    >>> f = lambda x: 0.5 * x @ A @ x - b @ x
    >>> tx = scale_by_newton_cg("hessian", damping=0.0, adapt_damping=False, cg_tol=1e-10)
    >>> x = jnp.zeros(2)
    >>> d, state = tx.update(jax.grad(f)(x), tx.init(x), x, value_fn=f)
    >>> np.allclose(x - d, jnp.linalg.solve(A, b), atol=1e-6)
    True
    >>> round(float(state.rho), 4), int(state.info.num_trials)
    (1.0, 1)

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    Martens and Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", Neural Networks: Tricks of the Trade, 2012.
    Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
    Neural Computation 2002. Nocedal and Wright, "Numerical Optimization", ch. 4 and 7, 2006.
    Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05, 1999.
    Frangella, Tropp and Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal.
    Appl. 2023.
  """
  if not callable(curvature):
    _checks.check_choice("curvature", curvature, tuple(curvatures_lib.CURVATURES))
  if not callable(preconditioner):
    _checks.check_choice("preconditioner", preconditioner, (None, *curvatures_lib.DIAGONALS))
  if curvature in curvatures_lib.NEEDS_MODEL and (model_fn is None or loss_fn is None):
    raise ValueError(
      f"newton_cg(curvature={curvature!r}) needs model_fn=(params, **data) -> outputs and "
      "loss_fn=(outputs, **data) -> loss at construction; or use curvature='hessian' and pass "
      "value_fn= to update()."
    )
  if (model_fn is None) != (loss_fn is None):
    raise ValueError("Pass model_fn and loss_fn together (or neither).")
  if module is not None:
    if not _nnx.is_module(module):
      raise TypeError(
        f"module= takes a flax nnx.Module (whose Param state is optimised); got a "
        f"{type(module).__name__}. For a plain pytree of parameters drop module=."
      )
    if model_fn is None:
      raise ValueError("module= is used by model_fn: pass model_fn=(module, **data) -> outputs.")
    model_fn = _module_model_fn(model_fn, module)
  _check("damping", damping, lambda v: v >= 0, ">= 0")
  lo, hi = damping_bounds
  if _concrete(lo) is not None and _concrete(hi) is not None and not 0 <= lo <= hi:
    raise ValueError(f"damping_bounds must satisfy 0 <= min <= max; got {damping_bounds!r}.")
  _check("damping_increase", damping_increase, lambda v: v >= 1, ">= 1")
  _check("damping_decrease", damping_decrease, lambda v: 0 < v <= 1, "in (0, 1]")
  _check("max_retries", max_retries, lambda v: v >= 0 and v == int(v), "an integer >= 0")
  _check("warm_start", warm_start, lambda v: 0 <= v <= 1, "in [0, 1]")
  if isinstance(cg_tol, str):
    _checks.check_choice("cg_tol", cg_tol, ("forcing",))
  else:
    _check("cg_tol", cg_tol, lambda v: v >= 0, ">= 0 or 'forcing'")
  max_steps = _static_int("cg_max_steps", cg_max_steps, DEFAULT_CG_MAX_STEPS, 1)
  rank = _static_int("nystrom_rank", nystrom_rank, DEFAULT_NYSTROM_RANK, 1)
  curvature_batch_size = _static_int("curvature_batch_size", curvature_batch_size, None, 1)
  preconditioner_batch_size = _static_int(
    "preconditioner_batch_size", preconditioner_batch_size, None, 1
  )
  if preconditioner_batch_size is not None and preconditioner is None:
    raise ValueError(
      f"preconditioner_batch_size={preconditioner_batch_size} sizes the preconditioner's batch, "
      "but preconditioner=None: set preconditioner='martens' (or a DiagonalFn), or drop it."
    )
  linear_solver = _make_solver(solver, max_steps, cg_progress_tol, rank, nystrom_refresh)
  if preconditioner is not None and solver in ("nystrom", "dense"):
    raise ValueError(
      f"preconditioner={preconditioner!r} applies to solver='cg' only; solver={solver!r} "
      "brings its own. Drop one of them."
    )
  derived_value_fn = None if model_fn is None else value_fn_from_model(model_fn, loss_fn)
  custom = callable(curvature) or callable(preconditioner) or not isinstance(solver, str)
  # The built-in solvers run on one vector per dtype (curvopt.linalg.flat), so the retry and
  # CG loops compile to a few kernels rather than a few per parameter leaf; a user's solver
  # sees pytrees shaped like the parameters.
  layout = flat_layout if isinstance(solver, str) else _identity_layout

  def init_fn(params: Params) -> NewtonCGState:
    leaves = jax.tree.leaves(params)
    dtype = jnp.result_type(*[jnp.real(leaf).dtype for leaf in leaves]) if leaves else float
    return NewtonCGState(
      count=jnp.zeros((), jnp.int32),
      direction=optax.tree.zeros_like(params),
      damping=jnp.asarray(damping, dtype),
      solver_state=linear_solver.init(layout(params).pack(params)),
      info=NewtonCGInfo(
        rho=jnp.asarray(jnp.nan, dtype),
        loss=jnp.asarray(jnp.nan, dtype),
        cg_steps=jnp.zeros((), jnp.int32),
        cg_status=jnp.zeros((), jnp.int32),
        negative_curvature=jnp.zeros((), bool),
        num_trials=jnp.zeros((), jnp.int32),
        num_rejected=jnp.zeros((), jnp.int32),
        num_failed=jnp.zeros((), jnp.int32),
      ),
    )

  def update_fn(updates, state, params=None, *, value=None, grad=None, value_fn=None, **data):
    del grad  # The direction solves against the incoming updates (the gradient).
    if params is None:
      raise ValueError("scale_by_newton_cg needs params: call update(grads, state, params, ...).")
    _checks.check_same_structure(params, updates, "params", "updates")
    _check_dtypes(params, updates)
    full_value_fn = value_fn if value_fn is not None else derived_value_fn
    if data and not custom:
      _check_data_names(data, [f for f in (value_fn, model_fn, loss_fn) if f is not None])
    objective = None
    if full_value_fn is not None:
      bound = route(full_value_fn, data)
      objective = lambda p: full_value_fn(p, **bound)
    if objective is None and (adapt_damping or accept_ratio is not None):
      raise ValueError(
        "newton_cg needs the objective to adapt damping or accept steps: pass value_fn= to "
        "update() (or model_fn/loss_fn at construction), or set adapt_damping=False and "
        "accept_ratio=None."
      )
    dtype = state.damping.dtype

    def chunk(data, size, name, count):
      """A chunk of the batch and the objective bound to it (the whole batch for ``None``)."""
      if size is None:
        return data, objective
      data = _curvature_chunk(data, size, count, name)
      if full_value_fn is None:
        return data, None
      bound_chunk = route(full_value_fn, data)
      return data, lambda p: full_value_fn(p, **bound_chunk)

    # The curvature may see a smaller chunk of the batch than the gradient and the reduction
    # ratio (Martens 2010 §4.2), and the preconditioner the first rows of that chunk.
    curvature_data, curvature_objective = chunk(
      data, curvature_batch_size, "curvature_batch_size", state.count
    )
    spec = curvatures_lib.CurvatureSpec(model_fn, loss_fn, full_value_fn, hvp_mode)
    curvature_fn = curvature if callable(curvature) else curvatures_lib.CURVATURES[curvature](spec)
    matvec = curvature_fn(params, curvature_objective, curvature_data)
    if preconditioner is None:
      diagonal = None
    else:
      diagonal_fn = preconditioner
      if not callable(preconditioner):
        diagonal_fn = curvatures_lib.DIAGONALS[preconditioner](spec)
      first_rows, first_rows_objective = curvature_data, curvature_objective
      if preconditioner_batch_size is not None:
        first_rows, first_rows_objective = chunk(
          curvature_data, preconditioner_batch_size, "preconditioner_batch_size", 0
        )
      diagonal = diagonal_fn(params, first_rows_objective, first_rows)
    pack, unpack = layout(updates)
    tree_matvec, tree_updates = matvec, updates
    matvec = lambda v: pack(tree_matvec(unpack(v)))
    updates = pack(tree_updates)
    diagonal = None if diagonal is None else pack(diagonal)
    solver_state, work = linear_solver.prepare(
      matvec, pack(params), state.solver_state, state.count
    )

    g_norm = optax.tree.norm(updates)
    tol = jnp.minimum(0.5, jnp.sqrt(g_norm)) if isinstance(cg_tol, str) else cg_tol
    backtrack_fn = None
    if cg_backtracking and objective is not None:
      backtrack_fn = lambda d: objective(optax.tree.sub(params, unpack(d)))
    if objective is None:
      loss = jnp.asarray(jnp.nan if value is None else value, dtype)
    else:
      loss = jnp.asarray(objective(params) if value is None else value, dtype)

    def trial(lam, x0):
      """One damped solve and its acceptance test."""
      precond = None
      if diagonal is not None:
        precond = damping_lib.diagonal_preconditioner(diagonal, lam, preconditioner_exponent)
      result = linear_solver.solve(
        matvec,
        updates,
        lam,
        x0,
        work,
        preconditioner=precond,
        tol=tol,
        backtrack_fn=backtrack_fn,
      )
      d = result.x
      finite = optax.tree.norm(d) < jnp.inf  # False for inf and nan.
      if objective is None:
        rho = jnp.asarray(jnp.nan, dtype)
      else:
        safe_d = optax.tree.where(finite, d, optax.tree.zeros_like(d))
        new_loss = objective(optax.tree.sub(params, unpack(safe_d))).astype(dtype)
        finite = finite & jnp.isfinite(loss) & jnp.isfinite(new_loss)
        predicted = jnp.asarray(result.quadratic_value, dtype)
        rho = damping_lib.reduction_ratio(new_loss - loss, predicted)
        rho = jnp.where(finite, rho, -jnp.inf).astype(dtype)
      accept = finite if accept_ratio is None else finite & (rho > accept_ratio)
      return result, d, rho, accept

    def raised(lam, k, result, d):
      """The damping of the next trial after a rejected one."""
      mu = damping_lib.curvature_along(d, updates).astype(dtype)
      new = damping_lib.retry_damping(lam, k, mu, increase=damping_increase)
      needed = damping_lib.negative_curvature_damping(
        lam, result.min_curvature, increase=damping_increase
      )
      new = jnp.where(result.negative_curvature, jnp.maximum(new, needed), new)
      return jnp.clip(new, lo, hi).astype(dtype)

    class Carry(NamedTuple):
      k: jax.Array
      lam: jax.Array
      d: Any
      rho: jax.Array
      accept: jax.Array
      steps: jax.Array
      status: jax.Array
      negative: jax.Array
      min_curvature: jax.Array

    def body(c: Carry) -> Carry:
      result, d, rho, accept = trial(c.lam, c.d)
      return Carry(
        k=c.k + 1,
        lam=jnp.where(accept, c.lam, raised(c.lam, c.k, result, d)),
        d=d,
        rho=rho,
        accept=accept,
        steps=c.steps + jnp.asarray(result.num_steps, jnp.int32),
        status=jnp.asarray(result.status, jnp.int32),
        negative=jnp.asarray(result.negative_curvature, bool),
        min_curvature=jnp.asarray(result.min_curvature, dtype),
      )

    x0 = pack(optax.tree.scale(jnp.asarray(warm_start, dtype), state.direction))
    x0 = optax.tree.cast_like(x0, updates)
    start = Carry(
      k=jnp.zeros((), jnp.int32),
      lam=state.damping,
      d=x0,
      rho=jnp.asarray(jnp.nan, dtype),
      accept=jnp.zeros((), bool),
      steps=jnp.zeros((), jnp.int32),
      status=jnp.zeros((), jnp.int32),
      negative=jnp.zeros((), bool),
      min_curvature=jnp.asarray(jnp.inf, dtype),
    )
    c = jax.lax.while_loop(lambda c: ~c.accept & (c.k <= max_retries), body, start)

    if adapt_damping:
      next_lam = damping_lib.levenberg_marquardt(
        c.lam, c.rho, increase=damping_increase, decrease=damping_decrease
      )
      needed = damping_lib.negative_curvature_damping(
        c.lam, c.min_curvature, increase=damping_increase
      )
      next_lam = jnp.where(c.negative, jnp.maximum(next_lam, needed), next_lam)
      next_lam = jnp.where(c.accept, next_lam, c.lam)  # c.lam was already raised on failure
      next_lam = jnp.clip(next_lam, lo, hi).astype(dtype)
    else:
      next_lam = state.damping
    out = unpack(optax.tree.where(c.accept, c.d, optax.tree.zeros_like(updates)))
    info = NewtonCGInfo(
      rho=c.rho,
      loss=loss,
      cg_steps=c.steps,
      cg_status=c.status,
      negative_curvature=c.negative,
      num_trials=c.k,
      num_rejected=state.info.num_rejected + c.k - c.accept.astype(jnp.int32),
      num_failed=state.info.num_failed + (~c.accept).astype(jnp.int32),
    )
    new_state = NewtonCGState(
      count=optax.safe_increment(state.count),
      direction=out,
      damping=next_lam,
      solver_state=solver_state,
      info=info,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -------------------------------------------------------------------------- the optimiser


def newton_cg(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  *,
  linesearch: optax.GradientTransformation | None = None,
  **options: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Newton-CG / Hessian-free optimiser: :func:`scale_by_newton_cg`, learning rate, line search.

  The update is :math:`-\eta\, d` with :math:`d \approx (C + \lambda I)^{-1} g` (see
  :func:`scale_by_newton_cg` for the curvature choices, solvers, damping and the acceptance
  rule), then optionally an optax line search (``optax.scale_by_backtracking_linesearch`` or
  ``optax.scale_by_zoom_linesearch``) exactly as ``optax.lbfgs`` builds it. For the line search
  this wrapper supplies what the caller did not: ``grad`` (the incoming gradient), ``value``
  (the loss the direction step computed) and, in GGN mode, ``value_fn`` built from
  ``model_fn``/``loss_fn`` with a signature naming their data arguments (so the line search
  routes the mini-batch correctly). Without a line search the result is an ordinary
  ``optax.chain``.

  Every option of :func:`scale_by_newton_cg` is accepted by keyword (the signature shown by
  ``inspect.signature`` lists them all, with their defaults), so ``optax.inject_hyperparams``
  and configuration tools see every option.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    linesearch: optional optax line search chained after the scaled direction.
    {options}

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, value_fn=..., **data)`` (``value_fn`` optional for GGN).
    Its state is ``(NewtonCGState, scale state[, line-search state])``.

  Examples:
    Linear least squares with the Gauss-Newton curvature converges in one step:

    >>> X, y = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]]), jnp.array([1.0, 0.0, 2.0])
    >>> model_fn = lambda w, x: x @ w
    >>> loss_fn = lambda z, y: 0.5 * jnp.sum((z - y) ** 2)
    >>> tx = newton_cg(model_fn=model_fn, loss_fn=loss_fn, damping=0.0, adapt_damping=False,
    ...                cg_tol=1e-12)
    >>> w = jnp.zeros(2)
    >>> g = jax.grad(lambda w: loss_fn(model_fn(w, X), y))(w)
    >>> updates, state = tx.update(g, tx.init(w), w, x=X, y=y)
    >>> w = optax.apply_updates(w, updates)
    >>> np.allclose(w, jnp.linalg.lstsq(X, y)[0], atol=1e-5)
    True

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
  """
  direction = scale_by_newton_cg(**options)
  scaling = optax.scale_by_learning_rate(learning_rate)
  if linesearch is None:
    return optax.chain(direction, scaling)
  linesearch = optax.with_extra_args_support(linesearch)
  model_fn, loss_fn = options.get("model_fn"), options.get("loss_fn")
  if options.get("module") is not None:
    model_fn = _module_model_fn(model_fn, options["module"])
  derived_value_fn = None if model_fn is None else value_fn_from_model(model_fn, loss_fn)

  def init_fn(params):
    return (direction.init(params), scaling.init(params), linesearch.init(params))

  def update_fn(updates, state, params=None, *, value=None, grad=None, value_fn=None, **data):
    d, direction_state = direction.update(
      updates, state[0], params, value=value, grad=grad, value_fn=value_fn, **data
    )
    scaled, scaling_state = scaling.update(d, state[1], params)
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


def _options_signature_and_doc() -> tuple[inspect.Signature, str]:
  """``newton_cg``'s signature and option docs, generated from ``scale_by_newton_cg``'s."""
  inner = inspect.signature(scale_by_newton_cg)
  own = inspect.signature(newton_cg).parameters
  options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inner.parameters.values()]
  parameters = [own["learning_rate"], *options, own["linesearch"]]
  signature = inspect.Signature(parameters, return_annotation=inner.return_annotation)
  doc = inspect.getdoc(scale_by_newton_cg)
  args = doc.split("Args:\n", 1)[1].split("\n\nReturns:", 1)[0]
  return signature, "\n".join("  " + line if line else line for line in args.splitlines())


newton_cg.__signature__, _options_doc = _options_signature_and_doc()
newton_cg.__doc__ = newton_cg.__doc__.replace("    {options}", _options_doc)
