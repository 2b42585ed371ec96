"""Tests of the launcher's ``mesh:`` section: data-parallel runs equal single-device runs.

Several devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts,
so the multi-device runs happen once, all together, in a subprocess (this file run as a
script, calling the launcher's command line ``main`` with the tasks of ``experiments/run.py``).
It writes the runs' directories and a ``facts.json``; the tests below read them. The references
are the same launcher on one device (``mesh.num_devices=1``), an uninterrupted run for the
resumed one, and the compiled program's HLO for where the reductions are.
"""

import collections
import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import yaml

# The tests that read the multi-device subprocess (a module fixture) are in the long tier;
# the checks of the mesh section in this one-device process are not.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "experiments", "run.py")
NUM_DEVICES = 4
STEPS = 6

# Digits logistic regression on mini-batches of 64 (a multiple of 4 devices), float64 so that
# reduction order shows only at round-off. DP-SGD's expected batch 62 pads to a size that the
# launcher rounds up to a multiple of the devices.
CONFIG = {
  "name": "mesh",
  "task": {"name": "logreg", "dataset": "digits", "batch_size": 64},
  "optimizers": [
    {"name": "newton_cg", "curvature": "ggn", "cg_max_steps": 10},
    {"name": "adam", "learning_rate": 0.05},
    {"name": "dp_sgd", "expected_batch_size": 62},
  ],
  "budget": {"steps": STEPS},
  "eval_every": 2,
  "seeds": [0],
  "precision": "float64",
  "progress": False,
  "checkpoint_interval_s": 0.0,
}


def _load_run_module():
  from experiments import run

  return run


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------- the sharded subprocess


def _cli(main, tasks, args, hooks=None):
  """Runs the launcher's command line; returns (exit status, stderr, stdout)."""
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    status = main(args, tasks=tasks, hooks=hooks)
  return status, err.getvalue(), out.getvalue()


def _run_dir(output_dir):
  (stamp,) = os.listdir(os.path.join(output_dir, CONFIG["name"]))
  return os.path.join(output_dir, CONFIG["name"], stamp)


def _sharded_main(out_dir):
  import jax
  import jax.numpy as jnp

  from curvopt import sharding
  from curvopt.launcher import config as config_lib
  from curvopt.launcher import optimizers as opt_lib
  from curvopt.launcher import runner

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  run = _load_run_module()
  path = os.path.join(out_dir, "mesh.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(CONFIG, f)
  facts = {"runs": {}, "errors": {}}

  def launch(tag, *overrides, hooks=None):
    output_dir = os.path.join(out_dir, tag)
    cli = [path, f"output_dir={output_dir}", *overrides]
    status, err, out = _cli(run.main, run.TASKS, cli, hooks)
    assert status == 0, err
    facts["runs"][tag] = {"dir": _run_dir(output_dir), "stdout": out}

  launch("single", "mesh.num_devices=1")
  traces = collections.Counter()
  launch(
    "sharded",
    f"mesh.num_devices={NUM_DEVICES}",
    hooks=runner.RunHooks(on_trace=lambda label: traces.update([label])),
  )
  facts["trace_counts"] = dict(traces)
  launch("all_devices", "mesh.num_devices=null", "optimizers=[{name: newton_cg, cg_max_steps: 10}]")

  # Interrupted after the 3rd evaluation (a checkpoint at step 2 exists), then resumed.
  def after_eval(num_evals):
    if num_evals >= 3:
      raise KeyboardInterrupt

  output_dir = os.path.join(out_dir, "resumed")
  cli = [path, f"output_dir={output_dir}", f"mesh.num_devices={NUM_DEVICES}"]
  try:
    _cli(run.main, run.TASKS, cli, runner.RunHooks(after_eval=after_eval))
    raise AssertionError("the run was not interrupted")
  except KeyboardInterrupt:
    pass
  resumed = _run_dir(output_dir)
  facts["interrupted_records"] = len(_records(resumed))
  status, err, _ = _cli(run.main, run.TASKS, ["--resume", resumed])
  assert status == 0, err
  facts["runs"]["resumed"] = {"dir": resumed}

  for tag, overrides in {
    "too_many": [f"mesh.num_devices={NUM_DEVICES + 1}"],
    "indivisible": [f"mesh.num_devices={NUM_DEVICES}", "task.batch_size=62"],
  }.items():
    output_dir = os.path.join(out_dir, tag)
    status, err, _ = _cli(run.main, run.TASKS, [path, f"output_dir={output_dir}", *overrides])
    facts["errors"][tag] = {"status": status, "stderr": err, "wrote": os.path.exists(output_dir)}

  # One Newton-CG step as the launcher builds it: where are the reductions, where the outputs?
  schemas = runner._LazySchemas(run.TASKS)
  layouts = {}
  for n in (1, NUM_DEVICES):
    cfg = config_lib.load_config(
      path, [f"mesh.num_devices={n}"], tasks=schemas, optimizers=opt_lib.OPTIMIZERS
    )
    task = run.TASKS["logreg"]().build(cfg.task, jnp.float64)
    mesh = runner.make_mesh(cfg.experiment.mesh)
    if mesh is not None:
      task.mesh = mesh
    method = opt_lib.build_method(cfg.optimizers[0], task, "optimizers[0]")
    key = jax.random.key(0)
    params = task.init_params(key)
    state = method.init(params, key)
    if mesh is not None:
      params, state = sharding.place_state((params, state), mesh)
    step = jax.jit(method.step).lower(params, state, key, jnp.int32(0)).compile()
    new_params, _, _ = step(params, state, key, jnp.int32(0))
    batch = jax.jit(task.step_batch)(key, jnp.int32(0))
    layouts[n] = {
      "all_reduces": step.as_text().count("all-reduce("),
      "params_replicated": all(
        p.sharding.is_fully_replicated and len(p.sharding.device_set) == n
        for p in jax.tree.leaves(new_params)
      ),
      "batch_shards": sorted({len(x.addressable_shards) for x in jax.tree.leaves(batch)}),
      "batch_shard_rows": sorted(
        {s.data.shape[0] for x in jax.tree.leaves(batch) for s in x.addressable_shards}
      ),
    }
  facts["layouts"] = layouts
  with open(os.path.join(out_dir, "facts.json"), "w") as f:
    json.dump(facts, f)


def _subprocess_env(num_devices=NUM_DEVICES):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh")
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), str(out)],
    env=_subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(out / "facts.json") as f:
    return json.load(f)


