"""The runner: trains every (optimiser, seed) pair, evaluates, logs, checkpoints and resumes.

Each optimiser's training loop is one compiled program, ``fori_loop`` over the steps between two
evaluations, compiled ahead of time once (so it cannot recompile). The batch of step ``t`` is a
pure function of the seed and ``t``; checkpoints (Orbax) hold the parameters, the optimiser
state, the step and the training time, so a resumed run continues exactly where the
checkpoint left it and ends with the same metrics as an uninterrupted run.
"""

import dataclasses
import datetime
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt import sharding
from curvopt.experiment import config as config_lib
from curvopt.experiment import optimizers as opt_lib
from curvopt.experiment import plots, records
from curvopt.experiment.config import Config, ConfigError, label_of


@dataclass
class RunHooks:
  """Callbacks into a run, for tests and tools (all optional).

  Attributes:
    on_trace: called with the optimiser's label each time its training loop is traced.
    after_eval: called with the number of evaluations so far, after each is logged.
  """

  on_trace: Callable[[str], None] | None = None
  after_eval: Callable[[int], None] | None = None


@dataclass
class TaskEntry:
  """A task family: its config schema, and ``build(cfg, dtype) -> Task``."""

  schema: type
  build: Callable[[Any, Any], Any]


@dataclass
class RunResult:
  run_dir: str
  records: list[dict]
  summary: str
  figure: Any = None


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def new_run_dir(output_dir: str, name: str) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = os.path.join(output_dir, _slug(name), stamp)
  path, i = base, 1
  while os.path.exists(path):
    path, i = f"{base}-{i}", i + 1
  os.makedirs(path)
  return path


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (unless a cache directory is already set).

  Repeated runs of a config, and runs of configs sharing a model, then skip most of their
  compile time. The directory is ``path``, else ``$CURVOPT_COMPILATION_CACHE``, else
  ``~/.cache/curvopt/jax``.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = (
    path
    or os.environ.get("CURVOPT_COMPILATION_CACHE")
    or os.path.join(os.path.expanduser("~"), ".cache", "curvopt", "jax")
  )
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


def _set_precision(precision: config_lib.Precision) -> Any:
  if precision is config_lib.Precision.float64:
    if not jax.config.jax_enable_x64:
      jax.config.update("jax_enable_x64", True)
    return jnp.float64
  return jnp.float32


def make_mesh(mesh_cfg: config_lib.MeshConfig) -> Any:
  """The data-parallel mesh of a config's ``mesh:`` section, ``None`` for one device.

  Calls ``jax.distributed.initialize()`` first when ``distributed`` is set (before any other
  use of JAX's backends). Errors name the config key.
  """
  if mesh_cfg.distributed and not jax.distributed.is_initialized():
    # JAX reads JAX_COORDINATOR_ADDRESS itself and detects SLURM, Open MPI, Kubernetes and
    # TPU pods; elsewhere the process count and id come from these two variables.
    env = {k: os.environ.get(f"JAX_{k.upper()}") for k in ("num_processes", "process_id")}
    jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v})
  available = jax.device_count()
  n = available if mesh_cfg.num_devices is None else mesh_cfg.num_devices
  if n > available:
    raise ConfigError(
      f"config key 'mesh.num_devices': {n} devices requested but {available} available "
      f"({jax.default_backend()}); use mesh.num_devices<={available} or null for all of them. "
      "On CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N set "
      "before the launcher starts; on several hosts set mesh.distributed=true."
    )
  if jax.process_count() > 1 and n != available:
    raise ConfigError(
      f"config key 'mesh.num_devices': {n} of {available} devices in a {jax.process_count()}-"
      "process run; every process must take part, so use null (all devices)."
    )
  if n == 1:
    return None
  return sharding.data_mesh(n, mesh_cfg.data_axis)


def _check_batch_splits(task: Any) -> None:
  """Rejects a mesh that does not divide every leaf of the task's batch (before any work)."""
  d = task.data_devices()
  if d == 1:
    return
  shapes = jax.eval_shape(task.batch, jax.random.key(0), jnp.int32(0))
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    size = leaf.shape[0] if leaf.ndim else d
    if size % d:
      keys = [
        f"task.{f.name}"
        for f in dataclasses.fields(task.cfg)
        if type(getattr(task.cfg, f.name)) is int and getattr(task.cfg, f.name) == size
      ]
      what = " or ".join(keys) or "task.batch_size (the whole training set is the batch now)"
      raise ConfigError(
        f"config key 'mesh.num_devices': the task's batch{jax.tree_util.keystr(path)} has "
        f"{size} examples, not a multiple of the {d} devices; set {what} to a multiple of "
        f"{d}, or mesh.num_devices to a divisor of {size}."
      )


