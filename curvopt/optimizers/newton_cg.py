r"""Newton-CG / Hessian-free optimisation as an optax transformation.

Each step solves the damped Newton system :math:`(C + \lambda I)\, d = g` approximately by
truncated conjugate gradient (:func:`curvopt.linalg.cg.conjugate_gradient`), with :math:`C` a
curvature matrix seen only through products (Hessian, generalised Gauss-Newton, empirical
Fisher, or your own), and returns the direction :math:`d`. The damping :math:`\lambda` follows
the Levenberg-Marquardt rule of Martens (2010). Everything runs inside one compiled program.

Conventions follow ``optax.lbfgs``: :func:`scale_by_newton_cg` returns a gradient-like
direction (multiply by ``-learning_rate``), :func:`newton_cg` chains it with the learning rate
and an optional optax line search, and per-step information arrives through optax's extra
arguments: ``update(grads, state, params, *, value=None, grad=None, value_fn=None, **data)``,
with the data keyword arguments routed to ``value_fn`` / ``model_fn`` / ``loss_fn`` by the
parameter names their signatures declare (as optax's line searches route them).
"""

import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from curvopt import _checks
from curvopt.curvature import products
from curvopt.linalg import cg

Params = Any
Matvec = Callable[[Any], Any]
CurvatureName = Literal["hessian", "ggn", "fisher"]
CURVATURES = ("hessian", "ggn", "fisher")
PRECONDITIONERS = (None, "martens")


