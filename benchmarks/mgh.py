"""Moré-Garbow-Hillstrom unconstrained test problems: curvopt newton_cg against scipy.

The problems of Moré, Garbow and Hillstrom, "Testing unconstrained optimization software",
ACM TOMS 7(1), 1981, written from the paper's definitions as residuals
:math:`f(x) = \\sum_i r_i(x)^2`, with the standard starting points and the published minimal
values :math:`f^*`. Each solver starts from the standard point and we record the first iteration
whose loss reaches :math:`f^*` (within ``f <= f* (1 + 1e-5) + 1e-10``):

* curvopt ``newton_cg(curvature="hessian")`` with every other option at its default, in a
  plain optax loop (``jit``, float64);
* scipy ``minimize(method="Newton-CG")`` and ``"trust-ncg"``, fed the same jitted JAX
  gradients and Hessian-vector products (default options, ``maxiter`` raised).

Usage: PYTHONPATH=$PWD python benchmarks/mgh.py [--max-iter 500] [--only NAME ...]
(about 2-4 minutes on a shared 2-core CPU, dominated by compilation).
"""

import argparse
import math
from collections.abc import Callable
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


class Problem(NamedTuple):
  """One MGH problem: residuals, standard start, published minimum ``f*``."""

  name: str
  residuals: Callable[[jax.Array], jax.Array]
  x0: tuple[float, ...]
  f_star: float

  def objective(self, x: jax.Array) -> jax.Array:
    return jnp.sum(self.residuals(x) ** 2)


def _i(m):
  return jnp.arange(1, m + 1, dtype=jnp.float64)


def rosenbrock(x):
  return jnp.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])


def freudenstein_roth(x):
  return jnp.stack(
    [
      -13.0 + x[0] + ((5.0 - x[1]) * x[1] - 2.0) * x[1],
      -29.0 + x[0] + ((x[1] + 1.0) * x[1] - 14.0) * x[1],
    ]
  )


def powell_badly_scaled(x):
  return jnp.stack([1e4 * x[0] * x[1] - 1.0, jnp.exp(-x[0]) + jnp.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x):
  return jnp.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2.0])


def beale(x):
  y = jnp.array([1.5, 2.25, 2.625])
  return y - x[0] * (1.0 - x[1] ** _i(3))


def jennrich_sampson(x):
  i = _i(10)
  return 2.0 + 2.0 * i - (jnp.exp(i * x[0]) + jnp.exp(i * x[1]))


def helical_valley(x):
  theta = jnp.arctan(x[1] / x[0]) / (2 * math.pi) + jnp.where(x[0] < 0, 0.5, 0.0)
  return jnp.stack(
    [10.0 * (x[2] - 10.0 * theta), 10.0 * (jnp.sqrt(x[0] ** 2 + x[1] ** 2) - 1.0), x[2]]
  )


_BARD_Y = jnp.array(
  [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]
)


def bard(x):
  u = _i(15)
  v = 16.0 - u
  w = jnp.minimum(u, v)
  return _BARD_Y - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSSIAN_Y = jnp.array(
  [0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989]
  + [0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009]
)


def gaussian(x):
  t = (8.0 - _i(15)) / 2.0
  return x[0] * jnp.exp(-x[1] * (t - x[2]) ** 2 / 2.0) - _GAUSSIAN_Y


_MEYER_Y = jnp.array(
  [34780.0, 28610.0, 23650.0, 19630.0, 16370.0, 13720.0, 11540.0, 9744.0]
  + [8261.0, 7030.0, 6005.0, 5147.0, 4427.0, 3820.0, 3307.0, 2872.0]
)


def meyer(x):
  t = 45.0 + 5.0 * _i(16)
  return x[0] * jnp.exp(x[1] / (t + x[2])) - _MEYER_Y


def box_3d(x):
  t = 0.1 * _i(10)
  return jnp.exp(-t * x[0]) - jnp.exp(-t * x[1]) - x[2] * (jnp.exp(-t) - jnp.exp(-10.0 * t))


def powell_singular(x):
  return jnp.stack(
    [
      x[0] + 10.0 * x[1],
      math.sqrt(5.0) * (x[2] - x[3]),
      (x[1] - 2.0 * x[2]) ** 2,
      math.sqrt(10.0) * (x[0] - x[3]) ** 2,
    ]
  )


