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

import curvopt
from curvopt import CG, GGN, Dense, Hessian, LevenbergMarquardt, NystromPreconditioner
from curvopt.linalg.cg import CGResult, conjugate_gradient
from curvopt.linalg.flat import packing
from curvopt.linalg.solvers import SolverKind, System
from curvopt.optimizers import damping
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
    lambda b: conjugate_gradient(lambda v: jnp.asarray(a) @ v, b, max_steps=3, tol=0.0)
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
  floor = damping.DIAGONAL_FLOOR * max(float(np.max(d)) for d in diag.values())
  np.testing.assert_allclose(out["a"], 1.0 / (np.asarray(diag["a"]) + 0.1 + floor) ** 0.75)
  np.testing.assert_allclose(out["b"], 2.0 / (np.asarray(diag["b"]) + 0.1 + floor) ** 0.75)
  # A zero entry with no damping stays finite: the floor is relative to the largest entry.
  zero = damping.diagonal_preconditioner({"a": jnp.array([0.0, 4.0])}, 0.0, exponent=1.0)
  np.testing.assert_allclose(zero({"a": jnp.ones(2)})["a"], [1 / 4e-4, 1 / (4 + 4e-4)])


# ------------------------------------------------------------------------------ solvers


def _system(a, like):
  """A :class:`System` for ``a`` acting on pytrees shaped like ``like`` (packed, as Newton-CG)."""
  pack, unpack = packing(like)
  matvec = lambda v: pack(
    jax.tree.map(lambda _, w: w, like, unpack_flat(jnp.asarray(a) @ ravel_pytree(unpack(v))[0]))
  )
  unpack_flat = ravel_pytree(like)[1]
  return System(matvec=matvec, like=pack(like)), pack, unpack


def _tree(v):
  return {"u": v[:2], "v": v[2:].reshape(-1, 1)}


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_dense_params_from_products_equals_linalg_solve(lam):
  a = _spd(7, 3)
  b = _tree(jnp.asarray(np.random.default_rng(4).normal(size=7)))
  system, pack, unpack = _system(a, b)
  solver = Dense()
  _, work = solver.prepare(system, (), jnp.zeros((), jnp.int32))
  result = jax.jit(lambda b, lam: solver.solve(system, work, pack(b), lam, None))(b, lam)
  flat_b = ravel_pytree(b)[0]
  expected = np.linalg.solve(a + lam * np.eye(7), flat_b)
  np.testing.assert_allclose(ravel_pytree(unpack(result.x))[0], expected, rtol=1e-10)
  np.testing.assert_allclose(result.quadratic_value, -0.5 * flat_b @ expected, rtol=1e-10)
  assert not bool(result.negative_curvature) and int(result.status) == curvopt.SolverStatus.DIRECT


def test_dense_on_indefinite_matrix_is_saddle_free_and_flags_it():
  a = np.diag([2.0, -1.0, 4.0])
  b = jnp.asarray([1.0, 1.0, 1.0])
  system, pack, _ = _system(a, b)
  _, work = Dense().prepare(system, (), 0)
  result = Dense().solve(system, work, pack(b), 0.5, None)
  # |eigenvalues of A| + damping: 2.5, 1.5, 4.5 (Dauphin et al.'s saddle-free step).
  np.testing.assert_allclose(result.x[0], [1 / 2.5, 1 / 1.5, 1 / 4.5])
  assert bool(result.negative_curvature) and float(result.min_curvature) == -0.5
  assert int(result.status) == curvopt.SolverStatus.INDEFINITE


