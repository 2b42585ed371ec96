"""Tests of curvopt.autodiff.operators against dense jax.hessian / jax.jacfwd references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mlp_apply, mlp_params

from curvopt.autodiff.operators import divergence, hessian_diagonal, laplacian

LAPLACIAN_METHODS = ("forward_laplacian", "forward", "taylor")
DTYPES = (jnp.float32, jnp.float64)
TOL = {jnp.float32: dict(rtol=2e-4, atol=2e-4), jnp.float64: dict(rtol=1e-10, atol=1e-10)}


def _mlp(params, x):
  """helpers' tanh MLP on one point (d,) -> scalar, parameters a list of dicts (a pytree)."""
  return mlp_apply(params, x)[0]


@jax.jit
def _inner(h):  # a nested jit: the interpreter must inline it
  return jnp.sin(h) * h


def _mixed(params, x):
  """Products of x-dependent factors, custom-JVP activations, where, nested jit, a sum."""
  h = x @ params[0]["w"] + params[0]["b"]
  h = jax.nn.softplus(h) * jnp.tanh(h) + _inner(h) + jnp.where(h > 0, h**2, jnp.exp(h))
  h = jax.nn.sigmoid(h @ params[1]["w"]) / (1.0 + h[:1] ** 2)
  return jnp.sum(h * params[2]["w"][:, 0]) + jnp.prod(jnp.cos(x))


def _problem(d, dtype, key=0):
  kp, kx = jax.random.split(jax.random.key(key))
  sizes = [d, 16, 16, 1]
  params = mlp_params(kp, sizes, dtype)
  x = jax.random.uniform(kx, (7, d), minval=-1.0, maxval=1.0).astype(dtype)
  return params, x


def _ref_hessians(u, x):
  return jax.vmap(jax.hessian(u))(x)


@pytest.mark.parametrize(
  "net, method, dtype",
  [(_mlp, m, dt) for m in LAPLACIAN_METHODS for dt in DTYPES]
  + [(_mixed, m, dt) for m in ("forward_laplacian", "forward") for dt in DTYPES],
)
def test_laplacian_matches_hessian_trace(net, method, dtype):
  """Under jit (and once without), on pytree-parameterised networks, float32 and float64."""
  params, x = _problem(3, dtype)

  def lap(params, x):
    return laplacian(lambda p: net(params, p), x, method=method)

  got = jax.jit(lap)(params, x)
  ref = jnp.trace(_ref_hessians(lambda p: net(params, p), x), axis1=-2, axis2=-1)
  assert got.shape == (7,) and got.dtype == dtype
  np.testing.assert_allclose(got, ref, **TOL[dtype])
  assert float(jnp.abs(ref).max()) > 0.1  # the reference is not trivially zero
  if dtype == jnp.float64 and net is _mlp:
    np.testing.assert_allclose(lap(params, x[:2]), ref[:2], **TOL[dtype])  # eager


