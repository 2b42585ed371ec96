"""Experiment configs: a typed schema (OmegaConf structured configs), safe YAML, dotted overrides.

A config is one comparison: a task, a list of optimisers, a budget, seeds, an evaluation cadence,
a precision and an output directory. The task and each optimiser have their own schema, chosen by
their ``name``; everything is validated before any work starts, and every error names the dotted
key path and, where it applies, the allowed keys or values.
"""

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors


class ConfigError(ValueError):
  """A config that does not match its schema; the message names the dotted key path."""


class Precision(enum.Enum):
  float32 = "float32"
  float64 = "float64"


@dataclass
class BudgetConfig:
  """How long each (optimiser, seed) run trains: ``steps``, ``seconds`` of training, or both.

  A run stops at whichever comes first; ``steps: null`` leaves only ``seconds`` (then
  required). The seconds count training only (not compilation or evaluation) and are kept to
  within one step.
  """

  steps: int | None = MISSING
  seconds: float | None = None


@dataclass
class MeshConfig:
  """Data-parallel devices: the batch of each step is split over ``num_devices`` devices.

  ``num_devices: 1`` (the default, also when the section is missing) runs on one device
  exactly as without a mesh; ``null`` uses every device (of every host). The parameters,
  optimiser state and stored data are replicated; XLA inserts the batch reductions.
  ``distributed: true`` calls ``jax.distributed.initialize()`` first (one process per host,
  all with the same config; JAX finds the processes under SLURM, Open MPI, Kubernetes or on
  TPU pods, elsewhere set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` in each process's environment); then only process 0 writes outputs.
  """

  num_devices: int | None = 1
  data_axis: str = "data"
  distributed: bool = False


@dataclass
class ExperimentConfig:
  """The top level of every config file.

  ``task`` and each entry of ``optimizers`` are validated against the schema their ``name``
  selects (a task module's ``Config``, an optimiser's hyper-parameter dataclass).
  """

  name: str = MISSING
  task: Any = None  # validated separately, against the schema named by task.name
  optimizers: Any = None  # validated separately, entry by entry
  budget: BudgetConfig = field(default_factory=BudgetConfig)
  seeds: list[int] = field(default_factory=lambda: [0])
  eval_every: int = 10
  precision: Precision = Precision.float32
  output_dir: str = "runs"
  metric: str | None = None
  target: float | None = None
  checkpoint_interval_s: float = 5.0
  progress: bool = True
  mesh: MeshConfig = field(default_factory=MeshConfig)


def _where(path: str) -> str:
  return f"config key '{path}'" if path else "config"


def _allowed_keys(schema: Any) -> str:
  return ", ".join(f.name for f in dataclasses.fields(schema))


def _reraise(err: oc_errors.OmegaConfBaseException, prefix: str, schema: Any) -> None:
  """Turns an OmegaConf error into a :class:`ConfigError` naming the full dotted key."""
  key = getattr(err, "full_key", "") or ""
  path = f"{prefix}.{key}" if prefix and key else (prefix or key)
  first_line = str(getattr(err, "msg", err)).splitlines()[0]
  if isinstance(err, oc_errors.ConfigKeyError):
    raise ConfigError(
      f"{_where(path)}: unknown key. {first_line}. Allowed keys here: "
      f"{_allowed_keys(_schema_at(schema, key))}."
    ) from None
  if isinstance(err, oc_errors.MissingMandatoryValue):
    raise ConfigError(f"{_where(path)}: a value is required and none was given.") from None
  raise ConfigError(f"{_where(path)}: {first_line}.") from None


def _schema_at(schema: Any, key: str) -> Any:
  """The dataclass owning the last component of ``key`` (for the allowed-keys list)."""
  parts = [p for p in key.replace("[", ".[").split(".") if p and not p.startswith("[")][:-1]
  for part in parts:
    types = {f.name: f.type for f in dataclasses.fields(schema)}
    sub = types.get(part)
    if not (isinstance(sub, type) and dataclasses.is_dataclass(sub)):
      return schema
    schema = sub
  return schema


def _validate(schema: Any, raw: Any, prefix: str) -> DictConfig:
  """Merges ``raw`` into the structured ``schema``; errors carry ``prefix`` + the key path."""
  if not isinstance(raw, Mapping | DictConfig):
    raise ConfigError(f"{_where(prefix)}: expected a mapping of keys to values, got {raw!r}.")
  try:
    node = OmegaConf.merge(OmegaConf.structured(schema), raw)
  except oc_errors.OmegaConfBaseException as err:
    _reraise(err, prefix, schema)
  missing = sorted(OmegaConf.missing_keys(node))
  if missing:
    path = f"{prefix}.{missing[0]}" if prefix else missing[0]
    raise ConfigError(f"{_where(path)}: a value is required and none was given.")
  return node


