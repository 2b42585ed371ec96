"""Tests for curvopt.linalg.cg against dense linear algebra and a NumPy reference CG."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import join, split
from helpers import spd as _spd

from curvopt.linalg.cg import CG_STATUSES, conjugate_gradient
from curvopt.linalg.status import SolverStatus


def _numpy_cg(a, b, steps):
  """Plain CG in NumPy, returning every iterate (the reference for stopping rules)."""
  x, r = np.zeros_like(b), b.copy()
  p, rz = r.copy(), r @ r
  iterates = [x.copy()]
  for _ in range(steps):
    ap = a @ p
    alpha = rz / (p @ ap)
    x = x + alpha * p
    r = r - alpha * ap
    rz_new = r @ r
    p = r + rz_new / rz * p
    rz = rz_new
    iterates.append(x.copy())
  return iterates


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 1e-3)])
@pytest.mark.parametrize("use_jit", [False, True])
def test_solves_spd_system_on_pytrees(dtype, rtol, use_jit):
  a = _spd(12, 50.0, 0, dtype)
  b = np.random.default_rng(1).normal(size=12).astype(dtype)
  matvec = lambda t: split(jnp.asarray(a) @ join(t))
  solve = lambda rhs: conjugate_gradient(matvec, rhs, tol=1e-12 if dtype == np.float64 else 1e-6)
  result = (jax.jit(solve) if use_jit else solve)(split(jnp.asarray(b)))
  np.testing.assert_allclose(join(result.x), np.linalg.solve(a, b), rtol=rtol, atol=rtol)
  assert join(result.x).dtype == dtype
  assert bool(result.converged) and CG_STATUSES[int(result.status)] == "residual"
  x = np.asarray(join(result.x), np.float64)
  phi = 0.5 * x @ a @ x - b @ x
  np.testing.assert_allclose(result.quadratic_value, phi, rtol=10 * rtol)


def test_preconditioner_same_solution_fewer_steps():
  rng = np.random.default_rng(2)
  scales = np.geomspace(1.0, 1e4, 30)
  a = np.diag(scales) + 0.1 * _spd(30, 2.0, 3)
  b = rng.normal(size=30)
  plain = conjugate_gradient(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=1e-10)
  diag = jnp.asarray(np.diag(a))
  pre = conjugate_gradient(
    lambda v: jnp.asarray(a) @ v, jnp.asarray(b), preconditioner=lambda r: r / diag, tol=1e-10
  )
  np.testing.assert_allclose(pre.x, np.linalg.solve(a, b), rtol=1e-7)
  np.testing.assert_allclose(plain.x, np.linalg.solve(a, b), rtol=1e-7)
  assert int(pre.num_steps) < int(plain.num_steps)


def test_steihaug_first_iteration_returns_steepest_descent():
  b = jnp.array([2.0, 0.1, -0.1])
  result = conjugate_gradient(lambda v: jnp.array([-1.0, 2.0, 3.0]) * v, b)
  np.testing.assert_array_equal(result.x, b)
  assert bool(result.negative_curvature) and int(result.num_steps) == 1
  # phi(b) = 0.5 b.Ab - b.b, computed densely.
  expected = 0.5 * b @ (jnp.array([-1.0, 2.0, 3.0]) * b) - b @ b
  np.testing.assert_allclose(result.quadratic_value, expected)


def test_steihaug_later_iteration_keeps_last_good_iterate():
  # Positive curvature on the first Krylov directions, negative on a weakly excited one.
  eigs = np.array([1.0, 2.0, 3.0, -0.5])
  a = np.diag(eigs)
  b = np.array([1.0, 1.0, 1.0, 1e-3])
  result = conjugate_gradient(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=0.0)
  assert bool(result.negative_curvature)
  k = int(result.selected_step)
  assert 0 < k < int(result.num_steps)
  # The returned iterate is the NumPy CG iterate at the selected step, with phi decreasing.
  iterates = _numpy_cg(a, b, k)
  np.testing.assert_allclose(result.x, iterates[k], rtol=1e-10)
  phis = [0.5 * x @ a @ x - b @ x for x in iterates]
  assert all(np.diff(phis) < 0)
  np.testing.assert_allclose(result.quadratic_value, phis[-1], rtol=1e-10)


def test_martens_progress_rule_matches_reference():
  a = _spd(200, 1e3, 4)
  b = np.random.default_rng(5).normal(size=200)
  eps, window = 5e-3, 10
  result = conjugate_gradient(
    lambda v: jnp.asarray(a) @ v,
    jnp.asarray(b),
    tol=0.0,
    progress_tol=eps,
    progress_window=window,
    max_steps=150,
  )
  phis = [0.5 * x @ a @ x - b @ x for x in _numpy_cg(a, b, 150)]
  expected = next(
    k
    for k in range(1, 151)
    if k > (s := max(window, int(np.ceil(0.1 * k))))
    and phis[k] < 0
    and (phis[k] - phis[k - s]) / phis[k] < s * eps
  )
  assert CG_STATUSES[int(result.status)] == "progress"
  assert int(result.num_steps) == expected


def test_warm_start_used_only_when_it_improves_on_zero():
  a = _spd(6, 10.0, 6)
  b = np.random.default_rng(7).normal(size=6)
  solution = np.linalg.solve(a, b)
  matvec = lambda v: jnp.asarray(a) @ v
  exact = conjugate_gradient(matvec, jnp.asarray(b), jnp.asarray(solution), tol=1e-8)
  assert int(exact.num_steps) == 0
  np.testing.assert_allclose(exact.x, solution)
  cold = conjugate_gradient(matvec, jnp.asarray(b), tol=1e-10)
  bad = conjugate_gradient(matvec, jnp.asarray(b), jnp.asarray(-10 * solution), tol=1e-10)
  np.testing.assert_allclose(bad.x, cold.x, rtol=1e-12)
  assert int(bad.num_steps) == int(cold.num_steps)


def test_backtracking_returns_best_saved_iterate():
  a = _spd(40, 1e3, 8)
  b = np.random.default_rng(9).normal(size=40)
  iterates = _numpy_cg(a, b, 30)
  target = iterates[5] + 1e-3  # an objective minimised near an early iterate
  objective = lambda x: jnp.sum((x - target) ** 2)
  result = conjugate_gradient(
    lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=0.0, max_steps=30, backtrack_fn=objective
  )
  saved = sorted({int(np.ceil(1.3**j)) for j in range(20) if np.ceil(1.3**j) <= 30})
  values = {k: float(np.sum((iterates[k] - target) ** 2)) for k in [*saved, 30]}
  best = min(values, key=values.get)
  assert int(result.selected_step) == best == 5
  np.testing.assert_allclose(result.x, iterates[best], rtol=1e-9)


def test_nonfinite_operator_reports_status_and_stays_finite():
  result = conjugate_gradient(lambda v: v * jnp.nan, jnp.ones(3))
  assert CG_STATUSES[int(result.status)] == "nonfinite"
  assert not bool(result.converged)
  np.testing.assert_array_equal(result.x, np.zeros(3))


def test_zero_rhs_and_vmap():
  result = conjugate_gradient(lambda v: 2.0 * v, jnp.zeros(3))
  assert int(result.num_steps) == 0 and bool(result.converged)
  np.testing.assert_array_equal(result.x, np.zeros(3))
  bs = jnp.arange(6.0).reshape(2, 3) + 1.0
  xs = jax.vmap(lambda b: conjugate_gradient(lambda v: 2.0 * v, b).x)(bs)
  np.testing.assert_allclose(xs, bs / 2)


def test_misuse_raises():
  with pytest.raises(ValueError, match="max_steps"):
    conjugate_gradient(lambda v: v, jnp.ones(2), max_steps=0)
  with pytest.raises(ValueError, match="x0"):
    conjugate_gradient(lambda v: v, jnp.ones(2), {"a": jnp.ones(2)})


def test_status_enumeration_matches_historical_tuple():
  assert CG_STATUSES[:5] == ("max_steps", "residual", "progress", "negative_curvature", "nonfinite")
  for code, name in enumerate(CG_STATUSES):
    assert SolverStatus(code).name.lower() == name
    assert isinstance(SolverStatus.message(code), str) and SolverStatus.message(code)
  assert SolverStatus.message(jnp.asarray(SolverStatus.NONFINITE)).startswith("A non-finite")
  with pytest.raises(ValueError, match="Unknown solver status"):
    SolverStatus.message(99)
  result = conjugate_gradient(lambda v: -v, jnp.ones(2))
  assert int(result.status) == SolverStatus.NEGATIVE_CURVATURE
  assert not SolverStatus.is_converged(result.status)


@pytest.mark.parametrize("damping", [0.5, jnp.asarray(0.5)])
def test_damping_solves_shifted_system(damping):
  a = _spd(10, 100.0, 10)
  b = np.random.default_rng(11).normal(size=10)
  result = jax.jit(
    lambda d: conjugate_gradient(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), damping=d, tol=1e-12)
  )(damping)
  np.testing.assert_allclose(result.x, np.linalg.solve(a + 0.5 * np.eye(10), b), rtol=1e-9)
  x = np.asarray(result.x)
  np.testing.assert_allclose(
    result.quadratic_value, 0.5 * x @ (a + 0.5 * np.eye(10)) @ x - b @ x, rtol=1e-9
  )


@pytest.mark.parametrize("unroll", [3])
@pytest.mark.parametrize(
  "options",
  [
    {"tol": 1e-8},
    {"tol": 0.0, "progress_tol": 5e-3},
    {"tol": 0.0, "max_steps": 17},
    {"tol": 0.0, "backtrack_fn": lambda x: jnp.sum((x - 0.1) ** 2), "max_steps": 20},
  ],
)
def test_unrolled_chunks_equal_plain_loop(unroll, options):
  a = _spd(40, 1e3, 12)
  b = jnp.asarray(np.random.default_rng(13).normal(size=40))
  solve = lambda u: conjugate_gradient(lambda v: jnp.asarray(a) @ v, b, unroll=u, **options)
  plain, chunked = jax.jit(lambda: solve(1))(), jax.jit(lambda: solve(unroll))()
  for field, p, c in zip(plain._fields, plain, chunked, strict=True):
    np.testing.assert_array_equal(p, c, err_msg=field)


def test_unrolled_chunks_stop_on_negative_curvature_like_plain_loop():
  a = np.diag([1.0, 2.0, 3.0, -0.5])
  b = jnp.asarray([1.0, 1.0, 1.0, 1e-3])
  plain = conjugate_gradient(lambda v: jnp.asarray(a) @ v, b, tol=0.0)
  chunked = conjugate_gradient(lambda v: jnp.asarray(a) @ v, b, tol=0.0, unroll=4)
  assert int(plain.status) == int(chunked.status) == SolverStatus.NEGATIVE_CURVATURE
  np.testing.assert_array_equal(plain.x, chunked.x)
  assert int(plain.num_steps) == int(chunked.num_steps)


def test_residual_replacement_keeps_long_float32_solve_honest():
  # A long float32 solve (hundreds of iterations, condition 1e4): the recursive residual drifts
  # far below the true one, so plain CG reports convergence it did not reach. With residual
  # replacement the reported residual is the true one and the solve does not claim success.
  a = _spd(100, 1e4, 2)
  b = np.random.default_rng(2).normal(size=100)
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  true_residual = lambda x: np.linalg.norm(b - a @ np.asarray(x, np.float64)) / np.linalg.norm(b)
  solve = jax.jit(
    lambda every: conjugate_gradient(
      lambda v: a32 @ v, b32, tol=1e-5, max_steps=600, recompute_residual_every=every
    ),
    static_argnums=0,
  )
  plain, replaced = solve(None), solve(10)
  assert int(plain.status) == SolverStatus.RESIDUAL  # claims ||r|| <= 1e-5 ||b|| ...
  assert true_residual(plain.x) > 10 * float(plain.relative_residual)  # ... but is far above
  assert int(replaced.status) == SolverStatus.MAX_STEPS
  np.testing.assert_allclose(replaced.relative_residual, true_residual(replaced.x), rtol=0.1)
  # Both still solve the system to the float32 floor (forward error ~1e-5).
  solution = np.linalg.solve(a, b)
  for result in (plain, replaced):
    error = np.linalg.norm(np.asarray(result.x, np.float64) - solution) / np.linalg.norm(solution)
    assert error < 1e-4


def test_residual_replacement_in_float64_reaches_same_solution():
  a = _spd(60, 1e3, 14)
  b = np.random.default_rng(15).normal(size=60)
  result = conjugate_gradient(
    lambda v: jnp.asarray(a) @ v,
    jnp.asarray(b),
    tol=1e-10,
    max_steps=500,
    recompute_residual_every=7,
  )
  assert int(result.status) == SolverStatus.RESIDUAL
  np.testing.assert_allclose(result.x, np.linalg.solve(a, b), rtol=1e-7)
  true = np.linalg.norm(b - a @ np.asarray(result.x)) / np.linalg.norm(b)
  assert true < 1e-9


def test_new_options_misuse_raises():
  with pytest.raises(ValueError, match="unroll"):
    conjugate_gradient(lambda v: v, jnp.ones(2), unroll=0)
  with pytest.raises(ValueError, match="recompute_residual_every"):
    conjugate_gradient(lambda v: v, jnp.ones(2), recompute_residual_every=0)


# ------------------------------------------------------------- packed loop, one operator trace


def _many_leaves(v, n_leaves):
  """A flat vector as a pytree of ``n_leaves`` leaves of mixed shapes."""
  sizes = np.diff(np.linspace(0, v.shape[0], n_leaves + 1).astype(int))
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return [v[o : o + s] for o, s in zip(offsets[:-1], sizes, strict=True)]


@pytest.mark.parametrize(
  "options",
  [
    {"tol": 1e-10},
    {"tol": 0.0, "progress_tol": 5e-2, "max_steps": 12},
    {"tol": 0.0, "backtrack_fn": lambda x: jnp.sum(jnp.concatenate(x) ** 2), "max_steps": 12},
    {"tol": 1e-10, "recompute_residual_every": 5},
  ],
)
@pytest.mark.parametrize("warm", [False, True])
def test_packed_loop_equals_pytree_loop(options, warm):
  # Same iterates up to the order of summation in inner products (float64).
  a = jnp.asarray(_spd(24, 10.0, 21))
  b = jnp.asarray(np.random.default_rng(22).normal(size=24))
  x0 = _many_leaves(jnp.linspace(-0.1, 0.1, 24), 5) if warm else None
  diag = jnp.diag(a)
  solve = lambda flatten: conjugate_gradient(
    lambda t: _many_leaves(a @ jnp.concatenate(t), 5),
    _many_leaves(b, 5),
    x0,
    preconditioner=lambda t: _many_leaves(jnp.concatenate(t) / diag, 5),
    flatten=flatten,
    **options,
  )
  packed, plain = jax.jit(lambda: solve(True))(), jax.jit(lambda: solve(False))()
  assert jax.tree.structure(packed.x) == jax.tree.structure(plain.x)
  for field in ("num_steps", "status", "selected_step", "converged", "negative_curvature"):
    assert int(getattr(packed, field)) == int(getattr(plain, field)), field
  np.testing.assert_allclose(jnp.concatenate(packed.x), jnp.concatenate(plain.x), rtol=1e-7)
  for field in ("quadratic_value", "min_curvature"):
    np.testing.assert_allclose(getattr(packed, field), getattr(plain, field), rtol=1e-9)
  np.testing.assert_allclose(packed.relative_residual, plain.relative_residual, atol=1e-9)


def test_packed_loop_keeps_mixed_dtypes_and_vmaps():
  a = jnp.asarray(_spd(6, 10.0, 23), jnp.float32)

  def matvec(t):
    v = a @ jnp.concatenate([t["lo"].astype(jnp.float32), t["hi"]])
    return {"lo": v[:2].astype(jnp.bfloat16), "hi": v[2:]}

  b = {"lo": jnp.ones(2, jnp.bfloat16), "hi": jnp.ones(4, jnp.float32)}
  result = conjugate_gradient(matvec, b, tol=1e-3)
  assert result.x["lo"].dtype == jnp.bfloat16 and result.x["hi"].dtype == jnp.float32
  x = np.concatenate([np.asarray(result.x["lo"], np.float32), result.x["hi"]])
  np.testing.assert_allclose(x, np.linalg.solve(np.asarray(a), np.ones(6)), rtol=0.05)

  rhs = jnp.asarray(np.random.default_rng(24).normal(size=(3, 12)))
  dense = jnp.asarray(_spd(12, 10.0, 25))
  batched = jax.vmap(
    lambda r: conjugate_gradient(lambda t: split(dense @ join(t)), split(r), tol=1e-12).x
  )(rhs)
  np.testing.assert_allclose(jax.vmap(join)(batched), np.linalg.solve(dense, rhs.T).T, rtol=1e-8)


def _count_primitive(jaxpr, name):
  """Occurrences of a primitive in a jaxpr and every sub-jaxpr (loop bodies, cond branches)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_primitive(sub, name)
  return count


