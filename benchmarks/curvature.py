"""Cost of curvopt's derivatives and curvature products, as ratios measured in one run.

Run: ``python benchmarks/curvature.py`` (CPU by default; add ``--quick`` for fewer repeats).

1. On an MLP 784-256-256-10 with softmax cross-entropy at batch 256: each product's time over
   one gradient, and over the hand-written JAX composition it replaces.
2. ``jacobian(mode="auto")`` against ``jacfwd`` and ``jacrev`` for a tall (32 -> 2048) and a
   wide (2048 -> 32) ``tanh(W x + b)`` predictor (the JAX autodiff cookbook's comparison).
3. ``jacobian_gram`` against forming both Jacobians (``f: R^10000 -> R^5``).
4. ``batch_jacobian`` and ``jacobian_diagonal`` against the full Jacobian of a row-wise MLP
   applied to a batch of 100 rows.
"""

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_median_seconds, median_seconds, print_table  # noqa: E402

import curvopt  # noqa: E402


def mlp_problem(key, sizes=(784, 256, 256, 10), batch=256):
  keys = jax.random.split(key, len(sizes) + 1)
  params = [
    {
      "w": jax.random.normal(k, (m, n)) / jnp.sqrt(m),
      "b": jnp.zeros(n),
    }
    for k, m, n in zip(keys[:-2], sizes[:-1], sizes[1:], strict=True)
  ]
  x = jax.random.normal(keys[-2], (batch, sizes[0]))
  labels = jax.nn.one_hot(jax.random.randint(keys[-1], (batch,), 0, sizes[-1]), sizes[-1])

  def model_fn(params):
    h = x
    for layer in params[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]

  def loss_fn(logits):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=-1))

  return params, model_fn, loss_fn


def bench_products(repeats):
  params, model_fn, loss_fn = mlp_problem(jax.random.key(0))
  f = lambda p: loss_fn(model_fn(p))
  v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape), params)

  grad = jax.jit(jax.grad(f))
  raw_fwd_rev = jax.jit(lambda p, v: jax.jvp(jax.grad(f), (p,), (v,))[1])

  def raw_ggn(p, v):
    z, jv = jax.jvp(model_fn, (p,), (v,))
    hjv = jax.jvp(jax.grad(loss_fn), (z,), (jv,))[1]
    return jax.vjp(model_fn, p)[1](hjv)[0]

  candidates = {
    "gradient (jax.grad)": (lambda: grad(params), None),
    "hvp fwd_rev": (lambda: hvp_fr(params, v), "jvp(grad(f))"),
    "hvp rev_fwd": (lambda: hvp_rf(params, v), "jvp(grad(f))"),
    "hvp rev_rev": (lambda: hvp_rr(params, v), "jvp(grad(f))"),
    "hvp_fn matvec (linearised once)": (lambda: hvp_lin(v), "jvp(grad(f))"),
    "ggn_vp": (lambda: ggn(params, v), "jvp + jvp(grad) + vjp"),
    "ggn_fn matvec (linearised once)": (lambda: ggn_lin(v), "jvp + jvp(grad) + vjp"),
  }
  hvp_fr = jax.jit(lambda p, v: curvopt.hvp(f, p, v, mode="fwd_rev"))
  hvp_rf = jax.jit(lambda p, v: curvopt.hvp(f, p, v, mode="rev_fwd"))
  hvp_rr = jax.jit(lambda p, v: curvopt.hvp(f, p, v, mode="rev_rev"))
  ggn = jax.jit(lambda p, v: curvopt.ggn_vp(model_fn, loss_fn, p, v))
  # Linearised matvecs: the linearisation runs once, outside the timed call, as inside CG.
  hvp_lin = jax.jit(curvopt.hvp_fn(f, params))
  ggn_lin = jax.jit(curvopt.ggn_fn(model_fn, loss_fn, params))
  raw_ggn_jit = jax.jit(raw_ggn)
  fns = {name: fn for name, (fn, _) in candidates.items()}
  fns["jvp(grad(f))"] = lambda: raw_fwd_rev(params, v)
  fns["jvp + jvp(grad) + vjp"] = lambda: raw_ggn_jit(params, v)
  times = interleaved_median_seconds(fns, repeats=repeats)
  t_grad = times["gradient (jax.grad)"]
  rows = []
  for name, (_, reference) in candidates.items():
    t = times[name]
    ratio_raw = f"{t / times[reference]:.3f}" if reference else "-"
    rows.append([name, t * 1e3, t / t_grad, ratio_raw, reference or "-"])
  print_table(
    "Curvature products, MLP 784-256-256-10, batch 256, float32",
    ["product", "ms", "x gradient", "x raw JAX", "raw JAX composition"],
    rows,
  )


