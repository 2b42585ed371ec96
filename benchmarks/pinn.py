"""Full PINN runs: Gauss-Newton vs Newton-CG vs Adam vs L-BFGS on the same wall-clock budget.

``python benchmarks/pinn.py [--problems poisson2d heat poisson5d] [--seconds 300]
[--optimizers dense_gn newton_cg adam lbfgs]`` trains each optimiser on each problem of
``experiments/pinn.py`` (the setups of Dangel, Müller & Zeinhofer 2024, float64) for
``--seconds`` of training time (compilation and evaluations excluded), evaluating the L2 error
every ``--eval-seconds``, and writes ``benchmarks/results/pinn/<problem>/``: ``metrics.jsonl``,
``summary.md`` (final errors, time per step, CG iterations per step, the error reached at
Newton-CG step 500), ``solution.png`` and ``pinn_curves.png``. Not run by CI.

``defaults`` is :func:`curvopt.newton_cg` with its defaults (the Gauss-Newton curvature of the
residual vector, ``solver="auto"``: the exact dense step for these networks); ``newton_cg`` is
the same curvature with truncated CG and Martens' heuristics (Hessian-free); ``ncg_nystrom``
adds a Nyström preconditioner. ``reference`` is the hand-written dense Gauss-Newton step that
held the record before the library had one (``reference_dense_gauss_newton`` below, kept only
as this benchmark's baseline). Times depend on the machine's load: say so with the numbers.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # LAPACK threads spin on a loaded CPU

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

jax.config.update("jax_enable_x64", True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvopt  # noqa: E402
from curvopt.launcher.optimizers import state_diagnostics  # noqa: E402
from curvopt.optimizers.newton_cg import newton_cg  # noqa: E402
from experiments import pinn  # noqa: E402

PROBLEM_CONFIGS = {
  "poisson2d": dict(problem="poisson2d", num_interior=900, num_boundary=120),
  "heat": dict(problem="heat", num_interior=900, num_boundary=60, num_initial=60),
  "poisson5d": dict(problem="poisson5d", num_interior=3000, num_boundary=500, resample=True),
  # More parameters (D = 10,065) than residuals (3,500): the sample-space (Woodbury) step.
  "poisson5d_wide": dict(
    problem="poisson5d",
    hidden=[64, 64, 48, 48],
    num_interior=3000,
    num_boundary=500,
    resample=True,
  ),
}


def make_optimizer(name: str, task: pinn.Pinn, args) -> tuple[optax.GradientTransformation, int]:
  """The transformation and the steps per compiled chunk."""
  if name == "reference":
    return reference_dense_gauss_newton(task), 10
  if name == "defaults":  # curvopt.newton_cg with its defaults (solver="auto")
    return newton_cg(model_fn=task.model_fn, loss_fn=task.output_loss), 10
  if name == "newton_cg":
    return newton_cg(
      1.0,
      model_fn=task.model_fn,
      loss_fn=task.output_loss,
      damping=args.ncg_damping,
      solver=curvopt.CG(max_steps=args.cg_max_steps, tol=1e-10, progress_tol=args.cg_progress_tol),
    ), 5
  if name == "ncg_nystrom":  # truncated CG with a Nystrom preconditioner
    preconditioner = curvopt.NystromPreconditioner(rank=args.nystrom_rank)
    return newton_cg(
      1.0,
      model_fn=task.model_fn,
      loss_fn=task.output_loss,
      damping=args.ncg_damping,
      solver=curvopt.CG(
        max_steps=args.cg_max_steps,
        tol=1e-10,
        progress_tol=args.cg_progress_tol,
        preconditioner=preconditioner,
      ),
    ), 5
  if name == "adam":
    return optax.adam(args.adam_lr), 500
  if name == "lbfgs":
    return optax.lbfgs(), 100
  raise ValueError(f"unknown optimiser {name!r}")


# ------------------------------------------------- the earlier record path, as the baseline


class ReferenceState(NamedTuple):
  count: jax.Array
  damping: jax.Array
  rho: jax.Array
  retries: jax.Array
  loss: jax.Array


def reference_dense_gauss_newton(task: pinn.Pinn) -> optax.GradientTransformationExtraArgs:
  """The hand-written damped Gauss-Newton (ENGD) step that held the PINN record before
  ``newton_cg(solver="auto")``: ``(JᵀJ + λI)⁻¹ Jᵀr`` by LU from per-point residual gradients,
  λ × 4 on a loss increase (up to 12 times), × 0.3 when ρ > 3/4, × 1.5 when ρ < 1/4, λ in
  [1e-14, 1e8], ρ on the undamped model. Kept unchanged as this benchmark's baseline."""

  def rows(params, x_interior, x_boundary):
    flat, unravel = ravel_pytree(params)

    def r_int(w, x):
      return pinn.interior_residual(task.problem, task.u(unravel(w)), x[None])[0]

    def r_bdy(w, x):
      return pinn.mlp(unravel(w), x) - pinn.exact_solution(task.problem, x)

    def per_point(r, x):
      return jax.vmap(jax.value_and_grad(r), in_axes=(None, 0))(flat, x)

    ri, ji = per_point(r_int, x_interior)
    rb, jb = per_point(r_bdy, x_boundary)
    si, sb = 1 / np.sqrt(x_interior.shape[0]), 1 / np.sqrt(x_boundary.shape[0])
    return jnp.concatenate([si * ri, sb * rb]), jnp.concatenate([si * ji, sb * jb])

  def loss_of(params, **data):
    return task.loss(params, **data)

  def init(params):
    dtype = ravel_pytree(params)[0].dtype
    zero = jnp.zeros((), jnp.int32)
    return ReferenceState(
      zero, jnp.asarray(1e-3, dtype), jnp.zeros((), dtype), zero, jnp.zeros((), dtype)
    )

  def update(updates, state, params=None, **extra):
    del updates
    data = {k: v for k, v in extra.items() if k in ("x_interior", "x_boundary")}
    flat, unravel = ravel_pytree(params)
    r, jac = rows(params, **data)
    loss, g, gram = 0.5 * jnp.sum(r**2), jac.T @ r, jac.T @ jac
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)

    def trial(lam):
      step = jnp.linalg.solve(gram + lam * eye, g)
      new_loss = loss_of(unravel(flat - step), **data)
      predicted = -g @ step + 0.5 * step @ (gram @ step)
      return step, new_loss, (new_loss - loss) / jnp.minimum(predicted, -jnp.finfo(flat.dtype).tiny)

    def body(carry):
      i, lam, _, _, _ = carry
      lam = jnp.where(i == 0, lam, jnp.minimum(lam * 4.0, 1e8))
      return (i + 1, lam, *trial(lam))

    def cond(carry):
      i, _, _, new_loss, _ = carry
      return (i <= 12) & ~(jnp.isfinite(new_loss) & (new_loss < loss))

    start = (
      jnp.zeros((), jnp.int32),
      state.damping,
      jnp.zeros_like(flat),
      jnp.asarray(jnp.inf, flat.dtype),
      jnp.zeros((), flat.dtype),
    )
    tries, lam, step, new_loss, rho = jax.lax.while_loop(cond, body, start)
    ok = jnp.isfinite(new_loss) & (new_loss < loss)
    lam = jnp.where(rho > 0.75, lam * 0.3, jnp.where(rho < 0.25, lam * 1.5, lam))
    lam = jnp.clip(jnp.where(ok, lam, lam * 4.0), 1e-14, 1e8)
    state = ReferenceState(state.count + 1, lam, rho, tries - 1, loss)
    return unravel(-jnp.where(ok, step, 0.0)), state

  return optax.GradientTransformationExtraArgs(init, update)


