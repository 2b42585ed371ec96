"""First-call time (trace + compile + one run) of curvopt's jitted programs against an Adam step.

Each row runs in a fresh Python process (nothing cached in memory, JAX's persistent compilation
cache off), as a user's first call would, on the autoencoder of ``benchmarks/newton_cg.py``
(digits, 64-32-16-8-16-32-64, 1797 images):

* ``adam``: one jitted training step, ``value_and_grad`` + ``optax.adam`` (the baseline);
* ``newton_cg``: one jitted ``newton_cg`` step with defaults (GGN curvature; ``solver="auto"``
  chooses truncated CG for this model);
* ``newton_cg_nystrom``: the same with ``solver="nystrom"``;
* ``top_eigenvalues``: the 5 largest GGN eigenvalues by 20 Lanczos iterations;
* ``spectral_density``: SLQ of the GGN, 20 iterations x 4 runs;
* ``empirical_ntk``: the NTK of 64 x 64 images.

``--model cnn`` times the ``adam``, ``newton_cg`` and ``newton_cg_kfac`` rows on a small CNN
instead (two 3 x 3 convolutions and a dense softmax head on the digits' 8 x 8 images; for its
3,818 parameters and 1797 x 10 outputs ``solver="auto"`` also chooses CG).

The ratio to Adam's first call is the figure the README quotes (goal: <= 2x).

Usage: PYTHONPATH=$PWD python benchmarks/first_call.py [--repeats 3] [--rows adam newton_cg ...]
  [--model cnn]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROWS = (
  "adam",
  "newton_cg",
  "newton_cg_kfac",
  "newton_cg_nystrom",
  "top_eigenvalues",
  "spectral_density",
  "empirical_ntk",
)


def _cnn():
  """A small CNN on the digits' 8 x 8 images: two 3 x 3 convolutions (8 channels, then 16 with
  stride 2) and a dense softmax head, with its data (images, integer labels)."""
  import jax
  import jax.numpy as jnp
  import optax
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = jnp.asarray(digits.images[..., None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {
    "c1": jax.random.normal(k1, (3, 3, 1, 8)) / 3.0,
    "b1": jnp.zeros(8),
    "c2": jax.random.normal(k2, (3, 3, 8, 16)) / jnp.sqrt(72.0),
    "b2": jnp.zeros(16),
    "w": jax.random.normal(k3, (4 * 4 * 16, 10)) / 16.0,
    "b": jnp.zeros(10),
  }

  def conv(h, w, stride):
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(h, w, stride, "SAME", dimension_numbers=dims)

  def model_fn(p, x):
    h = jax.nn.relu(conv(x, p["c1"], (1, 1)) + p["b1"])
    h = jax.nn.relu(conv(h, p["c2"], (2, 2)) + p["b2"])
    return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

  def loss_fn(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, model_fn, loss_fn, {"x": x, "y": y}


def _build(row: str, model: str = "autoencoder"):
  """The function and arguments whose first call is timed (imports stay outside the timing)."""
  if model == "cnn":  # before importing benchmarks/newton_cg.py, which turns on float64
    return _build_cnn(row)
  import jax
  import jax.numpy as jnp
  import optax
  from newton_cg import _init_autoencoder, loss_fn, model_fn
  from sklearn.datasets import load_digits

  import curvopt

  x = jnp.asarray(load_digits().data / 16.0)
  params = _init_autoencoder(jax.random.PRNGKey(0))
  value_fn = curvopt.value_fn_from_model(model_fn, loss_fn)
  ggn = lambda p, x: curvopt.ggn_fn(lambda q: model_fn(q, x), lambda o: loss_fn(o, x), p)

  if row in ("adam", "newton_cg", "newton_cg_kfac", "newton_cg_nystrom"):
    if row == "adam":
      tx = optax.adam(1e-3)
    else:
      solver = "nystrom" if row.endswith("nystrom") else "auto"
      pre = "kfac" if row.endswith("kfac") else None
      tx = curvopt.newton_cg(model_fn=model_fn, loss_fn=loss_fn, solver=solver, preconditioner=pre)

    def step(params, state, x):
      value, grads = jax.value_and_grad(value_fn)(params, x=x)
      extra = {} if row == "adam" else {"value": value, "x": x}
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state

    return jax.jit(step), (params, tx.init(params), x)
  if row == "top_eigenvalues":
    fn = lambda p, x: curvopt.top_eigenvalues(ggn(p, x), p, 0, k=5, num_iters=20).eigenvalues
    return jax.jit(fn), (params, x)
  if row == "spectral_density":
    fn = lambda p, x: curvopt.spectral_density(ggn(p, x), p, 0, num_iters=20, num_runs=4).density
    return jax.jit(fn), (params, x)
  if row == "empirical_ntk":
    fn = lambda p, x: curvopt.empirical_ntk(model_fn, p, x[:64], x[64:128])
    return jax.jit(fn), (params, x)
  raise ValueError(f"unknown row {row!r}; expected one of {ROWS}")


def _build_cnn(row: str):
  import jax
  import optax

  import curvopt

  params, model_fn, loss_fn, data = _cnn()
  value_fn = curvopt.value_fn_from_model(model_fn, loss_fn)
  if row == "adam":
    tx = optax.adam(1e-3)
  elif row in ("newton_cg", "newton_cg_kfac"):
    pre = "kfac" if row.endswith("kfac") else None
    tx = curvopt.newton_cg(model_fn=model_fn, loss_fn=loss_fn, preconditioner=pre)
  else:
    raise ValueError(f"--model cnn times adam, newton_cg and newton_cg_kfac; got {row!r}")

  def step(params, state, data):
    value, grads = jax.value_and_grad(value_fn)(params, **data)
    extra = {} if row == "adam" else {"value": value, **data}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return jax.jit(step), (params, tx.init(params), data)


def _time_row(row: str, model: str = "autoencoder") -> float:
  import jax

  fn, args = _build(row, model)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row")
  parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
  parser.add_argument(
    "--model",
    default="autoencoder",
    choices=("autoencoder", "cnn"),
    help="the autoencoder (an MLP) or a small CNN on digits (rows adam, newton_cg[_kfac])",
  )
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(_time_row(args.child, args.model))
    return

  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH", "")]))
  import jax

  print(
    f"jax {jax.__version__}, device {jax.devices()[0]}; {args.model}; "
    f"median of {args.repeats} processes"
  )
  print(f"{'first call':20s} {'seconds':>8s} {'vs adam':>8s} {'goal':>6s}")
  adam = None
  for row in ("adam", *[r for r in args.rows if r != "adam"]):
    times = []
    for _ in range(args.repeats):
      out = subprocess.run(
        [sys.executable, __file__, "--child", row, "--model", args.model],
        env=env,
        capture_output=True,
        text=True,
      )
      if out.returncode:
        raise RuntimeError(f"{row} failed:\n{out.stderr}")
      times.append(float(out.stdout.strip().splitlines()[-1]))
    seconds = statistics.median(times)
    adam = seconds if row == "adam" else adam
    goal = "" if row == "adam" else "<= 2x"
    print(f"{row:20s} {seconds:8.2f} {seconds / adam:7.1f}x {goal:>6s}", flush=True)


if __name__ == "__main__":
  main()
