"""The optimiser registry: each name maps to its config schema and its builder.

Every entry of a config's ``optimizers`` list names one of :data:`OPTIMIZERS` and sets its
hyper-parameters; ``label`` names the line in tables and plots (it may quote the entry's values,
``label: "dp_sgd σ={noise_multiplier}"``), ``variant`` selects a task-specific objective (e.g.
TD(0) semi-gradient vs residual-gradient). Each builder returns a :class:`Method`: an ``init``
and a pure ``step`` that the runner compiles once, or, for the ``scipy`` baseline, a host-side
loop.

curvopt's own optimisers take their schema from their signature
(:func:`schema_from_signature`): every keyword option of :func:`curvopt.newton_cg` and
:func:`curvopt.dp_sgd`, with its default, is a config key, so the launcher never lags behind
the library. Adding an optimiser is one builder decorated with :func:`register_optimizer`.
"""

import dataclasses
import enum
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt._typing import Params
from curvopt.launcher.config import ConfigError


@dataclass
class OptimizerConfig:
  """Fields shared by every optimiser entry.

  ``steps`` and ``eval_every`` override the experiment's ``budget.steps`` and ``eval_every``
  for this entry (a second-order method takes fewer, costlier steps). ``batch_size`` overrides
  the task's: ``"task"`` (the default) keeps it, ``null`` trains on the full batch, an integer
  draws that many examples per step; ``shuffle: true`` permutes a full batch at every step
  (Newton-CG's ``GGN(batch_size=...)`` chunks are then fresh random samples).
  """

  name: str = "?"
  label: str | None = None
  variant: str | None = None
  steps: int | None = None
  eval_every: int | None = None
  batch_size: Any = "task"
  shuffle: bool = False


_SIMPLE = (bool, int, float, str)


def _config_type(annotation: Any) -> tuple[Any, tuple | None]:
  """An OmegaConf-compatible field type for a signature annotation, and its allowed values.

  ``Literal`` strings become ``str`` with their choices; ``X | None`` stays optional; unions
  mixing a number and literals (``float | Literal["forcing"]``), tuples and untyped values
  become ``Any`` (the optimiser validates them); callables and arrays are dropped from unions
  (a YAML file cannot hold them).

  Examples:
    >>> _config_type(float | None)
    (typing.Optional[float], None)
    >>> _config_type(Literal["a", "b"])
    (<class 'str'>, ('a', 'b'))
  """
  optional = False
  members = [annotation]
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    members = list(typing.get_args(annotation))
  if type(None) in members:
    optional = True
    members = [m for m in members if m is not type(None)]
  literals: list[Any] = []
  simple: list[type] = []
  for m in members:
    if typing.get_origin(m) is Literal:
      literals.extend(typing.get_args(m))
    elif m in _SIMPLE:
      simple.append(m)
    elif m is Any or typing.get_origin(m) in (tuple, list) or dataclasses.is_dataclass(m):
      return Any, None  # validated by the optimiser (a part value may be given as a mapping)
  if literals and not simple and all(isinstance(v, str) for v in literals):
    kind, choices = str, tuple(literals)
  elif len(simple) == 1 and not literals:
    kind, choices = simple[0], None
  else:
    return Any, None
  return (typing.Optional[kind] if optional else kind), (  # noqa: UP045 (OmegaConf)
    choices + (None,) if choices and optional else choices
  )


def schema_from_signature(
  name: str,
  fn: Callable[..., Any],
  *,
  exclude: Sequence[str] = (),
  defaults: dict[str, Any] | None = None,
  extra: Sequence[tuple[str, Any, Any]] = (),
) -> type:
  """A config dataclass with one field per keyword option of ``fn``.

  Args:
    name: the optimiser's registry name (the ``name`` field's default).
    fn: the optimiser constructor; each parameter with a default (or in ``defaults``) whose
      annotation a YAML value can hold becomes a field of that type and default.
    exclude: parameters that the builder supplies itself (e.g. ``model_fn``, ``key``).
    defaults: launcher defaults for parameters without one (or overriding ``fn``'s).
    extra: ``(field, type, default)`` for launcher-only options (e.g. a line search by name).

  Returns:
    A dataclass subclassing :class:`OptimizerConfig`; ``schema.choices`` maps fields with a
    fixed set of values to them (checked by :func:`~curvopt.launcher.config.check_options`).
  """
  defaults = defaults or {}
  fields, choices = [("name", str, dataclasses.field(default=name))], {}
  for param in inspect.signature(fn).parameters.values():
    if param.name in exclude or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
      continue
    default = defaults.get(param.name, param.default)
    if default is inspect.Parameter.empty:
      raise TypeError(f"{fn.__name__}({param.name}=...) needs a launcher default or exclude=.")
    kind, allowed = _config_type(param.annotation)
    members = typing.get_args(param.annotation) or (param.annotation,)
    takes_part = any(dataclasses.is_dataclass(m) for m in members)
    if param.name == "learning_rate" or (kind is Any and type(default) is float and not takes_part):
      kind = float  # optax.ScalarOrSchedule, or an untyped number: a number from YAML
    if isinstance(default, tuple | list):
      field = dataclasses.field(default_factory=lambda d=list(default): list(d))
    else:
      field = dataclasses.field(default=default)
    fields.append((param.name, kind, field))
    if allowed:
      choices[param.name] = allowed
  for field_name, kind, default in extra:
    fields.append((field_name, kind, dataclasses.field(default=default)))
  cls_name = "".join(p.title() for p in name.split("_")) + "Config"
  schema = dataclasses.make_dataclass(cls_name, fields, bases=(OptimizerConfig,))
  schema.choices = choices
  schema.__doc__ = f"Options of :func:`{fn.__module__}.{fn.__qualname__}` (from its signature)."
  return schema


