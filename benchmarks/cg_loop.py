"""CG loop penalty: GGN products inside ``lax.while_loop`` / ``fori_loop`` vs unrolled, on CPU.

Issue 16 measured 20 GGN products on a small CNN (B=256) at ~5x the unrolled cost when run in a
``fori_loop``. This script times, in shuffled interleaved rounds (the machine is shared):

* ``unrolled``: 20 products in straight-line code (one XLA computation, no loop);
* ``fori_loop``: the same 20 products in ``lax.fori_loop``;
* ``fori_loop canonical``: the same, with the product wrapped in
  :func:`curvopt.linalg.conv_layout.canonical_convolutions`;
* ``cg as_is`` / ``cg``: :func:`curvopt.linalg.cg.conjugate_gradient` with ``max_steps=20,
  tol=0`` and ``conv_layout="as_is"`` / the default (canonical on CPU);
* ``cg unroll=k``: the default with ``k`` iterations per ``while_loop`` trip;

for a CNN (two 3x3 convolutions + dense, 28x28 inputs) and an MLP, and prints the ratios to
``unrolled``. ``--hlo DIR`` writes the optimised HLO of every variant for reading.

What it found (issue 16): inside the loop, the convolutions of the GGN product's backward pass
keep non-canonical dimension numbers (``f01b_i01o->01bf`` for the weight gradients,
``b01f_01oi->b01f`` for the input gradient), because XLA:CPU's ``ConvCanonicalization`` pass
visits only the entry computation; XLA then emits them as naive loop nests instead of Eigen
convolutions. Straight-line code gets them canonicalised. Re-emitting the convolutions in
canonical layout at the JAX level (``canonical_convolutions``) removes the penalty.

Run: ``PYTHONPATH=$PWD python benchmarks/cg_loop.py [--rounds 10] [--hlo /tmp/hlo]``.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_median_seconds, print_table  # noqa: E402

import curvopt  # noqa: E402
from curvopt.curvature.products import ggn_fn  # noqa: E402
from curvopt.linalg.cg import conjugate_gradient  # noqa: E402
from curvopt.linalg.conv_layout import canonical_convolutions  # noqa: E402

NUM_PRODUCTS = 20


def cnn_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "conv1": jax.random.normal(k1, (3, 3, 1, 8), jnp.float32) / 3.0,
    "conv2": jax.random.normal(k2, (3, 3, 8, 16), jnp.float32) / np.sqrt(72.0),
    "dense": jax.random.normal(k3, (7 * 7 * 16, 10), jnp.float32) / np.sqrt(784.0),
    "bias": jnp.zeros(10, jnp.float32),
  }


def cnn_apply(params, x):
  x = x.reshape(-1, 28, 28, 1)
  dims = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dims)
  x = jax.nn.relu(conv(x, params["conv1"]))
  x = jax.nn.relu(conv(x, params["conv2"]))
  return x.reshape(x.shape[0], -1) @ params["dense"] + params["bias"]


def mlp_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "w1": jax.random.normal(k1, (784, 256), jnp.float32) / 28.0,
    "w2": jax.random.normal(k2, (256, 256), jnp.float32) / 16.0,
    "w3": jax.random.normal(k3, (256, 10), jnp.float32) / 16.0,
  }


def mlp_apply(params, x):
  x = jnp.tanh(x @ params["w1"])
  x = jnp.tanh(x @ params["w2"])
  return x @ params["w3"]


def problem(name, batch_size=256):
  key = jax.random.key(0)
  kp, kx, ky = jax.random.split(key, 3)
  params = (cnn_params if name == "cnn" else mlp_params)(kp)
  apply = cnn_apply if name == "cnn" else mlp_apply
  x = jax.random.normal(kx, (batch_size, 784), jnp.float32)
  y = jax.random.randint(ky, (batch_size,), 0, 10)

  def loss_of_logits(logits):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  return params, lambda p: apply(p, x), loss_of_logits


def candidates(name, unrolls=(4,)):
  params, model, loss = problem(name)
  v0 = jax.tree.map(jnp.ones_like, params)

  def step(matvec, v):  # a CG-like recurrence: keeps the values bounded
    gv = matvec(v)
    return jax.tree.map(lambda a, b: a - 1e-3 * b, v, gv)

  @jax.jit
  def unrolled(params, v):
    matvec = ggn_fn(model, loss, params)
    for _ in range(NUM_PRODUCTS):
      v = step(matvec, v)
    return v

  def fori(wrap):
    @jax.jit
    def run(params, v):
      matvec = wrap(ggn_fn(model, loss, params))
      return jax.lax.fori_loop(0, NUM_PRODUCTS, lambda _, v: step(matvec, v), v)

    return run

  def cg(unroll=1, conv_layout="auto"):
    @jax.jit
    def solve(params, b):
      matvec = ggn_fn(model, loss, params)
      return conjugate_gradient(
        matvec,
        b,
        damping=1e-3,
        max_steps=NUM_PRODUCTS,
        tol=0.0,
        steihaug=False,
        unroll=unroll,
        conv_layout=conv_layout,
      ).x

    return solve

  fns = {
    "unrolled": unrolled,
    "fori_loop": fori(lambda f: f),
    "fori_loop canonical": fori(canonical_convolutions),
    "cg as_is": cg(conv_layout="as_is"),
    "cg": cg(),
  }
  fns.update({f"cg unroll={k}": cg(unroll=k) for k in unrolls})
  return fns, (params, v0)


def newton_candidates(batch_size=256):
  """One ``newton_cg`` step (GGN, 20 CG iterations) on the CNN, convolutions canonical or as
  they are, and one Adam step: issue 16's "newton_cg step vs Adam step" row."""
  import optax

  from curvopt.linalg import cg as cg_module
  from curvopt.optimizers import newton_cg as newton_module

  key = jax.random.key(0)
  kp, kx, ky = jax.random.split(key, 3)
  params = cnn_params(kp)
  x = jax.random.normal(kx, (batch_size, 784), jnp.float32)
  y = jax.random.randint(ky, (batch_size,), 0, 10)
  model_fn = lambda p, x: cnn_apply(p, x)

  def loss_fn(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  value_fn = newton_module.value_fn_from_model(model_fn, loss_fn)
  tx = newton_module.newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=curvopt.LevenbergMarquardt(init=1e-3, adapt=False, accept_ratio=None),
    solver=curvopt.CG(max_steps=NUM_PRODUCTS, tol=1e-30, progress_tol=None),
  )
  state = tx.init(params)

  def newton_step(conv_layout):
    # The optimiser reaches conjugate_gradient through the curvopt.linalg.cg module attribute:
    # swap it while tracing to choose the layout.
    solve = cg_module.conjugate_gradient

    @jax.jit
    def step(params, state):
      cg_module.conjugate_gradient = lambda *a, **k: solve(*a, **k, conv_layout=conv_layout)
      try:
        grads = jax.grad(value_fn)(params, x=x, y=y)
        updates, state = tx.update(grads, state, params, x=x, y=y)
      finally:
        cg_module.conjugate_gradient = solve
      return optax.apply_updates(params, updates), state

    return lambda: step(params, state)

  adam = optax.adam(1e-3)
  adam_state = adam.init(params)

  @jax.jit
  def adam_step(params, adam_state):
    grads = jax.grad(value_fn)(params, x=x, y=y)
    updates, adam_state = adam.update(grads, adam_state, params)
    return optax.apply_updates(params, updates), adam_state

  return {
    "adam step": lambda: adam_step(params, adam_state),
    "newton_cg step as_is": newton_step("as_is"),
    "newton_cg step": newton_step("auto"),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--models", default="cnn,mlp", help='"cnn,mlp", one of them, or "none"')
  parser.add_argument("--unrolls", default="4")
  parser.add_argument("--hlo", default=None, help="directory for optimised HLO dumps")
  parser.add_argument("--newton", action="store_true", help="also time newton_cg vs Adam steps")
  args = parser.parse_args()
  unrolls = tuple(int(k) for k in args.unrolls.split(","))
  rows = []
  for name in [m for m in args.models.split(",") if m in ("cnn", "mlp")]:
    fns, fn_args = candidates(name, unrolls)
    if args.hlo:
      os.makedirs(args.hlo, exist_ok=True)
      for label, fn in fns.items():
        text = fn.lower(*fn_args).compile().as_text()
        path = os.path.join(args.hlo, f"{name}_{label.replace(' ', '_').replace('=', '')}.hlo")
        with open(path, "w") as f:
          f.write(text)
    times = interleaved_median_seconds(
      {label: (lambda fn=fn: fn(*fn_args)) for label, fn in fns.items()},
      repeats=args.rounds,
      min_seconds=0.0,
    )
    base = times["unrolled"]
    for label, t in times.items():
      rows.append([name, label, f"{1e3 * t:.1f}", f"{t / base:.2f}"])
  if rows:
    print_table(
      f"{NUM_PRODUCTS} GGN products, B=256 (medians of interleaved rounds; shared 2-core CPU)",
      ["model", "variant", "ms", "x unrolled"],
      rows,
    )
  if args.newton:
    times = interleaved_median_seconds(newton_candidates(), repeats=args.rounds, min_seconds=0.0)
    base = times["adam step"]
    print_table(
      f"CNN B=256: newton_cg step ({NUM_PRODUCTS} CG iterations, GGN) vs Adam step",
      ["variant", "ms", "x Adam"],
      [[label, f"{1e3 * t:.1f}", f"{t / base:.1f}"] for label, t in times.items()],
    )


if __name__ == "__main__":
  main()
