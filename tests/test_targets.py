"""Tests for curvopt.targets against the tutorial's numbers and explicit Python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.recipes.targets import lambda_returns, td0_loss, td_target


def _linear_value(theta, s):
  return theta @ s


def test_td0_update_matches_tutorial():
  theta = jnp.array([0.1, -0.1, 0.0], jnp.float32)
  s_tm1 = jnp.array([1.0, 2.0, -1.0], jnp.float32)
  s_t = jnp.array([2.0, 1.0, 0.0], jnp.float32)
  update = -jax.grad(td0_loss, argnums=1)(_linear_value, theta, s_tm1, 1.0, s_t)
  assert update.dtype == jnp.float32
  np.testing.assert_allclose(update, [1.2, 2.4, -1.2], rtol=1e-6)


def test_td0_update_is_delta_times_feature_gradient():
  # Independent reference: the TD(0) update delta * grad v(s_tm1) written by hand, nonlinear v.
  value_fn = lambda p, s: jnp.tanh(p["w"] @ s + p["b"])
  params = {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}
  s_tm1, s_t = jnp.array([1.0, 2.0, -1.0]), jnp.array([0.5, -1.0, 2.0])
  r_t, discount = 0.7, 0.9
  delta = r_t + discount * value_fn(params, s_t) - value_fn(params, s_tm1)
  expected = jax.tree.map(lambda g: delta * g, jax.grad(value_fn)(params, s_tm1))
  update = jax.tree.map(
    jnp.negative, jax.grad(td0_loss, argnums=1)(value_fn, params, s_tm1, r_t, s_t, discount)
  )
  for got, want in zip(jax.tree.leaves(update), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_td_target_value_and_stopped_gradient():
  assert float(td_target(1.0, 0.9, 2.0)) == pytest.approx(2.8)
  grads = jax.grad(lambda r, d, v: td_target(r, d, v), argnums=(0, 1, 2))(1.0, 0.9, 2.0)
  assert all(float(g) == 0.0 for g in grads)


@pytest.mark.parametrize("jit", [False, True])
def test_per_example_td_gradients_match_python_loop(jit):
  rng = np.random.default_rng(0)
  theta = jnp.asarray(rng.normal(size=4))
  s_tm1, s_t = jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.normal(size=(6, 4)))
  r_t, discount = jnp.asarray(rng.normal(size=6)), jnp.asarray(rng.uniform(size=6))
  grad_fn = jax.grad(td0_loss, argnums=1)
  batched = jax.vmap(grad_fn, in_axes=(None, None, 0, 0, 0, 0))
  if jit:
    batched = jax.jit(batched, static_argnums=0)
  got = batched(_linear_value, theta, s_tm1, r_t, s_t, discount)
  want = np.stack(
    [grad_fn(_linear_value, theta, s_tm1[i], r_t[i], s_t[i], discount[i]) for i in range(6)]
  )
  assert got.shape == (6, 4)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def _lambda_returns_loop(r_t, discount_t, v_t, lambda_t):
  # Forward-view definition: G_t = r_t + g_t [(1 - l_t) v_t + l_t G_{t+1}], G_T = v_{T-1}.
  returns = np.zeros(len(r_t))
  g_next = v_t[-1]
  for t in reversed(range(len(r_t))):
    g_next = r_t[t] + discount_t[t] * ((1 - lambda_t[t]) * v_t[t] + lambda_t[t] * g_next)
    returns[t] = g_next
  return returns


@pytest.mark.parametrize("lambda_", [0.0, 0.5, 1.0, "array"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_lambda_returns_matches_loop(lambda_, dtype):
  rng = np.random.default_rng(1)
  T = 7
  r_t, v_t = rng.normal(size=T), rng.normal(size=T)
  discount_t = rng.uniform(0.5, 1.0, size=T)
  discount_t[3] = 0.0  # an episode boundary
  lam = rng.uniform(size=T) if lambda_ == "array" else np.full(T, lambda_)
  got = lambda_returns(
    jnp.asarray(r_t, dtype),
    jnp.asarray(discount_t, dtype),
    jnp.asarray(v_t, dtype),
    jnp.asarray(lam, dtype) if lambda_ == "array" else lambda_,
  )
  assert got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-12
  want = _lambda_returns_loop(r_t, discount_t, v_t, lam)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_lambda_returns_closed_forms():
  rng = np.random.default_rng(2)
  T = 5
  r_t, v_t = jnp.asarray(rng.normal(size=T)), jnp.asarray(rng.normal(size=T))
  discount_t = jnp.full(T, 0.9)
  # lambda = 0: one-step TD targets.
  np.testing.assert_allclose(lambda_returns(r_t, discount_t, v_t, 0.0), r_t + 0.9 * v_t)
  # lambda = 1: discounted Monte-Carlo sum bootstrapped from v_t[-1].
  mc = [
    sum(0.9**k * float(r_t[t + k]) for k in range(T - t)) + 0.9 ** (T - t) * float(v_t[-1])
    for t in range(T)
  ]
  np.testing.assert_allclose(lambda_returns(r_t, discount_t, v_t, 1.0), mc, rtol=1e-12)


def test_lambda_returns_vmap_jit_and_stop_gradient():
  rng = np.random.default_rng(3)
  r_t, v_t = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)))
  discount_t = jnp.full((5, 3), 0.8)
  batched = jax.jit(jax.vmap(lambda_returns, in_axes=(1, 1, 1, None), out_axes=1))
  got = batched(r_t, discount_t, v_t, 0.7)
  for b in range(3):
    np.testing.assert_allclose(
      got[:, b], _lambda_returns_loop(r_t[:, b], discount_t[:, b], v_t[:, b], np.full(5, 0.7))
    )
  g = jax.grad(lambda v: lambda_returns(r_t[:, 0], discount_t[:, 0], v, 0.7).sum())(v_t[:, 0])
  np.testing.assert_array_equal(g, 0.0)


def test_lambda_returns_rejects_bad_shapes():
  with pytest.raises(ValueError, match="time-major 1-D"):
    lambda_returns(jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="one length"):
    lambda_returns(jnp.ones(3), jnp.ones(4), jnp.ones(3))
