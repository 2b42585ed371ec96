"""Tests for curvopt.linalg.conv_layout: canonical convolutions give the same values, in loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvopt.curvature.products import ggn_fn
from curvopt.linalg.cg import conjugate_gradient
from curvopt.linalg.conv_layout import canonical_convolutions

_CANONICAL_2D = "b01f_01io->b01f"


def _conv(dims, **kwargs):
  def f(x, w):
    return jax.lax.conv_general_dilated(x, w, dimension_numbers=dims, **kwargs)

  return f


@pytest.mark.parametrize(
  "dims, x_shape, w_shape, kwargs",
  [
    (
      ("NHWC", "HWIO", "NHWC"),
      (2, 9, 9, 3),
      (3, 3, 3, 4),
      {"window_strides": (2, 2), "padding": "SAME"},
    ),
    (
      ("NCHW", "OIHW", "NCHW"),
      (2, 3, 9, 8),
      (4, 3, 3, 2),
      {"window_strides": (1, 2), "padding": "VALID", "rhs_dilation": (2, 1)},
    ),
    (
      ("NHWC", "HWIO", "NCHW"),
      (2, 7, 7, 4),
      (3, 3, 2, 6),
      {"window_strides": (1, 1), "padding": ((1, 0), (2, 1)), "feature_group_count": 2},
    ),
    (("NWC", "WIO", "NWC"), (3, 11, 2), (4, 2, 5), {"window_strides": (1,), "padding": "SAME"}),
  ],
)
def test_same_values_for_convolutions_and_their_derivatives(dims, x_shape, w_shape, kwargs):
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.normal(size=x_shape)), jnp.asarray(rng.normal(size=w_shape))
  f = _conv(dims, **kwargs)
  np.testing.assert_allclose(canonical_convolutions(f)(x, w), f(x, w), rtol=1e-12)
  # Reverse mode yields non-canonical convolutions (features as batch, swapped kernels).
  loss = lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  grads = jax.grad(loss, argnums=(0, 1))
  for got, want in zip(canonical_convolutions(grads)(x, w), grads(x, w), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _cnn():
  rng = np.random.default_rng(1)
  params = {
    "c1": jnp.asarray(rng.normal(size=(3, 3, 1, 4)) / 3),
    "c2": jnp.asarray(rng.normal(size=(3, 3, 4, 6)) / 6),
    "d": jnp.asarray(rng.normal(size=(4 * 4 * 6, 3)) / 10),
  }
  x = jnp.asarray(rng.normal(size=(8, 14, 14, 1)))
  dims = ("NHWC", "HWIO", "NHWC")

  def model(p):
    h = jax.nn.relu(
      jax.lax.conv_general_dilated(x, p["c1"], (2, 2), "SAME", dimension_numbers=dims)
    )
    h = jax.nn.relu(
      jax.lax.conv_general_dilated(h, p["c2"], (2, 2), "SAME", dimension_numbers=dims)
    )
    return h.reshape(8, -1) @ p["d"]

  loss = lambda z: jnp.mean(jax.nn.logsumexp(z, axis=1) - z[:, 0])
  return params, model, loss


def test_loop_body_convolutions_become_canonical():
  # The cause of the CPU loop penalty: a GGN product's convolutions inside fori_loop keep
  # non-canonical dimension numbers. After the rewrite every one is canonical.
  params, model, loss = _cnn()
  v = jax.tree.map(jnp.ones_like, params)

  def labels(wrap):
    def run(params, v):
      matvec = wrap(ggn_fn(model, loss, params))
      return jax.lax.fori_loop(0, 3, lambda _, u: matvec(u), v)

    text = jax.jit(run).lower(params, v).compile().as_text()
    return set(re.findall(r"dim_labels=([^ ,]+)", text))

  assert labels(lambda f: f) - {_CANONICAL_2D}  # XLA leaves some non-canonical in the loop
  assert labels(canonical_convolutions) == {_CANONICAL_2D}


def test_cg_conv_layouts_give_same_solution():
  params, model, loss = _cnn()
  b = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  solve = lambda layout: jax.jit(
    lambda p: conjugate_gradient(
      ggn_fn(model, loss, p), b, damping=1e-2, max_steps=15, tol=0.0, conv_layout=layout
    )
  )(params)
  canonical, as_is = solve("canonical"), solve("as_is")
  for got, want in zip(jax.tree.leaves(canonical.x), jax.tree.leaves(as_is.x), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(canonical.quadratic_value, as_is.quadratic_value, rtol=1e-10)
  assert int(canonical.num_steps) == int(as_is.num_steps) == 15


def test_function_without_convolutions_is_called_as_is():
  calls = []

  def f(x):
    calls.append(1)
    return {"y": 2.0 * x}

  out = canonical_convolutions(f)(jnp.arange(3.0))
  np.testing.assert_array_equal(out["y"], [0.0, 2.0, 4.0])
  with pytest.raises(ValueError, match="conv_layout"):
    conjugate_gradient(lambda v: v, jnp.ones(2), conv_layout="nhwc")
