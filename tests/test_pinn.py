"""Tests of the PINN task family (experiments/pinn.py) and quick runs of its three configs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvopt
from curvopt.curvature.gram import gauss_newton_rows
from curvopt.curvature.products import ggn_fn
from curvopt.launcher import config as config_lib
from curvopt.launcher import optimizers as opt_lib
from curvopt.launcher import runner
from experiments import pinn
from experiments import run as RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = {
  "poisson2d": dict(problem="poisson2d", num_interior=64, num_boundary=32),
  "heat": dict(problem="heat", num_interior=64, num_boundary=16, num_initial=16),
  "poisson5d": dict(problem="poisson5d", num_interior=64, num_boundary=32, resample=True),
}


def _task(problem, **kw):
  return pinn.build(pinn.Config(**(SMALL[problem] | kw)), jnp.float64)


@pytest.mark.parametrize("problem", pinn.PROBLEMS)
def test_exact_solution_has_zero_residual(problem):
  task = pinn.build(pinn.Config(**(SMALL[problem] | {"num_interior": 500})), jnp.float64)
  data = task.train_data
  u_star = lambda x: pinn.exact_solution(problem, x)  # noqa: E731
  residual = jax.jit(pinn.interior_residual, static_argnums=(0, 1))
  r = residual(problem, u_star, data["x_interior"])
  assert float(jnp.max(jnp.abs(r))) < 1e-11
  # and a wrong candidate does not: the residual is not trivially zero
  wrong = lambda x: u_star(x) + jnp.sum(x**2)  # noqa: E731
  r_wrong = residual(problem, wrong, data["x_interior"])
  assert float(jnp.max(jnp.abs(r_wrong))) > 0.1
  # boundary points lie on the boundary, where u* is the prescribed data
  xb = np.asarray(data["x_boundary"])
  on_face = np.isclose(xb, 0.0) | np.isclose(xb, 1.0)
  if problem == "heat":  # x in {0, 1} (u = 0) or t = 0 (u = sin(pi x))
    assert np.all(on_face[:, 1] | np.isclose(xb[:, 0], 0.0))
    side = np.isclose(xb[:, 1], 0.0) | np.isclose(xb[:, 1], 1.0)
    np.testing.assert_allclose(u_star(xb[side]), 0.0, atol=1e-12)
    t0 = np.isclose(xb[:, 0], 0.0)
    np.testing.assert_allclose(u_star(xb[t0]), np.sin(np.pi * xb[t0, 1]), atol=1e-12)
    assert side.sum() == 16 and t0.sum() >= 16
  else:
    assert np.all(on_face.any(axis=1))
    if problem == "poisson2d":
      np.testing.assert_allclose(u_star(xb), 0.0, atol=1e-12)


@pytest.mark.parametrize("problem", pinn.PROBLEMS)
def test_loss_matches_a_dense_hessian_reference(problem):
  """½ mean(r_Ω²) + ½ mean(r_∂Ω²), with the PDE operator from jax.hessian per point."""
  task = _task(problem)
  params = task.init_params(jax.random.key(0))
  xi, xb = task.train_data["x_interior"], task.train_data["x_boundary"]
  u = lambda x: pinn.mlp(params, x)  # noqa: E731
  hess = jax.vmap(jax.hessian(u))(xi)
  if problem == "heat":
    r_int = jax.vmap(jax.grad(u))(xi)[:, 0] - 0.25 * hess[:, 1, 1]
  else:
    r_int = -jnp.trace(hess, axis1=1, axis2=2) - pinn.source(problem, xi)
  r_bdy = jax.vmap(u)(xb) - pinn.exact_solution(problem, xb)
  expected = 0.5 * jnp.mean(r_int**2) + 0.5 * jnp.mean(r_bdy**2)
  np.testing.assert_allclose(jax.jit(task.loss)(params, xi, xb), expected, rtol=1e-12)


@pytest.mark.parametrize("problem", ["poisson2d", "heat"])
def test_newton_cg_rows_are_the_weighted_residual_jacobian(problem):
  """newton_cg's per-point rows F = the Jacobian (jacfwd) of the weighted residuals r, with
  L = ½|r|²: FᵀF = JᵀJ (= the GGN, checked against a product) and Fᵀ r_F = Jᵀ r."""
  task = _task(problem)
  params = task.init_params(jax.random.key(1))
  data = task.train_data
  rows = gauss_newton_rows(task.model_fn, task.output_loss, params, data)
  f = jax.jit(
    lambda p: jnp.concatenate(
      [rows.row_fn(i, jnp.arange(g.size)) for i, g in enumerate(rows.groups)]
    )
  )(params)
  flat, unravel = ravel_pytree(params)
  res = lambda w: task.model_fn(unravel(w), **data)  # noqa: E731
  n_i, n_b = data["x_interior"].shape[0], data["x_boundary"].shape[0]
  weighted = lambda w: jnp.concatenate(  # noqa: E731
    [res(w)["interior"] / np.sqrt(n_i), res(w)["boundary"] / np.sqrt(n_b)]
  )
  jac, r = jax.jit(jax.jacfwd(weighted))(flat), weighted(flat)
  np.testing.assert_allclose(f.T @ f, jac.T @ jac, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(f.T @ rows.residual, jac.T @ r, rtol=1e-9, atol=1e-12)
  v = jax.random.normal(jax.random.key(2), flat.shape, flat.dtype)
  ggn_v = jax.jit(
    lambda v: ggn_fn(lambda p: task.model_fn(p, **data), task.output_loss, params)(unravel(v))
  )
  np.testing.assert_allclose(ravel_pytree(ggn_v(v))[0], jac.T @ (jac @ v), rtol=1e-9)


def test_newton_cg_defaults_take_the_exact_gauss_newton_step_and_decrease_the_error():
  task = _task("poisson2d", num_interior=100, num_boundary=40)
  params = task.init_params(jax.random.key(0))
  tx = curvopt.newton_cg(model_fn=task.model_fn, loss_fn=task.output_loss)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(task.loss)(params, **task.train_data)
    updates, state = tx.update(grads, state, params, value=value, **task.train_data)
    return optax.apply_updates(params, updates), state

  evaluate = jax.jit(task.evaluate)
  before = evaluate(params)
  losses = []
  for _ in range(20):
    params, state = step(params, state)
    losses.append(float(state[0].loss))
    # 140 points, more parameters: the sample-space (Woodbury) form of the same step.
    assert int(state[0].solver) == curvopt.SolverKind.DENSE_SAMPLES
  after = evaluate(params)
  assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))  # LM never increases it
  assert float(after["l2_error"]) < 0.1 * float(before["l2_error"])
  assert float(after["pde_loss"]) < 1e-3 * float(before["pde_loss"])


def test_bad_problem_is_rejected():
  with pytest.raises(config_lib.ConfigError, match="task.problem"):
    pinn.build(pinn.Config(problem="wave"), jnp.float64)
  with pytest.raises(config_lib.ConfigError, match="num_initial"):
    pinn.build(pinn.Config(problem="heat"), jnp.float64)


def test_resampled_points_change_every_step_and_are_reproducible():
  task = _task("poisson5d")
  key = jax.random.key(3)
  b0, b1 = task.batch(key, jnp.int32(0)), task.batch(key, jnp.int32(1))
  assert not np.allclose(b0["x_interior"], b1["x_interior"])
  np.testing.assert_array_equal(task.batch(key, jnp.int32(1))["x_interior"], b1["x_interior"])
  fixed = _task("poisson2d")
  assert fixed.batch(key, jnp.int32(5)) is fixed.train_data


@pytest.mark.long
@pytest.mark.parametrize("name", ["pinn_poisson2d", "pinn_heat", "pinn_poisson5d"])
def test_config_quick_run_decreases_the_error(name, tmp_path):
  """A few Newton-CG steps of each config (small point sets) lower the L2 error.

  (tests/test_launcher_runs.py runs every optimiser of every config for two steps.)
  """
  problem = name.removeprefix("pinn_")
  overrides = [
    "budget.steps=8",
    "eval_every=8",
    "progress=false",
    "checkpoint_interval_s=1000",
    f"task.num_interior={4 * SMALL[problem]['num_interior']}",
    f"task.num_boundary={SMALL[problem]['num_boundary']}",
    "task.plot_grid=9",
  ]
  cfg = config_lib.load_config(
    os.path.join(ROOT, "configs", f"{name}.yaml"),
    overrides,
    tasks=runner._LazySchemas(RUN.TASKS),
    optimizers=opt_lib.OPTIMIZERS,
  )
  cfg.optimizers = cfg.optimizers[:1]  # the Newton-CG entry
  cfg.optimizers[0].steps, cfg.optimizers[0].eval_every = None, None
  cfg.experiment.output_dir = str(tmp_path)
  result = runner.run_experiment(cfg, RUN.TASKS["pinn"](), echo=False)
  recs = result.records
  ncg = sorted(
    (r for r in recs if r["optimizer"] == "newton_cg (defaults)"), key=lambda r: r["step"]
  )
  assert [r["step"] for r in ncg] == [0, 8] and ncg[-1]["l2_error"] < 0.9 * ncg[0]["l2_error"]
  assert all(np.isfinite(r["l2_error"]) and r["relative_l2_error"] > 0 for r in recs)
  files = os.listdir(result.run_dir)
  for png in ("comparison.png", "solution.png", "pinn_curves.png"):
    assert png in files
    with open(os.path.join(result.run_dir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "l2_error" in result.summary and "solution.png" in result.summary
