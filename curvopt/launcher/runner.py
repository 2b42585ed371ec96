"""The runner: trains every (optimiser, seed) pair, evaluates, logs, checkpoints and resumes.

Each optimiser's training loop is one compiled program, ``fori_loop`` over a number of steps given
at run time, compiled ahead of time once (so it cannot recompile). The runner calls it in chunks of
about :data:`~curvopt.launcher.pacing.CHUNK_SECONDS` of training (never past the next evaluation),
paced from the measured time per step: a seconds budget is then kept to within one step, Ctrl-C is
answered within a chunk, and the progress bar moves. The batch of step ``t`` is a pure function of
the seed and ``t``, and every step runs the same compiled body, so the chunking does not change the
results. Checkpoints (Orbax) hold the parameters, the optimiser state, the step and the training
time, so a resumed run continues exactly where the checkpoint left it and ends with the same metrics
as an uninterrupted run.
"""

import dataclasses
import datetime
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt import sharding
from curvopt.launcher import config as config_lib
from curvopt.launcher import interrupt, pacing, plots, records
from curvopt.launcher import optimizers as opt_lib
from curvopt.launcher.config import Config, ConfigError, label_of


@dataclass
class RunHooks:
  """Callbacks into a run, for tests and tools (all optional).

  Attributes:
    on_trace: called with the optimiser's label each time its training loop is traced.
    after_eval: called with the number of evaluations so far, after each is logged.
    should_stop: polled between two compiled calls; when it returns ``True`` the run saves a
      checkpoint and :func:`train` returns ``False`` (what Ctrl-C does on the command line).
  """

  on_trace: Callable[[str], None] | None = None
  after_eval: Callable[[int], None] | None = None
  should_stop: Callable[[], bool] | None = None


@dataclass
class TaskEntry:
  """A task family: its config schema, and ``build(cfg, dtype) -> Task``."""

  schema: type
  build: Callable[[Any, Any], Any]


@dataclass
class RunResult:
  """What :func:`run_experiment` returns; ``interrupted`` runs have no summary yet."""

  run_dir: str
  records: list[dict]
  summary: str
  figure: Any = None
  interrupted: bool = False


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


@dataclass
class _Run:
  """One (optimiser, seed) run: what :func:`_run_compiled` and :func:`_run_external` need."""

  task: Any
  method: Any
  seed: int
  label: str
  budget: pacing.Budget
  ck: "_Checkpoints"
  log_eval: Callable[..., None]
  progress: pacing.Progress
  compiled: dict[str, Any]  # label -> (compiled training loop, compile time), shared by seeds
  place: Callable[[Any], Any]
  on_trace: Callable[[str], None] | None
  should_stop: Callable[[], bool]


