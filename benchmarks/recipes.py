"""Benchmarks for the differentiation recipes (curvopt.implicit, curvopt.targets, curvopt.meta).

Prints three tables of ratios measured in one run:

1. gradient of a fixed point x = tanh(W x + b) (batch of states): ``curvopt.fixed_point``'s
   implicit gradient vs backpropagating through the unrolled 200-iteration solve
   (time, and compiled temporary memory from ``memory_analysis()``);
2. per-example TD(0) gradients: ``jit(vmap(grad(td0_loss)))`` vs a Python loop over
   ``jit(grad(td0_loss))``;
3. meta-gradient compiled temporary memory against the number of inner steps: MAML
   (backprop through the loop) vs implicit MAML.

Run: ``python benchmarks/recipes.py`` (CPU, about a minute). ``--quick`` for a smoke run.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.autodiff.implicit import fixed_point, fixed_point_solve
from curvopt.recipes.meta import maml_loss
from curvopt.recipes.targets import td0_loss


def _median_time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _tanh_step(params, x):
  return jnp.tanh(x @ params["W"].T + params["b"])


def fixed_point_table(batch, dim, num_iters, repeats):
  rng = np.random.default_rng(0)
  W = rng.normal(size=(dim, dim)).astype(np.float32)
  params = {
    "W": jnp.asarray(0.9 * W / np.linalg.norm(W, 2)),
    "b": jnp.asarray(rng.normal(size=dim), jnp.float32),
  }
  x0 = jnp.zeros((batch, dim), jnp.float32)

  def unrolled(params):
    x = jax.lax.fori_loop(0, num_iters, lambda _, x: _tanh_step(params, x), x0)
    return jnp.sum(x**2)

  def implicit(tol):
    # tol=1e-30 never converges on purpose (it times all iterations): no warning for it. The
    # converging run keeps the default status check (on_failure="warn", a host callback).
    on_failure = "ignore" if tol < 1e-20 else "warn"

    def loss(params):
      x = fixed_point(_tanh_step, params, x0, tol=tol, max_iter=num_iters, on_failure=on_failure)
      return jnp.sum(x**2)

    return loss

  iters = lambda tol: int(
    fixed_point_solve(
      _tanh_step, params, x0, tol=tol, max_iter=num_iters, on_failure="ignore"
    ).num_iters
  )
  rows = [("unrolled backprop", unrolled, num_iters)]
  rows.append(("fixed_point, tol=1e-30 (all iters)", implicit(1e-30), iters(1e-30)))
  rows.append(("fixed_point, tol=1e-6", implicit(1e-6), iters(1e-6)))
  reference = jax.jit(jax.grad(unrolled))(params)
  results = []
  for name, loss, iters in rows:
    grad = jax.jit(jax.grad(loss))
    t = _median_time(grad, params, repeats=repeats)
    mem = _temp_bytes(jax.grad(loss), params)
    err = max(
      float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
      for g, r in zip(jax.tree.leaves(grad(params)), jax.tree.leaves(reference), strict=True)
    )
    results.append((name, iters, t, mem, err))
  print(
    f"\n1. Gradient of a fixed point x = tanh(W x + b), x: ({batch}, {dim}) float32, "
    f"max {num_iters} iterations"
  )
  print(
    f"{'method':38s} {'fwd iters':>9s} {'time ms':>9s} {'time ratio':>10s} "
    f"{'temp MiB':>9s} {'mem ratio':>9s} {'max rel err':>11s}"
  )
  _, _, base_time, base_mem, _ = results[0]
  for name, iters, t, mem, err in results:
    print(
      f"{name:38s} {iters:9d} {1e3 * t:9.2f} {t / base_time:10.3f} "
      f"{mem / 2**20:9.2f} {mem / max(base_mem, 1):9.3f} {err:11.1e}"
    )


def td_table(batch, repeats):
  rng = np.random.default_rng(1)
  dim, hidden = 16, 64
  params = {
    "w1": jnp.asarray(rng.normal(size=(dim, hidden)) / 4, jnp.float32),
    "w2": jnp.asarray(rng.normal(size=hidden) / 8, jnp.float32),
  }
  value_fn = lambda p, s: jnp.tanh(s @ p["w1"]) @ p["w2"]
  s_tm1 = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  s_t = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  r_t = jnp.asarray(rng.normal(size=batch), jnp.float32)
  discount = jnp.full(batch, 0.99, jnp.float32)
  grad_one = jax.jit(jax.grad(td0_loss, argnums=1), static_argnums=0)
  grad_batch = jax.jit(
    jax.vmap(jax.grad(td0_loss, argnums=1), in_axes=(None, None, 0, 0, 0, 0)), static_argnums=0
  )

  def python_loop(params, s_tm1, r_t, s_t, discount):
    return [grad_one(value_fn, params, s_tm1[i], r_t[i], s_t[i], discount[i]) for i in range(batch)]

  t_loop = _median_time(python_loop, params, s_tm1, r_t, s_t, discount, repeats=repeats)
  t_vmap = _median_time(
    lambda *a: grad_batch(value_fn, *a), params, s_tm1, r_t, s_t, discount, repeats=repeats
  )
  loop = python_loop(params, s_tm1, r_t, s_t, discount)
  batched = grad_batch(value_fn, params, s_tm1, r_t, s_t, discount)
  err = float(jnp.max(jnp.abs(batched["w1"][3] - loop[3]["w1"])))
  print(f"\n2. Per-example TD(0) gradients, batch {batch}, MLP {dim}-{hidden}-1, float32")
  print(f"{'method':38s} {'time ms':>9s} {'ratio to loop':>13s}")
  print(f"{'Python loop of jit(grad)':38s} {1e3 * t_loop:9.2f} {1.0:13.3f}")
  print(f"{'jit(vmap(grad(td0_loss)))':38s} {1e3 * t_vmap:9.2f} {t_vmap / t_loop:13.4f}")
  print(f"(speed-up {t_loop / t_vmap:.0f}x; max abs difference {err:.1e})")


def meta_memory_table(steps_list):
  rng = np.random.default_rng(2)
  dim, n = 256, 32
  params = jnp.asarray(rng.normal(size=dim) / 16, jnp.float32)
  task = lambda: (
    jnp.asarray(rng.normal(size=(n, dim)), jnp.float32),
    jnp.asarray(rng.normal(size=n), jnp.float32),
  )
  support, query = task(), task()
  loss_fn = lambda w, b: jnp.mean(jnp.tanh(b[0] @ w - b[1]) ** 2)
  print(f"\n3. Meta-gradient compiled temp memory (KiB), {dim} params, {n} examples, float32")
  print(f"{'inner steps':>11s} {'MAML':>10s} {'iMAML':>10s} {'iMAML / MAML':>12s}")
  for steps in steps_list:
    maml = maml_loss(loss_fn, inner_lr=0.01, inner_steps=steps)
    imaml = maml_loss(loss_fn, inner_lr=0.01, inner_steps=steps, implicit=True, proximal_lambda=1.0)
    m1 = _temp_bytes(jax.grad(maml), params, support, query)
    m2 = _temp_bytes(jax.grad(imaml), params, support, query)
    print(f"{steps:11d} {m1 / 1024:10.1f} {m2 / 1024:10.1f} {m2 / m1:12.3f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
  args = parser.parse_args()
  repeats = 3 if args.quick else 7
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  if args.quick:
    fixed_point_table(batch=16, dim=64, num_iters=200, repeats=repeats)
    td_table(batch=32, repeats=repeats)
    meta_memory_table([10, 100])
  else:
    fixed_point_table(batch=128, dim=256, num_iters=200, repeats=repeats)
    td_table(batch=256, repeats=repeats)
    meta_memory_table([10, 100, 1000])


if __name__ == "__main__":
  main()