# ------------------------------------------------------------------------------------ tests


def _assert_same_metrics(actual, expected, rtol=1e-7, atol=1e-10):
  """Same records, same keys; floats equal up to reduction order (float64), ints exactly."""
  assert [(r["optimizer"], r["step"]) for r in actual] == [
    (r["optimizer"], r["step"]) for r in expected
  ]
  for a, e in zip(actual, expected, strict=True):
    assert a.keys() == e.keys()
    for k, v in e.items():
      if k in ("wall_time", "compile_time"):
        continue
      if isinstance(v, float):
        assert math.isclose(a[k], v, rel_tol=rtol, abs_tol=atol), (a["optimizer"], a["step"], k)
      else:
        assert a[k] == v, (a["optimizer"], a["step"], k)


@pytest.mark.long
def test_sharded_run_equals_single_device(sharded):
  single = _records(sharded["runs"]["single"]["dir"])
  parallel = _records(sharded["runs"]["sharded"]["dir"])
  assert {r["optimizer"] for r in single} == {"newton_cg", "adam", "dp_sgd"}
  assert {r["step"] for r in single} == {0, 2, 4, STEPS}
  _assert_same_metrics(parallel, single)
  # The runs trained: the final losses moved away from the initial ones.
  for label in ("newton_cg", "adam", "dp_sgd"):
    losses = [r["train_loss"] for r in single if r["optimizer"] == label]
    assert losses[-1] < losses[0], label
  assert "mesh: {'data': 4}" in sharded["runs"]["sharded"]["stdout"]
  assert "mesh:" not in sharded["runs"]["single"]["stdout"]


@pytest.mark.long
def test_sharded_run_compiles_each_loop_once(sharded):
  assert sharded["trace_counts"] == {"newton_cg": 1, "adam": 1, "dp_sgd": 1}


@pytest.mark.long
def test_null_num_devices_uses_every_device(sharded):
  out = sharded["runs"]["all_devices"]["stdout"]
  assert f"mesh: {{'data': {NUM_DEVICES}}}" in out
  single = [r for r in _records(sharded["runs"]["single"]["dir"]) if r["optimizer"] == "newton_cg"]
  _assert_same_metrics(_records(sharded["runs"]["all_devices"]["dir"]), single)