class CurvatureFn(Protocol):
  """Protocol of a user-defined curvature for :func:`scale_by_newton_cg`.

  Called once per step, inside the compiled update, as
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


class NewtonCGState(NamedTuple):
  r"""State of :func:`scale_by_newton_cg`, with the diagnostics users plot.

  Attributes:
    count: number of updates so far.
    direction: the last accepted direction :math:`d` (zero after a rejected step), the warm
      start of the next solve.
    damping: the current :math:`\lambda` (already adapted for the next step).
    rho: reduction ratio of the last step (actual / predicted decrease of the full step
      :math:`-d` on the same mini-batch); ``-inf`` for a non-finite step, ``nan`` when no
      objective was available to measure it.
    loss: the objective at the parameters the last update was computed at.
    cg_steps: CG iterations of the last solve.
    cg_status: why the last solve stopped, an index into
      :data:`curvopt.linalg.cg.CG_STATUSES`.
    negative_curvature: whether the last solve met non-positive curvature (Steihaug exit).
    num_rejected: total number of rejected steps (non-finite, or ``rho <= accept_ratio``).
  """

  count: jax.Array
  direction: Params
  damping: jax.Array
  rho: jax.Array
  loss: jax.Array
  cg_steps: jax.Array
  cg_status: jax.Array
  negative_curvature: jax.Array
  num_rejected: jax.Array


def _arg_names(fn: Callable) -> list[str]:
  """Names ``fn`` accepts as keywords, excluding ``*args``/``**kwargs`` (optax's rule)."""
  return [
    name
    for name, p in inspect.signature(fn).parameters.items()
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
  ]


def _route(fn: Callable, data: dict) -> dict:
  """The data keyword arguments that ``fn``'s signature names, as optax's line searches do."""
  names = _arg_names(fn)
  return {k: v for k, v in data.items() if k in names}


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
    for name in _arg_names(fn)[1:]:
      if name not in names:
        names.append(name)

  def value_fn(params, **data):
    outputs = model_fn(params, **_route(model_fn, data))
    return loss_fn(outputs, **_route(loss_fn, data))

  value_fn.__signature__ = inspect.Signature(
    [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
  )
  return value_fn


def _per_example(objective_fn: Callable, data: dict, what: str):
  """``(params, example) -> loss`` from a batch-mean objective, and the batch of examples."""
  examples = _route(objective_fn, data)
  if not examples:
    raise ValueError(
      f"{what} needs per-example losses: pass the mini-batch to update() as data keyword "
      "arguments that value_fn (or model_fn/loss_fn) names, each with a leading example axis."
    )
  loss = lambda p, ex: objective_fn(p, **jax.tree.map(lambda a: jnp.expand_dims(a, 0), ex))
  return loss, examples


def _curvature_chunk(data: dict, size: int | None, count: jax.Array) -> dict:
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
      "curvature_batch_size needs every data keyword argument to have the same leading example "
      f"axis; got leading sizes {sorted(map(str, sizes))}. Pass non-batch constants through "
      "model_fn/loss_fn closures instead."
    )
  (n,) = sizes
  if size > n:
    raise ValueError(
      f"curvature_batch_size={size} exceeds the {n} examples passed to update(); use at most "
      f"{n} (or None for the whole batch)."
    )
  start = (count % (n // size)) * size
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), data)


def scale_by_newton_cg(
  curvature: CurvatureName | CurvatureFn = "ggn",
  *,
  model_fn: Callable[..., Any] | None = None,
  loss_fn: Callable[..., jax.Array] | None = None,
  damping: float = 1.0,
  adapt_damping: bool = True,
  damping_bounds: tuple[float, float] = (1e-8, 1e8),
  damping_increase: float = 1.5,
  damping_decrease: float = 2.0 / 3.0,
  accept_ratio: float | None = 0.0,
  cg_max_steps: int = 100,
  cg_tol: float | Literal["forcing"] = 1e-4,
  cg_progress_tol: float | None = 5e-4,
  warm_start: float = 0.95,
  preconditioner: Literal["martens"] | Callable[..., Params] | None = None,
  preconditioner_exponent: float = 0.75,
  cg_backtracking: bool = False,
  hvp_mode: products.HvpMode = "fwd_rev",
  curvature_batch_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Newton-CG direction :math:`d \approx (C + \lambda I)^{-1} g` (Hessian-free, Martens 2010).

  Each update runs truncated (preconditioned) CG on :math:`(C + \lambda I) d = g`, where
  :math:`g` is the incoming update (the gradient), warm-started from ``warm_start`` times the
  previous solution and stopped on relative residual (``cg_tol``), Martens' progress rule
  (``cg_progress_tol``), non-positive curvature (Steihaug) or ``cg_max_steps``. Like every
  optax ``scale_by_*`` it returns a gradient-like direction: scale it by ``-learning_rate``
  (:func:`newton_cg` does).

  **Damping** (Levenberg-Marquardt, Martens 2010 §4.1). With the damped quadratic model
  :math:`q(p) = g^\top p + \tfrac12 p^\top (C + \lambda I) p` and the full step :math:`p = -d`,
  the reduction ratio :math:`\rho = (f(\theta - d) - f(\theta)) / q(-d)` is measured on the
  same mini-batch; then :math:`\lambda \leftarrow \tfrac32 \lambda` if :math:`\rho < \tfrac14`,
  :math:`\lambda \leftarrow \tfrac23 \lambda` if :math:`\rho > \tfrac34`, clipped to
  ``damping_bounds`` (when ``adapt_damping``). When CG meets non-positive curvature
  :math:`\mu = p^\top (C + \lambda I) p / p^\top p \le 0` along a direction :math:`p`,
  :math:`\lambda` is also raised to at least :math:`\tfrac32 (\lambda - \mu)`, which makes the
  damped curvature positive along :math:`p` at the next step.

  **Rejection.** A step whose loss or direction is non-finite, or (unless ``accept_ratio`` is
  ``None``) whose :math:`\rho \le` ``accept_ratio``, returns a zero update, raises the damping
  and increments ``num_rejected``; parameters never become NaN. With ``accept_ratio=0`` the
  loss on the step's mini-batch never increases (a trust-region acceptance test); pass
  ``None`` when a line search follows.

  **Curvature** :math:`C`:

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
  * any :class:`CurvatureFn` ``(params, objective, data) -> matvec``.

  **Preconditioner** (optional): ``"martens"`` uses
  :math:`M = (\mathrm{diag}(\frac1B \sum_i g_i^2) + \lambda)^{\alpha}` with
  :math:`\alpha` = ``preconditioner_exponent`` (Martens 2010 §4.7), which needs per-example
  gradients, hence the same data requirement as ``"fisher"``; a callable
  ``(params, objective, data) -> diagonal`` (a non-negative pytree shaped like ``params``, e.g.
  a Hutchinson estimate of :math:`\mathrm{diag}\, C`) gives
  :math:`M = (\mathrm{diagonal} + \lambda)^{\alpha}`.

  Args:
    curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or a :class:`CurvatureFn`.
    model_fn: ``model_fn(params, **data) -> outputs`` (``"ggn"``; optional otherwise, then
      used with ``loss_fn`` as the objective when no ``value_fn`` is given).
    loss_fn: ``loss_fn(outputs, **data) -> scalar`` (``"ggn"``).
    damping: initial :math:`\lambda \ge 0`.
    adapt_damping: adapt :math:`\lambda` from :math:`\rho`.
    damping_bounds: ``(min, max)`` of the adapted :math:`\lambda`.
    damping_increase: factor applied when :math:`\rho < 1/4` (or the step is rejected).
    damping_decrease: factor applied when :math:`\rho > 3/4`.
    accept_ratio: steps with :math:`\rho \le` ``accept_ratio`` are rejected; ``None`` accepts
      every finite step.
    cg_max_steps: maximum CG iterations per update (static).
    cg_tol: relative residual tolerance, or ``"forcing"`` for the superlinear forcing sequence
      :math:`\min(\tfrac12, \sqrt{\|g\|})` of scipy's Newton-CG (Nocedal and Wright, 7.1).
    cg_progress_tol: Martens' progress tolerance; ``None`` disables the test.
    warm_start: decay of the previous direction used as the CG starting point; ``0`` starts
      from zero (and saves one product per step).
    preconditioner: ``None``, ``"martens"`` or a callable returning a diagonal.
    preconditioner_exponent: the exponent :math:`\alpha`.
    cg_backtracking: return the best saved CG iterate by the true mini-batch loss
      (Martens 2010 §4.6) rather than the last one; costs a few loss evaluations and the
      memory of about ``log(cg_max_steps) / log(1.3)`` directions.
    hvp_mode: forward/reverse composition of Hessian products (``"hessian"`` only).
    curvature_batch_size: if set, curvature products and the preconditioner use only this
      many examples of the step's batch (Martens 2010 §4.2), while the gradient and
      :math:`\rho` use all of it. The chunk is rows ``[j s, (j + 1) s)`` of every data
      keyword argument with ``j = count mod (n // s)``, so it changes at every update with
      static shapes; every data argument needs the same leading example axis, and the
      objective must be a mean over examples (so that the chunk's curvature estimates the
      batch's). Shuffle the batch between updates (or pass a fresh permutation) so that the
      chunks are representative: contiguous rows of sorted data make a biased curvature.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`NewtonCGState`.

  Raises:
    ValueError: at construction for an unknown curvature or preconditioner, ``"ggn"`` without
      ``model_fn``/``loss_fn``, or invalid numbers; in ``update`` when a needed ``value_fn``
      or data argument is missing.

  Examples:
    On :math:`f(x) = \tfrac12 x^\top A x - b^\top x` one undamped Newton step lands on
    :math:`A^{-1} b`:

    >>> A, b = jnp.array([[3.0, 1.0], [1.0, 2.0]]), jnp.array([1.0, 1.0])
    >>> f = lambda x: 0.5 * x @ A @ x - b @ x
    >>> tx = scale_by_newton_cg("hessian", damping=0.0, adapt_damping=False, cg_tol=1e-10)
    >>> x = jnp.zeros(2)
    >>> d, state = tx.update(jax.grad(f)(x), tx.init(x), x, value_fn=f)
    >>> np.allclose(x - d, jnp.linalg.solve(A, b))
    True

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    Martens and Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", Neural Networks: Tricks of the Trade, 2012.
    Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
    Neural Computation 2002. Nocedal and Wright, "Numerical Optimization", ch. 7, 2006.
  """
  if not callable(curvature):
    _checks.check_choice("curvature", curvature, CURVATURES)
  if not callable(preconditioner):
    _checks.check_choice("preconditioner", preconditioner, PRECONDITIONERS)
  if curvature == "ggn" and (model_fn is None or loss_fn is None):
    raise ValueError(
      "newton_cg(curvature='ggn') needs model_fn=(params, **data) -> outputs and "
      "loss_fn=(outputs, **data) -> loss at construction; or use curvature='hessian' and pass "
      "value_fn= to update()."
    )
  if (model_fn is None) != (loss_fn is None):
    raise ValueError("Pass model_fn and loss_fn together (or neither).")
  if not damping >= 0:
    raise ValueError(f"damping must be >= 0; got {damping!r}.")
  lo, hi = damping_bounds
  if not 0 <= lo <= hi:
    raise ValueError(f"damping_bounds must satisfy 0 <= min <= max; got {damping_bounds!r}.")
  if not (damping_increase >= 1 and 0 < damping_decrease <= 1):
    raise ValueError(
      f"Need damping_increase >= 1 and 0 < damping_decrease <= 1; got {damping_increase!r} "
      f"and {damping_decrease!r}."
    )
  if curvature_batch_size is not None and not (
    isinstance(curvature_batch_size, int) and curvature_batch_size >= 1
  ):
    raise ValueError(
      f"curvature_batch_size must be a positive int or None; got {curvature_batch_size!r}."
    )
  if not 0 <= warm_start <= 1:
    raise ValueError(f"warm_start must be in [0, 1]; got {warm_start!r}.")
  if isinstance(cg_tol, str):
    _checks.check_choice("cg_tol", cg_tol, ("forcing",))
  elif not cg_tol >= 0:
    raise ValueError(f"cg_tol must be >= 0 or 'forcing'; got {cg_tol!r}.")
  derived_value_fn = None if model_fn is None else value_fn_from_model(model_fn, loss_fn)

  def init_fn(params: Params) -> NewtonCGState:
    leaves = jax.tree.leaves(params)
    dtype = jnp.result_type(*[jnp.real(leaf).dtype for leaf in leaves]) if leaves else float
    return NewtonCGState(
      count=jnp.zeros((), jnp.int32),
      direction=optax.tree.zeros_like(params),
      damping=jnp.asarray(damping, dtype),
      rho=jnp.asarray(jnp.nan, dtype),
      loss=jnp.asarray(jnp.nan, dtype),
      cg_steps=jnp.zeros((), jnp.int32),
      cg_status=jnp.zeros((), jnp.int32),
      negative_curvature=jnp.zeros((), bool),
      num_rejected=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, *, value=None, grad=None, value_fn=None, **data):
    del grad  # The direction solves against the incoming updates (the gradient).
    if params is None:
      raise ValueError("scale_by_newton_cg needs params: call update(grads, state, params, ...).")
    _checks.check_same_structure(params, updates, "params", "updates")
    full_value_fn = value_fn if value_fn is not None else derived_value_fn
    if full_value_fn is None:
      objective = None
    else:
      bound = _route(full_value_fn, data)
      objective = lambda p: full_value_fn(p, **bound)
    dtype = state.damping.dtype
    lam = state.damping

    # The curvature (and its preconditioner) may see a smaller chunk of the batch than the
    # gradient and the reduction ratio (Martens 2010 §4.2).
    curvature_data = _curvature_chunk(data, curvature_batch_size, state.count)
    if curvature_batch_size is None or full_value_fn is None:
      curvature_objective = objective
    else:
      bound_chunk = _route(full_value_fn, curvature_data)
      curvature_objective = lambda p: full_value_fn(p, **bound_chunk)

    if curvature == "hessian":
      if objective is None:
        raise ValueError(
          "newton_cg(curvature='hessian') needs value_fn=(params, **data) -> loss in update(), "
          "e.g. tx.update(grads, state, params, value_fn=loss_fn, x=x, y=y)."
        )
      matvec = products.hvp_fn(curvature_objective, params, mode=hvp_mode)
    elif curvature == "ggn":
      model_data = _route(model_fn, curvature_data)
      loss_data = _route(loss_fn, curvature_data)
      matvec = products.ggn_fn(
        lambda p: model_fn(p, **model_data), lambda z: loss_fn(z, **loss_data), params
      )
    elif curvature == "fisher":
      if full_value_fn is None:
        raise ValueError(
          "newton_cg(curvature='fisher') needs value_fn=(params, **data) -> mean loss in "
          "update() (or model_fn/loss_fn at construction), and the mini-batch as data "
          "keyword arguments with a leading example axis."
        )
      per_example, examples = _per_example(full_value_fn, curvature_data, "curvature='fisher'")
      matvec = products.empirical_fisher_fn(per_example, params, examples)
    else:
      matvec = curvature(params, curvature_objective, curvature_data)

    if callable(preconditioner):
      diagonal = preconditioner(params, curvature_objective, curvature_data)
    elif preconditioner == "martens":
      if full_value_fn is None:
        raise ValueError(
          "preconditioner='martens' needs value_fn in update() (or model_fn/loss_fn)."
        )
      per_example, examples = _per_example(
        full_value_fn, curvature_data, "preconditioner='martens'"
      )
      grads_i = jax.vmap(jax.grad(per_example), in_axes=(None, 0))(params, examples)
      diagonal = jax.tree.map(lambda g: jnp.mean(jnp.abs(g) ** 2, axis=0), grads_i)
    else:
      diagonal = None
    if diagonal is None:
      precond = None
    else:
      m = jax.tree.map(lambda d: (d + lam) ** preconditioner_exponent, diagonal)
      precond = lambda r: jax.tree.map(lambda ri, mi: ri / mi.astype(ri.dtype), r, m)

    damped = lambda v: optax.tree.add_scale(matvec(v), lam, v)
    g_norm = optax.tree.norm(updates)
    tol = jnp.minimum(0.5, jnp.sqrt(g_norm)) if cg_tol == "forcing" else cg_tol
    x0 = None if warm_start == 0 else optax.tree.scale(warm_start, state.direction)
    backtrack_fn = None
    if cg_backtracking and objective is not None:
      backtrack_fn = lambda d: objective(optax.tree.sub(params, d))
    result = cg.conjugate_gradient(
      damped,
      updates,
      x0,
      preconditioner=precond,
      max_steps=cg_max_steps,
      tol=tol,
      progress_tol=cg_progress_tol,
      backtrack_fn=backtrack_fn,
    )
    d = result.x

    # Reduction ratio of the full step -d on this mini-batch; q(-d) = phi(d), CG's quadratic.
    finite_d = optax.tree.norm(d) < jnp.inf  # False for inf and nan.
    if objective is None:
      if adapt_damping or accept_ratio is not None:
        raise ValueError(
          "newton_cg needs the objective to adapt damping or accept steps: pass value_fn= to "
          "update() (or model_fn/loss_fn at construction), or set adapt_damping=False and "
          "accept_ratio=None."
        )
      loss = jnp.asarray(jnp.nan if value is None else value, dtype)
      rho = jnp.asarray(jnp.nan, dtype)
      finite = finite_d
    else:
      loss = jnp.asarray(objective(params) if value is None else value, dtype)
      safe_d = optax.tree.where(finite_d, d, optax.tree.zeros_like(d))
      new_loss = objective(optax.tree.sub(params, safe_d)).astype(dtype)
      predicted = result.quadratic_value.astype(dtype)
      actual = new_loss - loss
      finite = finite_d & jnp.isfinite(loss) & jnp.isfinite(new_loss)
      rho = jnp.where(
        predicted < 0,
        actual / jnp.where(predicted < 0, predicted, -1.0),
        jnp.where(actual <= 0, 1.0, -jnp.inf),
      )
      rho = jnp.where(finite, rho, -jnp.inf).astype(dtype)
    accept = finite if accept_ratio is None else finite & (rho > accept_ratio)

    if adapt_damping:
      new_lam = jnp.where(
        ~accept | (rho < 0.25),
        lam * damping_increase,
        jnp.where(rho > 0.75, lam * damping_decrease, lam),
      )
      # On negative curvature, make C + new_lam I positive along the offending direction.
      needed = 1.5 * (lam - result.min_curvature)
      new_lam = jnp.where(result.negative_curvature, jnp.maximum(new_lam, needed), new_lam)
      new_lam = jnp.clip(new_lam, lo, hi).astype(dtype)
    else:
      new_lam = lam
    zeros = optax.tree.zeros_like(updates)
    out = optax.tree.where(accept, d, zeros)
    new_state = NewtonCGState(
      count=optax.safe_increment(state.count),
      direction=out,
      damping=new_lam,
      rho=rho,
      loss=loss,
      cg_steps=result.num_steps,
      cg_status=result.status,
      negative_curvature=result.negative_curvature,
      num_rejected=state.num_rejected + (~accept).astype(jnp.int32),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def newton_cg(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  *,
  curvature: CurvatureName | CurvatureFn = "ggn",
  model_fn: Callable[..., Any] | None = None,
  loss_fn: Callable[..., jax.Array] | None = None,
  damping: float = 1.0,
  adapt_damping: bool = True,
  damping_bounds: tuple[float, float] = (1e-8, 1e8),
  accept_ratio: float | None = 0.0,
  cg_max_steps: int = 100,
  cg_tol: float | Literal["forcing"] = 1e-4,
  cg_progress_tol: float | None = 5e-4,
  warm_start: float = 0.95,
  preconditioner: Literal["martens"] | Callable[..., Params] | None = None,
  cg_backtracking: bool = False,
  curvature_batch_size: int | None = None,
  linesearch: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Newton-CG / Hessian-free optimiser: :func:`scale_by_newton_cg`, learning rate, line search.

  The update is :math:`-\eta\, d` with :math:`d \approx (C + \lambda I)^{-1} g` (see
  :func:`scale_by_newton_cg` for the curvature choices, damping and rejection rules), then
  optionally an optax line search (``optax.scale_by_backtracking_linesearch`` or
  ``optax.scale_by_zoom_linesearch``) exactly as ``optax.lbfgs`` builds it. For the line search
  this wrapper supplies what the caller did not: ``grad`` (the incoming gradient), ``value``
  (the loss the direction step computed) and, in GGN mode, ``value_fn`` built from
  ``model_fn``/``loss_fn`` with a signature naming their data arguments (so the line search
  routes the mini-batch correctly). Without a line search the result is an ordinary
  ``optax.chain``.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    curvature: ``"hessian"``, ``"ggn"`` (default), ``"fisher"`` or a
      :class:`CurvatureFn`.
    model_fn: ``model_fn(params, **data) -> outputs`` (needed by ``"ggn"``).
    loss_fn: ``loss_fn(outputs, **data) -> loss`` (needed by ``"ggn"``).
    damping: initial Levenberg-Marquardt damping :math:`\lambda`.
    adapt_damping: adapt :math:`\lambda` from the reduction ratio.
    damping_bounds: bounds of the adapted damping.
    accept_ratio: reject steps whose reduction ratio is not above this; ``None`` to accept
      every finite step (natural with a line search).
    cg_max_steps: CG iterations per step at most.
    cg_tol: CG relative-residual tolerance or ``"forcing"``.
    cg_progress_tol: Martens' progress tolerance, ``None`` to disable.
    warm_start: decay of the previous direction used to start CG.
    preconditioner: ``None``, ``"martens"`` or a callable returning a diagonal.
    cg_backtracking: pick the best saved CG iterate by the true loss.
    curvature_batch_size: curvature products on a rotating chunk of this many examples of
      the batch (see :func:`scale_by_newton_cg`); ``None`` uses the whole batch.
    linesearch: optional optax line search chained after the scaled direction.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call
    ``update(grads, state, params, value_fn=..., **data)`` (``value_fn`` optional for GGN).

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
    >>> np.allclose(w, jnp.linalg.lstsq(X, y)[0])
    True

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
  """
  direction = scale_by_newton_cg(
    curvature,
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=damping,
    adapt_damping=adapt_damping,
    damping_bounds=damping_bounds,
    accept_ratio=accept_ratio,
    cg_max_steps=cg_max_steps,
    cg_tol=cg_tol,
    cg_progress_tol=cg_progress_tol,
    warm_start=warm_start,
    preconditioner=preconditioner,
    cg_backtracking=cg_backtracking,
    curvature_batch_size=curvature_batch_size,
  )
  scaling = optax.scale_by_learning_rate(learning_rate)
  if linesearch is None:
    return optax.chain(direction, scaling)
  linesearch = optax.with_extra_args_support(linesearch)
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
      value=direction_state.loss if value is None else value,
      grad=updates if grad is None else grad,
      value_fn=value_fn,
      **data,
    )
    return new_updates, (direction_state, scaling_state, linesearch_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
