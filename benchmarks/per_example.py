"""Per-example clipped gradient vs a plain mini-batch gradient: time and peak-memory ratios.

    python benchmarks/per_example.py [--quick] [--only {tables,guard,ghost}]

Models: an MLP 784-256-256-10 (ReLU) and a small CNN (two 3x3 convolutions, 8 and 16
channels, on 28x28x1 inputs, then a dense layer to 10), softmax cross-entropy, float32.
Columns, each as a ratio to ``jax.grad`` of the batch-mean loss measured in the same run:

- ``vmap``: ``clipped_grad(method="vmap")`` (per-example gradients, one contraction);
- ``chunked``: the same with ``chunk_size=32`` (lax.scan over chunks, bounded memory);
- ``loop``: a Python loop over examples of a jitted one-example gradient, clipped and summed
  on the host side of the loop (the naive reference);
- ``ghost``: ``clipped_grad(method="ghost")``, included whenever it works.

``--only ghost`` times ghost and vmap against the plain gradient on the MLP, the CNN and a
transformer block (seq 128, d 256, 4 heads) at B = 32 and 256, with peak memory (issue 16).

``--only guard`` measures the non-finite guard (issue 17) when every example is finite: the
step time and the compile time of ``clipped_sum_fn`` as shipped against the same method pass
with the guard removed (interleaved medians, so load drift hits both alike).

Time: after a compile warm-up, ``block_until_ready``; each ratio is the median over rounds of
(candidate time / plain time), the two timed back to back in each round (the machine may be
shared). The plain-gradient column is its own median time. Peak memory: XLA's
``compiled.memory_analysis()`` (temporaries + outputs) of the jitted function; for the loop,
that of one jitted per-example step.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_median_seconds, median_seconds, print_table  # noqa: E402

from curvopt import clipped_grad  # noqa: E402
from curvopt.privacy import clipping  # noqa: E402

CLIP = 1.0


def mlp_params(key, sizes=(784, 256, 256, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {
      "w": jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m),
      "b": jnp.zeros(n, jnp.float32),
    }
    for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def mlp_loss(params, example):
  h = example["x"]
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = h @ params[-1]["w"] + params[-1]["b"]
  return -jax.nn.log_softmax(logits)[example["y"]]


def cnn_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "conv1": jax.random.normal(k1, (3, 3, 1, 8), jnp.float32) / 3.0,
    "conv2": jax.random.normal(k2, (3, 3, 8, 16), jnp.float32) / np.sqrt(72.0),
    "dense": jax.random.normal(k3, (7 * 7 * 16, 10), jnp.float32) / np.sqrt(784.0),
    "bias": jnp.zeros(10, jnp.float32),
  }


def cnn_loss(params, example):
  x = example["x"].reshape(1, 28, 28, 1)
  dims = ("NHWC", "HWIO", "NHWC")
  x = jax.nn.relu(
    jax.lax.conv_general_dilated(x, params["conv1"], (2, 2), "SAME", dimension_numbers=dims)
  )
  x = jax.nn.relu(
    jax.lax.conv_general_dilated(x, params["conv2"], (2, 2), "SAME", dimension_numbers=dims)
  )
  logits = x.reshape(-1) @ params["dense"] + params["bias"]
  return -jax.nn.log_softmax(logits)[example["y"]]


def make_batch(key, size):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (size, 784), jnp.float32),
    "y": jax.random.randint(ky, (size,), 0, 10),
  }


def paired_ratio(fn, plain, *, rounds):
  """Median over rounds of time(fn)/time(plain), each round timing both back to back.

  The machine is shared: pairing the two measurements cancels most of the load drift that
  separate medians would fold into the ratio.
  """
  ratios = []
  for _ in range(rounds):
    t_fn = median_seconds(fn, repeats=3, min_seconds=0.0)
    t_plain = median_seconds(plain, repeats=3, min_seconds=0.0)
    ratios.append(t_fn / t_plain)
  return float(np.median(ratios))


def peak_bytes(fn, *args):
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    return float("nan")
  return stats.temp_size_in_bytes + stats.output_size_in_bytes


def plain_grad_fn(loss_fn):
  def batch_loss(params, batch):
    return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))

  return jax.grad(batch_loss)


def loop_clipped_grad(loss_fn, params, batch, size):
  """Naive reference: one jitted per-example gradient per example, clipped and summed."""
  step = _loop_step(loss_fn)
  total = jax.tree.map(jnp.zeros_like, params)
  for i in range(size):
    total = step(params, total, jax.tree.map(lambda x, i=i: x[i], batch))
  return jax.tree.map(lambda t: t / size, total)


@functools.cache
def _loop_step(loss_fn):
  @jax.jit
  def step(params, total, example):
    g = jax.grad(loss_fn)(params, example)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    factor = jnp.minimum(1.0, CLIP / norm)
    return jax.tree.map(lambda t, x: t + factor * x, total, g)

  return step


def measure(name, loss_fn, params, batch, *, repeats, with_loop=True, with_chunked=True):
  size = batch["y"].shape[0]
  plain = jax.jit(plain_grad_fn(loss_fn))
  t_plain = median_seconds(lambda: plain(params, batch), repeats=repeats)
  m_plain = peak_bytes(plain_grad_fn(loss_fn), params, batch)
  row = {"plain": (t_plain, m_plain)}
  candidates = {"vmap": clipped_grad(loss_fn, CLIP)}
  if with_chunked:
    candidates["chunked"] = clipped_grad(loss_fn, CLIP, chunk_size=32)
  try:
    ghost = clipped_grad(loss_fn, CLIP, method="ghost")
    jax.block_until_ready(jax.jit(ghost)(params, batch))
    candidates["ghost"] = ghost
  except Exception as e:  # noqa: BLE001 (the ghost column is optional)
    print(f"[{name}] ghost column skipped: {type(e).__name__}: {e}", file=sys.stderr)
  run_plain = lambda: plain(params, batch)
  for label, fn in candidates.items():
    jitted = jax.jit(fn)
    row[label] = (
      paired_ratio(lambda jitted=jitted: jitted(params, batch), run_plain, rounds=repeats),
      peak_bytes(fn, params, batch) / m_plain,
    )
  if with_loop:
    t_loop = paired_ratio(
      lambda: loop_clipped_grad(loss_fn, params, batch, size), run_plain, rounds=2
    )
    example = jax.tree.map(lambda x: x[0], batch)
    m_loop = peak_bytes(
      lambda p, t, e: _loop_step(loss_fn).__wrapped__(p, t, e), params, params, example
    )
    row["loop"] = (t_loop, m_loop / m_plain)
  return row


def transformer_params(key, d=256, heads=4, mlp=4):
  ks = jax.random.split(key, 7)
  dense = lambda k, a, b: jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a)
  del heads
  return {
    "ln1": {"scale": jnp.ones(d, jnp.float32), "bias": jnp.zeros(d, jnp.float32)},
    "q": dense(ks[0], d, d),
    "k": dense(ks[1], d, d),
    "v": dense(ks[2], d, d),
    "o": dense(ks[3], d, d),
    "ln2": {"scale": jnp.ones(d, jnp.float32), "bias": jnp.zeros(d, jnp.float32)},
    "mlp_in": dense(ks[4], d, mlp * d),
    "mlp_out": dense(ks[5], mlp * d, d),
    "head": dense(ks[6], d, 10),
  }


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = jnp.square(x - mu).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def transformer_loss(params, example, heads=4):
  """A pre-LayerNorm transformer block on one (T, d) sequence, mean-pooled to 10 logits."""
  x = example["x"]
  t, d = x.shape
  h = _layer_norm(x, params["ln1"])
  split = lambda z: z.reshape(t, heads, d // heads)
  q, k, v = split(h @ params["q"]), split(h @ params["k"]), split(h @ params["v"])
  att = jax.nn.softmax(jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d // heads), axis=-1)
  x = x + jnp.einsum("hts,shd->thd", att, v).reshape(t, d) @ params["o"]
  x = x + jax.nn.gelu(_layer_norm(x, params["ln2"]) @ params["mlp_in"]) @ params["mlp_out"]
  logits = x.mean(axis=0) @ params["head"]
  return -jax.nn.log_softmax(logits)[example["y"]]


def _transformer_batch(key, size, seq=128, d=256):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (size, seq, d), jnp.float32),
    "y": jax.random.randint(ky, (size,), 0, 10),
  }


def ghost_table(repeats, sizes=(32, 256), models=("mlp", "cnn", "transformer")):
  """Ghost and vmap against a plain gradient, time and peak memory, per model and batch size.

  The rows of issue 16's table: the MLP, the CNN and a transformer block (seq 128, d 256,
  4 heads) at each batch size, the three candidates timed in shuffled interleaved rounds.
  """
  key = jax.random.key(0)
  builders = {
    "mlp": ("MLP 784-256-256-10", mlp_loss, mlp_params(key), make_batch),
    "cnn": ("CNN conv8-conv16-dense", cnn_loss, cnn_params(key), make_batch),
    "transformer": (
      "Transformer block (seq 128, d 256, 4 heads)",
      transformer_loss,
      transformer_params(key),
      _transformer_batch,
    ),
  }
  rows = []
  for model in models:
    name, loss_fn, params, batch_fn = builders[model]
    for size in sizes:
      batch = batch_fn(jax.random.key(size), size)
      plain = jax.jit(plain_grad_fn(loss_fn))
      fns = {"plain": lambda plain=plain, batch=batch: plain(params, batch)}
      mems = {"plain": peak_bytes(plain_grad_fn(loss_fn), params, batch)}
      for method in ("vmap", "ghost"):
        fn = clipped_grad(loss_fn, CLIP, method=method)
        jitted = jax.jit(fn)
        fns[method] = lambda jitted=jitted, batch=batch: jitted(params, batch)
        mems[method] = peak_bytes(fn, params, batch)
      times = interleaved_median_seconds(fns, repeats=repeats, min_seconds=0.0)
      rows.append(
        [name, size, f"{1e3 * times['plain']:.4g} ms", f"{mems['plain'] / 2**20:.4g} MiB"]
        + [times[m] / times["plain"] for m in ("vmap", "ghost")]
        + [mems[m] / mems["plain"] for m in ("vmap", "ghost")]
        + ["<= 1.5x"]
      )
  print_table(
    "Ghost clipping against a plain mini-batch gradient (ratios; goal: ghost time <= 1.5x)",
    [
      "model",
      "batch",
      "plain time",
      "plain memory",
      "vmap time",
      "ghost time",
      "vmap mem",
      "ghost mem",
      "goal",
    ],
    rows,
  )


def _unguarded_pass(run, loss_fn, params, batch, is_padding, weights_of):
  """The method pass alone, as before the non-finite guard (for the guard's cost only)."""
  del loss_fn, params, weights_of
  total, sq = run(batch, is_padding)
  return total, sq, jnp.zeros(is_padding.shape, bool)


def _compile_seconds(fn, *args):
  t0 = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - t0


def guard_cost(repeats):
  """Step and compile time of the guarded clipped sum over the unguarded pass, all finite."""
  key = jax.random.key(0)
  rows = []
  models = [("MLP", mlp_loss, mlp_params(key)), ("CNN", cnn_loss, cnn_params(key))]
  for name, loss_fn, params in models:
    batch = make_batch(jax.random.key(1), 256)
    for method in ("vmap", "ghost"):
      fns, compiles = {}, {}
      for label, guard in (("unguarded", _unguarded_pass), ("guarded", clipping.guarded_pass)):
        clipping.guarded_pass = guard
        fn = clipping.clipped_sum_fn(loss_fn, CLIP, method=method)
        compiles[label] = _compile_seconds(fn, params, batch)
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(params, batch))
        fns[label] = lambda jitted=jitted: jitted(params, batch)
      clipping.guarded_pass = _GUARDED
      times = interleaved_median_seconds(fns, repeats=10 * repeats)
      rows.append(
        [
          f"{name} B=256",
          method,
          f"{1e3 * times['unguarded']:.3g} ms",
          times["guarded"] / times["unguarded"],
          f"{compiles['unguarded']:.2g} s",
          compiles["guarded"] / compiles["unguarded"],
        ]
      )
  print_table(
    "Non-finite guard, every example finite: guarded / unguarded",
    ["model", "method", "unguarded step", "step ratio", "unguarded compile", "compile ratio"],
    rows,
  )