def wood(x):
  return jnp.stack(
    [
      10.0 * (x[1] - x[0] ** 2),
      1.0 - x[0],
      math.sqrt(90.0) * (x[3] - x[2] ** 2),
      1.0 - x[2],
      math.sqrt(10.0) * (x[1] + x[3] - 2.0),
      (x[1] - x[3]) / math.sqrt(10.0),
    ]
  )


_KO_Y = jnp.array(
  [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
)
_KO_U = jnp.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625])


def kowalik_osborne(x):
  u = _KO_U
  return _KO_Y - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def brown_dennis(x):
  t = _i(20) / 5.0
  return (x[0] + t * x[1] - jnp.exp(t)) ** 2 + (x[2] + x[3] * jnp.sin(t) - jnp.cos(t)) ** 2


def biggs_exp6(x):
  t = 0.1 * _i(13)
  y = jnp.exp(-t) - 5.0 * jnp.exp(-10.0 * t) + 3.0 * jnp.exp(-4.0 * t)
  return x[2] * jnp.exp(-t * x[0]) - x[3] * jnp.exp(-t * x[1]) + x[5] * jnp.exp(-t * x[4]) - y


_OSBORNE1_Y = jnp.array(
  [0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751]
  + [0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490]
  + [0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406]
)


def osborne1(x):
  t = 10.0 * (_i(33) - 1.0)
  return _OSBORNE1_Y - (x[0] + x[1] * jnp.exp(-t * x[3]) + x[2] * jnp.exp(-t * x[4]))


def watson(x):
  n = x.shape[0]
  t = _i(29) / 29.0
  j = jnp.arange(1, n + 1, dtype=jnp.float64)
  s1 = jnp.sum((j[1:] - 1.0) * x[1:] * t[:, None] ** (j[1:] - 2.0), axis=1)
  s2 = jnp.sum(x * t[:, None] ** (j - 1.0), axis=1)
  return jnp.concatenate([s1 - s2**2 - 1.0, jnp.stack([x[0], x[1] - x[0] ** 2 - 1.0])])


def extended_rosenbrock(x):
  return jnp.stack([10.0 * (x[1::2] - x[::2] ** 2), 1.0 - x[::2]], axis=1).ravel()


def extended_powell(x):
  return jax.vmap(powell_singular)(x.reshape(-1, 4)).ravel()


def penalty1(x):
  return jnp.concatenate([math.sqrt(1e-5) * (x - 1.0), jnp.stack([jnp.sum(x**2) - 0.25])])


def penalty2(x):
  n = x.shape[0]
  a = math.sqrt(1e-5)
  i = jnp.arange(2, n + 1, dtype=jnp.float64)
  y = jnp.exp(i / 10.0) + jnp.exp((i - 1.0) / 10.0)
  j = jnp.arange(1, n + 1, dtype=jnp.float64)
  return jnp.concatenate(
    [
      jnp.stack([x[0] - 0.2]),
      a * (jnp.exp(x[1:] / 10.0) + jnp.exp(x[:-1] / 10.0) - y),
      a * (jnp.exp(x[1:] / 10.0) - math.exp(-0.1)),
      jnp.stack([jnp.sum((n - j + 1.0) * x**2) - 1.0]),
    ]
  )


def variably_dimensioned(x):
  j = jnp.arange(1, x.shape[0] + 1, dtype=jnp.float64)
  s = jnp.sum(j * (x - 1.0))
  return jnp.concatenate([x - 1.0, jnp.stack([s, s**2])])


def trigonometric(x):
  n = x.shape[0]
  i = jnp.arange(1, n + 1, dtype=jnp.float64)
  return n - jnp.sum(jnp.cos(x)) + i * (1.0 - jnp.cos(x)) - jnp.sin(x)


def brown_almost_linear(x):
  n = x.shape[0]
  return jnp.concatenate([x[:-1] + jnp.sum(x) - (n + 1.0), jnp.stack([jnp.prod(x) - 1.0])])


def discrete_boundary_value(x):
  n = x.shape[0]
  h = 1.0 / (n + 1)
  t = h * jnp.arange(1, n + 1, dtype=jnp.float64)
  padded = jnp.concatenate([jnp.zeros(1), x, jnp.zeros(1)])
  return 2.0 * x - padded[:-2] - padded[2:] + h**2 * (x + t + 1.0) ** 3 / 2.0


