"""Tests for curvopt.estimators against dense linear algebra in float64.

Statistical checks use fixed keys and tolerances of a few standard deviations, where the
standard deviation comes from the estimator's closed-form variance on the dense matrix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import regression_problem, with_spectrum
from jax.flatten_util import ravel_pytree

from curvopt.curvature.estimators import (
  hutchinson_diagonal,
  hutchinson_trace,
  hutchpp_trace,
  lanczos,
  spectral_density,
  top_eigenvalues,
)
from curvopt.curvature.products import hvp_fn

NUM_SIGMA = 4.0  # tolerance, in standard deviations, of every statistical check


def random_sym(n, seed=0):
  a = np.random.default_rng(seed).normal(size=(n, n))
  return (a + a.T) / 2


def dense_matvec(a, dtype):
  a = jnp.asarray(a, dtype)
  return lambda v: a @ v


def maybe_jit(fn, use_jit):
  return jax.jit(fn) if use_jit else fn


# ----------------------------------------------------------------------------------------------
# Hutchinson trace.


def hutchinson_variance(a, distribution):
  """Var[zᵀAz] for one probe (symmetric A)."""
  off = a - np.diag(np.diag(a))
  return 2 * np.sum(off**2) if distribution == "rademacher" else 2 * np.sum(a**2)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype,use_jit", [(jnp.float32, True), (jnp.float64, False)])
def test_hutchinson_trace_within_error_bars(distribution, dtype, use_jit):
  a = random_sym(30) + 3 * np.eye(30)
  m = 400
  fn = maybe_jit(
    lambda key: hutchinson_trace(
      dense_matvec(a, dtype), jnp.zeros(30, dtype), key, num_samples=m, distribution=distribution
    ),
    use_jit,
  )
  est = fn(jax.random.key(1))
  sd = np.sqrt(hutchinson_variance(a, distribution) / m)
  assert est.estimate.dtype == dtype
  assert abs(float(est.estimate) - np.trace(a)) < NUM_SIGMA * sd
  # The reported standard error estimates sd: with 400 samples, within ~±15% (well inside).
  assert 0.7 < float(est.stderr) / sd < 1.4


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_unbiased_over_many_keys(distribution):
  a = random_sym(12, seed=3)
  m, reps = 4, 2000
  fn = jax.jit(
    jax.vmap(
      lambda key: (
        hutchinson_trace(
          dense_matvec(a, jnp.float64), jnp.zeros(12), key, num_samples=m, distribution=distribution
        ).estimate
      )
    )
  )
  estimates = fn(jax.random.split(jax.random.key(0), reps))
  sd_of_mean = np.sqrt(hutchinson_variance(a, distribution) / (m * reps))
  assert abs(float(estimates.mean()) - np.trace(a)) < NUM_SIGMA * sd_of_mean
  # and the spread of single estimates matches the closed-form variance
  assert 0.85 < float(estimates.std()) / np.sqrt(hutchinson_variance(a, distribution) / m) < 1.15


def test_hutchinson_trace_single_sample_has_infinite_stderr():
  est = hutchinson_trace(lambda v: 2 * v, jnp.zeros(3), jax.random.key(0), num_samples=1)
  assert float(est.estimate) == 6.0  # Rademacher: zᵀ(2I)z = 2n exactly
  assert np.isinf(float(est.stderr))


# ----------------------------------------------------------------------------------------------
# Hutch++.


def test_hutchpp_exact_for_low_rank():
  u = np.random.default_rng(0).normal(size=(40, 3))
  a = u @ u.T  # rank 3 <= 9 // 3
  est = hutchpp_trace(dense_matvec(a, jnp.float64), jnp.zeros(40), jax.random.key(2), num_samples=9)
  np.testing.assert_allclose(float(est.estimate), np.trace(a), rtol=1e-10)
  assert float(est.stderr) < 1e-10


def test_hutchpp_unbiased_and_lower_variance_than_hutchinson():
  dtype = jnp.float32
  n, m, reps = 60, 30, 300
  a = with_spectrum(1.0 / np.arange(1, n + 1) ** 2, 1)  # fast-decaying PSD spectrum
  like = jnp.zeros(n, dtype)
  matvec = dense_matvec(a, dtype)
  keys = jax.random.split(jax.random.key(5), reps)
  pp = jax.jit(jax.vmap(lambda k: hutchpp_trace(matvec, like, k, num_samples=m).estimate))(keys)
  hutch = jax.jit(jax.vmap(lambda k: hutchinson_trace(matvec, like, k, num_samples=m).estimate))(
    keys
  )
  pp, hutch = np.asarray(pp, np.float64), np.asarray(hutch, np.float64)
  assert abs(pp.mean() - np.trace(a)) < NUM_SIGMA * pp.std() / np.sqrt(reps)
  assert abs(hutch.mean() - np.trace(a)) < NUM_SIGMA * hutch.std() / np.sqrt(reps)
  # Hutch++ deflates the top ~10 eigenvalues: its error is several times smaller.
  assert pp.std() < hutch.std() / 4


# ----------------------------------------------------------------------------------------------
# Hutchinson diagonal.


@pytest.mark.parametrize("dtype,use_jit", [(jnp.float32, True), (jnp.float64, False)])
def test_hutchinson_diagonal_within_error_bars(dtype, use_jit):
  n, m = 25, 300
  a = random_sym(n, seed=4)
  fn = maybe_jit(
    lambda key: hutchinson_diagonal(
      dense_matvec(a, dtype), jnp.zeros(n, dtype), key, num_samples=m
    ),
    use_jit,
  )
  diag = fn(jax.random.key(3))
  assert diag.dtype == dtype
  sd = np.sqrt((np.sum(a**2, axis=1) - np.diag(a) ** 2) / m)  # Σ_{k≠j} A_jk² / m
  # 25 entries at 4 sd: a false alarm has probability ~1e-3.
  assert np.all(np.abs(np.asarray(diag, np.float64) - np.diag(a)) < NUM_SIGMA * sd)


def test_hutchinson_diagonal_gaussian_unbiased():
  n, m = 10, 20000
  a = random_sym(n, seed=6)
  diag = hutchinson_diagonal(
    dense_matvec(a, jnp.float64),
    jnp.zeros(n),
    jax.random.key(0),
    num_samples=m,
    distribution="gaussian",
  )
  # Var[z_j (Az)_j] = A_jj² E[z⁴] - A_jj² + Σ_{k≠j} A_jk² = 2A_jj² + Σ_{k≠j} A_jk².
  sd = np.sqrt((np.sum(a**2, axis=1) + np.diag(a) ** 2) / m)
  assert np.all(np.abs(np.asarray(diag) - np.diag(a)) < NUM_SIGMA * sd)


# ----------------------------------------------------------------------------------------------
# Lanczos.


def check_lanczos_relation(a, res, atol):
  """V orthonormal, VᵀAV = T, and AVᵀ - VᵀT is β_m times a unit vector in the last column."""
  v = np.asarray(res.basis, np.float64)  # (m, n)
  m = v.shape[0]
  t = np.diag(res.alphas) + np.diag(res.betas, 1) + np.diag(res.betas, -1)
  np.testing.assert_allclose(v @ v.T, np.eye(m), atol=atol)
  np.testing.assert_allclose(v @ a @ v.T, t, atol=atol * np.abs(a).max())
  resid = a @ v.T - v.T @ t
  np.testing.assert_allclose(resid[:, :-1], 0, atol=atol * np.abs(a).max())
  np.testing.assert_allclose(np.linalg.norm(resid[:, -1]), float(res.next_beta), atol=atol)


@pytest.mark.parametrize(
  "dtype,atol,use_jit", [(jnp.float32, 1e-4, True), (jnp.float64, 1e-10, False)]
)
def test_lanczos_relation(dtype, atol, use_jit):
  a = random_sym(50, seed=7)
  fn = maybe_jit(
    lambda key: lanczos(
      dense_matvec(a, dtype), jnp.zeros(50, dtype), key, num_iters=20, return_basis=True
    ),
    use_jit,
  )
  res = fn(jax.random.key(0))
  assert res.alphas.shape == (20,) and res.betas.shape == (19,) and res.basis.shape == (20, 50)
  assert res.alphas.dtype == dtype
  check_lanczos_relation(a, res, atol)


def test_lanczos_without_reorthogonalization_matches_early_steps():
  a = random_sym(40, seed=8)
  kwargs = dict(num_iters=8, return_basis=True)
  full = lanczos(dense_matvec(a, jnp.float64), jnp.zeros(40), jax.random.key(1), **kwargs)
  plain = lanczos(
    dense_matvec(a, jnp.float64), jnp.zeros(40), jax.random.key(1), reorthogonalize=False, **kwargs
  )
  # Before any Ritz value converges, the plain recurrence is still orthogonal to round-off.
  np.testing.assert_allclose(plain.alphas, full.alphas, atol=1e-8)
  np.testing.assert_allclose(plain.betas, full.betas, atol=1e-8)
  check_lanczos_relation(a, plain, 1e-8)


def test_lanczos_breakdown_restarts_without_nan():
  # Three distinct eigenvalues: the Krylov space is invariant after three steps.
  a = with_spectrum([1.0] * 4 + [2.0] * 3 + [5.0] * 3, 2)
  matvec = dense_matvec(a, jnp.float64)
  res = lanczos(matvec, jnp.zeros(10), jax.random.key(0), num_iters=10, return_basis=True)
  assert np.all(np.isfinite(res.alphas)) and np.all(np.isfinite(res.betas))
  assert abs(float(res.betas[2])) < 1e-10  # the split
  check_lanczos_relation(a, res, 1e-10)
  t = np.diag(res.alphas) + np.diag(res.betas, 1) + np.diag(res.betas, -1)
  np.testing.assert_allclose(np.linalg.eigvalsh(t), np.linalg.eigvalsh(a), atol=1e-10)


def test_lanczos_clamps_num_iters_with_warning():
  with pytest.warns(UserWarning, match="exceeds the dimension 6"):
    res = lanczos(lambda v: 2.0 * v, jnp.zeros(6), jax.random.key(0), num_iters=10)
  assert res.alphas.shape == (6,)
  np.testing.assert_allclose(res.alphas, 2.0)


def test_lanczos_pytree_basis_has_like_structure():
  like = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
  d = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.arange(4.0) + 10}
  matvec = lambda v: jax.tree.map(jnp.multiply, d, v)
  res = lanczos(matvec, like, jax.random.key(0), num_iters=5, return_basis=True)
  assert res.basis["a"].shape == (5, 2, 3) and res.basis["b"].shape == (5, 4)


# ----------------------------------------------------------------------------------------------
# Top eigenvalues.


@pytest.mark.parametrize("dtype,use_jit", [(jnp.float32, True), (jnp.float64, False)])
def test_top_eigenvalues_spd_condition_1e3(dtype, use_jit):
  n, k = 200, 5
  eigenvalues = np.geomspace(1.0, 1e3, n)
  a = with_spectrum(eigenvalues, 3)
  assert np.isclose(np.linalg.cond(a), 1e3)
  fn = maybe_jit(
    lambda key: top_eigenvalues(
      dense_matvec(a, dtype), jnp.zeros(n, dtype), key, k=k, num_iters=80
    ),
    use_jit,
  )
  res = fn(jax.random.key(0))
  w, u = np.linalg.eigh(a)
  w, u = w[::-1][:k], u[:, ::-1][:, :k]
  np.testing.assert_allclose(res.eigenvalues, w, rtol=1e-3)
  y = np.asarray(res.eigenvectors, np.float64)
  np.testing.assert_allclose(np.abs(np.sum(y * u.T, axis=1)), 1.0, atol=1e-2)
  # The reported residual norms are the true ‖Ay - θy‖ (within round-off) and small.
  true_resid = np.linalg.norm(y @ a - np.asarray(res.eigenvalues)[:, None] * y, axis=1)
  np.testing.assert_allclose(res.residual_norms, true_resid, atol=1e-3 * w[0] * 1e-2)
  assert bool(res.converged.all())


def test_top_eigenvalues_largest_magnitude_indefinite():
  eigenvalues = np.concatenate([[-9.0, -7.0], np.linspace(-3, 3, 40), [8.0]])
  a = with_spectrum(eigenvalues, 5)
  res = top_eigenvalues(
    dense_matvec(a, jnp.float64), jnp.zeros(43), jax.random.key(1), k=3, num_iters=30
  )
  np.testing.assert_allclose(res.eigenvalues, [-9.0, 8.0, -7.0], rtol=1e-8)
  assert bool(res.converged.all())


def test_top_eigenvalues_reports_non_convergence():
  a = with_spectrum(np.linspace(1.0, 2.0, 100), 6)  # clustered: 3 steps cannot resolve it
  res = top_eigenvalues(
    dense_matvec(a, jnp.float64), jnp.zeros(100), jax.random.key(0), k=2, num_iters=3
  )
  assert not bool(res.converged.all())
  assert np.all(np.isfinite(res.residual_norms))


# ----------------------------------------------------------------------------------------------
# Spectral density.


def slq_mean_sd(a, num_runs):
  """sd of the SLQ mean, uᵀAu averaged over runs, for u uniform on the unit sphere."""
  n = a.shape[0]
  ev = np.linalg.eigvalsh(a)
  var = 2.0 / (n + 2) * (np.mean(ev**2) - np.mean(ev) ** 2)
  return np.sqrt(var / num_runs)


@pytest.mark.parametrize("dtype,use_jit", [(jnp.float32, True), (jnp.float64, False)])
def test_spectral_density_normalised_and_mean_is_trace_over_n(dtype, use_jit):
  n = 60
  a = random_sym(n, seed=9)
  fn = maybe_jit(
    lambda key: spectral_density(
      dense_matvec(a, dtype), jnp.zeros(n, dtype), key, num_iters=20, num_runs=10, grid=2000
    ),
    use_jit,
  )
  grid, density = fn(jax.random.key(0))
  assert grid.dtype == dtype and density.dtype == dtype and density.shape == (2000,)
  g, d = np.asarray(grid, np.float64), np.asarray(density, np.float64)
  dt = g[1] - g[0]
  assert np.all(d >= 0)
  np.testing.assert_allclose(d.sum() * dt, 1.0, atol=1e-4)
  mean = (g * d).sum() * dt
  assert abs(mean - np.trace(a) / n) < NUM_SIGMA * slq_mean_sd(a, 10)
  # the grid covers the spectrum
  ev = np.linalg.eigvalsh(a)
  assert g[0] < ev[0] and g[-1] > ev[-1]


def test_spectral_density_cluster_masses():
  # 30% of eigenvalues at 1, 70% at 10: the mass near each cluster is the cluster's share.
  # Per run the mass at 1 is Beta(3, 7)-distributed (sd 0.138).
  a = with_spectrum([1.0] * 6 + [10.0] * 14, 4)
  num_runs = 50
  grid, density = jax.jit(
    lambda key: spectral_density(
      dense_matvec(a, jnp.float64),
      jnp.zeros(20),
      key,
      num_iters=20,
      num_runs=num_runs,
      grid=jnp.linspace(-5.0, 20.0, 5001),
      sigma=0.2,
    )
  )(jax.random.key(0))
  dt = float(grid[1] - grid[0])
  low = float(density[grid < 5.5].sum()) * dt
  high = float(density[grid >= 5.5].sum()) * dt
  np.testing.assert_allclose(low + high, 1.0, atol=1e-10)
  assert abs(low - 0.3) < NUM_SIGMA * np.sqrt(3 * 7 / (10**2 * 11) / num_runs)
  # Gaussian broadening of two point masses: the peak height is mass / (√(2π) σ).
  peak = float(density[jnp.argmin(jnp.abs(grid - 1.0))])
  np.testing.assert_allclose(peak, low / (np.sqrt(2 * np.pi) * 0.2), rtol=1e-6)


def test_spectral_density_default_sigma_scales_with_spectrum():
  a = np.diag(np.linspace(0.0, 100.0, 30))
  sd = spectral_density(
    dense_matvec(a, jnp.float64),
    jnp.zeros(30),
    jax.random.key(0),
    num_iters=30,
    num_runs=2,
    grid=512,
  )
  # default width 1% of the span: the grid spans the Ritz values plus 6 sigma on each side
  np.testing.assert_allclose([sd.grid[0], sd.grid[-1]], [-6.0, 106.0], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# On a real pytree Hessian from hvp_fn, against dense jax.hessian.


@pytest.fixture(scope="module")
def mlp_hessian():
  problem = regression_problem(0, n=8, sizes=(3, 5, 1))
  flat, unravel = ravel_pytree(problem.params)
  dense = np.asarray(jax.jit(jax.hessian(lambda f: problem.value_fn(unravel(f))))(flat))
  return problem, dense


def test_estimators_on_pytree_hessian(mlp_hessian):
  problem, h = mlp_hessian
  params, mlp_loss = problem.params, problem.value_fn
  n = h.shape[0]
  matvec = hvp_fn(mlp_loss, params)
  key = jax.random.key(0)

  # The realistic use: params are arguments of the jitted function, the matvec built inside.
  @jax.jit
  def top_at(p, k):
    return top_eigenvalues(hvp_fn(mlp_loss, p), p, k, k=3, num_iters=n)

  res = top_at(params, key)
  w = np.linalg.eigvalsh(h)
  w = w[np.argsort(-np.abs(w))][:3]
  np.testing.assert_allclose(res.eigenvalues, w, rtol=1e-8)
  assert jax.tree.structure(res.eigenvectors) == jax.tree.structure(params)
  assert res.eigenvectors[0]["w"].shape == (3, 3, 5)
  y = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], res.eigenvectors))[0]
  np.testing.assert_allclose(h @ y, w[0] * y, atol=1e-8)

  m = 200
  trace = hutchinson_trace(matvec, params, key, num_samples=m)
  assert abs(float(trace.estimate) - np.trace(h)) < NUM_SIGMA * np.sqrt(
    hutchinson_variance(h, "rademacher") / m
  )

  diag = hutchinson_diagonal(matvec, params, key, num_samples=m)
  assert jax.tree.structure(diag) == jax.tree.structure(params)
  sd = np.sqrt((np.sum(h**2, axis=1) - np.diag(h) ** 2) / m)
  assert np.all(np.abs(np.asarray(ravel_pytree(diag)[0]) - np.diag(h)) < NUM_SIGMA * sd + 1e-12)

  grid, density = spectral_density(matvec, params, key, num_iters=n, num_runs=20, grid=4000)
  dt = float(grid[1] - grid[0])
  np.testing.assert_allclose(float(density.sum()) * dt, 1.0, atol=1e-6)
  mean = float((grid * density).sum()) * dt
  assert abs(mean - np.trace(h) / n) < NUM_SIGMA * slq_mean_sd(h, 20)


# ----------------------------------------------------------------------------------------------
# Compilation, loops and argument checks.


def test_one_trace_of_matvec_per_loop_and_no_recompilation():
  traces = {"matvec": 0, "fn": 0}
  a = jnp.asarray(random_sym(10), jnp.float64)

  def matvec(v):
    traces["matvec"] += 1
    return a @ v

  def fn(key):
    traces["fn"] += 1
    return top_eigenvalues(matvec, jnp.zeros(10), key, k=2, num_iters=10)

  jitted = jax.jit(fn)
  for seed in range(3):
    jax.block_until_ready(jitted(jax.random.key(seed)))
  assert traces["fn"] == 1  # no recompilation across keys
  assert traces["matvec"] <= 2  # the loop is a scan (eval_shape + body), not unrolled


@pytest.mark.parametrize(
  "call,error,match",
  [
    (lambda m, x, k: hutchinson_trace(m, x, k, num_samples=0), ValueError, "at least 1"),
    (lambda m, x, k: hutchinson_trace(m, x, k, num_samples=2.0), TypeError, "Python int"),
    (lambda m, x, k: hutchinson_trace(m, x, k, num_samples=True), TypeError, "Python int"),
    (
      lambda m, x, k: hutchinson_trace(m, x, k, num_samples=2, distribution="normal"),
      ValueError,
      "distribution 'normal'",
    ),
    (lambda m, x, k: hutchpp_trace(m, x, k, num_samples=2), ValueError, "at least 3"),
    (lambda m, x, k: hutchinson_diagonal(m, x, k, num_samples=-1), ValueError, "at least 1"),
    (lambda m, x, k: lanczos(m, x, k, num_iters=0), ValueError, "at least 1"),
    (lambda m, x, k: top_eigenvalues(m, x, k, k=5, num_iters=3), ValueError, "raise num_iters"),
    (
      lambda m, x, k: spectral_density(m, x, k, num_iters=2, num_runs=1, grid=10, sigma=-1.0),
      ValueError,
      "sigma must be positive",
    ),
    (
      lambda m, x, k: spectral_density(m, x, k, num_iters=2, num_runs=1, grid=jnp.zeros((2, 2))),
      ValueError,
      "1-D array",
    ),
  ],
)
def test_misuse_raises(call, error, match):
  with pytest.raises(error, match=match):
    call(lambda v: 2 * v, jnp.zeros(4), jax.random.key(0))


def test_matvec_with_wrong_output_structure_raises():
  with pytest.raises(ValueError, match="matvec"):
    hutchinson_trace(lambda v: v[:2], jnp.zeros(4), jax.random.key(0), num_samples=2)


def test_integer_like_raises():
  with pytest.raises(TypeError, match="floating"):
    hutchinson_trace(lambda v: v, jnp.zeros(4, jnp.int32), jax.random.key(0), num_samples=2)


def test_vmap_over_keys():
  a = with_spectrum(np.linspace(1.0, 4.0, 8), 1)
  keys = jax.random.split(jax.random.key(0), 3)
  sd = jax.jit(
    jax.vmap(
      lambda k: (
        spectral_density(
          dense_matvec(a, jnp.float64),
          jnp.zeros(8),
          k,
          num_iters=8,
          num_runs=2,
          grid=jnp.arange(8.0),
        ).density
      )
    )
  )(keys)
  assert sd.shape == (3, 8) and np.all(np.isfinite(sd))
  top = jax.jit(
    jax.vmap(
      lambda k: top_eigenvalues(dense_matvec(a, jnp.float64), jnp.zeros(8), k, k=1, num_iters=8)
    )
  )(keys)
  np.testing.assert_allclose(top.eigenvalues[:, 0], 4.0, rtol=1e-10)


def test_mixed_dtype_pytree_keeps_leaf_dtypes():
  like = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.float64)}
  matvec = lambda v: jax.tree.map(lambda x: 3 * x, v)
  diag = hutchinson_diagonal(matvec, like, jax.random.key(0), num_samples=2)
  assert diag["a"].dtype == jnp.float32 and diag["b"].dtype == jnp.float64
  np.testing.assert_allclose(ravel_pytree(diag)[0], 3.0)


# ----------------------------------------------------------------------------------------------
# One keyword per idea.


def _counting_matvec(counter):
  """``v -> 2 v`` that counts its calls on the host, one per vector (also under ``vmap``)."""

  def host(v):
    counter.append(1)
    return 2 * v

  return lambda v: jax.pure_callback(
    host, jax.ShapeDtypeStruct(v.shape, v.dtype), v, vmap_method="sequential"
  )


@pytest.mark.parametrize("fn", [hutchinson_trace, hutchpp_trace, hutchinson_diagonal])
def test_num_samples_is_the_matvec_budget_of_every_stochastic_estimator(fn):
  calls = []
  fn(_counting_matvec(calls), jnp.zeros(12), jax.random.key(0), num_samples=7)
  assert len(calls) == 7


def test_estimators_share_their_keywords():
  import inspect

  def keywords(fn):
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY}

  for fn in (hutchinson_trace, hutchpp_trace, hutchinson_diagonal):
    assert {"num_samples", "distribution"} <= keywords(fn), fn.__name__
  for fn in (lanczos, top_eigenvalues, spectral_density):
    assert "num_iters" in keywords(fn) and "num_samples" not in keywords(fn), fn.__name__