@pytest.mark.long
def test_sharded_resume_ends_like_uninterrupted_run(sharded):
  assert 0 < sharded["interrupted_records"] < len(_records(sharded["runs"]["sharded"]["dir"]))
  _assert_same_metrics(
    _records(sharded["runs"]["resumed"]["dir"]), _records(sharded["runs"]["sharded"]["dir"])
  )


@pytest.mark.long
def test_batch_is_split_and_reduced_params_replicated(sharded):
  one, many = sharded["layouts"]["1"], sharded["layouts"][str(NUM_DEVICES)]
  assert one["all_reduces"] == 0 and many["all_reduces"] > 0
  assert one["params_replicated"] and many["params_replicated"]
  assert many["batch_shards"] == [NUM_DEVICES]
  assert many["batch_shard_rows"] == [64 // NUM_DEVICES]


@pytest.mark.parametrize(
  "tag, hint",
  [
    ("too_many", "4 available"),
    (
      "indivisible",
      "62 examples, not a multiple of the 4 devices; set task.batch_size to a multiple of 4",
    ),
  ],
)
@pytest.mark.long
def test_bad_mesh_rejected_before_any_work(sharded, tag, hint):
  error = sharded["errors"][tag]
  assert error["status"] == 2
  assert "config key 'mesh.num_devices'" in error["stderr"] and hint in error["stderr"]
  assert not error["wrote"]  # rejected before the run directory was made


@pytest.mark.long
def test_two_processes_equal_single_device(sharded, tmp_path):
  """``mesh.distributed``: 2 CPU processes x 2 devices run the launcher as one 4-device job."""
  path = tmp_path / "mesh.yaml"
  with open(path, "w") as f:
    yaml.safe_dump(CONFIG, f)
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  out = tmp_path / "out"
  procs = []
  for i in range(2):
    env = _subprocess_env(2) | {
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i),
    }
    args = ["mesh.distributed=true", "mesh.num_devices=null", f"output_dir={out}"]
    procs.append(
      subprocess.Popen(
        [sys.executable, RUN_PY, str(path), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-4000:]
  assert f"mesh: {{'data': {NUM_DEVICES}}}" in outputs[0][0]
  assert "run directory" not in outputs[1][0]  # only process 0 reports and writes
  (stamp,) = os.listdir(out / CONFIG["name"])  # one run directory for both processes
  _assert_same_metrics(
    _records(out / CONFIG["name"] / stamp), _records(sharded["runs"]["single"]["dir"])
  )


# ------------------------------------------------------- validation in this (1-device) process


@pytest.mark.parametrize(
  "override, key, hint",
  [
    ("mesh.num_device=4", "mesh.num_device", "num_devices, data_axis, distributed"),
    ("mesh.num_devices=two", "mesh.num_devices", "Integer"),
    ("mesh.num_devices=0", "mesh.num_devices", ">= 1"),
    ("mesh.data_axis=' '", "mesh.data_axis", "non-empty"),
    ("mesh.distributed=maybe", "mesh.distributed", "not a valid bool"),
  ],
)
def test_bad_mesh_values_name_the_key(override, key, hint):
  from curvopt.launcher import config as config_lib
  from curvopt.launcher import optimizers as opt_lib
  from curvopt.launcher import runner

  run = _load_run_module()
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.load_config(
      CONFIG,
      [override],
      tasks=runner._LazySchemas(run.TASKS),
      optimizers=opt_lib.OPTIMIZERS,
    )
  assert f"'{key}'" in str(err.value) and hint in str(err.value), str(err.value)


def test_missing_mesh_section_is_one_device(tmp_path):
  import jax

  from curvopt.launcher import config as config_lib
  from curvopt.launcher import optimizers as opt_lib
  from curvopt.launcher import runner

  run = _load_run_module()
  cfg = config_lib.load_config(
    CONFIG, tasks=runner._LazySchemas(run.TASKS), optimizers=opt_lib.OPTIMIZERS
  )
  assert cfg.experiment.mesh.num_devices == 1 and cfg.experiment.mesh.data_axis == "data"
  assert runner.make_mesh(cfg.experiment.mesh) is None
  too_many = jax.device_count() + 1
  cfg.experiment.mesh.num_devices = too_many
  cfg.experiment.output_dir = str(tmp_path / "out")
  with pytest.raises(config_lib.ConfigError, match=r"'mesh\.num_devices': \d+ devices requested"):
    runner.run_experiment(cfg, run.TASKS["logreg"](), echo=False)
  assert not os.path.exists(tmp_path / "out")


if __name__ == "__main__":
  _sharded_main(sys.argv[1])