def train(setup: _Setup, hooks: RunHooks | None = None) -> bool:
  """Trains every (optimiser, seed) pair of ``setup``, logging and checkpointing as it goes.

  Returns:
    ``True`` when every run finished; ``False`` when ``hooks.should_stop`` stopped them (the
    run in progress saved a checkpoint, later ones did not start).
  """
  hooks = hooks or RunHooks()
  exp, task = setup.cfg.experiment, setup.task
  evaluate = jax.jit(task.evaluate)
  compiled: dict[str, Any] = {}
  place = _placer(setup.mesh)
  budgets = [pacing.Budget(exp, opt) for opt, _, _ in setup.runs]
  progress = pacing.Progress(exp.progress and setup.main_process, budgets)
  should_stop = hooks.should_stop or (lambda: False)
  num_evals = 0
  try:
    for (opt, method, seed), budget in zip(setup.runs, budgets, strict=True):
      if _agree([should_stop()])[0]:
        return False
      label = label_of(opt)

      def log_eval(params, step, wall, diagnostics, opt=opt, method=method, seed=seed, **extra):
        nonlocal num_evals
        values = jax.device_get(evaluate(params))
        num_evals += 1
        if setup.main_process:  # every process evaluates (one SPMD program); one writes
          _write_record(setup, opt, method, seed, step, wall, values, diagnostics, extra)
        if hooks.after_eval is not None:
          hooks.after_eval(num_evals)

      run = _Run(
        task, method, seed, label, budget, setup.ckpts[(label, seed)], log_eval, progress,
        compiled, place, hooks.on_trace, should_stop,
      )  # fmt: skip
      finished = (_run_external if method.external is not None else _run_compiled)(run)
      if not finished:
        return False
    return True
  finally:
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
  rows = records.summary_rows(
    recs, metric, higher_is_better=task.higher_is_better, target=exp.target, extra_metrics=extra
  )
  table = records.summary_markdown(
    rows, metric, target=exp.target, extra_metrics=extra, higher_is_better=task.higher_is_better
  )
  best = records.best_text(rows, metric, task.higher_is_better)
  header = (
    f"## {exp.name}\n\ntask: {setup.cfg.task.name} · precision: {exp.precision.value} · "
    f"seeds: {list(exp.seeds)} · budget: {_budget_text(exp.budget)}"
    + f" · device: {jax.devices()[0].device_kind}"
    + (f" · mesh: {dict(setup.mesh.shape)}" if setup.mesh is not None else "")
    + "\n\n"
  )
  footer = f"\n{best}\n" if best else ""
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


def _budget_text(budget: config_lib.BudgetConfig) -> str:
  parts = [f"{budget.steps} steps"] if budget.steps is not None else []
  parts += [f"{budget.seconds:g} s"] if budget.seconds is not None else []
  return " / ".join(parts) + " per run"


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
    cfg: a validated :class:`~curvopt.launcher.config.Config`.
    task_entry: the task family named by ``cfg.task.name``.
    run_dir: where to write; a fresh ``output_dir/<name>/<timestamp>/`` when ``None``.
    resume: continue the runs in ``run_dir`` from their checkpoints.
    echo: print the summary table.
    hooks: optional :class:`RunHooks` (tests count traces and interrupt runs with them).

  Returns:
    A :class:`RunResult` with the run directory, the metric records and the summary; when
    ``hooks.should_stop`` stopped the run, ``interrupted=True``, no summary, and
    ``run_experiment(cfg, task_entry, run_dir=result.run_dir, resume=True)`` continues it.
  """
  setup = setup_run(cfg, task_entry, run_dir=run_dir, resume=resume)
  if not train(setup, hooks):
    records_so_far = setup.log.read() if setup.main_process else []
    return RunResult(run_dir=setup.run_dir, records=records_so_far, summary="", interrupted=True)
  return summarise(setup, echo=echo)


def _keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keys of the initial parameters, the data order and the optimiser (e.g. DP noise)."""
  init_key, data_key, opt_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, data_key, opt_key


def _agree(values: Sequence[float]) -> list[float]:
  """Process 0's ``values`` on every process (they decide together when and how long to run)."""
  if jax.process_count() == 1:
    return list(values)
  from jax.experimental import multihost_utils

  data = np.asarray(values, np.float64)
  return np.asarray(multihost_utils.broadcast_one_to_all(data)).tolist()


def _compile_loop(run: _Run, carry: Any, data_key: Any) -> tuple[Any, float]:
  """The run's training loop ``(carry, data_key, start, num_steps) -> carry``, compiled once."""
  if run.label in run.compiled:  # compiled once per optimiser: seeds differ only in arguments
    return run.compiled[run.label]
  method, on_trace, label = run.method, run.on_trace, run.label

  def train_loop(carry, data_key, start, num_steps):
    if on_trace is not None:
      on_trace(label)

    def body(i, carry):
      return method.step(*carry[:2], data_key, start + i)

    return jax.lax.fori_loop(0, num_steps, body, carry)

  tic = time.perf_counter()
  jit_kwargs = {}
  if run.task.mesh is not None:  # outputs placed like inputs, so every call fits the program
    jit_kwargs["out_shardings"] = jax.tree.map(lambda a: a.sharding, carry)
  lowered = jax.jit(train_loop, **jit_kwargs).lower(carry, data_key, jnp.int32(0), jnp.int32(1))
  run.compiled[label] = (lowered.compile(), time.perf_counter() - tic)
  return run.compiled[label]


