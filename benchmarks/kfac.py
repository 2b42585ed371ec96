"""K-FAC (curvopt.kfac) step time against an Adam step and a Newton-CG step, and its races.

1. ``steps``: the time of one training step (gradient + update) of ``curvopt.kfac`` with its
   defaults (sampled GGN factors every step, inverses every 5 steps, automatic learning rate,
   momentum and damping), of ``optax.adam`` and of ``curvopt.newton_cg`` (GGN, its defaults),
   on an MLP (digits-sized 64-256-256-10, batch 256), a CNN (two 3x3 convolutions, batch
   256) and a transformer block (sequence 16, width 64, batch 64), float32. Each is timed as
   a jitted loop of 5 steps (so one inverse refresh and one damping adaptation are in it),
   interleaved so that load drift hits all alike; the table gives milliseconds per step.
2. ``races``: the launcher's digits autoencoder (60 s) and digits CNN (15 s), kfac against
   Adam with the configs' settings: the time K-FAC needs to reach Adam's best training error,
   and the test accuracy at equal wall time.
3. ``peer``: curvopt.kfac and kfac-jax (its automatic modes, in its own virtual environment:
   ``benchmarks/kfac_jax_peer.py``, interpreter from ``$KFAC_JAX_PYTHON``, default
   ``/work/venvs/kfacjax/bin/python``) on the launcher's digits autoencoder with the same data
   and initial parameters (seed 0), full batch, float32: training MSE against wall time.

Usage: PYTHONPATH=$PWD python benchmarks/kfac.py [--only steps|races|peer] [--seconds-scale S]
The machine is shared: read the ratios, and the absolute times, as loaded-machine figures.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from benchmarks._timing import interleaved_median_seconds, print_table
from curvopt import kfac, newton_cg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def _dense(key, m, n):
  return {"w": jax.random.normal(key, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}


def mlp_problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = [_dense(keys[0], 64, 256), _dense(keys[1], 256, 256), _dense(keys[2], 256, 10)]

  def model_fn(params, x):
    for layer in params[:-1]:
      x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]

  x = jax.random.normal(keys[3], (256, 64))
  return params, model_fn, {"x": x, "y": jax.nn.one_hot(jnp.arange(256) % 10, 10)}


def cnn_problem():
  keys = jax.random.split(jax.random.key(1), 4)
  params = {
    "c1": jax.random.normal(keys[0], (3, 3, 1, 8)) / 3,
    "b1": jnp.zeros(8),
    "c2": jax.random.normal(keys[1], (3, 3, 8, 16)) / 8,
    "b2": jnp.zeros(16),
    "out": _dense(keys[2], 4 * 16, 10),
  }

  def conv(x, w):
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

  def pool(x):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4

  def model_fn(params, x):
    h = pool(jax.nn.relu(conv(x, params["c1"]) + params["b1"]))
    h = pool(jax.nn.relu(conv(h, params["c2"]) + params["b2"]))
    h = h.reshape(h.shape[0], -1)
    return h @ params["out"]["w"] + params["out"]["b"]

  x = jax.random.normal(keys[3], (256, 8, 8, 1))
  return params, model_fn, {"x": x, "y": jax.nn.one_hot(jnp.arange(256) % 10, 10)}


def transformer_problem(d=64, heads=4, seq=16, batch=64):
  keys = jax.random.split(jax.random.key(2), 8)
  params = {
    "wq": _dense(keys[0], d, d)["w"],
    "wk": _dense(keys[1], d, d)["w"],
    "wv": _dense(keys[2], d, d)["w"],
    "wo": _dense(keys[3], d, d)["w"],
    "ln": {"g": jnp.ones(d), "b": jnp.zeros(d)},
    "mlp1": _dense(keys[4], d, 4 * d),
    "mlp2": _dense(keys[5], 4 * d, d),
    "head": _dense(keys[6], d, 10),
  }

  def model_fn(params, x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    z = (x - mu) / jnp.sqrt(var + 1e-5) * params["ln"]["g"] + params["ln"]["b"]
    split = lambda t: t.reshape(*t.shape[:-1], heads, d // heads)  # noqa: E731
    q, k, v = (split(z @ params[n]) for n in ("wq", "wk", "wv"))
    att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // heads), -1)
    h = x + jnp.einsum("bhts,bshd->bthd", att, v).reshape(x.shape) @ params["wo"]
    u = jax.nn.gelu(h @ params["mlp1"]["w"] + params["mlp1"]["b"])
    h = h + u @ params["mlp2"]["w"] + params["mlp2"]["b"]
    return h.mean(1) @ params["head"]["w"] + params["head"]["b"]

  x = jax.random.normal(keys[7], (batch, seq, d))
  return params, model_fn, {"x": x, "y": jax.nn.one_hot(jnp.arange(batch) % 10, 10)}


def loss_fn(logits, y):
  return optax.softmax_cross_entropy(logits, y).mean()


def _loop(tx, model_fn):
  value_fn = lambda p, x, y: loss_fn(model_fn(p, x), y)  # noqa: E731

  @jax.jit
  def run(params, state, data):
    def body(_, carry):
      params, state = carry
      value, grads = jax.value_and_grad(value_fn)(params, **data)
      updates, state = tx.update(grads, state, params, value=value, value_fn=value_fn, **data)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, STEPS, body, (params, state))

  return run


def steps_benchmark():
  rows = []
  for name, make in (
    ("MLP", mlp_problem),
    ("CNN", cnn_problem),
    ("transformer", transformer_problem),
  ):
    params, model_fn, data = make()
    txs = {
      "adam": optax.adam(1e-3),
      "kfac": kfac(model_fn=model_fn, loss_fn=loss_fn, data_like=data),
      "newton_cg": newton_cg(model_fn=model_fn, loss_fn=loss_fn),
    }
    calls = {}
    for label, tx in txs.items():
      run, state = _loop(tx, model_fn), tx.init(params)
      calls[label] = lambda run=run, state=state: run(params, state, data)
    times = interleaved_median_seconds(calls, repeats=10, min_seconds=2.0)
    ms = {k: 1e3 * v / STEPS for k, v in times.items()}
    rows.append(
      [name, ms["adam"], ms["kfac"], ms["newton_cg"], ms["kfac"] / ms["adam"],
       ms["kfac"] / ms["newton_cg"]]
    )  # fmt: skip
  print_table(
    f"ms per training step (float32, {jax.devices()[0].platform}, median, loaded machine)",
    ["model", "adam", "kfac", "newton_cg", "kfac / adam", "kfac / newton_cg"],
    rows,
  )


# --------------------------------------------------------------------------------- races


def _race(config, names, seconds, out_dir):
  """Runs the launcher on ``config`` with only the optimisers ``names``; returns the records."""
  with open(os.path.join(ROOT, "configs", config)) as f:
    cfg = yaml.safe_load(f)
  cfg["optimizers"] = [o for o in cfg["optimizers"] if o["name"] in names]
  cfg["budget"]["seconds"] = seconds
  cfg["name"] = f"bench_{cfg['name']}"
  path = os.path.join(out_dir, config)
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
  env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1")
  subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", "run.py"), path, "progress=false"],
    cwd=out_dir, env=env, check=True, capture_output=True,
  )  # fmt: skip
  (metrics,) = glob.glob(os.path.join(out_dir, "runs", cfg["name"], "*", "metrics.jsonl"))
  with open(metrics) as f:
    return [json.loads(line) for line in f]


def _first_time(records, label, metric, reached):
  for r in records:
    if r["optimizer"] == label and reached(r[metric]):
      return r["wall_time"]
  return float("inf")


def races_benchmark(scale):
  with tempfile.TemporaryDirectory() as out_dir:
    recs = _race("autoencoder_digits.yaml", ("adam", "kfac"), 60 * scale, out_dir)
    adam = [r for r in recs if r["optimizer"] == "adam"]
    best = min(r["train_mse"] for r in adam)
    t_adam = _first_time(recs, "adam", "train_mse", lambda v: v <= best)
    t_kfac = _first_time(recs, "kfac", "train_mse", lambda v: v <= best)
    kfac_best = min(r["train_mse"] for r in recs if r["optimizer"] == "kfac")
    rows = [["autoencoder: time to Adam's best train MSE", f"{best:.3g}", t_adam, t_kfac,
             t_kfac / t_adam, f"kfac best {kfac_best:.3g}"]]  # fmt: skip
    recs = _race("cnn_digits.yaml", ("adam", "kfac"), 15 * scale, out_dir)
    final = {label: [r for r in recs if r["optimizer"] == label][-1] for label in ("adam", "kfac")}
    rows.append(
      ["CNN: test accuracy at equal wall time", "", final["adam"]["test_accuracy"],
       final["kfac"]["test_accuracy"], "", f"{final['kfac']['wall_time']:.1f} s"]
    )  # fmt: skip
  print_table(
    "K-FAC (defaults) against Adam in the launcher (loaded machine)",
    ["race", "Adam's best", "adam", "kfac", "kfac / adam", "note"],
    rows,
  )


# ---------------------------------------------------------------------------------- peer


def _autoencoder():
  from curvopt.launcher import runner
  from experiments import autoencoder

  task = autoencoder.build(autoencoder.Config(encoder=[64, 128, 64, 32, 6]), jnp.float32)
  return task, task.init_params(runner._keys(0)[0])


def _curvopt_run(task, params, seconds):
  x = task.train_data["x"]
  tx = kfac(model_fn=task.model_fn, loss_fn=task.output_loss, data_like=task.train_data)
  mse = jax.jit(lambda p: task.evaluate(p)["train_mse"])

  @jax.jit
  def ten_steps(params, state):
    def body(_, carry):
      params, state = carry
      grads = jax.grad(task.loss)(params, x)
      updates, state = tx.update(grads, state, params, x=x)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, 10, body, (params, state))

  state = tx.init(params)
  records = [{"step": 0, "wall_time": 0.0, "train_mse": float(mse(params))}]
  jax.block_until_ready(ten_steps(params, state))  # compile
  wall, step = 0.0, 0
  while wall < seconds:
    tic = time.perf_counter()
    params, state = jax.block_until_ready(ten_steps(params, state))
    wall += time.perf_counter() - tic
    step += 10
    records.append({"step": step, "wall_time": wall, "train_mse": float(mse(params))})
  return records


def _at(records, seconds):
  before = [r["train_mse"] for r in records if r["wall_time"] <= seconds]
  return min(before) if before else float("nan")


def peer_benchmark(scale):
  seconds = 60 * scale
  task, params = _autoencoder()
  rows = {"curvopt.kfac": _curvopt_run(task, params, seconds)}
  python = os.environ.get("KFAC_JAX_PYTHON", "/work/venvs/kfacjax/bin/python")
  with tempfile.TemporaryDirectory() as tmp:
    arrays = {"x": np.asarray(task.train_data["x"]), "code_layer": task.code_layer}
    for i, layer in enumerate(params):
      arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(layer["w"]), np.asarray(layer["b"])
    np.savez(os.path.join(tmp, "problem.npz"), **arrays)
    out = os.path.join(tmp, "peer.json")
    script = os.path.join(ROOT, "benchmarks", "kfac_jax_peer.py")
    args = [python, script, os.path.join(tmp, "problem.npz"), str(seconds), out]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
      with open(out) as f:
        peer = json.load(f)
      rows[f"kfac-jax 0.0.8 (JAX {peer['jax']})"] = peer["records"]
    else:
      print(f"kfac-jax did not run ({python}):\n{proc.stderr[-2000:]}")
  times = [seconds / 6, seconds / 2, seconds]
  table = []
  for name, records in rows.items():
    steps = records[-1]["step"]
    ms = 1e3 * records[-1]["wall_time"] / max(steps, 1)
    table.append([name, steps, ms, *[_at(records, t) for t in times]])
  print_table(
    "digits autoencoder, full batch, float32, seed 0: best training MSE by wall time (loaded)",
    ["optimizer", "steps", "ms/step", *[f"MSE by {t:.0f} s" for t in times]],
    table,
  )


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", choices=("steps", "races", "peer"))
  parser.add_argument("--seconds-scale", type=float, default=1.0)
  args = parser.parse_args()
  if args.only in (None, "steps"):
    steps_benchmark()
  if args.only in (None, "races"):
    races_benchmark(args.seconds_scale)
  if args.only in (None, "peer"):
    peer_benchmark(args.seconds_scale)