def _placer(mesh: Any) -> Callable[[Any], Any]:
  """Puts a ``(params, state, diagnostics)`` carry on the mesh: replicated, sharded leaves kept."""
  if mesh is None:
    return lambda carry: carry

  def place(carry):
    # PRNG keys travel as their uint32 data: a multi-process run places plain arrays only.
    like = carry
    carry = sharding.place_state(jax.tree.map(_key_data, carry), mesh)
    return jax.tree.map(_unkey, carry, like)

  return place


def _agree_run_dir(run_dir: str | None) -> str | None:
  """In a multi-process run every process uses process 0's run directory."""
  if jax.process_count() == 1:
    return run_dir
  from jax.experimental import multihost_utils

  raw = np.zeros(4096, np.uint8)
  if jax.process_index() == 0 and run_dir is not None:
    data = run_dir.encode()
    raw[: len(data)] = np.frombuffer(data, np.uint8)
  raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
  return bytes(raw[raw != 0]).decode() or None


def _is_key(leaf: Any) -> bool:
  return jnp.issubdtype(getattr(leaf, "dtype", None) or np.float32, jax.dtypes.prng_key)


def _key_data(leaf: Any) -> Any:
  """Typed PRNG keys are saved as their raw ``uint32`` data."""
  return jax.random.key_data(leaf) if _is_key(leaf) else leaf


def _unkey(data: Any, like: Any) -> Any:
  if _is_key(like):
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))
  return data


class _Checkpoints:
  """Orbax checkpoints of one (optimiser, seed) run: flat leaves + step + training time."""

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, tree: Any, wall: float, finished: bool) -> None:
    leaves = [_key_data(leaf) for leaf in jax.tree.leaves(tree)]
    item = {
      "leaves": {str(i): leaf for i, leaf in enumerate(leaves)},
      "step": np.asarray(step, np.int64),
      "wall": np.asarray(wall, np.float64),
      "finished": np.asarray(int(finished), np.int64),
    }
    self.manager.save(step, args=self._ocp.args.StandardSave(item), force=True)
    self.manager.wait_until_finished()

  def restore(self, like: Any) -> tuple[Any, int, float, bool]:
    leaves, treedef = jax.tree.flatten(like)
    target = {
      "leaves": {str(i): _key_data(leaf) for i, leaf in enumerate(leaves)},
      "step": np.asarray(0, np.int64),
      "wall": np.asarray(0.0, np.float64),
      "finished": np.asarray(0, np.int64),
    }
    out = self.manager.restore(
      self.manager.latest_step(), args=self._ocp.args.StandardRestore(target)
    )
    restored = [_unkey(out["leaves"][str(i)], leaf) for i, leaf in enumerate(leaves)]
    tree = jax.tree.unflatten(treedef, restored)
    return tree, int(out["step"]), float(out["wall"]), bool(int(out["finished"]))

  def close(self) -> None:
    self.manager.close()


@dataclass
class _Setup:
  """Everything a run needs, built and validated before any training."""

  cfg: Config
  task: Any
  methods: list[Any]
  metric: str
  run_dir: str
  log: records.MetricsLog
  runs: list[tuple[Any, Any, int]]
  ckpts: dict[tuple[str, int], "_Checkpoints"]
  mesh: Any
  main_process: bool