def run(task: pinn.Pinn, name: str, args, run_dir: str, log) -> list[dict]:
  tx, chunk = make_optimizer(name, task, args)
  tx = optax.with_extra_args_support(tx)
  params = task.init_params(jax.random.key(args.seed))
  state = tx.init(params)
  data_key = jax.random.key(args.seed + 1)

  def one(carry, t):
    params, state, _ = carry
    batch = task.batch(data_key, t)
    value, grad = jax.value_and_grad(task.loss)(params, **batch)
    updates, state = tx.update(
      grad, state, params, value=value, grad=grad, value_fn=task.loss, **batch
    )
    diag = {"train_loss": value} | state_diagnostics(state)
    return optax.apply_updates(params, updates), state, diag

  @jax.jit
  def train(carry, start):
    def body(i, c):
      params, state, diag = one(c, start + i)
      cg = diag.get("cg_steps", jnp.zeros((), jnp.int32))
      total = c[2]["cg_total"] + cg.astype(jnp.int64)
      return params, state, diag | {"cg_total": total}

    return jax.lax.fori_loop(0, chunk, body, carry)

  diag0 = jax.eval_shape(lambda p, s: one((p, s, None), 0)[2], params, state)
  diag0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), diag0)
  diag0["cg_total"] = jnp.zeros((), jnp.int64)
  carry = (params, state, diag0)
  evaluate = jax.jit(task.evaluate)
  tic = time.perf_counter()
  compiled = train.lower(carry, 0).compile()
  compile_time = time.perf_counter() - tic
  records, step, wall, last_eval = [], 0, 0.0, -1e9
  arrays_dir = os.path.join(run_dir, "arrays")
  os.makedirs(arrays_dir, exist_ok=True)

  def record(carry):
    ev = jax.device_get(evaluate(carry[0]))
    rec = {"optimizer": name, "seed": args.seed, "step": step, "wall_time": wall}
    rec |= {k: float(v) for k, v in ev.items() if np.ndim(v) == 0}
    rec |= {k: float(v) for k, v in jax.device_get(carry[2]).items()}
    rec["compile_time"] = compile_time
    np.savez(os.path.join(arrays_dir, f"{name}-seed{args.seed}-step000.npz"), u_plot=ev["u_plot"])
    records.append(rec)
    log.write(json.dumps(rec) + "\n")
    log.flush()
    return rec

  rec = record(carry)
  while wall < args.seconds and step < args.max_steps:
    tic = time.perf_counter()
    carry = jax.block_until_ready(compiled(carry, step))
    wall += time.perf_counter() - tic
    step += chunk
    if wall - last_eval >= args.eval_seconds or wall >= args.seconds or step >= args.max_steps:
      last_eval = wall
      rec = record(carry)
      print(
        f"  {name:10s} step {step:6d}  {wall:7.1f}s  loss {rec['pde_loss']:.3e}  "
        f"l2 {rec['l2_error']:.3e}  rel {rec['relative_l2_error']:.3e}",
        flush=True,
      )
  return records


