"""Hessian spectrum of a small trained MLP: Lanczos vs PyHessian-style power iteration.

Trains a 64-32-10 tanh MLP on scikit-learn's bundled digits (full batch, Adam), then on the
Hessian of the training loss (a matvec from ``curvopt.hvp_fn``, float32):

* top-5 eigenvalues (largest magnitude) with ``curvopt.estimators.top_eigenvalues`` (Lanczos,
  full reorthogonalisation) vs power iteration with deflation, stopped when the relative change
  of the eigenvalue is below 1e-3 or after 100 steps (what PyHessian's ``eigenvalues`` does);
* the spectral density (``spectral_density``, stochastic Lanczos quadrature) vs the exact
  broadened density from the dense Hessian (``jax.hessian`` + ``numpy.linalg.eigh``);
* the trace: Hutchinson vs Hutch++ at the same matvec budget.

Both eigen-solvers and the density are checked against the dense eigendecomposition (float64).
Times are medians of several jitted runs after a warm-up; ratios are measured in one run.

Run: ``python benchmarks/estimators.py`` (about a minute or two on a laptop CPU).
"""

import argparse
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from curvopt.curvature.estimators import (
  hutchinson_trace,
  hutchpp_trace,
  spectral_density,
  top_eigenvalues,
)
from curvopt.curvature.products import hvp_fn


def train_mlp(steps: int, seed: int = 0):
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y)
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
    "w1": jax.random.normal(k1, (64, 32), jnp.float32) / 8.0,
    "b1": jnp.zeros(32, jnp.float32),
    "w2": jax.random.normal(k2, (32, 10), jnp.float32) / np.sqrt(32.0),
    "b2": jnp.zeros(10, jnp.float32),
  }

  def loss_fn(p):
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = opt.init(params)
  for _ in range(steps):
    params, state, loss = step(params, state)
  return loss_fn, params, float(loss)