def _initial_carry(run: _Run) -> tuple[Any, Any, int, float, bool]:
  """``(carry, data_key, step, wall, finished)``: fresh (step 0 logged), or from a checkpoint."""
  init_key, data_key, opt_key = _keys(run.seed)
  params = run.place(run.task.init_params(init_key))
  state = run.method.init(params, opt_key)
  diag_like = jax.eval_shape(run.method.step, params, state, data_key, jnp.int32(0))[2]
  diagnostics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), diag_like)
  carry, data_key = run.place(((params, state, diagnostics), data_key))
  if run.ck.latest_step() is None:
    run.log_eval(carry[0], 0, 0.0, {})  # no optimiser diagnostics before the first step
    return carry, data_key, 0, 0.0, False
  carry, step, wall, finished = run.ck.restore(carry)  # restore targets carry the shardings
  return run.place(carry), data_key, step, wall, finished


def _run_compiled(run: _Run) -> bool:
  """Trains one run in paced chunks of its compiled loop; ``False`` if it was stopped."""
  budget = run.budget
  carry, data_key, step, wall, finished = _initial_carry(run)
  run.progress.advance(run.label, step, wall)
  if finished:
    run.progress.skip(budget, step, wall)
    return True
  compiled, compile_time = _compile_loop(run, carry, data_key)
  pacer, last_save = pacing.Pacer(budget), time.perf_counter()
  done, stop, _ = _agree([budget.done(step, wall), run.should_stop(), 0])
  while not (done or stop):
    (n,) = _agree([pacer.next(step, wall)])
    n = int(n)
    tic = time.perf_counter()
    carry = jax.block_until_ready(compiled(carry, data_key, jnp.int32(step), jnp.int32(n)))
    seconds = time.perf_counter() - tic
    wall, step = wall + seconds, step + n
    pacer.observe(n, seconds)
    run.progress.advance(run.label, n, seconds)
    save_due = time.perf_counter() - last_save >= budget.checkpoint_interval_s
    done, stop, save_due = _agree([budget.done(step, wall), run.should_stop(), save_due])
    if done or step % budget.every == 0:
      run.log_eval(carry[0], step, wall, carry[2], compile_time=compile_time)
    if done or stop or save_due:
      run.ck.save(step, carry, wall, bool(done))
      last_save = time.perf_counter()
  if done:
    run.progress.skip(budget, step, wall)
  return bool(done)


def _run_external(run: _Run) -> bool:
  """Host-side baselines (scipy): rerun from the start unless a finished checkpoint exists.

  Stopped (``should_stop``), it saves nothing: the resumed run starts it again.
  """
  budget = run.budget
  init_key, _, _ = _keys(run.seed)
  params = run.task.init_params(init_key)
  if run.ck.latest_step() is not None:
    _, _, _, finished = run.ck.restore(params)
    if finished:
      run.progress.skip(budget, 0, 0.0)
      return True
  run.log_eval(params, 0, 0.0, {})
  clock = {"start": time.perf_counter(), "eval": 0.0, "step": 0, "params": params, "wall": 0.0}

  def callback(p, it):
    wall = time.perf_counter() - clock["start"] - clock["eval"]
    run.progress.advance(run.label, it - clock["step"], wall - clock["wall"])
    clock.update(step=it, params=p, wall=wall)
    if run.should_stop():
      clock["stopped"] = True
      return True
    if it % budget.every == 0 or it == budget.steps:
      tic = time.perf_counter()
      run.log_eval(p, it, wall, {})
      clock["eval"] += time.perf_counter() - tic
      clock["logged"] = it
    return budget.seconds is not None and wall >= budget.seconds

  run.method.external(params, budget.steps or _UNBOUNDED_STEPS, callback)
  if clock.get("stopped"):
    return False
  wall = time.perf_counter() - clock["start"] - clock["eval"]
  if clock.get("logged") != clock["step"]:
    run.log_eval(clock["params"], clock["step"], wall, {})
  run.progress.skip(budget, clock["step"], wall)
  run.ck.save(clock["step"], clock["params"], wall, True)
  return True


