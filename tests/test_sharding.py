"""Tests for curvopt.sharding: sharded Newton-CG, clipped gradients and DP-SGD equal one device.

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX
starts, so they run once, all together, in a subprocess (this file run as a script). It writes
its results (arrays as ``.npz``, shardings, trace and cache counts, HLO facts as ``.json``);
the tests below compare them with the same computations done here, on one device, in this
process. The problems are built from fixed seeds by the functions below, shared by both sides.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt import clipped_grad, clipped_sum_fn, dp_sgd, per_example_grads, sharding
from curvopt.optimizers.newton_cg import newton_cg

# The tests that read the multi-device subprocesses are in the long tier; the one-device check
# of the helpers is not.

NUM_DEVICES = 4
BATCH = 32
CLIP = 0.5
NOISE = 1.0
NUM_STEPS = 3
_BACKEND_COMPILES = []  # Filled by a jax.monitoring listener in the subprocess only.


def _count_compiles(event, duration, **kwargs):
  del duration, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _BACKEND_COMPILES.append(event)


# ------------------------------------------------------------------------------ problems


def _problem(seed=0, hidden=16):
  """A small tanh MLP regression problem in float64 (dense layers: ghost clipping applies)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = {
    "w1": 0.5 * jax.random.normal(k1, (6, hidden), jnp.float64),
    "b1": jnp.zeros(hidden, jnp.float64),
    "w2": 0.5 * jax.random.normal(k2, (hidden, 3), jnp.float64),
  }
  xs = jax.random.normal(k3, (NUM_STEPS, BATCH, 6), jnp.float64)
  ys = jnp.sin(xs[..., :3]) + 0.1 * jax.random.normal(k4, (NUM_STEPS, BATCH, 3), jnp.float64)
  return params, xs, ys