def _named_schema(raw: Any, prefix: str, registry: Mapping[str, Any], what: str) -> Any:
  if not isinstance(raw, Mapping | DictConfig):
    raise ConfigError(f"{_where(prefix)}: expected a mapping with a 'name' key, got {raw!r}.")
  name = raw.get("name", None)
  if name is None:
    raise ConfigError(
      f"{_where(prefix + '.name')}: a value is required; allowed {what}s: {sorted(registry)}."
    )
  if name not in registry:
    raise ConfigError(
      f"{_where(prefix + '.name')}: unknown {what} {name!r}; allowed values: {sorted(registry)}."
    )
  return registry[name]


@dataclass
class Config:
  """A validated experiment: the top level, the task's config and each optimiser's config."""

  experiment: ExperimentConfig
  task: Any
  optimizers: list[Any]

  def to_yaml(self) -> str:
    node = OmegaConf.structured(self.experiment)
    node.task = OmegaConf.structured(self.task)
    node.optimizers = [OmegaConf.structured(o) for o in self.optimizers]
    return OmegaConf.to_yaml(node)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
  """Parses ``dotted.key=value`` strings; values are read as YAML (safely).

  Examples:
    >>> parse_overrides(["budget.steps=100", "optimizers.0.name=adam", "seeds=[1, 2]"])
    [('budget.steps', 100), ('optimizers.0.name', 'adam'), ('seeds', [1, 2])]
  """
  parsed = []
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ConfigError(
        f"override {item!r} is not of the form dotted.key=value (e.g. budget.steps=100)."
      )
    try:
      parsed.append((key.strip(), yaml.safe_load(value) if value else None))
    except yaml.YAMLError as err:
      raise ConfigError(f"override {item!r}: value is not valid YAML ({err}).") from None
  return parsed


def load_config(
  source: str | Mapping[str, Any],
  overrides: Sequence[str] = (),
  *,
  tasks: Mapping[str, Any],
  optimizers: Mapping[str, Any],
) -> Config:
  """Loads, overrides and validates a config before any work starts.

  Args:
    source: path of a YAML file (loaded with a safe loader), or an already-parsed mapping.
    overrides: ``dotted.key=value`` strings applied before validation; list entries are
      addressed by index, ``optimizers.0.learning_rate=0.1``.
    tasks: task name -> its config dataclass, or a zero-argument callable returning it (lazy
      import of the task module).
    optimizers: optimiser name -> its hyper-parameter dataclass (or a registry entry with a
      ``schema`` attribute, as :data:`curvopt.launcher.optimizers.OPTIMIZERS` holds).

  Returns:
    A :class:`Config` of dataclass instances.

  Raises:
    ConfigError: with the dotted key path for unknown keys, wrong types, missing required values
      and unknown choices (listing the allowed values).
  """
  if isinstance(source, str):
    try:
      raw = OmegaConf.load(source)  # OmegaConf's loader is a yaml.SafeLoader subclass.
    except (OSError, yaml.YAMLError) as err:
      raise ConfigError(f"cannot read config {source!r}: {err}") from None
  else:
    raw = OmegaConf.create(dict(source))
  if not isinstance(raw, DictConfig):
    raise ConfigError(f"config {source!r} must be a mapping at the top level.")
  for key, value in parse_overrides(overrides):
    try:
      OmegaConf.update(raw, key, value, merge=False, force_add=True)
    except (oc_errors.OmegaConfBaseException, IndexError, ValueError) as err:
      raise ConfigError(f"override {key}={value!r} cannot be applied: {err}") from None

  if isinstance(raw.get("seeds", None), int):  # seeds=0 means seeds=[0]
    raw.seeds = [raw.seeds]
  raw_task = raw.pop("task", None) if "task" in raw else None
  raw_opts = raw.pop("optimizers", None) if "optimizers" in raw else None
  top = _validate(ExperimentConfig, raw, "")
  if raw_task is None:
    raise ConfigError(f"config key 'task': a value is required; allowed tasks: {sorted(tasks)}.")
  if raw_opts is None:
    raise ConfigError(
      f"config key 'optimizers': a list is required; allowed optimisers: {sorted(optimizers)}."
    )
  task_schema = _named_schema(raw_task, "task", tasks, "task")
  if not dataclasses.is_dataclass(task_schema):
    task_schema = task_schema()
  task = OmegaConf.to_object(_validate(task_schema, raw_task, "task"))
  if not isinstance(raw_opts, ListConfig | list) or not raw_opts:
    raise ConfigError(
      f"config key 'optimizers': expected a non-empty list of mappings, got {raw_opts!r}."
    )
  opts = []
  for i, raw_opt in enumerate(raw_opts):
    schema = _named_schema(raw_opt, f"optimizers[{i}]", optimizers, "optimiser")
    schema = getattr(schema, "schema", schema)  # a registry entry, or the schema itself
    opts.append(OmegaConf.to_object(_validate(schema, raw_opt, f"optimizers[{i}]")))
  experiment = OmegaConf.to_object(top)
  _check_values(experiment, opts)
  return Config(experiment=experiment, task=task, optimizers=opts)