def test_nystrom_preconditioned_cg_is_exact_on_a_low_rank_curvature():
  # C of rank 3 is captured exactly by a rank-3 sketch: P^-1 (C + mu I) has two distinct
  # eigenvalues, so preconditioned CG solves in two steps.
  rng = np.random.default_rng(5)
  u = np.linalg.qr(rng.normal(size=(9, 3)))[0]
  c = u @ np.diag([5.0, 2.0, 0.5]) @ u.T
  b = _tree(jnp.asarray(rng.normal(size=9)))
  system, pack, unpack = _system(c, b)
  mu = 0.1
  solver = CG(tol=1e-10, progress_tol=None, preconditioner=NystromPreconditioner(rank=3))

  @jax.jit
  def solve(b):
    state, work = solver.prepare(system, solver.init(system.like), jnp.zeros((), jnp.int32))
    return state, solver.solve(system, work, pack(b), mu, None)

  state, result = solve(b)
  np.testing.assert_allclose(state[0].eigenvalues, [5.0, 2.0, 0.5], rtol=1e-8)
  assert int(result.num_steps) <= 2
  np.testing.assert_allclose(
    ravel_pytree(unpack(result.x))[0],
    np.linalg.solve(c + mu * np.eye(9), ravel_pytree(b)[0]),
    rtol=1e-8,
  )


def test_nystrom_state_refreshes_every_k_updates():
  a = _spd(5, 6)
  system, _, _ = _system(a, jnp.zeros(5))
  preconditioner = NystromPreconditioner(rank=2, refresh=3)
  state = preconditioner.init(system.like)
  prepare = jax.jit(lambda state, count: preconditioner.prepare(system, state, count))
  eigenvalues = []
  for count in range(7):
    state, _ = prepare(state, jnp.asarray(count))
    eigenvalues.append(np.asarray(state[0].eigenvalues))
  # New sketches (new keys) at counts 0, 3 and 6 only; the top eigenvalue is close to a's.
  changed = [not np.array_equal(eigenvalues[i], eigenvalues[i - 1]) for i in range(1, 7)]
  assert changed == [False, False, True, False, False, True]
  assert eigenvalues[0][0] <= np.linalg.eigvalsh(a)[-1] * (1 + 1e-10)


def test_a_user_solver_is_one_class_following_the_protocol():
  # A Jacobi-free Richardson iteration written by the user: init, resolve, prepare,
  # initial_guess and solve on the packed vectors.
  params, x, y, model_fn, loss_fn = regression_problem(1, n=24)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  lam = 0.5

  class Richardson:
    kind = SolverKind.OTHER

    def init(self, like):
      return ()

    def resolve(self, system):
      return self

    def prepare(self, system, state, count):
      return state, None

    def initial_guess(self, previous):
      return None

    def solve(self, system, work, b, damping, x0, *, backtrack_fn=None):
      damped = lambda v: optax.tree.add_scale(system.matvec(v), damping, v)
      x = optax.tree.zeros_like(b)
      for _ in range(3):  # a fixed, small number of sweeps
        x = optax.tree.add_scale(x, 0.2, optax.tree.sub(b, damped(x)))
      quad = 0.5 * optax.tree.vdot(x, damped(x)) - optax.tree.vdot(b, x)
      zero = jnp.zeros((), jnp.int32)
      return CGResult(x, zero, quad, quad, zero, False, True, zero, jnp.inf)

  policy = LevenbergMarquardt(init=lam, accept_ratio=None)
  tx = scale_by_newton_cg(
    "ggn", model_fn=model_fn, loss_fn=loss_fn, damping=policy, solver=Richardson()
  )
  d, state = jax.jit(lambda g, s, p: tx.update(g, s, p, x=x, y=y))(g, tx.init(params), params)
  c = dense_ggn(params, x, y, model_fn, loss_fn) + lam * np.eye(ravel_pytree(g)[0].size)
  expected, flat_g = np.zeros_like(c[0]), np.asarray(ravel_pytree(g)[0])
  for _ in range(3):
    expected = expected + 0.2 * (flat_g - c @ expected)
  np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-8)
  assert int(state.solver) == SolverKind.OTHER


# ------------------------------------------------------------------------------- the parts