def options_of(cfg: Any, schema_fn: Callable[..., Any], *, exclude: Sequence[str] = ()) -> dict:
  """The entries of ``cfg`` that ``schema_fn`` accepts as keyword arguments (lists as tuples)."""
  names = set(inspect.signature(schema_fn).parameters) - set(exclude)
  out = {}
  for f in dataclasses.fields(cfg):
    if f.name in names:
      value = getattr(cfg, f.name)
      out[f.name] = tuple(value) if isinstance(value, list) else value
  return out


@dataclass(frozen=True)
class OptimizerEntry:
  """A registered optimiser: its config ``schema`` and ``build(cfg, task, path) -> Method``."""

  schema: type
  build: Callable[[Any, Any, str], "Method"]


#: Optimiser name -> :class:`OptimizerEntry`.
OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register_optimizer(name: str, schema: type) -> Callable:
  """Decorator: registers ``build(cfg, task, path) -> Method`` under ``name`` with ``schema``."""

  def register(build: Callable) -> Callable:
    OPTIMIZERS[name] = OptimizerEntry(schema=schema, build=build)
    return build

  return register


def schemas() -> dict[str, type]:
  """Optimiser name -> config schema (what :func:`~curvopt.launcher.config.load_config` needs)."""
  return {name: entry.schema for name, entry in OPTIMIZERS.items()}


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


LINESEARCHES = ("none", "zoom", "backtracking")


def _linesearch(kind: str, steps: int) -> optax.GradientTransformationExtraArgs | None:
  if kind == "zoom":
    return optax.scale_by_zoom_linesearch(max_linesearch_steps=steps)
  if kind == "backtracking":
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
  """Builds the :class:`Method` for optimiser entry ``cfg`` (at config key ``path``) on ``task``.

  Values the optimiser itself rejects (a ``ValueError`` at construction) become a
  :class:`ConfigError` naming ``path``, before any training starts.
  """
  task.check_variant(f"{path}.variant", cfg.variant)
  if cfg.batch_size != "task" or cfg.shuffle:
    batch_size = task.batch_size if cfg.batch_size == "task" else cfg.batch_size
    try:
      task = task.with_batching(batch_size, cfg.shuffle)
    except ValueError as err:
      raise ConfigError(f"config key '{path}.batch_size': {err}") from None
  try:
    return OPTIMIZERS[cfg.name].build(cfg, task, path)
  except ConfigError:
    raise
  except (ValueError, TypeError) as err:
    raise ConfigError(f"config key '{path}': {err}") from None


# ------------------------------------------------------------------------------------------
# optax's optimisers (hand-written schemas: a few stable options each).


@dataclass
class SGDConfig(OptimizerConfig):
  name: str = "sgd"
  learning_rate: float = 0.1
  momentum: float | None = None
  nesterov: bool = False


@register_optimizer("sgd", SGDConfig)
def _build_sgd(cfg: SGDConfig, task: Any, path: str) -> Method:
  tx = optax.sgd(cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov)
  return optax_method(task, tx, task.objective(cfg.variant))


@dataclass
class AdamConfig(OptimizerConfig):
  name: str = "adam"
  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0


@register_optimizer("adam", AdamConfig)
def _build_adam(cfg: AdamConfig, task: Any, path: str) -> Method:
  if cfg.weight_decay:
    tx = optax.adamw(cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay)
  else:
    tx = optax.adam(cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps)
  return optax_method(task, tx, task.objective(cfg.variant))


