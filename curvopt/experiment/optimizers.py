"""The optimiser registry: a hyper-parameter schema per name, and how to build each one.

Every entry of a config's ``optimizers`` list names one of :data:`OPTIMIZERS` and sets its
hyper-parameters; ``label`` names the line in tables and plots, ``variant`` selects a
task-specific objective (e.g. TD(0) semi-gradient vs residual-gradient). Each builder returns
a :class:`Method`: an ``init`` and a pure ``step`` that the runner compiles once, or, for the
``scipy`` baseline, a host-side loop.
"""

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt.experiment.config import ConfigError

Params = Any


@dataclass
class OptimizerConfig:
  """Fields shared by every optimiser entry.

  ``steps`` and ``eval_every`` override the experiment's ``budget.steps`` and ``eval_every``
  for this entry (a second-order method takes fewer, costlier steps).
  """

  name: str = "?"
  label: str | None = None
  variant: str | None = None
  steps: int | None = None
  eval_every: int | None = None


@dataclass
class SGDConfig(OptimizerConfig):
  name: str = "sgd"
  learning_rate: float = 0.1
  momentum: float | None = None
  nesterov: bool = False


@dataclass
class AdamConfig(OptimizerConfig):
  name: str = "adam"
  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0


class Linesearch(enum.Enum):
  none = "none"
  zoom = "zoom"
  backtracking = "backtracking"


@dataclass
class LBFGSConfig(OptimizerConfig):
  name: str = "lbfgs"
  learning_rate: float | None = None
  memory_size: int = 10
  linesearch: Linesearch = Linesearch.zoom
  max_linesearch_steps: int = 15


class Curvature(enum.Enum):
  ggn = "ggn"
  hessian = "hessian"
  fisher = "fisher"


@dataclass
class NewtonCGConfig(OptimizerConfig):
  name: str = "newton_cg"
  learning_rate: float = 1.0
  curvature: Curvature = Curvature.ggn
  damping: float = 1.0
  adapt_damping: bool = True
  accept_ratio: float | None = 0.0
  cg_max_steps: int = 50
  cg_tol: float = 1e-4
  cg_progress_tol: float | None = 5e-4
  warm_start: float = 0.95
  martens_preconditioner: bool = False
  linesearch: Linesearch = Linesearch.none
  max_linesearch_steps: int = 15


@dataclass
class DPSGDConfig(OptimizerConfig):
  name: str = "dp_sgd"
  learning_rate: float = 0.5
  l2_norm_clip: float = 1.0
  noise_multiplier: float = 1.0
  expected_batch_size: int = 64
  momentum: float | None = None
  delta: float = 1e-5


class ScipyMethod(enum.Enum):
  newton_cg = "Newton-CG"
  lbfgs_b = "L-BFGS-B"
  bfgs = "BFGS"
  trust_ncg = "trust-ncg"


@dataclass
class ScipyConfig(OptimizerConfig):
  name: str = "scipy"
  method: ScipyMethod = ScipyMethod.newton_cg
  tol: float = 1e-10


OPTIMIZERS: dict[str, type] = {
  "sgd": SGDConfig,
  "adam": AdamConfig,
  "lbfgs": LBFGSConfig,
  "newton_cg": NewtonCGConfig,
  "dp_sgd": DPSGDConfig,
  "scipy": ScipyConfig,
}


class Method(NamedTuple):
  """How the runner trains with one optimiser entry.

  Attributes:
    init: ``(params, key) -> state`` (``key``: a PRNG key derived from the seed, e.g. for noise).
    step: ``(params, state, data_key, step) -> (params, state, diagnostics)``, pure and
      traceable (the runner compiles it once, inside a loop over steps).
    host_metrics: ``step -> dict`` of host-side metrics logged at each evaluation.
    external: for host-side baselines only (scipy): ``(params, steps, callback) -> None`` where
      ``callback(params, step) -> bool`` logs an evaluation and returns ``True`` to stop.
  """

  init: Callable[[Params, jax.Array], Any]
  step: Callable[..., tuple[Params, Any, dict]] | None
  host_metrics: Callable[[int], dict] = lambda step: {}
  external: Callable[..., None] | None = None


_SKIP_DIAGNOSTICS = ("count", "value", "loss", "direction")