def setup_run(
  cfg: Config, task_entry: TaskEntry, *, run_dir: str | None = None, resume: bool = False
) -> _Setup:
  """Builds the task and every optimiser (rejecting bad values) and prepares the run directory."""
  exp = cfg.experiment
  dtype = _set_precision(exp.precision)
  mesh = make_mesh(exp.mesh)
  main_process = jax.process_index() == 0
  task = task_entry.build(cfg.task, dtype).on_mesh(mesh, exp.mesh.data_axis)
  _check_batch_splits(task)
  methods = [
    opt_lib.build_method(opt, task, f"optimizers[{i}]") for i, opt in enumerate(cfg.optimizers)
  ]
  params_like = jax.eval_shape(task.init_params, jax.random.key(0))
  eval_keys = sorted(
    k for k, v in jax.eval_shape(task.evaluate, params_like).items() if not v.shape
  )
  metric = exp.metric or task.metric
  if metric not in eval_keys:
    raise ConfigError(
      f"config key 'metric': invalid value {metric!r}; this task reports {eval_keys}."
    )

  if run_dir is None and main_process:
    run_dir = new_run_dir(exp.output_dir, exp.name)
  run_dir = _agree_run_dir(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  if not resume and main_process:
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
      f.write(cfg.to_yaml())
  log = records.MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
  runs = [
    (opt, method, seed)
    for opt, method in zip(cfg.optimizers, methods, strict=True)
    for seed in exp.seeds
  ]
  ckpts = {
    (label_of(o), s): _Checkpoints(
      os.path.join(run_dir, "checkpoints", f"{_slug(label_of(o))}-seed{s}")
    )
    for o, _, s in runs
  }
  if resume and main_process:
    # Keep only what the checkpoints cover: later records are recomputed identically.
    latest = {k: c.latest_step() for k, c in ckpts.items()}
    log.keep(
      lambda r: (
        latest.get((r["optimizer"], r["seed"])) is not None
        and r["step"] <= latest[(r["optimizer"], r["seed"])]
      )
    )
  return _Setup(cfg, task, methods, metric, run_dir, log, runs, ckpts, mesh, main_process)


def train(setup: _Setup, hooks: RunHooks | None = None) -> None:
  """Trains every (optimiser, seed) pair of ``setup``, logging and checkpointing as it goes."""
  hooks = hooks or RunHooks()
  exp, task = setup.cfg.experiment, setup.task
  evaluate = jax.jit(task.evaluate)
  compiled: dict[str, Any] = {}  # label -> compiled training loop, shared by the seeds
  place = _placer(setup.mesh)
  progress = _progress(
    exp.progress and setup.main_process, sum(_Budget(exp, o).steps for o, _, _ in setup.runs)
  )
  num_evals = 0
  try:
    for opt, method, seed in setup.runs:
      label = label_of(opt)

      def log_eval(params, step, wall, diagnostics, opt=opt, method=method, seed=seed, **extra):
        nonlocal num_evals
        values = jax.device_get(evaluate(params))
        num_evals += 1
        if setup.main_process:  # every process evaluates (one SPMD program); one writes
          _write_record(setup, opt, method, seed, step, wall, values, diagnostics, extra)
        if hooks.after_eval is not None:
          hooks.after_eval(num_evals)

      run = _run_external if method.external is not None else _run_compiled
      run(
        task,
        method,
        seed,
        _Budget(exp, opt),
        compiled,
        setup.ckpts[(label, seed)],
        log_eval,
        progress,
        label,
        place,
        hooks.on_trace,
      )
  finally:
    if progress is not None:
      progress.close()
    for c in setup.ckpts.values():
      c.close()


def _write_record(setup, opt, method, seed, step, wall, values, diagnostics, extra) -> None:
  label = label_of(opt)
  rec = {"optimizer": label, "seed": seed, "step": int(step), "wall_time": wall}
  rec.update(extra)
  rec.update({k: records.to_python(v) for k, v in values.items() if np.ndim(v) == 0})
  arrays = {k: np.asarray(v) for k, v in values.items() if np.ndim(v) > 0}
  if arrays:  # non-scalar evaluations (e.g. a spectral density) go to arrays/*.npz
    os.makedirs(os.path.join(setup.run_dir, "arrays"), exist_ok=True)
    name = f"{_slug(label)}-seed{seed}-step{int(step):07d}.npz"
    np.savez(os.path.join(setup.run_dir, "arrays", name), **arrays)
  rec.update({k: records.to_python(v) for k, v in jax.device_get(diagnostics).items()})
  rec.update(method.host_metrics(step))
  setup.log.append(rec)


def summarise(setup: _Setup, *, echo: bool = True) -> RunResult:
  """The summary table, ``summary.md`` and the comparison plot of a finished run."""
  exp, task, metric, run_dir = setup.cfg.experiment, setup.task, setup.metric, setup.run_dir
  if not setup.main_process:
    return RunResult(run_dir=run_dir, records=[], summary="")
  recs = setup.log.read()
  extra = [m for m in task.summary_metrics if m != metric]
  extra += [m for m in ("epsilon", "compile_time") if any(m in r for r in recs)]
  rows = records.summarize(
    recs, metric, higher_is_better=task.higher_is_better, target=exp.target, extra_metrics=extra
  )
  table = records.summary_markdown(
    rows, metric, target=exp.target, extra_metrics=extra, higher_is_better=task.higher_is_better
  )
  best = records.best_row(rows, task.higher_is_better)
  header = (
    f"## {exp.name}\n\ntask: {setup.cfg.task.name} · precision: {exp.precision.value} · "
    f"seeds: {list(exp.seeds)} · budget: {exp.budget.steps} steps"
    + (f" / {exp.budget.seconds:g} s" if exp.budget.seconds else "")
    + f" · device: {jax.devices()[0].device_kind}"
    + (f" · mesh: {dict(setup.mesh.shape)}" if setup.mesh is not None else "")
    + "\n\n"
  )
  which = "highest" if task.higher_is_better else "lowest"
  footer = f"\n{which} final {metric}: **{best}**\n" if best else ""
  report = task.report(run_dir, recs)
  summary = header + table + footer + (("\n" + report) if report else "")
  with open(os.path.join(run_dir, "summary.md"), "w") as f:
    f.write(summary)

  values = [r.get(metric) for r in recs if r.get(metric) is not None]
  log_y = ("loss" in metric or "mse" in metric or "error" in metric) and min(values, default=0) > 0
  fig = plots.comparison_figure(recs, metric, title=exp.name, log_y=log_y)
  plots.save_figure(fig, os.path.join(run_dir, "comparison.png"))
  if echo:
    print(summary)
    print(f"run directory: {run_dir}")
  return RunResult(run_dir=run_dir, records=recs, summary=summary, figure=fig)


def run_experiment(
  cfg: Config,
  task_entry: TaskEntry,
  *,
  run_dir: str | None = None,
  resume: bool = False,
  echo: bool = True,
  hooks: RunHooks | None = None,
) -> RunResult:
  """Runs the comparison described by ``cfg`` and writes its run directory.

  :func:`setup_run` (build and validate), :func:`train`, then :func:`summarise`.

  Args:
    cfg: a validated :class:`~curvopt.experiment.config.Config`.
    task_entry: the task family named by ``cfg.task.name``.
    run_dir: where to write; a fresh ``output_dir/<name>/<timestamp>/`` when ``None``.
    resume: continue the runs in ``run_dir`` from their checkpoints.
    echo: print the summary table.
    hooks: optional :class:`RunHooks` (tests count traces and interrupt runs with them).

  Returns:
    A :class:`RunResult` with the run directory, the metric records and the summary.
  """
  setup = setup_run(cfg, task_entry, run_dir=run_dir, resume=resume)
  train(setup, hooks)
  return summarise(setup, echo=echo)


def _progress(enabled: bool, total: int):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


class _Budget:
  """Steps, evaluation cadence, seconds and checkpoint interval of one optimiser entry."""

  def __init__(self, exp, opt):
    self.steps = opt.steps or exp.budget.steps
    self.every = opt.eval_every or exp.eval_every
    self.seconds = exp.budget.seconds
    self.checkpoint_interval_s = exp.checkpoint_interval_s

  def done(self, step: int, wall: float) -> bool:
    return step >= self.steps or (self.seconds is not None and wall >= self.seconds)


def _keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keys of the initial parameters, the data order and the optimiser (e.g. DP noise)."""
  init_key, data_key, opt_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, data_key, opt_key


def _run_compiled(
  task, method, seed, budget, cache, ck, log_eval, progress, label, place, on_trace
) -> None:
  steps, every = budget.steps, budget.every
  init_key, data_key, opt_key = _keys(seed)
  params = place(task.init_params(init_key))
  state = method.init(params, opt_key)
  diag_like = jax.eval_shape(method.step, params, state, data_key, jnp.int32(0))[2]
  diagnostics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), diag_like)
  (params, state, diagnostics), data_key = place(((params, state, diagnostics), data_key))
  step, wall = 0, 0.0
  if ck.latest_step() is not None:  # restore targets carry the mesh shardings
    (params, state, diagnostics), step, wall, finished = ck.restore((params, state, diagnostics))
    params, state, diagnostics = place((params, state, diagnostics))
    if progress is not None:
      progress.update(step)
    if finished:
      if progress is not None:
        progress.update(steps - step)
      return
  else:
    log_eval(params, 0, 0.0, {})  # no optimiser diagnostics before the first step

  def train_loop(carry, data_key, start, num_steps):
    if on_trace is not None:
      on_trace(label)

    def body(i, carry):
      return method.step(*carry[:2], data_key, start + i)

    return jax.lax.fori_loop(0, num_steps, body, carry)

  carry = (params, state, diagnostics)
  if label not in cache:  # compiled once per optimiser: seeds differ only in the arguments
    tic = time.perf_counter()
    jit_kwargs = {}
    if task.mesh is not None:  # outputs placed like inputs, so every call fits the program
      jit_kwargs["out_shardings"] = jax.tree.map(lambda a: a.sharding, carry)
    lowered = jax.jit(train_loop, **jit_kwargs).lower(carry, data_key, jnp.int32(0), jnp.int32(1))
    cache[label] = (lowered.compile(), time.perf_counter() - tic)
  compiled, compile_time = cache[label]
  last_save = time.perf_counter()
  while not budget.done(step, wall):
    n = min(every, steps - step)
    tic = time.perf_counter()
    carry = jax.block_until_ready(compiled(carry, data_key, jnp.int32(step), jnp.int32(n)))
    wall += time.perf_counter() - tic
    step += n
    if progress is not None:
      progress.set_description(label)
      progress.update(n)
    log_eval(carry[0], step, wall, carry[2], compile_time=compile_time)
    finished = budget.done(step, wall)
    if finished or time.perf_counter() - last_save >= budget.checkpoint_interval_s:
      ck.save(step, carry, wall, finished)
      last_save = time.perf_counter()
  if progress is not None and step < steps:
    progress.update(steps - step)


def _run_external(
  task, method, seed, budget, cache, ck, log_eval, progress, label, place, on_trace
) -> None:
  """Host-side baselines (scipy): rerun from the start unless a finished checkpoint exists."""
  del cache, place, on_trace  # nothing is compiled as one program here
  steps, every = budget.steps, budget.every
  init_key, _, _ = _keys(seed)
  params = task.init_params(init_key)
  if ck.latest_step() is not None:
    _, _, _, finished = ck.restore(params)
    if finished:
      if progress is not None:
        progress.update(steps)
      return
  log_eval(params, 0, 0.0, {})
  clock = {"start": time.perf_counter(), "eval": 0.0, "step": 0, "params": params}

  def callback(p, it):
    clock["step"], clock["params"] = it, p
    wall = time.perf_counter() - clock["start"] - clock["eval"]
    if progress is not None:
      progress.set_description(label)
      progress.update(1)
    if it % every == 0 or it == steps:
      tic = time.perf_counter()
      log_eval(p, it, wall, {})
      clock["eval"] += time.perf_counter() - tic
      clock["logged"] = it
    return budget.seconds is not None and wall >= budget.seconds

  method.external(params, steps, callback)
  wall = time.perf_counter() - clock["start"] - clock["eval"]
  if clock.get("logged") != clock["step"]:
    log_eval(clock["params"], clock["step"], wall, {})
  if progress is not None:
    progress.update(max(steps - clock["step"], 0))
  ck.save(clock["step"], clock["params"], wall, True)


def main(
  argv: Sequence[str],
  *,
  tasks: Mapping[str, Callable[[], TaskEntry]],
  prog: str = "run.py",
  hooks: RunHooks | None = None,
) -> int:
  """Command line: ``run.py CONFIG.yaml [dotted.key=value ...]`` or ``run.py --resume RUN_DIR``.

  Args:
    argv: the arguments after the program name.
    tasks: task name -> zero-argument loader of its :class:`TaskEntry` (modules are imported
      only when their task is used).
    prog: program name for the usage message.
    hooks: optional :class:`RunHooks` passed to :func:`run_experiment`.

  Returns:
    The exit status: 0 on success, 2 for a config error.
  """
  import argparse

  parser = argparse.ArgumentParser(
    prog=prog, description="Run an optimiser comparison described by a YAML config."
  )
  parser.add_argument("config", nargs="?", help="path of the YAML config")
  parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
  parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
  args = parser.parse_args(argv)
  if args.resume and args.config and args.config.endswith((".yaml", ".yml")):
    parser.error("--resume takes the run directory's own config.yaml; give no config file.")
  overrides = list(args.overrides)
  if args.resume:
    if args.config:  # argparse put the first override in `config`
      overrides.insert(0, args.config)
    if overrides:
      parser.error("--resume continues a run exactly as configured; overrides are not allowed.")
    source = os.path.join(args.resume, "config.yaml")
  elif args.config is None:
    parser.error("a config file is required (e.g. configs/quickstart.yaml), or --resume RUN_DIR.")
  else:
    source = args.config

  schemas = _LazySchemas(tasks)
  try:
    cfg = config_lib.load_config(source, overrides, tasks=schemas, optimizers=opt_lib.OPTIMIZERS)
    enable_compilation_cache()
    run_experiment(
      cfg, tasks[cfg.task.name](), run_dir=args.resume, resume=bool(args.resume), hooks=hooks
    )
  except ConfigError as err:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2
  return 0


class _LazySchemas(Mapping):
  """Task name -> schema, importing a task's module only when its schema is looked up."""

  def __init__(self, tasks: Mapping[str, Callable[[], TaskEntry]]):
    self._tasks = tasks

  def __getitem__(self, name):
    return self._tasks[name]().schema

  def __iter__(self):
    return iter(self._tasks)

  def __len__(self):
    return len(self._tasks)
