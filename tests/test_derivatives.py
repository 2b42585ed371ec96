"""Jacobians and Hessians against jax.jacrev / jax.hessian in float64 and explicit loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_close, mlp_apply, mlp_params

from curvopt.autodiff.derivatives import (
  batch_hessian,
  batch_jacobian,
  empirical_ntk,
  hessian,
  is_elementwise,
  jacobian,
  jacobian_diagonal,
  jacobian_gram,
  jmp,
  mjp,
)


def _pytree_fn(x):
  """A dict input and a (tuple, nested) output: (3,) and (2, 2) -> ((2,), {'c': (3,)})."""
  a, b = x["a"], x["b"]
  return (jnp.sin(a[:2]) * b.sum(), {"c": jnp.tanh(b @ a[:2]).repeat(2)[:3] * a})


def _pytree_input(dtype):
  return {"a": jnp.array([0.3, -1.2, 0.5], dtype), "b": jnp.array([[1.0, 2.0], [-0.5, 0.1]], dtype)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_jacobian_matches_jacrev_on_pytrees(dtype, mode, use_jit):
  jac_fn = jacobian(_pytree_fn, mode=mode)
  if use_jit:
    jac_fn = jax.jit(jac_fn)
  actual = jac_fn(_pytree_input(dtype))
  expected = jax.jacrev(_pytree_fn)(_pytree_input(jnp.float64))
  assert_tree_close(actual, jax.tree.map(lambda e: e.astype(dtype), expected), rtol=1e-5, atol=1e-5)
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(actual))


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_jacobian_argnums_tuple_and_aux(mode):
  def f(x, y, scale):
    return scale * jnp.outer(x, y).ravel(), {"norm": jnp.sum(x**2)}

  x, y = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0, 3.0])
  (jx, jy), aux = jacobian(f, argnums=(0, 1), mode=mode, has_aux=True)(x, y, 2.0)
  (ex, ey), _ = jax.jacrev(f, argnums=(0, 1), has_aux=True)(x, y, 2.0)
  assert_tree_close((jx, jy), (ex, ey), atol=1e-10)
  assert float(aux["norm"]) == 5.0


@pytest.mark.parametrize(("n_in", "n_out", "expected"), [(3, 40, "jacfwd"), (40, 3, "jacrev")])
def test_jacobian_auto_picks_forward_for_tall_and_reverse_for_wide(
  monkeypatch, n_in, n_out, expected
):
  used = []
  for name in ("jacfwd", "jacrev"):
    original = getattr(jax, name)

    def spy(*args, _name=name, _original=original, **kwargs):
      used.append(_name)
      return _original(*args, **kwargs)

    monkeypatch.setattr(jax, name, spy)
  w = jnp.ones((n_out, n_in))
  jacobian(lambda x: jnp.tanh(w @ x))(jnp.ones(n_in))
  assert used == [expected]


def test_jacobian_rejects_unknown_mode():
  with pytest.raises(ValueError, match="Unknown mode 'reverse'"):
    jacobian(jnp.sin, mode="reverse")


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev", "fwd_fwd", "rev_fwd"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_hessian_modes_match_jax_hessian(mode, dtype):
  f = lambda x: jnp.sum(jnp.sin(x["a"][:2]) * (x["b"] @ x["a"][:2])) + jnp.prod(x["b"])
  x = _pytree_input(dtype)
  expected = jax.hessian(f)(_pytree_input(jnp.float64))
  actual = jax.jit(hessian(f, mode=mode))(x)
  assert_tree_close(actual, jax.tree.map(lambda e: e.astype(dtype), expected), rtol=1e-5, atol=1e-5)


def test_hessian_argnums_tuple():
  f = lambda x, y: jnp.sum(x**2 * y) + jnp.sum(y**3)
  x, y = jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])
  for mode in ("fwd_rev", "rev_rev", "fwd_fwd", "rev_fwd"):
    assert_tree_close(hessian(f, (0, 1), mode=mode)(x, y), jax.hessian(f, (0, 1))(x, y), atol=1e-10)
  with pytest.raises(ValueError, match="Unknown mode"):
    hessian(f, mode="fwd")


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
@pytest.mark.parametrize(("n_in", "n_out"), [(5, 3), (3, 7)])
def test_batch_jacobian_matches_per_row_loop(mode, n_in, n_out):
  params = mlp_params(0, (n_in, 6, n_out))
  x = jax.random.normal(jax.random.key(1), (4, n_in), jnp.float64)
  f = lambda x: mlp_apply(params, x)
  actual = jax.jit(lambda x: batch_jacobian(f, x, mode=mode))(x)
  assert actual.shape == (4, n_out, n_in)
  for b in range(4):
    np.testing.assert_allclose(actual[b], jax.jacrev(lambda r: f(r[None])[0])(x[b]), rtol=1e-12)


def test_batch_jacobian_multidimensional_rows():
  x = jax.random.normal(jax.random.key(2), (3, 2, 4), jnp.float64)
  f = lambda x: jnp.cumsum(x, axis=-1) * jnp.sum(x, axis=1, keepdims=True)
  actual = batch_jacobian(f, x)
  assert actual.shape == (3, 2, 4, 2, 4)
  for b in range(3):
    np.testing.assert_allclose(actual[b], jax.jacrev(lambda r: f(r[None])[0])(x[b]))


def test_batch_jacobian_errors():
  with pytest.raises(TypeError, match="leading batch axis"):
    batch_jacobian(jnp.sin, {"a": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match="batch size 4 leading"):
    batch_jacobian(lambda x: x.sum(0), jnp.ones((4, 3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_batch_hessian_matches_per_row_hessian(dtype):
  params = mlp_params(0, (3, 5, 1))
  x = jax.random.normal(jax.random.key(3), (4, 3), jnp.float64)
  f = lambda x: mlp_apply(jax.tree.map(lambda p: p.astype(x.dtype), params), x)[:, 0]
  actual = jax.jit(lambda x: batch_hessian(f, x))(x.astype(dtype))
  assert actual.shape == (4, 3, 3) and actual.dtype == dtype
  for b in range(4):
    expected = jax.hessian(lambda r: f(r[None])[0])(x[b])
    np.testing.assert_allclose(
      actual[b], expected, rtol=1e-4 if dtype == jnp.float32 else 1e-10, atol=1e-6
    )


def test_batch_hessian_vector_output():
  x = jax.random.normal(jax.random.key(4), (2, 3), jnp.float64)
  f = lambda x: jnp.stack([jnp.sum(x**3, -1), jnp.prod(x, -1)], -1)
  actual = batch_hessian(f, x)
  assert actual.shape == (2, 2, 3, 3)
  for b in range(2):
    np.testing.assert_allclose(actual[b], jax.hessian(lambda r: f(r[None])[0])(x[b]))


def test_is_elementwise_reads_the_jaxpr():
  x = jnp.ones((3, 2))
  c = jnp.arange(6.0).reshape(3, 2)
  assert is_elementwise(lambda x: jax.nn.relu(x) * c + jnp.exp(x) ** 2 / 3.0, x)
  assert is_elementwise(lambda x: jax.nn.softplus(x) + jnp.where(x > 0, x, 0.1 * x), x)
  assert is_elementwise(jax.jit(jnp.tanh), x)
  assert is_elementwise(lambda x: x + jnp.array([1.0, 2.0]), x)  # broadcast constant
  # A gradient's jaxpr also computes the (unused) loss value, a sum: dead code is skipped.
  assert is_elementwise(jax.grad(lambda x: jax.nn.log_sigmoid(x).sum() + (x**2).mean()), x)
  assert not is_elementwise(lambda x: x * x.sum(), x)
  assert not is_elementwise(lambda x: x[::-1], x)
  assert not is_elementwise(lambda x: x @ jnp.eye(2), x)


_SEPARABLE = lambda x: jnp.sin(x) * x**2 + jax.nn.sigmoid(x)
_GENERAL = lambda x: jnp.cumsum(x.ravel()).reshape(x.shape)
_ROW_INDEPENDENT = lambda x: jnp.tanh(x @ jnp.arange(9.0).reshape(3, 3) / 9 + x)


@pytest.mark.parametrize(
  ("f", "batch_dims"),
  [
    (_SEPARABLE, 0),  # detected elementwise: one JVP
    (_SEPARABLE, 1),
    (_GENERAL, 0),  # one JVP per coordinate
    (_ROW_INDEPENDENT, 0),
    (_ROW_INDEPENDENT, 1),  # one JVP per within-row coordinate
  ],
)
def test_jacobian_diagonal_matches_full_jacobian(f, batch_dims):
  x = jax.random.normal(jax.random.key(5), (4, 3), jnp.float64)
  expected = jnp.diagonal(jax.jacrev(f)(x).reshape(12, 12)).reshape(4, 3)
  actual = jax.jit(lambda x: jacobian_diagonal(f, x, batch_dims=batch_dims, chunk_size=5))(x)
  np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_jacobian_diagonal_errors():
  with pytest.raises(ValueError, match="same shape|input's shape"):
    jacobian_diagonal(lambda x: x.sum(), jnp.ones(3))
  with pytest.raises(ValueError, match="batch_dims=3"):
    jacobian_diagonal(jnp.sin, jnp.ones((2, 2)), batch_dims=3)


def test_jmp_and_mjp_match_dense_products():
  x = {"a": jnp.array([0.3, -1.2, 0.5]), "b": jnp.array([2.0, 1.0])}
  f = lambda x: jnp.concatenate([jnp.sin(x["a"]) * x["b"][0], x["b"] ** 2 * x["a"][0]])
  flat_jac = jnp.concatenate(
    [jax.jacrev(f)(x)["a"], jax.jacrev(f)(x)["b"]], axis=1
  )  # (5 out, 5 in)
  tangents = jax.random.normal(jax.random.key(6), (4, 5), jnp.float64)
  matrix = {"a": tangents[:, :3], "b": tangents[:, 3:]}
  np.testing.assert_allclose(jax.jit(lambda x, m: jmp(f, x, m))(x, matrix), tangents @ flat_jac.T)
  cotangents = jax.random.normal(jax.random.key(7), (6, 5), jnp.float64)
  actual = mjp(f, x, cotangents)
  np.testing.assert_allclose(jnp.concatenate([actual["a"], actual["b"]], 1), cotangents @ flat_jac)
  with pytest.raises(ValueError, match="matrix rows"):
    jmp(f, x, tangents)


@pytest.mark.parametrize(("n_in", "n_out"), [(30, 4), (3, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jacobian_gram_matches_explicit_jacobians(n_in, n_out, dtype):
  w = jax.random.normal(jax.random.key(8), (n_out, n_in), jnp.float64).astype(dtype)
  f = lambda x: jnp.tanh(w @ x).reshape(2, n_out // 2)
  x1 = jax.random.normal(jax.random.key(9), (n_in,), jnp.float64).astype(dtype)
  x2 = jax.random.normal(jax.random.key(10), (n_in,), jnp.float64).astype(dtype)
  j1, j2 = jax.jacrev(f)(x1).reshape(n_out, n_in), jax.jacrev(f)(x2).reshape(n_out, n_in)
  actual = jax.jit(lambda a, b: jacobian_gram(f, a, b))(x1, x2)
  assert actual.shape == (2, n_out // 2, 2, n_out // 2)
  tol = 1e-5 if dtype == jnp.float32 else 1e-12
  np.testing.assert_allclose(actual.reshape(n_out, n_out), j1 @ j2.T, rtol=tol, atol=tol)


def test_jacobian_gram_pytree_input():
  f = lambda x: jnp.stack([x["u"].sum() * x["v"], jnp.sin(x["u"][0])])
  x1 = {"u": jnp.array([1.0, 2.0, 3.0]), "v": jnp.array(0.5)}
  x2 = {"u": jnp.array([-1.0, 0.2, 0.1]), "v": jnp.array(2.0)}
  flat = lambda x: jnp.concatenate([jax.jacrev(f)(x)["u"], jax.jacrev(f)(x)["v"][:, None]], 1)
  np.testing.assert_allclose(jacobian_gram(f, x1, x2), flat(x1) @ flat(x2).T, rtol=1e-12)


def _ntk_reference(apply_fn, params, x1, x2):
  """Explicit double loop over example pairs with dense per-example Jacobians."""

  def jac(x):
    j = jax.jacrev(lambda p: apply_fn(p, x[None])[0])(params)
    out_size = int(np.prod(apply_fn(params, x[None]).shape[1:]))
    return jnp.concatenate([leaf.reshape(out_size, -1) for leaf in jax.tree.leaves(j)], 1)

  return np.array([[jac(a) @ jac(b).T for b in x2] for a in x1])


@pytest.mark.parametrize("method", ["auto", "jacobian_contraction", "ntk_vector_products"])
@pytest.mark.parametrize("n_out", [1, 3])
def test_empirical_ntk_matches_pairwise_loop(method, n_out):
  params, apply_fn = mlp_params(0, (4, 5, n_out)), mlp_apply
  x1 = jax.random.normal(jax.random.key(11), (3, 4), jnp.float64)
  x2 = jax.random.normal(jax.random.key(12), (2, 4), jnp.float64)
  actual = jax.jit(lambda p, a, b: empirical_ntk(apply_fn, p, a, b, method=method))(params, x1, x2)
  expected = _ntk_reference(apply_fn, params, x1, x2)
  if n_out == 1:
    assert actual.shape == (3, 2)
    expected = expected[..., 0, 0]
  else:
    assert actual.shape == (3, 2, n_out, n_out)
  np.testing.assert_allclose(actual, expected, rtol=1e-10)