def power_iteration_deflation(matvec, like, key, *, k, max_iters=100, tol=1e-3):
  """PyHessian's ``eigenvalues``: power iteration, deflating the converged eigenvectors.

  Each eigenpair restarts from a random vector kept orthogonal to the previous eigenvectors,
  and stops when ``|λ - λ_prev| / (|λ_prev| + 1e-6) < tol`` or after ``max_iters`` steps.
  Returns the eigenvalues and the number of matvecs used.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(like)
  n = flat.size
  flat_mv = lambda v: jax.flatten_util.ravel_pytree(matvec(unravel(v)))[0]

  def orthonormal(v, found):
    v = v - found.T @ (found @ v)
    return v / jnp.linalg.norm(v)

  found = jnp.zeros((k, n), flat.dtype)
  eigenvalues, total = [], 0
  for i, key_i in enumerate(jax.random.split(key, k)):
    v0 = orthonormal(jax.random.normal(key_i, (n,), flat.dtype), found)

    def cond(c):
      _, lam, lam_prev, it = c
      return (it < max_iters) & (
        (it < 2) | (jnp.abs(lam - lam_prev) / (jnp.abs(lam_prev) + 1e-6) >= tol)
      )

    def body(c, found=found):
      v, lam, _, it = c
      hv = flat_mv(v)
      return orthonormal(hv, found), jnp.vdot(v, hv), lam, it + 1

    zero = jnp.zeros((), flat.dtype)
    v, lam, _, it = jax.lax.while_loop(cond, body, (v0, zero, zero, 0))
    found = found.at[i].set(v)
    eigenvalues.append(lam)
    total = total + it
  return jnp.stack(eigenvalues), total


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train-steps", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--k", type=int, default=5)
  parser.add_argument("--lanczos-iters", type=int, default=30)
  parser.add_argument("--slq-iters", type=int, default=80)
  parser.add_argument("--slq-runs", type=int, default=4)
  parser.add_argument("--trace-matvecs", type=int, default=90)
  args = parser.parse_args()
  k = args.k

  loss_fn, params, loss = train_mlp(args.train_steps)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  n = flat.size
  print(
    f"digits MLP 64-32-10, {n} parameters, training loss {loss:.4f} after "
    f"{args.train_steps} Adam steps"
  )

  # Dense reference (float64 eigh of the float32 Hessian).
  dense_fn = jax.jit(lambda f: jax.hessian(lambda g: loss_fn(unravel(g)))(f))
  hess, t_dense = timed(dense_fn, flat, repeats=1)
  hess = np.asarray(hess, np.float64)
  hess = (hess + hess.T) / 2
  t0 = time.perf_counter()
  ev = np.linalg.eigvalsh(hess)
  t_dense += time.perf_counter() - t0
  ref = ev[np.argsort(-np.abs(ev))][:k]

  matvec = hvp_fn(loss_fn, params)
  key = jax.random.key(0)

  rel_err = lambda values: float(np.max(np.abs(np.asarray(values, np.float64) - ref) / np.abs(ref)))
  rows = {}
  for iters in sorted({args.lanczos_iters // 2, args.lanczos_iters}):
    fn = jax.jit(
      lambda key, iters=iters: top_eigenvalues(matvec, params, key, k=k, num_iters=iters)
    )
    res, t = timed(fn, key, repeats=args.repeats)
    label = f"Lanczos, {iters} steps (curvopt)"
    rows[label] = (iters, t, rel_err(res.eigenvalues), bool(res.converged.all()))
  lanczos_row = rows[f"Lanczos, {args.lanczos_iters} steps (curvopt)"]
  power_rows = []
  for tol, max_iters in [(1e-3, 100), (1e-6, 1000)]:
    fn = jax.jit(
      lambda key, tol=tol, max_iters=max_iters: power_iteration_deflation(
        matvec, params, key, k=k, max_iters=max_iters, tol=tol
      )
    )
    (values, count), t = timed(fn, key, repeats=args.repeats)
    label = f"power iteration + deflation, tol {tol:g} (PyHessian)"
    rows[label] = (int(count), t, rel_err(values), None)
    power_rows.append(label)

  print(
    f"\nTop-{k} Hessian eigenvalues (largest magnitude), dense eigh: "
    f"{np.array2string(ref, precision=5)}"
  )
  print("| method | matvecs | time (ms) | max rel. error vs eigh | converged flag |")
  print("|---|---:|---:|---:|---|")
  for label, (count, t, err, conv) in rows.items():
    flag = "" if conv is None else str(conv)
    print(f"| {label} | {count} | {1e3 * t:.1f} | {err:.1e} | {flag} |")
  for label in power_rows:
    count, t, _, _ = rows[label]
    print(
      f"| **ratio Lanczos {args.lanczos_iters} / power tol {label.split('tol ')[1].split()[0]}** | "
      f"**{lanczos_row[0] / count:.2f}** | **{lanczos_row[1] / t:.2f}** | | |"
    )

  # Spectral density.
  num_points = 2000
  sigma = 0.01 * (ev.max() - ev.min())  # the width is the user's choice: 1% of the span
  density_fn = jax.jit(
    lambda key: spectral_density(
      matvec,
      params,
      key,
      num_iters=args.slq_iters,
      num_runs=args.slq_runs,
      grid=num_points,
      sigma=sigma,
    )
  )
  sd, t_sd = timed(density_fn, key, repeats=args.repeats)
  grid = np.asarray(sd.grid, np.float64)
  dens = np.asarray(sd.density, np.float64)
  dt = grid[1] - grid[0]
  exact = np.exp(-0.5 * ((grid[:, None] - ev[None, :]) / sigma) ** 2).sum(1)
  exact /= n * np.sqrt(2 * np.pi) * sigma
  l1 = np.abs(dens - exact).sum() * dt
  mass_sd = dens.sum() * dt
  mean_sd = (grid * dens).sum() * dt
  print(
    f"\nSpectral density (SLQ, {args.slq_runs} runs x {args.slq_iters} Lanczos steps, "
    f"sigma {sigma:.3g})"
  )
  print("| method | matvecs | time (ms) | mass | mean (trace/n) | L1 distance to exact |")
  print("|---|---:|---:|---:|---:|---:|")
  print(
    f"| SLQ (curvopt) | {args.slq_iters * args.slq_runs} | {1e3 * t_sd:.1f} | "
    f"{mass_sd:.4f} | {mean_sd:.4g} | {l1:.3f} |"
  )
  print(
    f"| dense jax.hessian + eigh | {n} (columns) | {1e3 * t_dense:.1f} | 1 | {ev.mean():.4g} | 0 |"
  )
  print(
    f"| **ratio SLQ / dense** | **{args.slq_iters * args.slq_runs / n:.3f}** | "
    f"**{t_sd / t_dense:.3f}** | | | |"
  )

  # Trace at equal budget, RMS error over several keys.
  m = args.trace_matvecs
  keys = jax.random.split(jax.random.key(1), 10)
  hutch_fn = jax.jit(lambda key: hutchinson_trace(matvec, params, key, num_samples=m).estimate)
  pp_fn = jax.jit(lambda key: hutchpp_trace(matvec, params, key, num_samples=m).estimate)
  exact_trace = np.trace(hess)
  rms = lambda fn: float(np.sqrt(np.mean([(float(fn(kk)) - exact_trace) ** 2 for kk in keys])))
  _, t_h = timed(hutch_fn, keys[0], repeats=args.repeats)
  _, t_pp = timed(pp_fn, keys[0], repeats=args.repeats)
  rms_h, rms_pp = rms(hutch_fn), rms(pp_fn)
  print(f"\nTrace (exact {exact_trace:.4g}), {m} matvecs, RMS error over 10 keys")
  print("| method | time (ms) | RMS relative error |")
  print("|---|---:|---:|")
  print(f"| Hutchinson | {1e3 * t_h:.1f} | {rms_h / abs(exact_trace):.2e} |")
  print(f"| Hutch++ | {1e3 * t_pp:.1f} | {rms_pp / abs(exact_trace):.2e} |")
  print(f"| **ratio Hutch++ / Hutchinson** | **{t_pp / t_h:.2f}** | **{rms_pp / rms_h:.2f}** |")


if __name__ == "__main__":
  main()