@dataclass
class LBFGSConfig(OptimizerConfig):
  name: str = "lbfgs"
  learning_rate: float | None = None
  memory_size: int = 10
  linesearch: str = "zoom"
  max_linesearch_steps: int = 15
  choices = {"linesearch": LINESEARCHES}  # noqa: RUF012 (class-level table, not a field)


@register_optimizer("lbfgs", LBFGSConfig)
def _build_lbfgs(cfg: LBFGSConfig, task: Any, path: str) -> Method:
  tx = optax.lbfgs(
    cfg.learning_rate,
    memory_size=cfg.memory_size,
    linesearch=_linesearch(cfg.linesearch, cfg.max_linesearch_steps),
  )
  return optax_method(task, tx, task.objective(cfg.variant))


# ------------------------------------------------------------------------------------------
# curvopt's optimisers: schemas derived from their signatures.


#: Part names a config may use, and the value each builds (schemas: the classes' fields).
def _part_registries() -> dict[str, dict[str, Any]]:
  import curvopt

  return {
    "curvature": {"hessian": curvopt.Hessian, "ggn": curvopt.GGN, "fisher": curvopt.Fisher},
    "solver": {
      "auto": curvopt.Auto,
      "cg": curvopt.CG,
      "dense": curvopt.Dense,
      "dense_samples": lambda **kw: curvopt.Dense(space="samples", **kw),
      "nystrom": lambda **kw: curvopt.CG(preconditioner=curvopt.NystromPreconditioner(), **kw),
    },
    "preconditioner": {
      "martens": curvopt.MartensDiagonal,
      "nystrom": curvopt.NystromPreconditioner,
      "kfac": curvopt.KFACPreconditioner,
    },
  }


def _fields(cls: Any) -> list[str]:
  if dataclasses.is_dataclass(cls):
    return [f.name for f in dataclasses.fields(cls)]
  return [n for n in inspect.signature(cls).parameters if n != "kw"]


def part_from_config(kind: str, raw: Any, path: str) -> Any:
  """A Newton-CG part from a config value: a name, or a mapping ``{name: ..., option: ...}``.

  The allowed options are the fields of the part's own class (so the launcher never lags
  behind the library); nested parts (a CG's ``preconditioner``, an Auto's ``cg``) nest the
  same way. ``damping`` takes a number or the options of ``LevenbergMarquardt`` (no name).

  Examples:
    >>> part_from_config("solver", {"name": "cg", "max_steps": 50}, "solver").max_steps
    50
  """
  import curvopt

  if not isinstance(raw, Mapping):
    registry = _part_registries().get(kind, {})
    if isinstance(raw, str) and raw not in registry:
      raise ConfigError(
        f"config key '{path}': unknown {kind} {raw!r}; allowed values: {sorted(registry)}."
      )
    return raw  # a number or a name: newton_cg resolves it (its shortcuts may apply)
  if kind == "damping":
    name, cls, options = None, curvopt.LevenbergMarquardt, dict(raw)
  else:
    registry = _part_registries()[kind]
    options = dict(raw)
    name = options.pop("name", None)
    if name not in registry:
      raise ConfigError(
        f"config key '{path}.name': unknown {kind} {name!r}; allowed values: {sorted(registry)}."
      )
    cls = registry[name]
  allowed = _fields({"nystrom": curvopt.CG, "dense_samples": curvopt.Dense}.get(name, cls))
  for key, value in list(options.items()):
    if key not in allowed:
      raise ConfigError(f"config key '{path}.{key}': unknown option; allowed options: {allowed}.")
    if key == "preconditioner" and value is not None:
      options[key] = part_from_config("preconditioner", value, f"{path}.{key}")
    elif key == "cg":
      options[key] = part_from_config("solver", {"name": "cg", **dict(value)}, f"{path}.{key}")
    elif isinstance(value, list):
      options[key] = tuple(value)
  try:
    return cls(**options)
  except (TypeError, ValueError) as err:
    raise ConfigError(f"config key '{path}': {err}") from None


def _newton_cg_schema() -> type:
  from curvopt import newton_cg

  schema = schema_from_signature(
    "newton_cg",
    newton_cg,
    exclude=("model_fn", "loss_fn", "module", "linesearch"),
    extra=[("linesearch", str, "none"), ("max_linesearch_steps", int, 15)],
  )
  schema.choices["linesearch"] = LINESEARCHES
  for kind in ("curvature", "solver"):  # plain names; mappings are checked when built
    schema.choices[kind] = tuple(_part_registries()[kind])
  return schema


NewtonCGConfig = _newton_cg_schema()