def model_fn(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def loss_fn(outputs, y):
  return 0.5 * jnp.mean(jnp.sum((outputs - y) ** 2, axis=-1))


def value_fn(params, x, y):
  return loss_fn(model_fn(params, x), y)


def example_loss(params, example):
  x, y = example
  return 0.5 * jnp.sum((model_fn(params, x) - y) ** 2)


NEWTON_KWARGS = dict(damping=1e-2, solver=curvopt.CG(max_steps=12, tol=1e-9, progress_tol=None))


def _newton_step_fn(curvature, counter):
  """Returns ``(tx, step)``: one jitted-able Newton-CG training step."""
  if curvature == "ggn":
    tx = newton_cg(curvature="ggn", model_fn=model_fn, loss_fn=loss_fn, **NEWTON_KWARGS)
  else:
    tx = newton_cg(curvature="hessian", **NEWTON_KWARGS)

  def step(params, state, x, y):
    counter.append(1)  # Runs once per trace: counts compilations of this step.
    loss, grads = jax.value_and_grad(value_fn)(params, x, y)
    extra = {} if curvature == "ggn" else {"value_fn": value_fn}
    updates, state = tx.update(grads, state, params, x=x, y=y, **extra)
    return optax.apply_updates(params, updates), state, loss

  return tx, step


def _placers(mesh):
  if mesh is None:
    return (lambda b: b), (lambda s: s)
  return (lambda b: sharding.shard_batch(b, mesh)), (lambda s: sharding.place_state(s, mesh))


def _run_newton(curvature, params, xs, ys, mesh=None):
  """``NUM_STEPS`` jitted Newton-CG steps; returns final params, per-step stats, trace count."""
  place_batch, place_state = _placers(mesh)
  counter = []
  tx, step = _newton_step_fn(curvature, counter)
  step = jax.jit(step)
  state = place_state(tx.init(params))
  losses, cg_steps, dampings = [], [], []
  for t in range(NUM_STEPS):
    if t == 1:
      compiles = len(_BACKEND_COMPILES)
    x, y = place_batch((xs[t], ys[t]))
    params, state, loss = step(params, state, x, y)
    losses.append(loss)
    cg_steps.append(state[0].cg_steps)
    dampings.append(state[0].damping)
  stats = {"loss": np.array(losses), "cg_steps": np.array(cg_steps), "damping": np.array(dampings)}
  recompiles = len(_BACKEND_COMPILES) - compiles  # XLA compilations after the first step.
  return params, state, stats, (len(counter), recompiles), step


def _dp_step_fn(method):
  opt = dp_sgd(0.1, l2_norm_clip=CLIP, noise_multiplier=NOISE, key=jax.random.key(7))

  def step(params, state, x, y):
    if method == "vmap":
      grads = per_example_grads(example_loss, params, (x, y))
    else:
      grads = clipped_sum_fn(example_loss, CLIP, method="ghost")(params, (x, y))
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return opt, step


def _run_dp(method, params, xs, ys, mesh=None):
  place_batch, place_state = _placers(mesh)
  opt, step = _dp_step_fn(method)
  step = jax.jit(step)
  state = place_state(opt.init(params))
  for t in range(NUM_STEPS):
    if t == 1:
      compiles = len(_BACKEND_COMPILES)
    x, y = place_batch((xs[t], ys[t]))
    params, state = step(params, state, x, y)
  return params, state, len(_BACKEND_COMPILES) - compiles


# ------------------------------------------------------------------- the sharded subprocess


def _spec(array):
  return str(array.sharding.spec) if hasattr(array.sharding, "spec") else repr(array.sharding)


def _sharded_main(out_dir):
  """Runs every multi-device check on a 4-device CPU; writes ``results.npz`` and ``facts.json``."""
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  arrays, facts = {}, {}
  mesh = sharding.data_mesh(NUM_DEVICES)
  params, xs, ys = _problem()
  place = lambda b: sharding.shard_batch(b, mesh)
  rparams = sharding.replicate(params, mesh)

  for curvature in ("ggn", "hessian"):
    new_params, state, stats, traces, step = _run_newton(curvature, rparams, xs, ys, mesh)
    for k, v in new_params.items():
      arrays[f"newton_{curvature}_{k}"] = np.asarray(v)
      facts[f"newton_{curvature}_spec_{k}"] = _spec(v)
    for k, v in stats.items():
      arrays[f"newton_{curvature}_{k}"] = v
    facts[f"newton_{curvature}_direction_spec"] = _spec(state[0].direction["w1"])
    facts[f"newton_{curvature}_traces"], facts[f"newton_{curvature}_recompiles"] = traces
    x, y = place((xs[0], ys[0]))
    # No host round-trip inside the step: it runs with device<->host transfers disallowed.
    with jax.transfer_guard("disallow"):
      jax.block_until_ready(step(new_params, state, x, y))
    hlo = step.lower(new_params, state, x, y).compile().as_text()
    facts[f"newton_{curvature}_hlo"] = {
      "while": hlo.count(" while("),
      "all-reduce": hlo.count(" all-reduce("),
      "host": sum(hlo.count(s) for s in ("outfeed", "infeed", "host_callback", "xla_python")),
    }

  batch = place((xs[0], ys[0]))
  for method in ("vmap", "ghost"):
    fn = jax.jit(clipped_grad(example_loss, CLIP, method=method))
    mean, norms = fn(rparams, batch)
    for k, v in mean.items():
      arrays[f"clip_{method}_{k}"] = np.asarray(v)
      facts[f"clip_{method}_spec_{k}"] = _spec(v)
    arrays[f"clip_{method}_norms"] = np.asarray(norms)
    facts[f"clip_{method}_norms_spec"] = _spec(norms)

  for method in ("vmap", "ghost"):
    new_params, state, recompiles = _run_dp(method, rparams, xs, ys, mesh)
    for k, v in new_params.items():
      arrays[f"dp_{method}_{k}"] = np.asarray(v)
      facts[f"dp_{method}_spec_{k}"] = _spec(v)
    facts[f"dp_{method}_recompiles"] = recompiles

  # Parameters sharded too: the hidden layer split over "model" on a 2 x 2 mesh.
  mesh2 = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
  sparams = jax.device_put(params, {k: NamedSharding(mesh2, s) for k, s in specs.items()})
  new_params, state, stats, traces, step = _run_newton("ggn", sparams, xs, ys, mesh2)
  for k, v in new_params.items():
    arrays[f"model_{k}"] = np.asarray(v)
    facts[f"model_spec_{k}"] = _spec(v)
    facts[f"model_shard_shape_{k}"] = list(v.addressable_shards[0].data.shape)
  for k, v in stats.items():
    arrays[f"model_{k}"] = v
  facts["model_traces"], facts["model_recompiles"] = traces
  facts["model_direction_spec_w1"] = _spec(state[0].direction["w1"])

  try:
    sharding.shard_batch(jnp.zeros((30, 2)), mesh)
  except ValueError as e:
    facts["indivisible_error"] = str(e)

  np.savez(os.path.join(out_dir, "results.npz"), **arrays)
  with open(os.path.join(out_dir, "facts.json"), "w") as f:
    json.dump(facts, f, indent=1)


P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

# ------------------------------------------------------------------------------ the tests


def _subprocess_env(num_devices):
  """This environment plus ``num_devices`` fake CPU devices, x64 and the repository on the path."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_ENABLE_X64"] = "1"
  root = pathlib.Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
  return env


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """Runs :func:`_sharded_main` once in a 4-device subprocess; returns ``(arrays, facts)``."""
  out_dir = tmp_path_factory.mktemp("sharded")
  proc = subprocess.run(
    [sys.executable, __file__, str(out_dir)],
    env=_subprocess_env(NUM_DEVICES),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  arrays = dict(np.load(out_dir / "results.npz"))
  facts = json.loads((out_dir / "facts.json").read_text())
  return arrays, facts


@pytest.fixture(scope="module")
def problem():
  return _problem()


def _close(actual, expected, what):
  np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12, err_msg=what)


@pytest.mark.long
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_newton_cg_sharded_equals_single_device(sharded, problem, curvature):
  arrays, facts = sharded
  params, state, stats, traces, _ = _run_newton(curvature, *problem)
  for k, v in params.items():
    _close(arrays[f"newton_{curvature}_{k}"], v, k)
  _close(arrays[f"newton_{curvature}_loss"], stats["loss"], "loss")
  _close(arrays[f"newton_{curvature}_damping"], stats["damping"], "damping")
  np.testing.assert_array_equal(arrays[f"newton_{curvature}_cg_steps"], stats["cg_steps"])
  assert traces[0] == 1
  # The steps did something: the loss went down over the three mini-batches' steps.
  assert not np.allclose(params["w1"], problem[0]["w1"])


@pytest.mark.long
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_newton_cg_sharded_layout_and_one_program(sharded, curvature):
  _, facts = sharded
  for k in ("w1", "b1", "w2"):
    assert facts[f"newton_{curvature}_spec_{k}"] == "P()"  # Parameters replicated.
  assert facts[f"newton_{curvature}_direction_spec"] == "P()"
  # One compiled program serves every step: traced once, no XLA compilation after step 1.
  assert facts[f"newton_{curvature}_traces"] == 1
  assert facts[f"newton_{curvature}_recompiles"] == 0
  hlo = facts[f"newton_{curvature}_hlo"]
  # CG is one while loop in one program, no host transfer (the step also ran under
  # jax.transfer_guard("disallow")), and XLA inserted the batch reductions.
  assert hlo["while"] >= 1
  assert hlo["host"] == 0
  assert hlo["all-reduce"] >= 1


@pytest.mark.long
@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_clipped_grad_sharded_equals_single_device(sharded, problem, method):
  arrays, facts = sharded
  params, xs, ys = problem
  mean, norms = jax.jit(clipped_grad(example_loss, CLIP, method=method))(params, (xs[0], ys[0]))
  for k, v in mean.items():
    _close(arrays[f"clip_{method}_{k}"], v, k)
    assert facts[f"clip_{method}_spec_{k}"] == "P()"
  _close(arrays[f"clip_{method}_norms"], norms, "norms")
  assert facts[f"clip_{method}_norms_spec"] == "P('data',)"  # Per-example norms stay split.
  assert np.sum(np.asarray(norms) > CLIP) > 0  # Clipping is active.
  # Independent reference: per-example norms from an explicit loop on one device.
  loop = [
    optax.tree.norm(jax.grad(example_loss)(params, (xs[0, i], ys[0, i]))) for i in range(BATCH)
  ]
  _close(arrays[f"clip_{method}_norms"], np.array(loop), "loop norms")


@pytest.mark.long
@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_dp_sgd_sharded_equals_single_device(sharded, problem, method):
  arrays, facts = sharded
  params, _, _ = _run_dp(method, *problem)
  for k, v in params.items():
    _close(arrays[f"dp_{method}_{k}"], v, k)
    assert facts[f"dp_{method}_spec_{k}"] == "P()"
  assert facts[f"dp_{method}_recompiles"] == 0


@pytest.mark.long
def test_newton_cg_model_sharded_params(sharded, problem):
  arrays, facts = sharded
  params, _, stats, _, _ = _run_newton("ggn", *problem)
  for k, v in params.items():
    _close(arrays[f"model_{k}"], v, k)
  np.testing.assert_array_equal(arrays["model_cg_steps"], stats["cg_steps"])
  # The parameters keep their "model" split: each device holds half the hidden units.
  assert facts["model_spec_w1"] == "P(None, 'model')"
  assert facts["model_spec_b1"] == "P('model',)"
  assert facts["model_spec_w2"] == "P('model',)"
  assert facts["model_shard_shape_w1"] == [6, 8]
  assert facts["model_direction_spec_w1"] == "P(None, 'model')"
  assert facts["model_traces"] == 1
  assert facts["model_recompiles"] == 0


@pytest.mark.long
def test_shard_batch_rejects_indivisible_batch(sharded):
  _, facts = sharded
  assert "30 examples" in facts["indivisible_error"]
  assert "is_padding" in facts["indivisible_error"]


def test_helpers_single_device():
  mesh = sharding.data_mesh()
  x = sharding.shard_batch({"x": jnp.ones((4, 2), jnp.float32)}, mesh)
  assert x["x"].sharding == sharding.batch_sharding(mesh)
  with pytest.raises(ValueError, match="device"):
    sharding.data_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match="scalar"):
    sharding.shard_batch({"n": jnp.ones((), jnp.float32)}, mesh)
  with pytest.raises(ValueError, match="no axis 'model'"):
    sharding.shard_batch(jnp.ones(4), mesh, axis_name="model")


def _multihost_main(out_dir, process_id, port):
  """One of two CPU processes (2 devices each) of a ``jax.distributed`` run: a Newton-CG step."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  from jax.experimental import multihost_utils  # noqa: PLC0415

  mesh = sharding.data_mesh()
  params, xs, ys = _problem()
  half = BATCH // 2
  rows = slice(process_id * half, (process_id + 1) * half)  # This host's slice of the batch.
  local = (np.asarray(xs[0, rows]), np.asarray(ys[0, rows]))
  x, y = sharding.shard_batch(local, mesh)
  assert x.shape == (BATCH, 6) and not x.is_fully_addressable
  rparams = sharding.replicate(params, mesh)
  tx, step = _newton_step_fn("ggn", [])
  state = sharding.place_state(tx.init(rparams), mesh)
  new_params, state, loss = jax.jit(step)(rparams, state, x, y)
  gathered = multihost_utils.process_allgather(new_params, tiled=True)
  out = {k: np.asarray(v) for k, v in gathered.items()}
  out["loss"] = np.asarray(multihost_utils.process_allgather(loss, tiled=True))
  np.savez(os.path.join(out_dir, f"multihost_{process_id}.npz"), **out)
  jax.distributed.shutdown()


@pytest.mark.long
def test_newton_cg_two_processes_equals_single_device(problem, tmp_path):
  """``jax.distributed`` with 2 CPU processes x 2 devices, each feeding half of the batch."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  env = _subprocess_env(2)
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, "multihost", str(tmp_path), str(i), str(port)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
  params, xs, ys = problem
  tx, step = _newton_step_fn("ggn", [])
  expected, _, loss = jax.jit(step)(params, tx.init(params), xs[0], ys[0])
  for i in range(2):
    got = dict(np.load(tmp_path / f"multihost_{i}.npz"))
    for k, v in expected.items():
      _close(got[k], v, k)
    _close(got["loss"], loss, "loss")


if __name__ == "__main__":
  if sys.argv[1] == "multihost":
    _multihost_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    _sharded_main(sys.argv[1])
