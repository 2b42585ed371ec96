"""Tests for curvopt.linalg.nystrom against closed forms and dense eigendecompositions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import join, split, with_spectrum

from curvopt.linalg.cg import conjugate_gradient
from curvopt.linalg.nystrom import (
  nystrom_approximation,
  nystrom_cg,
  nystrom_preconditioner,
)
from curvopt.linalg.status import SolverStatus


def _low_rank(n, rank, seed):
  """A PSD matrix of exact rank ``rank`` with eigenvalues between 1 and 100."""
  return with_spectrum(np.r_[np.geomspace(100.0, 1.0, rank), np.zeros(n - rank)], seed)


@pytest.mark.parametrize("batch_mode", ["vmap", "map"])
def test_preconditioner_is_exact_inverse_on_low_rank_plus_shift(batch_mode):
  # A of rank 5 on a 12-dim pytree; sketch rank 7 > 5 captures it, so λ̂_ℓ = 0 and
  # P⁻¹ = U(Λ+μ)⁻¹Uᵀ + (I - UUᵀ)/μ = (A + μI)⁻¹ exactly.
  a, mu = _low_rank(12, 5, 0), 0.3
  matvec = lambda t: split(jnp.asarray(a) @ join(t))
  approx = nystrom_approximation(
    matvec, split(jnp.zeros(12)), jax.random.key(1), 7, batch_mode=batch_mode
  )
  assert jax.tree.map(jnp.shape, approx.basis) == {"w": (7, 2, 4), "b": (7, 4)}
  precond = nystrom_preconditioner(approx, mu)
  p_inv = jax.vmap(lambda e: join(precond(split(e))))(jnp.eye(12)).T
  np.testing.assert_allclose(p_inv @ (a + mu * np.eye(12)), np.eye(12), atol=1e-10)
  np.testing.assert_allclose(approx.eigenvalues[:5], np.geomspace(100.0, 1.0, 5), rtol=1e-10)
  np.testing.assert_allclose(approx.eigenvalues[5:], 0.0, atol=1e-10)
  # The basis is orthonormal and spans A's range.
  u = jax.vmap(join)(approx.basis)
  np.testing.assert_allclose(u @ u.T, np.eye(7), atol=1e-12)
  np.testing.assert_allclose(u[:5].T @ (u[:5] @ a), a, atol=1e-9)


def test_sketch_of_exact_rank_gives_two_point_spectrum_and_two_pcg_steps():
  # With ℓ = rank(A), P⁻¹(A + μI) has eigenvalues 1 (on A's range) and μ/(λ_r + μ) (off it):
  # PCG solves in exactly two iterations.
  a, mu = _low_rank(30, 6, 2), 0.1
  approx = nystrom_approximation(lambda v: jnp.asarray(a) @ v, jnp.zeros(30), jax.random.key(3), 6)
  precond = nystrom_preconditioner(approx, mu)
  p_inv = jax.vmap(precond)(jnp.eye(30)).T
  eigs = np.sort(np.linalg.eigvals(p_inv @ (a + mu * np.eye(30))).real)
  np.testing.assert_allclose(eigs[:24], mu / (1.0 + mu), rtol=1e-8)
  np.testing.assert_allclose(eigs[24:], 1.0, rtol=1e-8)
  b = jnp.asarray(np.random.default_rng(4).normal(size=30))
  result = conjugate_gradient(
    lambda v: jnp.asarray(a) @ v, b, damping=mu, preconditioner=precond, tol=1e-8
  )
  assert int(result.num_steps) == 2 and int(result.status) == SolverStatus.RESIDUAL
  np.testing.assert_allclose(result.x, np.linalg.solve(a + mu * np.eye(30), b), rtol=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-6), (np.float32, 1e-3)])
def test_recovers_top_eigenvalues_of_decaying_spectrum(dtype, rtol):
  # Low rank plus fast decay: eigenvalues 1000·0.5^i. An oversampled sketch (rank 30) is
  # accurate for the top ones (Tropp et al. 2017: error ~ the tail beyond the sketch).
  spectrum = 1000.0 * 0.5 ** np.arange(80)
  a = with_spectrum(spectrum, 5, dtype)
  approx = jax.jit(
    lambda k: nystrom_approximation(lambda v: jnp.asarray(a) @ v, jnp.zeros(80, dtype), k, 30)
  )(jax.random.key(6))
  assert approx.eigenvalues.dtype == dtype
  np.testing.assert_allclose(approx.eigenvalues[:10], spectrum[:10], rtol=rtol)
  assert np.all(np.diff(np.asarray(approx.eigenvalues)) <= 0)
  assert np.all(np.asarray(approx.eigenvalues) >= 0)


def test_pcg_needs_far_fewer_iterations_on_ill_conditioned_spectrum():
  # 300-dim, eigenvalues 1e4·i^-2 (effective dimension ~100 at μ = 1): plain CG needs
  # many iterations (111 measured), Nyström PCG with a rank-60 sketch few (23).
  n, mu = 300, 1.0
  a = with_spectrum(1e4 * np.arange(1, n + 1) ** -2.0, 7)
  b = jnp.asarray(np.random.default_rng(8).normal(size=n))
  matvec = lambda v: jnp.asarray(a) @ v
  plain = jax.jit(lambda: conjugate_gradient(matvec, b, damping=mu, tol=1e-8, max_steps=n))()
  pcg = jax.jit(
    lambda: nystrom_cg(matvec, b, damping=mu, key=jax.random.key(9), rank=60, tol=1e-8, max_steps=n)
  )()
  solution = np.linalg.solve(a + mu * np.eye(n), b)
  for result in (plain, pcg):
    assert int(result.status) == SolverStatus.RESIDUAL
    np.testing.assert_allclose(result.x, solution, rtol=1e-6, atol=1e-9)
  assert 3 * int(pcg.num_steps) < int(plain.num_steps)


def test_indefinite_operator_falls_back_to_positive_part():
  # An indefinite operator: the Cholesky factor of the core fails; the eigh fallback keeps
  # the approximation finite and non-negative.
  a = with_spectrum(np.r_[50.0, 10.0, -5.0, np.zeros(7)], 10)
  approx = nystrom_approximation(lambda v: jnp.asarray(a) @ v, jnp.zeros(10), jax.random.key(0), 4)
  eigenvalues = np.asarray(approx.eigenvalues)
  assert np.all(np.isfinite(eigenvalues)) and np.all(eigenvalues >= 0)
  assert np.all(np.isfinite(np.asarray(approx.basis)))
  assert eigenvalues[0] > 10.0


def test_zero_damping_on_singular_approximation_stays_finite():
  approx = nystrom_approximation(lambda v: 0.0 * v, jnp.zeros(5), jax.random.key(0), 2)
  out = nystrom_preconditioner(approx, 0.0)(jnp.ones(5))
  np.testing.assert_allclose(out, np.ones(5))


def test_misuse_raises():
  with pytest.raises(ValueError, match="rank"):
    nystrom_approximation(lambda v: v, jnp.zeros(3), jax.random.key(0), 4)
  with pytest.raises(ValueError, match="batch_mode"):
    nystrom_approximation(lambda v: v, jnp.zeros(3), jax.random.key(0), 2, batch_mode="loop")
  with pytest.raises(ValueError, match="preconditioner"):
    nystrom_cg(lambda v: v, jnp.ones(3), rank=2, preconditioner=lambda r: r)
