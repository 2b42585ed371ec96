"""The solvers of Newton-CG's damped system agree, and ``solver="auto"`` chooses by its cost model.

References: dense float64 linear algebra (``jax.jacrev``/``jax.hessian`` Gauss-Newton matrices,
``np.linalg.solve``, ``np.linalg.pinv``) and explicit per-example loops.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_ggn, regression_problem
from jax.flatten_util import ravel_pytree

from curvopt import CG, Auto, Dense, LevenbergMarquardt, SolverKind, SolverStatus
from curvopt.curvature.gram import gauss_newton_rows
from curvopt.linalg.dense import kernel_solve
from curvopt.linalg.solvers import GramFactor, System
from curvopt.optimizers.newton_cg import scale_by_newton_cg, value_fn_from_model

# More parameters (P = 98) than residuals (N K = 24 * 2 = 48): every solver applies.
WIDE = dict(seed=3, n=24, sizes=(3, 16, 2))


def _direction(problem, solver, lam=0.05, curvature="ggn"):
  params, x, y, model_fn, loss_fn = problem
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  tx = scale_by_newton_cg(
    curvature,
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=LevenbergMarquardt(init=lam, adapt=False, accept_ratio=None),
    solver=solver,
  )
  kwargs = {} if curvature == "ggn" else {"value_fn": value_fn}
  d, state = jax.jit(lambda g, s, p: tx.update(g, s, p, x=x, y=y, **kwargs))(
    g, tx.init(params), params
  )
  return ravel_pytree(d)[0], state, ravel_pytree(g)[0]


def test_dense_params_dense_samples_and_converged_cg_give_the_same_step():
  problem = regression_problem(**WIDE)
  lam = 0.05
  steps = {}
  for name, solver in [
    ("params", Dense("params")),
    ("samples", Dense("samples")),
    ("cg", CG(tol=1e-14, progress_tol=None, max_steps=500)),
  ]:
    steps[name], state, flat_g = _direction(problem, solver, lam)
    kind = {"params": SolverKind.DENSE_PARAMS, "samples": SolverKind.DENSE_SAMPLES}
    assert int(state.solver) == kind.get(name, SolverKind.CG)
  c = dense_ggn(*problem)
  expected = np.linalg.solve(c + lam * np.eye(flat_g.size), flat_g)
  for name, step in steps.items():
    np.testing.assert_allclose(step, expected, rtol=1e-10, atol=1e-13, err_msg=name)


def test_dense_samples_matches_parameter_space_at_zero_damping_as_minimum_norm_step():
  problem = regression_problem(**WIDE)
  step, state, flat_g = _direction(problem, Dense("samples"), lam=0.0)
  c = dense_ggn(*problem)  # rank 48 < 98: singular
  np.testing.assert_allclose(step, np.linalg.pinv(c) @ flat_g, rtol=1e-7, atol=1e-10)
  assert int(state.cg_status) == SolverStatus.DIRECT


@pytest.mark.parametrize("extra", [False, True])
def test_kernel_solve_against_the_parameter_space_solve(extra):
  rng = np.random.default_rng(0)
  f, r = rng.normal(size=(5, 9)), rng.normal(size=5)
  b = f.T @ r + (rng.normal(size=9) if extra else 0.0)  # with a part outside F^T r
  for lam in (1e-3, 0.7):
    result = kernel_solve(jnp.asarray(f), jnp.asarray(b), lam, jnp.asarray(r))
    expected = np.linalg.solve(f.T @ f + lam * np.eye(9), b)
    np.testing.assert_allclose(result.x, expected, rtol=1e-9)
    plain = kernel_solve(jnp.asarray(f), jnp.asarray(b), lam)  # Woodbury without r
    np.testing.assert_allclose(plain.x, expected, rtol=1e-7)
    np.testing.assert_allclose(
      result.quadratic_value, 0.5 * expected @ (f.T @ f + lam * np.eye(9)) @ expected - b @ expected
    )


def _mixed_model():
  """Two output groups of different lengths (a PINN's interior and boundary residuals) and a
  cross-entropy head: the rows must be exact for both."""
  k = jax.random.split(jax.random.key(0), 5)
  params = {
    "w1": jax.random.normal(k[0], (4, 6)),
    "b1": jnp.zeros(6),
    "w2": jax.random.normal(k[1], (6, 3)),
  }
  x = jax.random.normal(k[2], (10, 4))
  labels = jax.random.randint(k[3], (10,), 0, 3)
  xb = jax.random.normal(k[4], (7, 4))

  def model_fn(p, x, xb):
    return {"a": jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], "b": jnp.sin(xb @ p["w1"]).sum(-1)}

  def loss_fn(z):
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z["a"]), labels[:, None], 1))
    return ce + 1.5 * jnp.mean((z["b"] - 1.0) ** 2)

  return params, {"x": x, "xb": xb}, model_fn, loss_fn


def test_gauss_newton_rows_against_the_dense_jacobian_and_loss_hessian():
  params, data, model_fn, loss_fn = _mixed_model()
  rows = gauss_newton_rows(model_fn, loss_fn, params, data)
  assert [g.size for g in rows.groups] == [10, 7] and [g.width for g in rows.groups] == [3, 1]
  f = jnp.concatenate([rows.row_fn(i, jnp.arange(g.size)) for i, g in enumerate(rows.groups)])
  flat, unravel = ravel_pytree(params)
  outputs = lambda w: ravel_pytree(model_fn(unravel(w), **data))[0]
  jac = jax.jacrev(outputs)(flat)
  _, unflatten = ravel_pytree(model_fn(params, **data))
  h = jax.hessian(lambda z: loss_fn(unflatten(z)))(outputs(flat))
  np.testing.assert_allclose(f.T @ f, jac.T @ h @ jac, rtol=1e-10, atol=1e-13)
  grad = jax.grad(lambda w: loss_fn(model_fn(unravel(w), **data)))(flat)
  np.testing.assert_allclose(f.T @ rows.residual, grad, rtol=1e-10, atol=1e-13)


def test_a_model_that_mixes_rows_has_no_rows():
  params, data, model_fn, loss_fn = _mixed_model()
  mixing = lambda p, x, xb: {"a": model_fn(p, x, xb)["a"].sum(0), "b": model_fn(p, x, xb)["b"]}
  assert gauss_newton_rows(mixing, lambda z: jnp.sum(z["a"] ** 2), params, data) is None


def test_rows_formed_in_chunks_equal_rows_formed_at_once():
  problem = regression_problem(**WIDE)
  lam = 0.05
  whole = _direction(problem, Dense("params"), lam)[0]
  small = Dense("params", memory_limit=98 * 8 * 5)  # 5 rows of F at a time
  np.testing.assert_allclose(_direction(problem, small, lam)[0], whole, rtol=1e-12)
  samples = _direction(problem, Dense("samples", memory_limit=98 * 8 * 5), lam)[0]
  np.testing.assert_allclose(samples, whole, rtol=1e-10)


def test_fisher_rows_are_per_example_gradients():
  problem = regression_problem(**WIDE)
  lam = 0.2
  step, state, flat_g = _direction(problem, Dense("samples"), lam, curvature="fisher")
  params, x, y, model_fn, loss_fn = problem
  flat, unravel = ravel_pytree(params)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  per = np.stack(
    [
      jax.grad(lambda v: value_fn(unravel(v), x=x[i : i + 1], y=y[i : i + 1]))(flat)
      for i in range(24)
    ]
  )
  fisher = per.T @ per / 24
  np.testing.assert_allclose(
    step, np.linalg.solve(fisher + lam * np.eye(flat.size), flat_g), rtol=1e-9
  )


def test_indefinite_hessian_gets_the_saddle_free_step_whichever_way_dense_is_chosen():
  f = lambda p, x, y: jnp.sum(0.25 * p["w"] ** 4 - 0.5 * p["w"] ** 2) + 0.1 * p["w"][0] * p["w"][1]
  params = {"w": jnp.array([0.1, -0.2, 0.05, 2.0])}
  g = jax.grad(f)(params, None, None)
  h = jax.hessian(lambda w: f({"w": w}, None, None))(params["w"])
  lam = 0.1
  w, v = np.linalg.eigh(h)
  expected = v @ ((v.T @ g["w"]) / (np.abs(w) + lam))  # Dauphin et al.'s |H| + damping
  for solver in ("dense", "auto"):
    tx = scale_by_newton_cg(
      "hessian", solver=solver, damping=LevenbergMarquardt(init=lam, adapt=False, accept_ratio=None)
    )
    d, state = tx.update(g, tx.init(params), params, value_fn=lambda p: f(p, None, None))
    np.testing.assert_allclose(d["w"], expected, rtol=1e-10)
    assert bool(state.negative_curvature) and int(state.solver) == SolverKind.DENSE_PARAMS


def _system(n, m=None, product_cost=1e3, dtypes=1):
  like = tuple(jnp.zeros(n // dtypes, jnp.float64) for _ in range(dtypes))
  factor = None
  if m is not None:
    factor = GramFactor(m, None, None, None, rows_cost=3 * product_cost)
  return System(matvec=None, like=like, factor=factor, product_cost=product_cost)


@pytest.mark.parametrize(
  "system, choice",
  [
    # Product costs from XLA's cost analysis of each model (benchmarks/pinn.py's problems).
    (_system(257, 1020, 4.0e6), "params"),  # 2-D Poisson PINN (2-64-1): the ENGD step
    (_system(449, 3500, 1.75e7), "params"),  # 5-D Poisson PINN (5-64-1)
    (_system(10065, 3500, 1.3e9), "samples"),  # 5-D Poisson, D = 10,065: more params than rows
    (_system(650, 17970, 7e6), "cg"),  # digits logistic regression (10 classes)
    (_system(5600, 115008, 2e7), "cg"),  # digits autoencoder
    (_system(20, None, 1e2), "params"),  # a small Hessian (Moré-Garbow-Hillstrom)
    (_system(200_000, None, 1e9), "cg"),  # too big for a dense matrix
    (_system(256, 100, 1e5, dtypes=2), "cg"),  # mixed dtypes: no dense solve
  ],
)
def test_auto_cost_model_choices(system, choice):
  auto = Auto()
  chosen = auto.resolve(system)
  costs = auto.costs(system)
  assert min(costs, key=costs.get) == choice, costs
  assert (chosen.space if isinstance(chosen, Dense) else "cg") == choice


def test_auto_reports_its_choice_and_follows_the_shapes():
  # Small: the dense parameter-space step; more parameters than residuals: sample space.
  _, state, _ = _direction(regression_problem(n=64), "auto")
  assert int(state.solver) == SolverKind.DENSE_PARAMS
  _, state, _ = _direction(regression_problem(**WIDE), Auto(memory_limit=98 * 48 * 8 + 48**2 * 8))
  assert int(state.solver) == SolverKind.DENSE_SAMPLES
