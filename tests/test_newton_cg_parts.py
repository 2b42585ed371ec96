"""Unit tests of Newton-CG's parts: damping rules, diagonals, solvers and the registries.

Each part is checked against its definition (dense float64 linear algebra, explicit loops).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import dense_ggn, regression_problem
from jax.flatten_util import ravel_pytree

from curvopt.optimizers import curvatures, damping, solvers
from curvopt.optimizers.newton_cg import newton_cg, scale_by_newton_cg, value_fn_from_model


def _spd(n, seed=0, shift=0.5):
  m = np.random.default_rng(seed).normal(size=(n, n))
  return m @ m.T + shift * np.eye(n)


# ------------------------------------------------------------------------------ damping


def test_reduction_ratio_against_definition_and_edge_cases():
  np.testing.assert_allclose(damping.reduction_ratio(-0.3, -0.4), 0.75)
  assert float(damping.reduction_ratio(0.1, -0.4)) == pytest.approx(-0.25)
  # The model predicts no decrease: 1 if the loss did not increase, -inf otherwise.
  assert float(damping.reduction_ratio(-0.1, 0.0)) == 1.0
  assert float(damping.reduction_ratio(0.1, 0.2)) == -np.inf
  assert float(damping.reduction_ratio(jnp.inf, -1.0)) == -np.inf


@pytest.mark.parametrize("use_jit", [False, True])
def test_levenberg_marquardt_piecewise_and_traceable(use_jit):
  rule = lambda lam, rho, inc, dec: damping.levenberg_marquardt(
    lam, rho, increase=inc, decrease=dec
  )
  rule = jax.jit(rule) if use_jit else rule
  lam = jnp.asarray(2.0)
  for rho, expected in [(-1.0, 6.0), (0.2, 6.0), (0.25, 2.0), (0.75, 2.0), (0.8, 0.5), (np.nan, 2)]:
    np.testing.assert_allclose(rule(lam, jnp.asarray(rho), 3.0, 0.25), expected)


def test_retry_damping_escalates_geometrically_with_a_scale_floor():
  lam = jnp.asarray(1e-3)
  factors = [float(damping.retry_damping(lam, k, jnp.nan, increase=1.5)) / 1e-3 for k in range(4)]
  np.testing.assert_allclose(factors, [1.5, 3.0, 6.0, 12.0])
  # The floor: the curvature along the rejected step (ignored when non-positive or NaN).
  assert float(damping.retry_damping(lam, 0, jnp.asarray(7.0))) == 7.0
  assert float(damping.retry_damping(lam, 0, jnp.asarray(-7.0))) == pytest.approx(1.5e-3)


def test_curvature_along_a_cg_solution_is_its_rayleigh_quotient():
  a = _spd(6, 1)
  b = np.random.default_rng(2).normal(size=6)
  # Three CG iterations from zero (a Krylov iterate, not the solution).
  result = jax.jit(
    lambda b: solvers.cg_solver(solvers.SolverOptions(max_steps=3, progress_tol=None)).solve(
      lambda v: jnp.asarray(a) @ v, b, 0.0, None, None, tol=0.0
    )
  )(jnp.asarray(b))
  d = np.asarray(result.x)
  np.testing.assert_allclose(damping.curvature_along(result.x, jnp.asarray(b)), d @ a @ d / (d @ d))


def test_negative_curvature_damping_makes_the_direction_positive():
  c = np.diag([3.0, 1.0, -2.0])
  lam, p = 0.5, np.array([0.0, 0.0, 1.0])
  mu = p @ (c + lam * np.eye(3)) @ p / (p @ p)
  new = float(damping.negative_curvature_damping(jnp.asarray(lam), jnp.asarray(mu), increase=1.5))
  np.testing.assert_allclose(new, 1.5 * (lam - mu))
  assert p @ (c + new * np.eye(3)) @ p > 0
  # Positive curvature or a non-finite mu leave lambda alone.
  assert float(damping.negative_curvature_damping(jnp.asarray(lam), jnp.asarray(4.0))) == lam
  assert float(damping.negative_curvature_damping(jnp.asarray(lam), jnp.inf)) == lam


def test_martens_diagonal_and_diagonal_preconditioner_against_loops():
  grads = {"a": jnp.arange(12.0).reshape(4, 3), "b": -jnp.arange(4.0)[:, None]}
  diag = damping.martens_diagonal(grads)
  np.testing.assert_allclose(
    diag["a"], [np.mean([r[j] ** 2 for r in grads["a"]]) for j in range(3)]
  )
  np.testing.assert_allclose(diag["b"], [np.mean(np.arange(4.0) ** 2)])
  apply = damping.diagonal_preconditioner(diag, 0.1, exponent=0.75)
  r = {"a": jnp.ones(3), "b": jnp.full(1, 2.0)}
  out = apply(r)
  np.testing.assert_allclose(out["a"], 1.0 / (np.asarray(diag["a"]) + 0.1) ** 0.75)
  np.testing.assert_allclose(out["b"], 2.0 / (np.asarray(diag["b"]) + 0.1) ** 0.75)


# ------------------------------------------------------------------------------ solvers


def _pytree_operator(a):
  """``a`` acting on ``{"u": v[:2], "v": v[2:].reshape(-1, 1)}`` pytrees."""
  split = lambda v: {"u": v[:2], "v": v[2:].reshape(-1, 1)}
  matvec = lambda t: split(jnp.asarray(a) @ ravel_pytree(t)[0])
  return split, matvec


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_dense_solver_equals_linalg_solve(lam):
  a = _spd(7, 3)
  split, matvec = _pytree_operator(a)
  b = split(jnp.asarray(np.random.default_rng(4).normal(size=7)))
  solver = solvers.dense_solver(solvers.SolverOptions())
  _, work = solver.prepare(matvec, b, (), jnp.zeros((), jnp.int32))
  result = jax.jit(lambda b, lam: solver.solve(matvec, b, lam, None, work))(b, lam)
  flat_b = ravel_pytree(b)[0]
  expected = np.linalg.solve(a + lam * np.eye(7), flat_b)
  np.testing.assert_allclose(ravel_pytree(result.x)[0], expected, rtol=1e-10)
  np.testing.assert_allclose(result.quadratic_value, -0.5 * flat_b @ expected, rtol=1e-10)
  assert not bool(result.negative_curvature)


def test_dense_solver_on_indefinite_matrix_is_saddle_free_and_flags_it():
  a = np.diag([2.0, -1.0, 4.0])
  b = jnp.asarray([1.0, 1.0, 1.0])
  solver = solvers.dense_solver(solvers.SolverOptions())
  _, work = solver.prepare(lambda v: jnp.asarray(a) @ v, b, (), 0)
  result = solver.solve(None, b, 0.5, None, work)
  np.testing.assert_allclose(result.x, [1 / 2.5, 1 / 1.5, 1 / 4.5])
  assert bool(result.negative_curvature) and float(result.min_curvature) == -0.5


def test_nystrom_solver_is_exact_on_a_low_rank_curvature():
  # C of rank 3 is captured exactly by a rank-3 sketch: P^-1 (C + mu I) has two distinct
  # eigenvalues, so preconditioned CG solves in two steps.
  rng = np.random.default_rng(5)
  u = np.linalg.qr(rng.normal(size=(9, 3)))[0]
  c = u @ np.diag([5.0, 2.0, 0.5]) @ u.T
  split, matvec = _pytree_operator(c)
  params = split(jnp.zeros(9))
  mu = 0.1
  solver = solvers.nystrom_solver(solvers.SolverOptions(rank=3, progress_tol=None))
  b = split(jnp.asarray(rng.normal(size=9)))

  @jax.jit
  def solve(params, b):
    state, work = solver.prepare(matvec, params, solver.init(params), jnp.zeros((), jnp.int32))
    return state, solver.solve(matvec, b, mu, None, work, tol=1e-10)

  state, result = solve(params, b)
  np.testing.assert_allclose(state.approximation.eigenvalues, [5.0, 2.0, 0.5], rtol=1e-8)
  assert int(result.num_steps) <= 2
  np.testing.assert_allclose(
    ravel_pytree(result.x)[0], np.linalg.solve(c + mu * np.eye(9), ravel_pytree(b)[0]), rtol=1e-8
  )


def test_nystrom_state_refreshes_every_k_updates():
  a = _spd(5, 6)
  solver = solvers.nystrom_solver(solvers.SolverOptions(rank=2, refresh_every=3))
  matvec = lambda v: jnp.asarray(a) @ v
  params = jnp.zeros(5)
  state = solver.init(params)
  prepare = jax.jit(solver.prepare, static_argnums=0)
  eigenvalues = []
  for count in range(7):
    state, _ = prepare(matvec, params, state, jnp.asarray(count))
    eigenvalues.append(np.asarray(state.approximation.eigenvalues))
  # New sketches (new keys) at counts 0, 3 and 6 only; the top eigenvalue is close to a's.
  changed = [not np.array_equal(eigenvalues[i], eigenvalues[i - 1]) for i in range(1, 7)]
  assert changed == [False, False, True, False, False, True]
  assert eigenvalues[0][0] <= np.linalg.eigvalsh(a)[-1] * (1 + 1e-10)


@pytest.mark.parametrize("solver", ["cg", "nystrom", "dense"])
def test_newton_cg_solvers_agree_with_the_dense_damped_solve(solver):
  params, x, y, model_fn, loss_fn = regression_problem(n=24)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  lam = 0.05
  tx = scale_by_newton_cg(
    "ggn",
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=lam,
    adapt_damping=False,
    accept_ratio=None,
    solver=solver,
    cg_tol=1e-12,
    cg_progress_tol=None,
    nystrom_rank=8,
  )
  d, state = jax.jit(lambda g, s, p: tx.update(g, s, p, x=x, y=y))(g, tx.init(params), params)
  c = dense_ggn(params, x, y, model_fn, loss_fn)
  flat_g = ravel_pytree(g)[0]
  expected = np.linalg.solve(c + lam * np.eye(flat_g.size), flat_g)
  np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-7, atol=1e-10)
  if solver == "nystrom":  # the sketch is kept in the state
    assert state.solver_state.approximation.eigenvalues.shape == (8,)


def test_a_linalg_solve_fn_plugs_in_as_the_solver():
  # Any function following curvopt.linalg.solve's protocol is a solver: here a Jacobi-
  # preconditioned Richardson iteration written by the user.
  params, x, y, model_fn, loss_fn = regression_problem(1, n=24)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  lam = 0.5

  def richardson(matvec, b, x0=None, *, damping=0.0, preconditioner=None, max_steps=100, tol=0):
    del x0, preconditioner, tol
    # A user's solver sees pytrees shaped like the parameters (built-in ones run packed).
    assert jax.tree.structure(b) == jax.tree.structure(params)
    damped = lambda v: optax.tree.add_scale(matvec(v), damping, v)
    x = optax.tree.zeros_like(b)
    for _ in range(3):  # a fixed, small number of sweeps
      x = optax.tree.add_scale(x, 0.2, optax.tree.sub(b, damped(x)))
    quad = 0.5 * optax.tree.vdot(x, damped(x)) - optax.tree.vdot(b, x)
    zero = jnp.zeros((), jnp.int32)
    return solvers.CGResult(x, zero, quad, quad, zero, False, True, zero, jnp.inf)

  tx = scale_by_newton_cg(
    "ggn", model_fn=model_fn, loss_fn=loss_fn, damping=lam, accept_ratio=None, solver=richardson
  )
  d, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, x=x, y=y))(g, tx.init(params), params)
  c = dense_ggn(params, x, y, model_fn, loss_fn) + lam * np.eye(ravel_pytree(g)[0].size)
  expected, flat_g = np.zeros_like(c[0]), np.asarray(ravel_pytree(g)[0])
  for _ in range(3):
    expected = expected + 0.2 * (flat_g - c @ expected)
  np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-8)
  # The library's dense solve, through the same protocol, is the exact damped solve.
  from curvopt.linalg.dense import dense_solve

  tx = scale_by_newton_cg(
    "ggn", model_fn=model_fn, loss_fn=loss_fn, damping=lam, accept_ratio=None, solver=dense_solve
  )
  d, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, x=x, y=y))(g, tx.init(params), params)
  np.testing.assert_allclose(ravel_pytree(d)[0], np.linalg.solve(c, flat_g), rtol=1e-8)


# ---------------------------------------------------------------------------- registries


def test_a_new_curvature_is_one_function_and_one_entry(monkeypatch):
  params, x, y, model_fn, loss_fn = regression_problem(2, n=24)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)

  def gauss_newton_diagonal(spec):  # the diagonal of the GGN, by one product per coordinate
    def curvature(params, objective, data):
      matvec = curvatures.ggn(spec)(params, objective, data)
      flat, unravel = ravel_pytree(params)
      diag = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0] @ e)(jnp.eye(flat.size))
      return lambda v: unravel(diag * ravel_pytree(v)[0])

    return curvature

  monkeypatch.setitem(curvatures.CURVATURES, "ggn_diagonal", gauss_newton_diagonal)
  tx = scale_by_newton_cg(
    "ggn_diagonal",
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=0.1,
    adapt_damping=False,
    accept_ratio=None,
    cg_tol=1e-12,
    cg_progress_tol=None,
  )
  d, _ = tx.update(g, tx.init(params), params, x=x, y=y)
  diag = np.diag(dense_ggn(params, x, y, model_fn, loss_fn))
  np.testing.assert_allclose(ravel_pytree(d)[0], ravel_pytree(g)[0] / (diag + 0.1), rtol=1e-8)


def test_newton_cg_signature_lists_every_option_with_its_default():
  outer = inspect.signature(newton_cg).parameters
  inner = inspect.signature(scale_by_newton_cg).parameters
  assert list(outer) == ["learning_rate", *inner, "linesearch"]
  for name, p in inner.items():
    assert outer[name].default == p.default and outer[name].annotation == p.annotation, name
    assert outer[name].kind == inspect.Parameter.KEYWORD_ONLY
  # The docstring documents every option.
  for name in inner:
    assert f"    {name}:" in newton_cg.__doc__, name


def test_newton_cg_forwards_options_it_used_to_drop():
  f = lambda x: jnp.sum((x - 1.0) ** 4) + jnp.sum(x**2)
  x = jnp.zeros(3)
  g = jax.grad(f)(x)
  tx = newton_cg(curvature="hessian", damping_decrease=0.1, hvp_mode="rev_rev")
  ref = scale_by_newton_cg("hessian", damping_decrease=0.1, hvp_mode="rev_rev")
  (u, state), (d, ref_state) = jax.jit(
    lambda g, x: (
      tx.update(g, tx.init(x), x, value_fn=f),
      ref.update(g, ref.init(x), x, value_fn=f),
    )
  )(g, x)
  np.testing.assert_allclose(u, -d)
  assert float(ref_state.rho) > 0.75  # so the damping shrank by damping_decrease, not 2/3
  np.testing.assert_allclose(state[0].damping, 0.1)
  with pytest.raises(TypeError, match="damping_decreas"):
    newton_cg(curvature="hessian", damping_decreas=0.1)