def test_a_new_curvature_is_one_value_with_an_operator():
  params, x, y, model_fn, loss_fn = regression_problem(2, n=24)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)

  class GaussNewtonDiagonal:  # the diagonal of the GGN, by one product per coordinate
    def operator(self, params, problem, value_fn, data, count):
      op = GGN().operator(params, problem, value_fn, data, count)
      flat, unravel = ravel_pytree(params)
      diag = jax.vmap(lambda e: ravel_pytree(op.matvec(unravel(e)))[0] @ e)(jnp.eye(flat.size))
      matvec = lambda v: unravel(diag * ravel_pytree(v)[0])
      return op._replace(matvec=matvec, factor=None)

  tx = scale_by_newton_cg(
    GaussNewtonDiagonal(),
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=LevenbergMarquardt(init=0.1, adapt=False, accept_ratio=None),
    solver=CG(tol=1e-12, progress_tol=None),
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
  # The docstrings document every option.
  for name in [*outer]:
    assert f"    {name}:" in newton_cg.__doc__, name


def test_parts_reach_the_update():
  f = lambda x: jnp.sum((x - 1.0) ** 4) + jnp.sum(x**2)
  x = jnp.zeros(3)
  g = jax.grad(f)(x)
  parts = dict(curvature=Hessian(mode="rev_rev"), damping=LevenbergMarquardt(decrease=0.1))
  tx = newton_cg(**parts)
  ref = scale_by_newton_cg(**parts)
  (u, state), (d, ref_state) = jax.jit(
    lambda g, x: (
      tx.update(g, tx.init(x), x, value_fn=f),
      ref.update(g, ref.init(x), x, value_fn=f),
    )
  )(g, x)
  np.testing.assert_allclose(u, -d)
  assert float(ref_state.rho) > 0.75  # so the damping shrank by decrease, not 1/3
  np.testing.assert_allclose(state[0].damping, 0.1)
  with pytest.raises(TypeError, match="damping_decreas"):
    newton_cg(curvature="hessian", damping_decreas=0.1)


@pytest.mark.parametrize(
  "call, match",
  [
    # A shortcut that conflicts with an explicit part is a named error.
    (lambda: newton_cg(curvature="hessian", solver=CG(), cg_tol=1e-3), r"cg_tol.*solver=CG"),
    (lambda: newton_cg(curvature="hessian", solver="dense", cg_max_steps=5), "apply to CG"),
    (lambda: newton_cg(curvature="hessian", solver="dense", preconditioner="martens"), "CG"),
    (
      lambda: newton_cg(curvature="hessian", damping=LevenbergMarquardt(), adapt_damping=False),
      r"LevenbergMarquardt\(adapt=",
    ),
    (lambda: newton_cg(curvature="hessian", solver="nystrom", preconditioner="martens"), "Nystr"),
    (lambda: newton_cg(curvature="hessian", solver="gmres"), "Unknown solver"),
    # Each part validates its own options.
    (lambda: CG(max_steps=0), "CG.max_steps"),
    (lambda: CG(warm_start=2.0), r"CG.warm_start must be in \[0, 1\]"),
    (lambda: Dense(space="rows"), "Dense.space"),
    (lambda: LevenbergMarquardt(bounds=(1.0, 0.1)), "bounds"),
    (lambda: LevenbergMarquardt(decrease=2.0), "decrease"),
    (lambda: Hessian(mode="fwd_fwd"), "Hessian mode"),
    (lambda: NystromPreconditioner(rank=0), "rank"),
  ],
)
def test_an_option_that_does_not_apply_cannot_reach_a_part(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize(
  "old, where",
  [
    ("nystrom_rank", "NystromPreconditioner"),
    ("cg_progress_tol", "CG"),
    ("accept_ratio", "LevenbergMarquardt"),
    ("hvp_mode", "Hessian"),
    ("curvature_batch_size", "GGN"),
  ],
)
def test_options_of_earlier_versions_name_their_new_part(old, where):
  with pytest.raises(TypeError, match=f"{old} -> .*{where}"):
    newton_cg(curvature="hessian", **{old: 1})