def _check_values(experiment: ExperimentConfig, opts: list[Any]) -> None:
  checks: list[tuple[str, bool, str]] = [
    ("name", bool(experiment.name.strip()), "a non-empty run name"),
    (
      "budget.steps",
      experiment.budget.steps is None or experiment.budget.steps >= 1,
      "an integer >= 1 (or null with budget.seconds set)",
    ),
    ("eval_every", experiment.eval_every >= 1, "an integer >= 1"),
    ("seeds", len(experiment.seeds) >= 1, "a non-empty list of integers"),
    ("checkpoint_interval_s", experiment.checkpoint_interval_s >= 0, "a number >= 0"),
    (
      "mesh.num_devices",
      experiment.mesh.num_devices is None or experiment.mesh.num_devices >= 1,
      "an integer >= 1, or null for every device",
    ),
    ("mesh.data_axis", bool(experiment.mesh.data_axis.strip()), "a non-empty axis name"),
  ]
  if experiment.budget.seconds is not None:
    checks.append(("budget.seconds", experiment.budget.seconds > 0, "a number > 0 or null"))
  else:
    checks.append(
      ("budget.steps", experiment.budget.steps is not None, "an integer >= 1 (no seconds set)")
    )
  for key, ok, expected in checks:
    if not ok:
      raise ConfigError(f"config key '{key}': expected {expected}.")
  for i, opt in enumerate(opts):
    check_options(opt, f"optimizers[{i}]")
  seen: dict[str, int] = {}
  for i, opt in enumerate(opts):
    label = label_of(opt)
    if label in seen:
      raise ConfigError(
        f"config key 'optimizers[{i}].label': label {label!r} is already used by "
        f"optimizers[{seen[label]}]; give each entry a distinct label."
      )
    seen[label] = i


def check_options(opt: Any, path: str) -> None:
  """Rejects values outside a field's choices and non-positive learning rates.

  An optimiser schema may carry ``choices``, a table of field -> allowed values (those derived
  from ``Literal`` annotations); ``learning_rate`` must be a number > 0 wherever it is set.
  """
  for field_name, allowed in getattr(type(opt), "choices", {}).items():
    value = getattr(opt, field_name)
    if isinstance(value, Mapping):
      continue  # a part given with its options, e.g. solver: {name: cg}: checked when built
    if value not in allowed:
      raise ConfigError(
        f"config key '{path}.{field_name}': invalid value {value!r}; allowed values: "
        f"{list(allowed)}."
      )
  lr = getattr(opt, "learning_rate", None)
  if isinstance(lr, int | float) and not isinstance(lr, bool) and not lr > 0:
    raise ConfigError(
      f"config key '{path}.learning_rate': expected a number > 0 (or null where the optimiser "
      f"allows it); got {lr!r}."
    )


def label_of(opt: Any) -> str:
  """The display name of an optimiser entry: its ``label``, else its ``name``.

  A label may quote the entry's own values, so that it follows overrides:
  ``label: "dp_sgd σ={noise_multiplier}"``.

  Examples:
    >>> from types import SimpleNamespace
    >>> label_of(SimpleNamespace(name="dp_sgd", label="σ={noise_multiplier}", noise_multiplier=2.0))
    'σ=2.0'
  """
  if not opt.label:
    return opt.name
  try:
    return opt.label.format(**vars(opt))
  except (KeyError, IndexError, ValueError) as err:
    raise ConfigError(
      f"config key 'label': {opt.label!r} quotes an unknown option ({err}); use {{field}} with "
      f"one of {sorted(vars(opt))}, or double the braces for a literal brace."
    ) from None
