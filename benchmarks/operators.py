"""Cost of the Laplacian of an MLP w.r.t. its inputs: curvopt.laplacian vs jax.hessian's trace.

``python benchmarks/operators.py [--points 1000] [--dims 2 5 10 50]`` times, for a tanh MLP
``d-64-64-1`` (float64) on ``--points`` collocation points, the Laplacian by

* ``forward_laplacian`` (default of :func:`curvopt.autodiff.operators.laplacian`),
* ``forward`` (nested JVPs over the ``d`` basis directions) and ``taylor`` (``jet``),
* the reference ``jnp.trace(jax.hessian(u)(x))`` per point (``vmap``),

and also the Laplacian *with its parameter gradient* (what a PINN step needs), all jitted,
interleaved medians. Prints a table of times and ratios to the reference; ratios < 1 mean
faster than the ``jax.hessian`` composition. The machine is shared: repeat for stable ratios.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import interleaved_median_seconds  # noqa: E402

from curvopt.autodiff.operators import laplacian  # noqa: E402


def mlp(params, x):
  for w, b in params[:-1]:
    x = jnp.tanh(x @ w + b)
  w, b = params[-1]
  return (x @ w + b)[0]


def init(key, sizes):
  params = []
  for k, (m, n) in zip(
    jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:], strict=True), strict=True
  ):
    params.append((jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.full((n,), 0.1)))
  return params


def candidates(params, x):
  def ours(method):
    return lambda p: laplacian(lambda y: mlp(p, y), x, method=method)

  def reference(p):
    return jax.vmap(lambda y: jnp.trace(jax.hessian(lambda z: mlp(p, z))(y)))(x)

  fns = {m: ours(m) for m in ("forward_laplacian", "forward", "taylor")}
  fns["jax.hessian trace"] = reference
  return fns


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=1000)
  parser.add_argument("--dims", type=int, nargs="+", default=[2, 5, 10, 50])
  parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
  args = parser.parse_args(argv)
  print(
    f"Laplacian of a tanh MLP d-{'-'.join(map(str, args.hidden))}-1, {args.points} points, "
    f"float64, {jax.devices()[0].device_kind}; median ms (ratio to jax.hessian trace)\n"
  )
  header = (
    "| d | what | forward_laplacian | forward (nested jvp) | taylor (jet) | jax.hessian trace |"
  )
  print(header)
  print("|---|---|---|---|---|---|")
  for d in args.dims:
    kp, kx = jax.random.split(jax.random.key(d))
    params = init(kp, [d, *args.hidden, 1])
    x = jax.random.uniform(kx, (args.points, d), jnp.float64)
    fns = candidates(params, x)
    ref = fns["jax.hessian trace"](params)
    for name, fn in fns.items():  # every method agrees with the reference before timing
      np.testing.assert_allclose(fn(params), ref, rtol=1e-9, atol=1e-9, err_msg=name)
    for what, wrap in (
      ("value", lambda fn: jax.jit(fn)),
      (
        "value + grad wrt params",
        lambda fn: jax.jit(jax.grad(lambda p, fn=fn: jnp.sum(fn(p) ** 2))),
      ),
    ):
      compiled = {name: wrap(fn) for name, fn in fns.items()}
      times = interleaved_median_seconds(
        {name: (lambda f=f: f(params)) for name, f in compiled.items()}, repeats=15
      )
      base = times["jax.hessian trace"]
      cells = [f"{1e3 * times[n]:.2f} ({times[n] / base:.2f}x)" for n in fns]
      print(f"| {d} | {what} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
