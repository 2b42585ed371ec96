"""Tests for curvopt/privacy.py: against dp_accounting called directly, closed forms, scipy."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from curvopt.privacy import (
  epsilon,
  noise_multiplier_for_epsilon,
  padded_batch_size,
  poisson_sample,
)

SETTINGS = [(1.1, 256 / 60000, 1000, 1e-5), (0.8, 0.01, 300, 1e-6), (2.0, 1.0, 10, 1e-3)]


@pytest.mark.parametrize("sigma, q, steps, delta", SETTINGS)
def test_rdp_epsilon_equals_dp_accounting_called_directly(sigma, q, steps, delta):
  accountant = dp_accounting.rdp.RdpAccountant()
  event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
  # composed in two parts (RDP adds over compositions), not one SelfComposedDpEvent as in the module
  accountant.compose(event, steps // 3)
  accountant.compose(event, steps - steps // 3)
  assert epsilon(sigma, q, steps, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)


def test_pld_epsilon_equals_dp_accounting_called_directly():
  sigma, q, steps, delta = SETTINGS[0]
  accountant = dp_accounting.pld.PLDAccountant()
  event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
  accountant.compose(event, steps)
  got = epsilon(sigma, q, steps, delta, accountant="pld")
  assert got == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
  assert got < epsilon(sigma, q, steps, delta)  # PLD is tighter than RDP


def analytic_gaussian_epsilon(sigma, delta):
  """Exact ε of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
  gap = lambda e: (
    stats.norm.cdf(-e * sigma + 0.5 / sigma)
    - math.exp(e) * stats.norm.cdf(-e * sigma - 0.5 / sigma)
    - delta
  )
  return optimize.brentq(gap, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_single_full_batch_step_matches_analytic_gaussian_mechanism(sigma):
  exact = analytic_gaussian_epsilon(sigma, 1e-5)
  pld = epsilon(sigma, 1.0, 1, 1e-5, accountant="pld")
  rdp = epsilon(sigma, 1.0, 1, 1e-5)
  assert exact <= pld <= exact * 1.01  # PLD: tight up to its (pessimistic) discretisation
  assert exact < rdp  # RDP: an upper bound


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
  eps = [epsilon(1.0, 0.01, t, 1e-5) for t in (0, 10, 100, 1000, 5000)]
  assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
  by_noise = [epsilon(s, 0.01, 1000, 1e-5) for s in (0.6, 1.0, 2.0, 4.0)]
  assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
  assert epsilon(0.0, 0.01, 10, 1e-5) == math.inf


@pytest.mark.parametrize("target", [0.5, 3.0])
def test_noise_multiplier_for_epsilon_inverts_epsilon(target):
  q, steps, delta = 0.02, 500, 1e-5
  sigma = noise_multiplier_for_epsilon(target, q, steps, delta, tol=1e-5)
  assert epsilon(sigma, q, steps, delta) <= target  # never overspends
  assert epsilon(sigma - 1e-3, q, steps, delta) > target  # and is (nearly) the smallest


def test_bad_inputs():
  for delta in (0.0, 1.0, -0.1, 2.0):
    with pytest.raises(ValueError, match="delta must be in"):
      epsilon(1.0, 0.01, 10, delta)
  with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
    epsilon(-1.0, 0.01, 10, 1e-5)
  for q in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="sample_rate must be in"):
      epsilon(1.0, q, 10, 1e-5)
  for steps in (-1, 2.5):
    with pytest.raises(ValueError, match="steps must be"):
      epsilon(1.0, 0.01, steps, 1e-5)
  with pytest.raises(ValueError, match="Unknown accountant"):
    epsilon(1.0, 0.01, 10, 1e-5, accountant="moments")
  with pytest.raises(ValueError, match="target_epsilon must be > 0"):
    noise_multiplier_for_epsilon(0.0, 0.01, 10, 1e-5)
  with pytest.raises(ValueError, match="delta must be in"):
    noise_multiplier_for_epsilon(1.0, 0.01, 10, 1.0)
  with pytest.raises(ValueError, match="sample_rate must be in"):
    poisson_sample(jax.random.key(0), 10, 0.0, 5)


def test_poisson_sample_statistics_and_padding():
  n, q, size, trials = 200, 0.1, 40, 500
  batches = jax.jit(jax.vmap(lambda k: poisson_sample(k, n, q, size)))(
    jax.random.split(jax.random.key(0), trials)
  )
  counts = np.sum(~np.asarray(batches.is_padding), axis=1)
  # Binomial(200, 0.1): mean 20, variance 18; the mean of 500 draws has std 0.19
  assert abs(counts.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / trials)
  assert abs(counts.var() - n * q * (1 - q)) < 0.25 * n * q * (1 - q)
  # each example's inclusion frequency is q: pooled over examples, a chi-square-free check
  hits = np.zeros(n)
  for idx, pad in zip(np.asarray(batches.indices), np.asarray(batches.is_padding), strict=True):
    real = idx[~pad]
    assert np.all(np.diff(real) > 0)  # distinct, sorted
    hits[real] += 1
  assert abs(hits.mean() / trials - q) < 5 * math.sqrt(q * (1 - q) / (trials * n))
  assert int(batches.num_truncated.sum()) == 0


def test_poisson_sample_counts_truncation():
  b = poisson_sample(jax.random.key(1), 100, 1.0, 30)
  assert int(b.num_truncated) == 70 and not bool(b.is_padding.any())
  np.testing.assert_array_equal(b.indices, np.arange(30))


@pytest.mark.parametrize("n, q, p", [(60000, 256 / 60000, 1e-9), (1000, 0.05, 1e-3)])
def test_padded_batch_size_is_the_binomial_tail_quantile(n, q, p):
  b = padded_batch_size(n, q, p)
  assert stats.binom.sf(b, n, q) <= p < stats.binom.sf(b - 1, n, q)


def test_poisson_sample_integrates_with_jit_arrays():
  b = poisson_sample(jax.random.key(2), 50, 0.5, padded_batch_size(50, 0.5))
  assert b.indices.dtype == jnp.int32 and b.is_padding.dtype == jnp.bool_