def state_diagnostics(state: Any) -> dict[str, jax.Array]:
  """Scalar fields of the optimiser state's NamedTuples (damping, rho, CG steps, ...).

  Each scalar leaf whose path ends in a NamedTuple field is reported under the field's name
  (``damping``, ``rho``, ``cg_steps``, ``learning_rate`` of a line search, ...); counters and
  values logged elsewhere are skipped; repeated names get a suffix.

  Examples:
    >>> from typing import NamedTuple
    >>> class State(NamedTuple):
    ...   count: jax.Array
    ...   damping: jax.Array
    ...   direction: jax.Array
    >>> state = State(jnp.int32(3), jnp.float32(0.5), jnp.zeros(4))
    >>> {k: float(v) for k, v in state_diagnostics(state).items()}
    {'damping': 0.5}
  """
  out: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not path or not isinstance(path[-1], jax.tree_util.GetAttrKey):
      continue
    name = path[-1].name
    leaf = jnp.asarray(leaf)
    if (
      name in _SKIP_DIAGNOSTICS or leaf.ndim != 0 or jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    ):
      continue
    key, i = name, 2
    while key in out:
      key, i = f"{name}_{i}", i + 1
    out[key] = leaf.astype(jnp.float32) if leaf.dtype == jnp.bool_ else leaf
  return out


def _linesearch(kind: Linesearch, steps: int) -> optax.GradientTransformationExtraArgs | None:
  if kind is Linesearch.zoom:
    return optax.scale_by_zoom_linesearch(max_linesearch_steps=steps)
  if kind is Linesearch.backtracking:
    return optax.scale_by_backtracking_linesearch(max_backtracking_steps=steps)
  return None


def optax_method(task: Any, tx: optax.GradientTransformation, objective: Callable) -> Method:
  """A :class:`Method` for any optax transformation, given optax's extra args each step.

  The step calls ``tx.update(grad, state, params, value=, grad=, value_fn=objective, **batch)``
  (the convention of ``optax.lbfgs`` and its line searches), so transformations that need the
  objective or the mini-batch receive them, and the others ignore them.
  """
  tx = optax.with_extra_args_support(tx)

  def step(params, state, data_key, t):
    batch = task.step_batch(data_key, t)
    value, grad = jax.value_and_grad(objective)(params, **batch)
    updates, state = tx.update(
      grad, state, params, value=value, grad=grad, value_fn=objective, **batch
    )
    params = optax.apply_updates(params, updates)
    diagnostics = {"loss": value, "grad_norm": optax.tree.norm(grad)}
    return params, state, diagnostics | state_diagnostics(state)

  return Method(init=lambda params, key: tx.init(params), step=step)


def build_method(cfg: Any, task: Any, path: str) -> Method:
  """Builds the :class:`Method` for optimiser entry ``cfg`` (at config key ``path``) on ``task``."""
  task.check_variant(f"{path}.variant", cfg.variant)
  objective = task.objective(cfg.variant)
  if isinstance(cfg, SGDConfig):
    tx = optax.sgd(cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov)
  elif isinstance(cfg, AdamConfig):
    if cfg.weight_decay:
      tx = optax.adamw(cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay)
    else:
      tx = optax.adam(cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps)
  elif isinstance(cfg, LBFGSConfig):
    tx = optax.lbfgs(
      cfg.learning_rate,
      memory_size=cfg.memory_size,
      linesearch=_linesearch(cfg.linesearch, cfg.max_linesearch_steps),
    )
  elif isinstance(cfg, NewtonCGConfig):
    from curvopt.optimizers.newton_cg import newton_cg

    extra = task.newton_cg_args(cfg.variant, cfg.curvature.value)
    extra.setdefault("curvature", cfg.curvature.value)
    tx = newton_cg(
      cfg.learning_rate,
      **extra,
      damping=cfg.damping,
      adapt_damping=cfg.adapt_damping,
      accept_ratio=cfg.accept_ratio,
      cg_max_steps=cfg.cg_max_steps,
      cg_tol=cfg.cg_tol,
      cg_progress_tol=cfg.cg_progress_tol,
      warm_start=cfg.warm_start,
      preconditioner="martens" if cfg.martens_preconditioner else None,
      linesearch=_linesearch(cfg.linesearch, cfg.max_linesearch_steps),
    )
  elif isinstance(cfg, DPSGDConfig):
    return _dp_sgd_method(cfg, task, objective, path)
  elif isinstance(cfg, ScipyConfig):
    return _scipy_method(cfg, task, objective)
  else:  # pragma: no cover - the registry and this function are kept in step
    raise ConfigError(f"config key '{path}.name': no builder for {cfg.name!r}.")
  return optax_method(task, tx, objective)