def summarise(problem: str, records: list[dict], args) -> str:
  lines = [
    f"## PINN {problem}: {args.seconds:g} s per optimiser (float64, CPU, shared machine)\n",
    "| optimiser | steps | s/step | CG it./step | loss | l2_error | relative | l2 @ 100 s "
    "| l2 @ step 500 |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  by = {}
  for r in records:
    by.setdefault(r["optimizer"], []).append(r)
  for name, rs in by.items():
    last = rs[-1]
    per_step = last["wall_time"] / max(last["step"], 1)
    cg = last.get("cg_total", 0) / max(last["step"], 1) if "cg" in name else None
    at100 = [r for r in rs if r["wall_time"] <= 100]
    at500 = [r for r in rs if r["step"] <= 500]
    lines.append(
      f"| {name} | {last['step']} | {per_step:.3g} | {'' if cg is None else f'{cg:.0f}'} | "
      f"{last['pde_loss']:.2e} | {last['l2_error']:.2e} | {last['relative_l2_error']:.2e} | "
      f"{at100[-1]['l2_error'] if at100 else float('nan'):.2e} | "
      f"{at500[-1]['l2_error'] if at500 and 'cg' in name else float('nan'):.2e} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", nargs="+", default=list(PROBLEM_CONFIGS))
  parser.add_argument(
    "--optimizers", nargs="+", default=["defaults", "reference", "newton_cg", "adam", "lbfgs"]
  )
  parser.add_argument("--seconds", type=float, default=300.0)
  parser.add_argument("--max-steps", type=int, default=10**9)
  parser.add_argument("--eval-seconds", type=float, default=5.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--adam-lr", type=float, default=1e-3)
  parser.add_argument("--ncg-damping", type=float, default=1e-2)
  parser.add_argument("--cg-max-steps", type=int, default=250)
  parser.add_argument("--cg-progress-tol", type=float, default=5e-4)
  parser.add_argument("--nystrom-rank", type=int, default=50)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "pinn"))
  args = parser.parse_args(argv)
  for problem in args.problems:
    task = pinn.build(pinn.Config(**PROBLEM_CONFIGS[problem]), jnp.float64)
    run_dir = os.path.join(args.out, problem)
    os.makedirs(run_dir, exist_ok=True)
    print(f"# {problem} -> {run_dir}", flush=True)
    records = []
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as log:
      for name in args.optimizers:
        records += run(task, name, args, run_dir, log)
    records = []  # every optimiser's latest run in this directory (runs may be separate)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      for line in f:
        rec = json.loads(line)
        if rec["step"] == 0:
          records = [r for r in records if r["optimizer"] != rec["optimizer"]]
        records.append(rec)
    summary = summarise(problem, records, args)
    summary += "\n" + pinn.write_report(task, run_dir, records)
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
      f.write(summary)
    print(summary, flush=True)


if __name__ == "__main__":
  main()