_GUARDED = clipping.guarded_pass


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  parser.add_argument("--only", choices=["tables", "guard", "ghost"], default=None)
  args = parser.parse_args()
  repeats = 3 if args.quick else 7
  key = jax.random.key(0)
  print(
    f"# per-example clipping benchmark on {jax.devices()[0].device_kind} ({jax.default_backend()})"
  )
  if args.only in (None, "guard"):
    guard_cost(repeats)
  if args.only in (None, "ghost"):
    ghost_table(repeats)
  if args.only in ("guard", "ghost"):
    return

  columns = ["vmap", "chunked", "loop", "ghost"]
  rows_t, rows_m = [], []
  models = [
    ("MLP 784-256-256-10, B=256", mlp_loss, mlp_params(key)),
    ("CNN conv8-conv16-dense, B=256", cnn_loss, cnn_params(key)),
  ]
  for name, loss_fn, params in models:
    batch = make_batch(jax.random.key(1), 256)
    row = measure(name, loss_fn, params, batch, repeats=repeats)
    t_plain, m_plain = row["plain"]
    rows_t.append(
      [name, f"{1e3 * t_plain:.3g} ms"] + [row[c][0] if c in row else "n/a" for c in columns]
    )
    rows_m.append(
      [name, f"{m_plain / 2**20:.3g} MiB"] + [row[c][1] if c in row else "n/a" for c in columns]
    )
  print_table(
    "Time, ratio to a plain mini-batch gradient", ["model", "plain grad"] + columns, rows_t
  )
  print_table(
    "Peak memory (XLA temporaries + outputs), ratio to a plain mini-batch gradient",
    ["model", "plain grad"] + columns,
    rows_m,
  )

  rows_b = []
  params = mlp_params(key)
  for size in (8, 32, 128, 256):
    batch = make_batch(jax.random.key(1), size)
    row = measure(
      "MLP", mlp_loss, params, batch, repeats=repeats, with_loop=False, with_chunked=False
    )
    rows_b.append(
      [size, f"{1e3 * row['plain'][0]:.3g} ms"]
      + [row[c][i] if c in row else "n/a" for c in ("vmap", "ghost") for i in (0, 1)]
    )
  print_table(
    "MLP 784-256-256-10 by batch size, ratios to a plain mini-batch gradient",
    ["batch", "plain grad", "vmap time", "vmap memory", "ghost time", "ghost memory"],
    rows_b,
  )


if __name__ == "__main__":
  main()