_UNBOUNDED_STEPS = 2**31 - 1  # a host-side baseline's iteration cap under a seconds-only budget


def resume_command(script: str, run_dir: str) -> str:
  """The shell command that continues ``run_dir``: ``python SCRIPT --resume RUN_DIR``.

  ``python`` is this interpreter's path unless ``python`` on the ``PATH`` is this interpreter.
  """
  on_path = shutil.which("python")
  same = on_path is not None and os.path.abspath(on_path) == os.path.abspath(sys.executable)
  return shlex.join(["python" if same else sys.executable, script, "--resume", run_dir])


def main(
  argv: Sequence[str],
  *,
  tasks: Mapping[str, Callable[[], TaskEntry]],
  prog: str = "run.py",
  hooks: RunHooks | None = None,
) -> int:
  """Command line: ``run.py CONFIG.yaml [dotted.key=value ...]`` or ``run.py --resume RUN_DIR``.

  Ctrl-C stops the run after the step in progress with a checkpoint, prints the run directory
  and the ``--resume`` command, and returns 130; a second Ctrl-C exits at once
  (:mod:`curvopt.launcher.interrupt`).

  Args:
    argv: the arguments after the program name.
    tasks: task name -> zero-argument loader of its :class:`TaskEntry` (modules are imported
      only when their task is used).
    prog: program name for the usage message and the ``--resume`` command (the script's path
      as typed, ``sys.argv[0]``).
    hooks: optional :class:`RunHooks` passed to :func:`train`.

  Returns:
    The exit status: 0 on success, 2 for a config error, 130 when stopped by Ctrl-C.
  """
  source, overrides, resume_dir = _parse_args(argv, prog)
  hooks = hooks or RunHooks()
  stop = interrupt.StopOnInterrupt()
  with stop:
    try:
      schemas = _LazySchemas(tasks)
      cfg = config_lib.load_config(source, overrides, tasks=schemas, optimizers=opt_lib.OPTIMIZERS)
      if stop():
        print("Stopped by Ctrl-C before the run started.", file=sys.stderr)
        return interrupt.EXIT_STATUS
      enable_compilation_cache()
      setup = setup_run(cfg, tasks[cfg.task.name](), run_dir=resume_dir, resume=bool(resume_dir))
    except ConfigError as err:
      print(f"{prog}: error: {err}", file=sys.stderr)
      return 2
    command = resume_command(prog, setup.run_dir)
    stop.exit_message = f"The last checkpoint is kept; continue with:\n  {command}"
    user_stop = hooks.should_stop or (lambda: False)
    stop_hooks = dataclasses.replace(hooks, should_stop=lambda: stop() or user_stop())
    if train(setup, stop_hooks):
      summarise(setup)
      return 0
  if setup.main_process:
    print(
      f"Stopped by Ctrl-C; the checkpoints are saved.\nrun directory: {setup.run_dir}\n"
      f"resume with: {command}",
      flush=True,
    )
  return interrupt.EXIT_STATUS


def _parse_args(argv: Sequence[str], prog: str) -> tuple[str, list[str], str | None]:
  """``(config source, overrides, run directory to resume or None)`` from the command line."""
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
    return os.path.join(args.resume, "config.yaml"), [], args.resume
  if args.config is None:
    parser.error("a config file is required (e.g. configs/quickstart.yaml), or --resume RUN_DIR.")
  return args.config, overrides, None


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
