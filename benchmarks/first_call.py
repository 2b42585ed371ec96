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

The ratio to Adam's first call is the figure the README quotes (goal: <= 2x).

Usage: PYTHONPATH=$PWD python benchmarks/first_call.py [--repeats 3] [--rows adam newton_cg ...]
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


def _build(row: str):
  """The function and arguments whose first call is timed (imports stay outside the timing)."""
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


def _time_row(row: str) -> float:
  import jax

  fn, args = _build(row)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row")
  parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(_time_row(args.child))
    return

  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH", "")]))
  import jax

  print(f"jax {jax.__version__}, device {jax.devices()[0]}; median of {args.repeats} processes")
  print(f"{'first call':20s} {'seconds':>8s} {'vs adam':>8s} {'goal':>6s}")
  adam = None
  for row in ("adam", *[r for r in args.rows if r != "adam"]):
    times = []
    for _ in range(args.repeats):
      out = subprocess.run(
        [sys.executable, __file__, "--child", row], env=env, capture_output=True, text=True
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