def _curvature_name(curvature: Any) -> str:
  return curvature.get("name") if isinstance(curvature, Mapping) else curvature


@register_optimizer("newton_cg", NewtonCGConfig)
def _build_newton_cg(cfg: Any, task: Any, path: str) -> Method:
  from curvopt import newton_cg

  options = options_of(cfg, newton_cg, exclude=("model_fn", "loss_fn", "module", "linesearch"))
  for kind in ("curvature", "solver", "damping", "preconditioner"):
    if options.get(kind) is not None:
      options[kind] = part_from_config(kind, options[kind], f"{path}.{kind}")
  if _curvature_name(cfg.curvature) in ("ggn", None) or not isinstance(options["curvature"], str):
    split = task.gauss_newton_split(cfg.variant)
    if split is not None:
      options["model_fn"], options["loss_fn"] = split
    elif _curvature_name(cfg.curvature) == "ggn":
      raise ConfigError(
        f"config key '{path}.curvature': task {type(task).__name__} has no model/loss split, "
        "so curvature='ggn' is not available; use curvature: hessian."
      )
  tx = newton_cg(**options, linesearch=_linesearch(cfg.linesearch, cfg.max_linesearch_steps))
  return optax_method(task, tx, task.objective(cfg.variant))


def _dp_sgd_schema() -> type:
  from curvopt import dp_sgd

  return schema_from_signature(
    "dp_sgd",
    dp_sgd,
    exclude=("key",),
    defaults={
      "learning_rate": 0.5,
      "l2_norm_clip": 1.0,
      "noise_multiplier": 1.0,
      "expected_batch_size": 64,
    },
    extra=[("delta", float, 1e-5)],
  )


DPSGDConfig = _dp_sgd_schema()


@register_optimizer("dp_sgd", DPSGDConfig)
def _build_dp_sgd(cfg: Any, task: Any, path: str) -> Method:
  """DP-SGD with Poisson sampling, per-example gradients, and ε reported at each evaluation."""
  from curvopt import dp_sgd, per_example_grads, privacy

  if cfg.batch_size != "task" or cfg.shuffle:
    raise ConfigError(
      f"config key '{path}.batch_size': dp_sgd draws Poisson-sampled batches of "
      "expected_batch_size examples; drop batch_size and shuffle from this entry."
    )
  n = task.num_train()
  if cfg.expected_batch_size is None or not 0 < cfg.expected_batch_size <= n:
    raise ConfigError(
      f"config key '{path}.expected_batch_size': expected an integer in [1, {n}] (the training "
      f"set size); got {cfg.expected_batch_size}."
    )
  rate = cfg.expected_batch_size / n
  padded = privacy.padded_batch_size(n, rate)
  devices = task.data_devices()
  padded = -(-padded // devices) * devices  # more padding, so the batch splits evenly

  options = options_of(cfg, dp_sgd, exclude=("key",))

  def make(key):  # the noise key lives in the state; ``key`` only seeds it at init
    return dp_sgd(**options, key=key)

  make(jax.random.key(0))  # invalid values fail here, before any work

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


@register_optimizer("scipy", ScipyConfig)
def _build_scipy(cfg: ScipyConfig, task: Any, path: str) -> Method:
  """``scipy.optimize.minimize`` on the full-batch objective, with jitted value/grad/HVP."""
  objective = task.objective(cfg.variant)
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


def _kfac_schema() -> type:
  from curvopt import kfac

  # learning_rate: None (the quadratic model's, the default) or a number.
  return schema_from_signature(
    "kfac",
    kfac,
    exclude=("learning_rate", "model_fn", "loss_fn", "module", "data_like"),
    extra=[("learning_rate", typing.Optional[float], None)],  # noqa: UP045 (OmegaConf)
  )


KFACConfig = _kfac_schema()


@register_optimizer("kfac", KFACConfig)
def _build_kfac(cfg: Any, task: Any, path: str) -> Method:
  """K-FAC on the task's Gauss-Newton split; the factors are allocated from a batch's shapes."""
  from curvopt import kfac

  split = task.gauss_newton_split(cfg.variant)
  if split is None:
    raise ConfigError(
      f"config key '{path}.name': task {type(task).__name__} has no model/loss split, so "
      "kfac (whose factors are Gauss-Newton's) is not available."
    )
  options = options_of(cfg, kfac, exclude=("model_fn", "loss_fn", "module", "data_like"))
  batch_like = jax.eval_shape(task.batch, jax.random.key(0), jnp.int32(0))
  tx = kfac(**options, model_fn=split[0], loss_fn=split[1], data_like=batch_like)
  return optax_method(task, tx, task.objective(cfg.variant))