def bench_jacobian_modes(repeats):
  rows = []
  for name, (n_in, n_out) in {"tall 32->2048": (32, 2048), "wide 2048->32": (2048, 32)}.items():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    w = jax.random.normal(k1, (n_out, n_in))
    b = jax.random.normal(k2, (n_out,))
    x = jax.random.normal(k3, (n_in,))
    predict = lambda x, w=w, b=b: jnp.tanh(w @ x + b)
    times = interleaved_median_seconds(
      {
        mode: functools.partial(jax.jit(curvopt.jacobian(predict, mode=mode)), x)
        for mode in ("auto", "fwd", "rev")
      },
      repeats=10 * repeats,  # sub-millisecond calls: many rounds for steady medians
    )
    best = min(times["fwd"], times["rev"])
    rows.append(
      [
        name,
        times["fwd"] * 1e3,
        times["rev"] * 1e3,
        times["auto"] * 1e3,
        times["auto"] / best,
        max(times["fwd"], times["rev"]) / best,
      ]
    )
  print_table(
    "jacobian(mode='auto') vs fixed modes, tanh(Wx + b)",
    ["case", "jacfwd ms", "jacrev ms", "auto ms", "auto / best", "worst / best"],
    rows,
  )


def bench_gram(repeats):
  n, m = 10000, 5
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  w = jax.random.normal(k1, (m, n)) / jnp.sqrt(n)
  f = lambda x: jnp.tanh(w @ jnp.sin(x))
  x1, x2 = jax.random.normal(k2, (n,)), jax.random.normal(k3, (n,))
  ours = jax.jit(lambda a, b: curvopt.jacobian_gram(f, a, b))
  both_rev = jax.jit(lambda a, b: jax.jacrev(f)(a) @ jax.jacrev(f)(b).T)
  times = interleaved_median_seconds(
    {"ours": lambda: ours(x1, x2), "rev": lambda: both_rev(x1, x2)}, repeats=repeats
  )
  t_ours, t_rev = times["ours"], times["rev"]
  print_table(
    "jacobian_gram, f: R^10000 -> R^5",
    ["method", "ms", "x jacobian_gram"],
    [
      ["jacobian_gram (vjp then jvp, vmapped)", t_ours * 1e3, 1.0],
      ["jacrev(f)(x1) @ jacrev(f)(x2).T", t_rev * 1e3, t_rev / t_ours],
    ],
  )


def bench_batched(repeats, batch=100, width=64):
  keys = jax.random.split(jax.random.key(4), 3)
  w1 = jax.random.normal(keys[0], (width, width)) / jnp.sqrt(width)
  w2 = jax.random.normal(keys[1], (width, width)) / jnp.sqrt(width)
  x = jax.random.normal(keys[2], (batch, width))
  f = lambda x: jnp.tanh(jnp.tanh(x @ w1) @ w2) + x
  full = jax.jit(jax.jacrev(f))
  bj = jax.jit(lambda x: curvopt.batch_jacobian(f, x))
  diag_rows = jax.jit(lambda x: curvopt.jacobian_diagonal(f, x, batch_dims=1))
  diag_elementwise = jax.jit(lambda x: curvopt.jacobian_diagonal(jnp.tanh, x))
  t_full = median_seconds(lambda: full(x), repeats=max(3, repeats // 4))
  rows = [["full jax.jacrev", t_full * 1e3, 1.0]]
  for name, fn in [
    ("batch_jacobian", lambda: bj(x)),
    ("jacobian_diagonal(batch_dims=1)", lambda: diag_rows(x)),
    ("jacobian_diagonal of elementwise tanh (1 JVP)", lambda: diag_elementwise(x)),
  ]:
    t = median_seconds(fn, repeats=repeats)
    rows.append([name, t * 1e3, t_full / t])
  print_table(
    f"Batched Jacobians, row-wise MLP on a ({batch}, {width}) batch "
    f"(full Jacobian {batch * width}x{batch * width})",
    ["method", "ms", "speed-up vs full"],
    rows,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  args = parser.parse_args()
  repeats = 5 if args.quick else 30
  print(f"devices: {jax.devices()}, jax {jax.__version__}")
  bench_products(repeats)
  bench_jacobian_modes(repeats)
  bench_gram(repeats)
  bench_batched(repeats)


if __name__ == "__main__":
  main()
