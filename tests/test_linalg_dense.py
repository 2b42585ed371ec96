"""Tests for curvopt.linalg.dense and the solver protocol against dense NumPy linear algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import join, spd, split, with_spectrum
from jax.flatten_util import ravel_pytree

from curvopt.linalg.dense import dense_matrix, dense_solve
from curvopt.linalg.status import SolverStatus


@pytest.mark.parametrize("method", ["cholesky", "eigh", "lstsq"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_equals_numpy_solve_of_damped_matrix_on_pytrees(method, use_jit):
  a = spd(12, 1e3, 0) - 2.0 * np.eye(12)  # indefinite until damped
  b = np.random.default_rng(1).normal(size=12)
  matvec = lambda t: split(jnp.asarray(a) @ join(t))
  solve = lambda d: dense_solve(matvec, split(jnp.asarray(b)), damping=d, method=method)
  result = (jax.jit(solve) if use_jit else solve)(jnp.asarray(2.5))
  damped = a + 2.5 * np.eye(12)
  expected = np.linalg.solve(damped, b)
  np.testing.assert_allclose(join(result.x), expected, rtol=1e-10)
  assert jax.tree.structure(result.x) == jax.tree.structure(split(jnp.zeros(12)))
  assert int(result.status) == SolverStatus.DIRECT and bool(result.converged)
  assert not bool(result.negative_curvature) and int(result.num_steps) == 12
  np.testing.assert_allclose(
    result.quadratic_value, 0.5 * expected @ damped @ expected - b @ expected, rtol=1e-10
  )
  assert float(result.relative_residual) < 1e-12
  lam_min = np.linalg.eigvalsh(damped)[0]
  if method == "cholesky":  # a Rayleigh quotient: an upper bound on the smallest eigenvalue
    assert lam_min <= float(result.min_curvature) <= np.linalg.eigvalsh(damped)[-1]
  else:
    np.testing.assert_allclose(result.min_curvature, lam_min, rtol=1e-9)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_indefinite_matrix_gets_the_saddle_free_step(method):
  eigs = np.array([-3.0, -1.0, 0.5, 2.0, 4.0, 8.0])
  a = with_spectrum(eigs, 2)
  b = np.random.default_rng(3).normal(size=6)
  result = dense_solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), method=method)
  w, v = np.linalg.eigh(a)
  expected = v @ ((v.T @ b) / np.abs(w))  # Dauphin et al.: every negative curvature flipped
  np.testing.assert_allclose(result.x, expected, rtol=1e-10)
  assert int(result.status) == SolverStatus.INDEFINITE
  assert bool(result.negative_curvature) and not bool(result.converged)
  np.testing.assert_allclose(result.min_curvature, -3.0, rtol=1e-10)
  assert float(result.quadratic_value) < 0  # a descent direction for the quadratic model


def test_lstsq_on_singular_matrix_is_minimum_norm_solution():
  a = with_spectrum([0.0, 0.0, 1.0, 5.0], 4)
  b = np.random.default_rng(5).normal(size=4)
  result = dense_solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), method="lstsq")
  np.testing.assert_allclose(result.x, np.linalg.pinv(a) @ b, rtol=1e-8, atol=1e-12)
  assert int(result.status) == SolverStatus.SINGULAR


def test_singular_psd_matrix_gets_the_minimum_norm_solution():
  a = with_spectrum([0.0, 0.0, 1.0, 5.0], 4)
  b = np.random.default_rng(5).normal(size=4)
  result = dense_solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b))
  np.testing.assert_allclose(result.x, np.linalg.pinv(a) @ b, rtol=1e-8, atol=1e-12)
  assert int(result.status) == SolverStatus.SINGULAR and not bool(result.negative_curvature)


def test_ggn_of_least_squares_gives_levenberg_marquardt_step():
  # r(θ) = tanh(X θ) - y; GGN = JᵀJ, gradient Jᵀr. The LM step solves
  # min ||J δ + r||² + λ||δ||², i.e. least squares on [J; √λ I] δ = [-r; 0].
  rng = np.random.default_rng(6)
  x, y = jnp.asarray(rng.normal(size=(20, 5))), jnp.asarray(rng.normal(size=20))
  theta, lam = {"w": jnp.asarray(rng.normal(size=5))}, 0.3
  residual = lambda p: jnp.tanh(x @ p["w"]) - y
  jac = jax.jacfwd(residual)(theta)["w"]
  r = residual(theta)

  def ggn_vp(v):
    _, jv = jax.jvp(residual, (theta,), (v,))
    return jax.vjp(residual, theta)[1](jv)[0]

  grad = jax.grad(lambda p: 0.5 * jnp.sum(residual(p) ** 2))(theta)
  step = dense_solve(ggn_vp, jax.tree.map(jnp.negative, grad), damping=lam)
  stacked = np.vstack([jac, np.sqrt(lam) * np.eye(5)])
  expected = np.linalg.lstsq(stacked, np.r_[-r, np.zeros(5)], rcond=None)[0]
  np.testing.assert_allclose(step.x["w"], expected, rtol=1e-9)


def test_dense_matrix_matches_jacobian_of_linear_map():
  a = np.random.default_rng(7).normal(size=(12, 12))
  m = dense_matrix(lambda t: split(jnp.asarray(a) @ join(t)), split(jnp.zeros(12)))
  # ravel_pytree orders the leaves by dict key ("b" before "w"): permute a accordingly.
  order = np.asarray(ravel_pytree(split(jnp.arange(12)))[0])
  np.testing.assert_allclose(m, a[order][:, order], rtol=1e-12)


def test_nonfinite_matrix_reports_status_and_zero_step():
  result = dense_solve(lambda v: v * jnp.nan, jnp.ones(3))
  assert int(result.status) == SolverStatus.NONFINITE and not bool(result.converged)
  np.testing.assert_array_equal(result.x, np.zeros(3))


def test_misuse_raises():
  with pytest.raises(ValueError, match="method"):
    dense_solve(lambda v: v, jnp.ones(2), method="qr")