def broyden_tridiagonal(x):
  padded = jnp.concatenate([jnp.zeros(1), x, jnp.zeros(1)])
  return (3.0 - 2.0 * x) * x - padded[:-2] - 2.0 * padded[2:] + 1.0


def broyden_banded(x):
  n = x.shape[0]
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  band = (j != i) & (j >= i - 5) & (j <= i + 1)
  return x * (2.0 + 5.0 * x**2) + 1.0 - jnp.sum(jnp.where(band, x * (1.0 + x), 0.0), axis=1)


def linear_full_rank(x, m=20):
  s = jnp.sum(x)
  n = x.shape[0]
  return jnp.concatenate([x - 2.0 * s / m - 1.0, jnp.full(m - n, -2.0 * s / m - 1.0)])


def _discrete_bv_start(n):
  t = np.arange(1, n + 1) / (n + 1)
  return tuple(t * (t - 1.0))


PROBLEMS = (
  Problem("Rosenbrock", rosenbrock, (-1.2, 1.0), 0.0),
  Problem("Freudenstein-Roth", freudenstein_roth, (0.5, -2.0), 0.0),
  Problem("Powell badly scaled", powell_badly_scaled, (0.0, 1.0), 0.0),
  Problem("Brown badly scaled", brown_badly_scaled, (1.0, 1.0), 0.0),
  Problem("Beale", beale, (1.0, 1.0), 0.0),
  Problem("Jennrich-Sampson (m=10)", jennrich_sampson, (0.3, 0.4), 124.362),
  Problem("Helical valley", helical_valley, (-1.0, 0.0, 0.0), 0.0),
  Problem("Bard", bard, (1.0, 1.0, 1.0), 8.21487e-3),
  Problem("Gaussian", gaussian, (0.4, 1.0, 0.0), 1.12793e-8),
  Problem("Meyer", meyer, (0.02, 4000.0, 250.0), 87.9458),
  Problem("Box 3-D (m=10)", box_3d, (0.0, 10.0, 20.0), 0.0),
  Problem("Powell singular", powell_singular, (3.0, -1.0, 0.0, 1.0), 0.0),
  Problem("Wood", wood, (-3.0, -1.0, -3.0, -1.0), 0.0),
  Problem("Kowalik-Osborne", kowalik_osborne, (0.25, 0.39, 0.415, 0.39), 3.07505e-4),
  Problem("Brown-Dennis (m=20)", brown_dennis, (25.0, 5.0, -5.0, -1.0), 85822.2),
  Problem("Biggs EXP6 (m=13)", biggs_exp6, (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), 5.65565e-3),
  Problem("Osborne 1", osborne1, (0.5, 1.5, -1.0, 0.01, 0.02), 5.46489e-5),
  Problem("Watson (n=6)", watson, (0.0,) * 6, 2.28767e-3),
  Problem("Extended Rosenbrock (n=10)", extended_rosenbrock, (-1.2, 1.0) * 5, 0.0),
  Problem("Extended Powell (n=8)", extended_powell, (3.0, -1.0, 0.0, 1.0) * 2, 0.0),
  Problem("Penalty I (n=4)", penalty1, (1.0, 2.0, 3.0, 4.0), 2.24997e-5),
  Problem("Penalty II (n=4)", penalty2, (0.5,) * 4, 9.37629e-6),
  Problem(
    "Variably dimensioned (n=10)", variably_dimensioned, tuple(1 - np.arange(1, 11) / 10), 0.0
  ),
  Problem("Trigonometric (n=10)", trigonometric, (0.1,) * 10, 0.0),
  Problem("Brown almost-linear (n=10)", brown_almost_linear, (0.5,) * 10, 0.0),
  Problem("Discrete boundary value (n=10)", discrete_boundary_value, _discrete_bv_start(10), 0.0),
  Problem("Broyden tridiagonal (n=10)", broyden_tridiagonal, (-1.0,) * 10, 0.0),
  Problem("Broyden banded (n=10)", broyden_banded, (-1.0,) * 10, 0.0),
  Problem("Linear full rank (n=5, m=20)", linear_full_rank, (1.0,) * 5, 15.0),
)


def reached(f: float, f_star: float) -> bool:
  """Whether ``f`` reaches the published minimum (6 significant digits are published)."""
  return f <= f_star * (1 + 1e-5) + 1e-10


