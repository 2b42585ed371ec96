"""Newton-CG (curvopt) against scipy, optax.lbfgs and Adam, measured in one run.

1. Digits multinomial logistic regression (float64): wall time to ||g|| <= 1e-6 for
   curvopt.newton_cg (Hessian, forcing-sequence CG, optax backtracking line search), scipy
   ``minimize(method="Newton-CG")`` and ``"trust-ncg"`` fed jitted JAX gradients / HVPs, and
   ``optax.lbfgs``. Compilation excluded (warm-up first), median of repeats.
2. Martens' (2010) deep autoencoder scaled to digits, 64-32-16-8-16-32-64 (tanh, linear code,
   logistic output, cross-entropy): training reconstruction error (sum of squares per image)
   against wall-clock and epochs for curvopt Newton-CG (GGN; gradient and reduction ratio on the
   full batch, curvature products either on the full batch or on a 600-example chunk of a fresh
   permutation, as in Martens 2010, with Martens' diagonal preconditioner from 128 of those
   examples, damping floor 1e-3 and every finite step accepted), Adam (mini-batch 128, lr sweep)
   and optax.lbfgs (full batch). The data are jit arguments for every method (closing
   over them as constants made XLA's CPU code for the CG loop ~2.7x slower). Newton-CG with
   default settings, with the Nyström solver and with Martens' preconditioner are listed
   too, with curvature products and time per step.
3. First-call (trace + compile) time of one jitted training step, Newton-CG variants vs Adam.

Usage: PYTHONPATH=$PWD python benchmarks/newton_cg.py [--quick]
       [--only {logistic,autoencoder,compile}] [--plot benchmarks/results/newton_cg.png]
The machine is shared: run one part at a time, and read time ratios as noisy.
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import scipy.optimize  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import curvopt  # noqa: E402
from curvopt.linalg.cg import CGResult  # noqa: E402
from curvopt.optimizers.newton_cg import newton_cg, value_fn_from_model  # noqa: E402


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


# ------------------------------------------------------------------ 1. logistic regression


def logistic_benchmark(repeats):
  data = load_digits()
  x = jnp.asarray(data.data / 16.0)
  y = jax.nn.one_hot(data.target, 10, dtype=jnp.float64)

  def loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    nll = -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))
    return nll + 5e-4 * jnp.sum(params["w"] ** 2)

  params0 = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  flat0, unravel = ravel_pytree(params0)
  tol = 1e-6
  rows = []

  def run_curvopt(tx, **kw):
    @jax.jit
    def step(params, state):
      value, grad = jax.value_and_grad(loss)(params, x, y)
      updates, state = tx.update(grad, state, params, value=value, value_fn=loss, x=x, y=y, **kw)
      params = optax.apply_updates(params, updates)
      return params, state, optax.tree.norm(jax.grad(loss)(params, x, y))

    def solve():
      params, state, iters = params0, tx.init(params0), 0
      gnorm, products = np.inf, 0
      while gnorm > tol and iters < 500:
        params, state, gnorm = step(params, state)
        gnorm = float(gnorm)
        products += int(state[0].info.cg_steps)
        iters += 1
      return iters, gnorm, products

    solve()  # compile
    return _median_time(solve, repeats)

  ls = optax.scale_by_backtracking_linesearch(max_backtracking_steps=20)
  hessian_tx = newton_cg(
    curvature="hessian",
    damping=curvopt.LevenbergMarquardt(init=0.0, adapt=False, accept_ratio=None),
    cg_tol="forcing",
    cg_max_steps=200,
    warm_start=0.0,
    linesearch=ls,
  )
  t, (iters, gnorm, products) = run_curvopt(hessian_tx)
  rows.append(("curvopt newton_cg (hessian, line search)", t, iters, gnorm, products))
  lm_tx = newton_cg(
    curvature="hessian",
    damping=1e-4,
    cg_tol="forcing",
    cg_max_steps=200,
    warm_start=0.0,
  )
  t, (iters, gnorm, products) = run_curvopt(lm_tx)
  rows.append(("curvopt newton_cg (hessian, LM damping, lr=1)", t, iters, gnorm, products))

  # Default settings (only the curvature chosen), then each linear solver / preconditioner.
  for label, extra in [
    ("defaults", {}),
    ("defaults, solver='nystrom'", dict(solver="nystrom")),
    ("defaults, solver='dense'", dict(solver="dense")),
    ("defaults, preconditioner='martens'", dict(preconditioner="martens")),
  ]:
    t, (iters, gnorm, products) = run_curvopt(newton_cg(curvature="hessian", **extra))
    rows.append((f"curvopt newton_cg ({label})", t, iters, gnorm, products))

  lbfgs = optax.lbfgs()

  @jax.jit
  def lbfgs_step(params, state):
    value, grad = optax.value_and_grad_from_state(lambda p: loss(p, x, y))(params, state=state)
    updates, state = lbfgs.update(
      grad, state, params, value=value, grad=grad, value_fn=lambda p: loss(p, x, y)
    )
    params = optax.apply_updates(params, updates)
    return params, state, optax.tree.norm(jax.grad(loss)(params, x, y))

  def lbfgs_solve():
    params, state, iters, gnorm = params0, lbfgs.init(params0), 0, np.inf
    while gnorm > tol and iters < 5000:
      params, state, gnorm = lbfgs_step(params, state)
      gnorm = float(gnorm)
      iters += 1
    return iters, gnorm

  lbfgs_solve()
  t, (iters, gnorm) = _median_time(lbfgs_solve, repeats)
  rows.append(("optax.lbfgs (zoom line search)", t, iters, gnorm, 0))

  f = jax.jit(lambda v: loss(unravel(v), x, y))
  g = jax.jit(jax.grad(lambda v: loss(unravel(v), x, y)))
  hvp = jax.jit(lambda v, p: jax.jvp(jax.grad(lambda u: loss(unravel(u), x, y)), (v,), (p,))[1])
  fun = lambda v: float(f(v))
  jac = lambda v: np.asarray(g(v))
  hessp = lambda v, p: np.asarray(hvp(v, p))
  z = np.zeros(flat0.size)
  fun(z), jac(z), hessp(z, z)  # compile

  # scipy's Newton-CG has no gradient tolerance: find the first iteration with ||g|| <= tol,
  # then time exactly that many iterations.
  norms = []
  scipy.optimize.minimize(
    fun,
    z,
    jac=jac,
    hessp=hessp,
    method="Newton-CG",
    callback=lambda v: norms.append(np.linalg.norm(jac(v))),
    options={"xtol": 1e-14, "maxiter": 200},
  )
  needed = next(i + 1 for i, n in enumerate(norms) if n <= tol)

  def scipy_ncg():
    res = scipy.optimize.minimize(
      fun,
      z,
      jac=jac,
      hessp=hessp,
      method="Newton-CG",
      options={"xtol": 1e-14, "maxiter": needed},
    )
    return res.nit, float(np.linalg.norm(jac(res.x))), res.nhev

  t, (iters, gnorm, products) = _median_time(scipy_ncg, repeats)
  rows.append(("scipy Newton-CG (jitted JAX grad/HVP)", t, iters, gnorm, products))

  def scipy_tncg():
    res = scipy.optimize.minimize(
      fun, z, jac=jac, hessp=hessp, method="trust-ncg", options={"gtol": tol, "maxiter": 500}
    )
    return res.nit, float(np.linalg.norm(jac(res.x))), res.nhev

  t, (iters, gnorm, products) = _median_time(scipy_tncg, repeats)
  rows.append(("scipy trust-ncg (jitted JAX grad/HVP)", t, iters, gnorm, products))

  ref = next(t for name, t, *_ in rows if name.startswith("scipy Newton-CG"))
  print("\n1. Digits logistic regression (650 params, float64): wall time to ||g|| <= 1e-6")
  print(
    f"{'method':48s} {'time [ms]':>10s} {'iters':>6s} {'products':>9s} {'||g||':>9s} "
    f"{'vs scipy NCG':>13s}"
  )
  for name, t, iters, gnorm, products in rows:
    print(f"{name:48s} {1e3 * t:10.1f} {iters:6d} {products:9d} {gnorm:9.1e} {t / ref:12.2f}x")
  print("   products: curvature-vector products in all steps (dense: n per step, not counted)")
  return rows


# ---------------------------------------------------------------------- 2. autoencoder

SIZES = (64, 32, 16, 8, 16, 32, 64)
CURVATURE_BATCH = 600  # ~1/3 of the 1797 images
PRECONDITIONER_BATCH = 128  # examples of the curvature chunk behind Martens' diagonal


def _init_autoencoder(key):
  params = []
  for n_in, n_out in zip(SIZES[:-1], SIZES[1:], strict=True):
    key, sub = jax.random.split(key)
    params.append(
      {"w": jax.random.normal(sub, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)}
    )
  return params


def model_fn(params, x):
  h = x
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i != len(params) - 1 and i != len(params) // 2 - 1:  # linear code layer, logits out
      h = jnp.tanh(h)
  return h


def loss_fn(logits, x):
  """Cross-entropy of logistic outputs against pixel intensities in [0, 1], per image."""
  return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1))


def reconstruction_error(params, x):
  return jnp.mean(jnp.sum((jax.nn.sigmoid(model_fn(params, x)) - x) ** 2, axis=-1))


def autoencoder_benchmark(epochs, ncg_steps, lbfgs_steps, plot):
  x = jnp.asarray(load_digits().data / 16.0)
  n = x.shape[0]
  params0 = _init_autoencoder(jax.random.PRNGKey(0))
  value_fn = value_fn_from_model(model_fn, loss_fn)
  err = jax.jit(reconstruction_error)
  curves = {}

  # Newton-CG with the Gauss-Newton curvature, Martens-style damping. The gradient, the loss
  # and the reduction ratio use the full batch; with curvature_batch_size the GGN products (and
  # the diagonal preconditioner) use a rotating chunk of the batch, which is re-permuted every
  # step so the chunk is a fresh random sample (Martens 2010 §4.2).
  # With the full-batch gradient rho > 3/4 nearly always, so an unbounded-below damping decays
  # to ~1e-8 and CG runs to its limit on an ill-conditioned system: the tuned variant keeps
  # lambda >= 1e-3, accepts every finite step (accept_ratio=None), and takes Martens' diagonal
  # (mean of squared per-example gradients) from only 128 examples of the chunk, which costs
  # far less than per-example gradients on all 600 and preconditions as well.
  def martens_diagonal(params, objective, data):
    del objective
    xs = data["x"][:PRECONDITIONER_BATCH]
    per_example = lambda p, xi: value_fn(p, x=xi[None])
    grads_i = jax.vmap(jax.grad(per_example), in_axes=(None, 0))(params, xs)
    return jax.tree.map(lambda g: jnp.mean(g**2, axis=0), grads_i)

  variants = {
    "curvopt newton_cg (GGN, defaults)": (dict(), ncg_steps // 2),
    "curvopt newton_cg (GGN, defaults, nystrom)": (dict(solver="nystrom"), ncg_steps // 2),
    "curvopt newton_cg (GGN, defaults, martens)": (dict(preconditioner="martens"), ncg_steps // 2),
    f"curvopt newton_cg (GGN {CURVATURE_BATCH}, tuned)": (
      dict(
        curvature=curvopt.GGN(batch_size=CURVATURE_BATCH),
        solver=curvopt.CG(
          max_steps=50, preconditioner=curvopt.DiagonalPreconditioner(martens_diagonal)
        ),
        damping=curvopt.LevenbergMarquardt(bounds=(1e-3, 1e8), accept_ratio=None),
      ),
      ncg_steps,
    ),
  }
  for name, (kwargs, steps) in variants.items():
    tx = newton_cg(model_fn=model_fn, loss_fn=loss_fn, **kwargs)
    shuffle = "curvature" in kwargs

    @jax.jit
    def ncg_step(params, state, key, x, tx=tx, shuffle=shuffle):
      xs = x[jax.random.permutation(key, n)] if shuffle else x  # same full-batch gradient
      value, grads = jax.value_and_grad(value_fn)(params, x=xs)
      updates, state = tx.update(grads, state, params, value=value, x=xs)
      return optax.apply_updates(params, updates), state

    key = jax.random.PRNGKey(2)
    jax.block_until_ready(ncg_step(params0, tx.init(params0), key, x))
    params, state = params0, tx.init(params0)
    times, errors, elapsed, cg_total = [0.0], [float(err(params0, x))], 0.0, 0
    for _ in range(steps):
      key, sub = jax.random.split(key)
      t0 = time.perf_counter()
      params, state = jax.block_until_ready(ncg_step(params, state, sub, x))
      elapsed += time.perf_counter() - t0
      cg_total += int(state[0].cg_steps)
      times.append(elapsed)
      errors.append(float(err(params, x)))
    curves[name] = (np.arange(steps + 1), times, errors)
    print(
      f"   {name}: {cg_total / steps:.1f} CG steps per outer step, "
      f"{1e3 * elapsed / steps:.1f} ms per step, {int(state[0].info.num_rejected)} rejected "
      f"trials, {int(state[0].info.num_failed)} zero steps"
    )

  # Adam, mini-batches of 128, one lax.scan per epoch.
  batch = 128
  num_batches = n // batch
  for lr in (1e-3, 3e-3, 1e-2):
    opt = optax.adam(lr)

    @jax.jit
    def epoch(params, state, key, x, opt=opt):
      perm = jax.random.permutation(key, n)[: num_batches * batch].reshape(num_batches, batch)

      def body(carry, idx):
        params, state = carry
        grads = jax.grad(value_fn)(params, x=x[idx])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

      return jax.lax.scan(body, (params, state), perm)[0]

    key = jax.random.PRNGKey(1)
    jax.block_until_ready(epoch(params0, opt.init(params0), key, x))
    params, state = params0, opt.init(params0)
    times, errors, elapsed = [0.0], [float(err(params0, x))], 0.0
    for _ in range(epochs):
      key, sub = jax.random.split(key)
      t0 = time.perf_counter()
      params, state = jax.block_until_ready(epoch(params, state, sub, x))
      elapsed += time.perf_counter() - t0
      times.append(elapsed)
      errors.append(float(err(params, x)))
    curves[f"adam lr={lr:g}"] = (np.arange(epochs + 1), times, errors)

  # optax.lbfgs, full batch.
  lbfgs = optax.lbfgs()

  @jax.jit
  def lbfgs_step(params, state, x):
    fn = lambda p: value_fn(p, x=x)
    value, grad = optax.value_and_grad_from_state(fn)(params, state=state)
    updates, state = lbfgs.update(grad, state, params, value=value, grad=grad, value_fn=fn)
    return optax.apply_updates(params, updates), state

  jax.block_until_ready(lbfgs_step(params0, lbfgs.init(params0), x))
  params, state = params0, lbfgs.init(params0)
  times, errors, elapsed = [0.0], [float(err(params0, x))], 0.0
  for _ in range(lbfgs_steps):
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(lbfgs_step(params, state, x))
    elapsed += time.perf_counter() - t0
    times.append(elapsed)
    errors.append(float(err(params, x)))
  curves["optax.lbfgs"] = (np.arange(lbfgs_steps + 1), times, errors)

  adam_names = [k for k in curves if k.startswith("adam")]
  best_adam = min(adam_names, key=lambda k: curves[k][2][-1])
  target = curves[best_adam][2][-1]
  print(
    f"\n2. Deep autoencoder {'-'.join(map(str, SIZES))} on digits ({n} images): "
    f"training reconstruction error (sum of squares per image)"
  )
  print(
    f"{'method':42s} {'epochs':>7s} {'time [s]':>9s} {'final err':>10s} "
    f"{'time to best Adam err':>22s}"
  )
  for name, (ep, times, errors) in curves.items():
    hit = next((t for t, e in zip(times, errors, strict=True) if e <= target), None)
    hit_s = "not reached" if hit is None else f"{hit:.2f} s"
    print(f"{name:42s} {ep[-1]:7d} {times[-1]:9.2f} {errors[-1]:10.3f} {hit_s:>22s}")
  adam_time = curves[best_adam][1][-1]
  for name in variants:
    hit = next((t for t, e in zip(*curves[name][1:], strict=True) if e <= target), None)
    if hit is not None:
      print(
        f"{name} reaches {best_adam}'s final error {target:.3f} in {hit:.2f} s = "
        f"{hit / adam_time:.2f}x Adam's {adam_time:.2f} s"
      )
    else:
      print(f"{name} does not reach {best_adam}'s final error {target:.3f}")

  if plot:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (ep, times, errors) in curves.items():
      axes[0].plot(times, errors, label=name)
      axes[1].plot(ep, errors, label=name)
    for ax, xlabel in zip(axes, ("wall-clock [s]", "epochs (full-batch steps)"), strict=True):
      ax.set_yscale("log")
      ax.set_xlabel(xlabel)
      ax.set_ylabel("reconstruction error")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot, dpi=80)
    print(f"plot saved to {plot}")
  return curves


# ------------------------------------------------------------------------- 3. compile time


def compile_benchmark():
  """First-call cost of one jitted training step: trace + lower, and XLA compile, separately.

  On the autoencoder of part 2 (GGN, full batch). Variants switch off one part of the
  Newton-CG step at a time, to see what dominates: the retry loop around the solve, the
  reduction ratio (loss evaluations), the CG loop (replaced by a closed-form user solve), the
  Martens preconditioner (per-example gradients).
  """
  x = jnp.asarray(load_digits().data / 16.0)
  params0 = _init_autoencoder(jax.random.PRNGKey(0))
  value_fn = value_fn_from_model(model_fn, loss_fn)

  class ScaledIdentity:
    """A closed-form solver (no loop): x = b / (1 + damping), its model value for rho."""

    kind = curvopt.SolverKind.OTHER

    def init(self, like):
      return ()

    def resolve(self, system):
      return self

    def prepare(self, system, state, count):
      return state, None

    def initial_guess(self, previous):
      return None

    def solve(self, system, work, b, damping, x0, *, backtrack_fn=None):
      x = optax.tree.scale(1.0 / (1.0 + damping), b)
      zero = jnp.zeros((), jnp.int32)
      phi = -0.5 * optax.tree.vdot(b, x)
      return CGResult(x, zero, jnp.zeros(()), phi, zero, False, True, zero, jnp.inf)

  lm = curvopt.LevenbergMarquardt
  variants = {
    "adam": lambda: optax.adam(1e-3),
    "newton_cg defaults": lambda: newton_cg(model_fn=model_fn, loss_fn=loss_fn),
    "  no retries (max_retries=0)": lambda: newton_cg(
      model_fn=model_fn, loss_fn=loss_fn, damping=lm(max_retries=0)
    ),
    "  no rho (adapt=False, accept_ratio=None)": lambda: newton_cg(
      model_fn=model_fn, loss_fn=loss_fn, damping=lm(adapt=False, accept_ratio=None)
    ),
    "  no CG loop (closed-form user solve)": lambda: newton_cg(
      model_fn=model_fn, loss_fn=loss_fn, solver=ScaledIdentity()
    ),
    "  + martens preconditioner": lambda: newton_cg(
      model_fn=model_fn, loss_fn=loss_fn, preconditioner="martens"
    ),
    "  solver='nystrom'": lambda: newton_cg(model_fn=model_fn, loss_fn=loss_fn, solver="nystrom"),
  }
  print("\n3. First call of a jitted training step (autoencoder, GGN): seconds")
  print(f"{'variant':52s} {'trace+lower':>12s} {'compile':>8s} {'total':>7s} {'vs adam':>8s}")
  adam_total = None
  for name, make in variants.items():
    tx = make()
    is_adam = name == "adam"

    def step(params, state, x, tx=tx, is_adam=is_adam):
      value, grads = jax.value_and_grad(value_fn)(params, x=x)
      if is_adam:
        updates, state = tx.update(grads, state, params)
      else:
        updates, state = tx.update(grads, state, params, value=value, x=x)
      return optax.apply_updates(params, updates), state

    state = tx.init(params0)
    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(params0, state, x)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(params0, state, x))
    t3 = time.perf_counter()
    total = t3 - t0
    adam_total = total if is_adam else adam_total
    print(f"{name:52s} {t1 - t0:12.2f} {t2 - t1:8.2f} {total:7.2f} {total / adam_total:7.1f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
  parser.add_argument("--plot", default=None, help="PNG path for the autoencoder curves")
  parser.add_argument(
    "--only",
    choices=("logistic", "autoencoder", "compile"),
    default=None,
    help="run one part only",
  )
  args = parser.parse_args()
  print(f"jax {jax.__version__}, optax {optax.__version__}, device {jax.devices()[0]}")
  if args.only == "compile":
    compile_benchmark()
    return
  if args.only != "autoencoder":
    logistic_benchmark(repeats=3 if args.quick else 5)
  if args.only == "logistic":
    return
  if args.quick:
    autoencoder_benchmark(epochs=100, ncg_steps=60, lbfgs_steps=300, plot=args.plot)
  else:
    autoencoder_benchmark(epochs=400, ncg_steps=200, lbfgs_steps=1000, plot=args.plot)


if __name__ == "__main__":
  main()