def _dp_sgd_method(cfg: DPSGDConfig, task: Any, objective: Callable, path: str) -> Method:
  """DP-SGD with Poisson sampling, per-example gradients, and ε reported at each evaluation."""
  from curvopt import dp_sgd, per_example_grads, privacy

  n = task.num_train()
  if not 0 < cfg.expected_batch_size <= n:
    raise ConfigError(
      f"config key '{path}.expected_batch_size': expected an integer in [1, {n}] (the training "
      f"set size); got {cfg.expected_batch_size}."
    )
  del objective  # DP-SGD differentiates the per-example loss instead.
  rate = cfg.expected_batch_size / n
  padded = privacy.padded_batch_size(n, rate)
  devices = task.data_devices()
  padded = -(-padded // devices) * devices  # more padding, so the batch splits evenly

  def make(key):  # the noise key lives in the state; ``key`` only seeds it at init
    return dp_sgd(
      cfg.learning_rate,
      l2_norm_clip=cfg.l2_norm_clip,
      noise_multiplier=cfg.noise_multiplier,
      key=key,
      expected_batch_size=cfg.expected_batch_size,
      momentum=cfg.momentum,
    )

  def step(params, state, data_key, t):
    tx = make(jax.random.key(0))
    sample = privacy.poisson_sample(jax.random.fold_in(data_key, t), n, rate, padded)
    batch = jax.tree.map(lambda a: a[sample.indices], task.train_data)
    batch, is_padding = task.constrain_batch((batch, sample.is_padding))
    grads = per_example_grads(task.per_example_loss, params, batch)
    updates, state = tx.update(grads, state, params, is_padding=is_padding)
    params = optax.apply_updates(params, updates)
    diagnostics = {"batch_size": jnp.sum(~sample.is_padding), "truncated": sample.num_truncated}
    return params, state, diagnostics | state_diagnostics(state)

  def host_metrics(step):
    eps = privacy.epsilon(cfg.noise_multiplier, rate, int(step), cfg.delta)
    return {"epsilon": float(eps), "delta": cfg.delta}

  return Method(
    init=lambda params, key: make(key).init(params), step=step, host_metrics=host_metrics
  )


def _scipy_method(cfg: ScipyConfig, task: Any, objective: Callable) -> Method:
  """``scipy.optimize.minimize`` on the full-batch objective, with jitted value/grad/HVP."""
  import scipy.optimize
  from jax.flatten_util import ravel_pytree

  from curvopt.curvature.products import hvp

  if task.batch_size is not None:
    raise ConfigError("the scipy baseline needs a full-batch task (task.batch_size: null).")

  def external(params, steps, callback):
    flat0, unravel = ravel_pytree(params)
    dtype = flat0.dtype
    data = task.train_data
    f = jax.jit(lambda w: objective(unravel(w), **data))
    fg = jax.jit(jax.value_and_grad(lambda w: objective(unravel(w), **data)))
    hessp = jax.jit(lambda w, v: hvp(lambda u: objective(unravel(u), **data), w, v))
    fg(flat0), hessp(flat0, flat0), f(flat0)  # compile before the clock starts
    counter = {"it": 0}

    def fun(w):
      value, grad = fg(jnp.asarray(w, dtype))
      return float(value), np.asarray(grad, np.float64)

    def cb(wk):
      counter["it"] += 1
      if callback(unravel(jnp.asarray(wk, dtype)), counter["it"]):
        raise StopIteration

    kwargs = {}
    if cfg.method in (ScipyMethod.newton_cg, ScipyMethod.trust_ncg):
      kwargs["hessp"] = lambda w, v: np.asarray(
        hessp(jnp.asarray(w, dtype), jnp.asarray(v, dtype)), np.float64
      )
    scipy.optimize.minimize(
      fun,
      np.asarray(flat0, np.float64),
      jac=True,
      method=cfg.method.value,
      tol=cfg.tol,
      callback=cb,
      options={"maxiter": int(steps)},
      **kwargs,
    )

  return Method(init=lambda params, key: (), step=None, external=external)