def run_newton_cg(problem: Problem, max_iter: int, **options) -> tuple[int | None, float]:
  """First iteration at which curvopt's newton_cg reaches ``f*`` (``None``), and the last f."""
  import optax  # noqa: PLC0415

  from curvopt.optimizers.newton_cg import newton_cg  # noqa: PLC0415

  tx = newton_cg(curvature="hessian", **options)
  f = problem.objective

  @jax.jit
  def steps(x, state):  # ten steps per call: fewer host round trips
    def body(carry, _):
      x, state = carry
      value, grad = jax.value_and_grad(f)(x)
      updates, state = tx.update(grad, state, x, value=value, value_fn=f)
      x = optax.apply_updates(x, updates)
      return (x, state), f(x)

    return jax.lax.scan(body, (x, state), None, length=10)

  x = jnp.asarray(problem.x0, jnp.float64)
  state = tx.init(x)
  if reached(float(f(x)), problem.f_star):
    return 0, float(f(x))
  for k in range(0, max_iter, 10):
    (x, state), values = steps(x, state)
    hits = [i for i, v in enumerate(np.asarray(values)) if reached(float(v), problem.f_star)]
    if hits:
      return k + hits[0] + 1, float(values[hits[0]])
  return None, float(values[-1])


def run_scipy(problem: Problem, method: str, max_iter: int) -> tuple[int | None, int, float]:
  """First iteration at which scipy's ``method`` reaches ``f*`` (``None``), its iterations to
  its own termination, and its final f."""
  import scipy.optimize  # noqa: PLC0415

  f = jax.jit(problem.objective)
  g = jax.jit(jax.grad(problem.objective))
  hvp = jax.jit(lambda x, p: jax.jvp(jax.grad(problem.objective), (x,), (p,))[1])
  values = []
  res = scipy.optimize.minimize(
    lambda x: float(f(x)),
    np.asarray(problem.x0, np.float64),
    jac=lambda x: np.asarray(g(x)),
    hessp=lambda x, p: np.asarray(hvp(x, p)),
    method=method,
    callback=lambda x, *args: values.append(float(f(x))),
    options={"maxiter": max_iter},
  )
  hit = next((i + 1 for i, v in enumerate(values) if reached(v, problem.f_star)), None)
  return hit, int(res.nit), float(res.fun)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--max-iter", type=int, default=500)
  parser.add_argument("--only", nargs="*", default=None, help="problem names to run")
  args = parser.parse_args()
  fmt = lambda hit: "-" if hit is None else str(hit)
  print(
    f"{'problem':32s} {'n':>3s} {'f*':>11s} {'newton_cg':>10s} {'scipy NCG':>14s} "
    f"{'trust-ncg':>14s}  ok   final f (ours)"
  )
  wins = only_ours = 0
  for problem in PROBLEMS:
    if args.only and problem.name not in args.only:
      continue
    ours, f_ours = run_newton_cg(problem, args.max_iter)
    scipy_hit, scipy_nit, _ = run_scipy(problem, "Newton-CG", args.max_iter)
    trust_hit, trust_nit, _ = run_scipy(problem, "trust-ncg", args.max_iter)
    budget = 3 * (scipy_hit if scipy_hit is not None else scipy_nit)
    ok = ours is not None and ours <= budget
    wins += ok
    only_ours += ours is not None and scipy_hit is None and not ok
    print(
      f"{problem.name:32s} {len(problem.x0):3d} {problem.f_star:11.5e} {fmt(ours):>10s} "
      f"{fmt(scipy_hit) + ' (' + str(scipy_nit) + ')':>14s} "
      f"{fmt(trust_hit) + ' (' + str(trust_nit) + ')':>14s} {'yes' if ok else 'no':>4s}   "
      f"{f_ours:.6e}",
      flush=True,
    )
  print(
    f"\nIterations to reach f* (f <= f* (1 + 1e-5) + 1e-10); in brackets scipy's iterations to "
    f"its own termination (default tolerances); '-' = f* not reached within {args.max_iter} "
    "iterations. ok: newton_cg reaches f* within 3x scipy Newton-CG's iterations to f* (or to "
    f"its termination when it never reaches f*): {wins} problems. Besides these, newton_cg "
    f"reaches f* where scipy Newton-CG stops without reaching it on {only_ours} more."
  )


if __name__ == "__main__":
  main()