@pytest.mark.parametrize(
  "method, dtype, jit",
  [("forward", jnp.float32, True), ("forward", jnp.float64, False), ("taylor", jnp.float64, True)],
)
def test_hessian_diagonal_matches_hessian(method, dtype, jit):
  params, x = _problem(4, dtype)
  u = lambda p: _mlp(params, p)  # noqa: E731
  fn = lambda x: hessian_diagonal(u, x, method=method)  # noqa: E731
  got = (jax.jit(fn) if jit else fn)(x)
  ref = jnp.diagonal(_ref_hessians(u, x), axis1=-2, axis2=-1)
  assert got.shape == (7, 4)
  np.testing.assert_allclose(got, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype, jit", [(jnp.float32, True), (jnp.float64, False)])
def test_divergence_matches_jacfwd_trace(dtype, jit):
  params, x = _problem(3, dtype)
  w = jax.random.normal(jax.random.key(5), (3, 3)).astype(dtype)

  def field(p):  # a non-gradient vector field R^3 -> R^3
    return jnp.tanh(p @ w) * _mlp(params, p) + jnp.sin(p[::-1])

  fn = lambda x: divergence(field, x)  # noqa: E731
  got = (jax.jit(fn) if jit else fn)(x)
  ref = jnp.trace(jax.vmap(jax.jacfwd(field))(x), axis1=-2, axis2=-1)
  np.testing.assert_allclose(got, ref, **TOL[dtype])
  # the divergence of a gradient is the Laplacian
  u = lambda p: _mlp(params, p)  # noqa: E731
  np.testing.assert_allclose(divergence(jax.grad(u), x), laplacian(u, x), **TOL[dtype])


@pytest.mark.parametrize("method", ["forward_laplacian", "forward"])
def test_laplacian_under_vmap_over_parameters(method):
  keys = jax.random.split(jax.random.key(1), 3)
  params = jax.vmap(lambda k: mlp_params(k, [2, 8, 1], jnp.float64))(keys)
  x = jax.random.uniform(jax.random.key(2), (5, 2), dtype=jnp.float64)
  got = jax.jit(jax.vmap(lambda p: laplacian(lambda y: _mlp(p, y), x, method=method)))(params)
  for i in range(3):
    p_i = jax.tree.map(lambda a: a[i], params)
    ref = jnp.trace(_ref_hessians(lambda y: _mlp(p_i, y), x), axis1=-2, axis2=-1)
    np.testing.assert_allclose(got[i], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", LAPLACIAN_METHODS)
def test_laplacian_is_differentiable_in_parameters(method):
  """grad and jvp w.r.t. closed-over parameters (what a PINN's Gauss-Newton step needs)."""
  params, x = _problem(2, jnp.float64)

  def loss(params, lap):
    return jnp.sum(jnp.sin(lap(params)))

  ours = lambda p: laplacian(lambda y: _mlp(p, y), x, method=method)  # noqa: E731
  ref = lambda p: jnp.trace(  # noqa: E731
    _ref_hessians(lambda y: _mlp(p, y), x), axis1=-2, axis2=-1
  )
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g, g_ref = grad(params, ours), grad(params, ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), g, g_ref)
  v = jax.tree.map(jnp.ones_like, params)
  tangent = jax.jit(lambda fn, p, v: jax.jvp(fn, (p,), (v,))[1], static_argnums=0)
  t, t_ref = tangent(ours, params, v), tangent(ref, params, v)
  np.testing.assert_allclose(t, t_ref, rtol=1e-9, atol=1e-12)


def test_batch_shapes_vector_outputs_and_chunks():
  params, _ = _problem(3, jnp.float64)
  x = jax.random.normal(jax.random.key(3), (2, 4, 3), dtype=jnp.float64)
  u = lambda p: _mlp(params, p)  # noqa: E731
  vec = lambda p: jnp.stack([u(p), u(p) ** 2, jnp.sum(p**3)])  # noqa: E731

  @jax.jit
  def run(x):
    flat = x.reshape(8, 3)
    return {
      "flat": laplacian(u, flat),
      "nd": laplacian(u, x),
      "point": laplacian(u, x[0, 0]),
      "vec": [laplacian(vec, flat, method=m) for m in LAPLACIAN_METHODS],
      "chunks": [laplacian(u, x, method=m, chunk_size=2) for m in ("forward", "taylor")],
      "div": divergence(jax.grad(u), x, chunk_size=2),
    }

  out = run(x)
  flat = out["flat"]
  np.testing.assert_allclose(out["nd"], flat.reshape(2, 4), rtol=1e-12)
  np.testing.assert_allclose(out["point"], flat[0], rtol=1e-12)  # one point
  ref = jnp.trace(jax.vmap(jax.hessian(vec))(x.reshape(8, 3)), axis1=-2, axis2=-1)
  for got in out["vec"]:
    np.testing.assert_allclose(got, ref, rtol=1e-10)
  for got in out["chunks"]:
    np.testing.assert_allclose(got, flat.reshape(2, 4), rtol=1e-12)
  np.testing.assert_allclose(out["div"], flat.reshape(2, 4), rtol=1e-10)


def test_input_independent_function_has_zero_laplacian():
  x = jnp.ones((3, 2))
  np.testing.assert_array_equal(laplacian(lambda p: jnp.float32(2.0), x), jnp.zeros(3))
  np.testing.assert_array_equal(laplacian(lambda p: p.sum(), x), jnp.zeros(3))


def test_poisson_closed_form():
  """u = prod_{i<3} sin(pi x_i) in 5-D: Laplacian -3 pi^2 u, and u* = sum cos(pi x_i): -pi^2 u*."""
  x = jax.random.uniform(jax.random.key(0), (11, 5), dtype=jnp.float64)
  u = lambda p: jnp.sin(jnp.pi * p[0]) * jnp.sin(jnp.pi * p[1]) * jnp.sin(jnp.pi * p[2])  # noqa: E731
  v = lambda p: jnp.sum(jnp.cos(jnp.pi * p))  # noqa: E731
  for method in LAPLACIAN_METHODS:
    np.testing.assert_allclose(
      laplacian(u, x, method=method), -3 * jnp.pi**2 * jax.vmap(u)(x), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
      laplacian(v, x, method=method), -(jnp.pi**2) * jax.vmap(v)(x), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda: laplacian(jnp.sum, jnp.float32(1.0)), TypeError, r"\(\*batch, d\)"),
    (lambda: laplacian(jnp.sum, jnp.ones((2, 3), jnp.int32)), TypeError, "floating"),
    (lambda: laplacian(jnp.sum, jnp.ones((2, 3)), method="hessian"), ValueError, "method"),
    (
      lambda: hessian_diagonal(jnp.sum, jnp.ones(3), method="forward_laplacian"),
      ValueError,
      "method",
    ),
    (lambda: laplacian(lambda p: {"a": p}, jnp.ones((2, 3))), TypeError, "one array"),
    (lambda: divergence(jnp.sum, jnp.ones((2, 3))), ValueError, "same shape"),
    (lambda: laplacian(jnp.sum, jnp.ones((2, 3)), chunk_size=0), ValueError, "chunk_size"),
    (lambda: laplacian(jnp.prod, jnp.ones((2, 3)), method="taylor"), ValueError, "jet"),
  ],
)
def test_misuse_raises_a_clear_error(call, error, match):
  with pytest.raises(error, match=match):
    call()
