"""Tests for curvopt.custom_rules: tutorial numbers, check_grads, jit/vmap/grad(grad)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from curvopt.autodiff.custom_rules import clip_gradient, log1pexp, straight_through


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_straight_through_round_tutorial(dtype):
  g = straight_through(jnp.round)
  x = jnp.asarray(3.2, dtype)
  assert g(x).dtype == dtype
  assert float(g(x)) == 3.0
  assert float(jax.grad(g)(x)) == 1.0
  assert float(jax.jit(jax.grad(g))(x)) == 1.0


def test_straight_through_value_is_exact_and_gradient_identity_on_pytrees():
  rng = np.random.default_rng(0)
  x = {"a": jnp.asarray(rng.normal(size=(3, 4)) * 1e3), "b": jnp.asarray(rng.normal(size=5))}
  quantise = lambda t: jax.tree.map(lambda v: jnp.round(v * 4.0) / 4.0, t)
  g = straight_through(quantise)
  for got, want in zip(jax.tree.leaves(g(x)), jax.tree.leaves(quantise(x)), strict=True):
    np.testing.assert_array_equal(got, want)  # bit-exact
  weights = jax.tree.map(lambda v: jnp.arange(v.size, dtype=v.dtype).reshape(v.shape), x)
  loss = lambda t: sum(
    jnp.vdot(w, v) for w, v in zip(jax.tree.leaves(weights), jax.tree.leaves(g(t)), strict=True)
  )
  for got, want in zip(jax.tree.leaves(jax.grad(loss)(x)), jax.tree.leaves(weights), strict=True):
    np.testing.assert_array_equal(got, want)
  # Forward mode and vmap agree.
  _, tangent = jax.jvp(g, (x,), (weights,))
  for got, want in zip(jax.tree.leaves(tangent), jax.tree.leaves(weights), strict=True):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(jax.vmap(g)(x["a"]), quantise(x["a"]))


def test_straight_through_check_grads_where_exact():
  # Where f's true derivative is the identity, the straight-through rule is exact to order 2.
  g = straight_through(lambda t: t + 2.5)
  check_grads(g, (jnp.array([0.3, -1.2, 2.0]),), order=2, modes=["fwd", "rev"])


def test_straight_through_rejects_shape_change():
  with pytest.raises(ValueError, match="shaped like x"):
    straight_through(jnp.sum)(jnp.ones(3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_clip_gradient_clipped_sine(dtype):
  t = jnp.linspace(0.0, 10.0, 1000, dtype=dtype)
  clip_sin = lambda x: jnp.sin(clip_gradient(-0.75, 0.75, x))
  np.testing.assert_array_equal(clip_sin(t), jnp.sin(t))
  grads = jax.jit(jax.vmap(jax.grad(clip_sin)))(t)
  assert grads.dtype == dtype
  np.testing.assert_allclose(grads, np.clip(np.cos(np.asarray(t)), -0.75, 0.75), rtol=1e-6)
  # Second derivative: d/dx clip(cos x) = -sin x where |cos x| < 0.75, else 0.
  second = jax.vmap(jax.grad(jax.grad(clip_sin)))(t)
  inside = np.abs(np.cos(np.asarray(t))) < 0.75
  want = np.where(inside, -np.sin(np.asarray(t)), 0.0)
  np.testing.assert_allclose(second, want, rtol=1e-5, atol=1e-6)


def test_clip_gradient_pytree_and_bounds_get_zero_cotangent():
  x = {"u": jnp.array([1.0, 2.0]), "v": jnp.array(3.0)}
  loss = lambda lo, hi, x: 10.0 * x["u"].sum() - 0.1 * x["v"] + lo * hi * 0.0
  grads = jax.grad(lambda lo, hi, x: loss(lo, hi, clip_gradient(lo, hi, x)), argnums=(0, 1, 2))(
    -1.0, 1.0, x
  )
  assert float(grads[0]) == 0.0 and float(grads[1]) == 0.0
  np.testing.assert_array_equal(grads[2]["u"], [1.0, 1.0])
  np.testing.assert_allclose(grads[2]["v"], -0.1)


def test_clip_gradient_check_grads_when_unclipped():
  # With bounds wider than any cotangent, the rule is the identity's VJP, to order 2.
  f = lambda x: clip_gradient(-1e6, 1e6, x)
  check_grads(f, (jnp.array([0.5, -2.0, 1.5]),), order=2, modes=["rev"])


def test_log1pexp_tutorial_and_stability():
  assert float(jax.grad(log1pexp)(100.0)) == 1.0
  assert float(jax.jit(jax.grad(log1pexp))(100.0)) == 1.0
  x = jnp.array([-1000.0, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0])
  np.testing.assert_allclose(log1pexp(x), np.logaddexp(0.0, np.asarray(x)), rtol=1e-12)
  sig = scipy.special.expit(np.asarray(x))
  np.testing.assert_allclose(jax.vmap(jax.grad(log1pexp))(x), sig, rtol=1e-12)
  second = jax.vmap(jax.grad(jax.grad(log1pexp)))(x)
  np.testing.assert_allclose(second, sig * (1 - sig), rtol=1e-10, atol=1e-300)
  assert np.all(np.isfinite(second))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_log1pexp_check_grads(dtype):
  x = jnp.array([-3.0, -0.5, 0.2, 4.0], dtype)
  check_grads(
    log1pexp, (x,), order=2, modes=["fwd", "rev"], eps=1e-3 if dtype == jnp.float32 else None
  )