@pytest.mark.parametrize("flatten", [False, True])
def test_warm_started_solve_holds_the_operator_once(flatten):
  # The warm start's product A x0 is the loop's first trip, so the compiled program holds one
  # copy of the operator (a network's whole linearised product), not two. The operator is
  # marked by a cumsum, which nothing else in CG uses.
  a = jnp.asarray(_spd(12, 10.0, 26))
  matvec = lambda t: split(a @ join(t) + 0.0 * jnp.cumsum(join(t)))
  b, x0 = split(jnp.ones(12)), split(jnp.full(12, 0.01))
  solve = lambda b, x0: conjugate_gradient(matvec, b, x0, tol=1e-12, flatten=flatten)
  assert _count_primitive(jax.make_jaxpr(solve)(b, x0).jaxpr, "cumsum") == 1
  result = jax.jit(solve)(b, x0)
  np.testing.assert_allclose(join(result.x), np.linalg.solve(a, np.ones(12)), rtol=1e-8)


def test_loop_body_does_not_grow_with_the_number_of_leaves():
  # Packed into one vector, the loop compiles to the same program for 2 or 40 leaves; only the
  # operator (here a matrix product) sees the pytree.
  def body_size(n_leaves):
    a = jnp.eye(40)
    solve = lambda b: conjugate_gradient(
      lambda t: _many_leaves(a @ jnp.concatenate(t), n_leaves), b, tol=1e-6
    )
    jaxpr = jax.make_jaxpr(solve)(_many_leaves(jnp.ones(40), n_leaves)).jaxpr
    (loop,) = [e for e in jaxpr.eqns if e.primitive.name == "while"]
    body = loop.params["body_jaxpr"].jaxpr
    return sum(e.primitive.name not in ("slice", "concatenate", "reshape") for e in body.eqns)

  assert body_size(40) == body_size(2)
