"""Curvature products against dense float64 references and explicit loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from curvopt.curvature.products import empirical_fisher_fn, ggn_fn, ggn_vp, hvp, hvp_fn

MODES = ("fwd_rev", "rev_fwd", "rev_rev")


def _params(dtype, key=0):
  """The same values in every dtype (drawn in float64, then cast)."""
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  params = {
    "dense": {
      "w": jax.random.normal(k1, (4, 3), jnp.float64),
      "b": jax.random.normal(k2, (3,), jnp.float64),
    },
    "scale": (jax.random.normal(k3, (), jnp.float64),),
  }
  return jax.tree.map(lambda a: a.astype(dtype), params)


def _inputs(dtype):
  return jax.random.normal(jax.random.key(7), (5, 4), jnp.float64).astype(dtype)


def _model(params, x):
  h = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])
  return params["scale"][0] * h


def _xent(logits, labels):
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=-1))


def _labels():
  return jax.nn.one_hot(jnp.array([0, 2, 1, 1, 0]), 3)


def _loss(params, dtype):
  return _xent(_model(params, _inputs(dtype)), _labels())


def _dense_hessian_times(f, x, v):
  flat_x, unravel = ravel_pytree(x)
  hess = jax.hessian(lambda z: f(unravel(z)))(flat_x)
  return unravel(hess @ ravel_pytree(v)[0])


def _assert_tree_close(actual, expected, dtype):
  rtol = 1e-10 if dtype == jnp.float64 else 2e-4
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol), actual, expected
  )
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for leaf in jax.tree.leaves(actual):
    assert leaf.dtype == dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_jit", [False, True])
def test_hvp_matches_dense_hessian(dtype, mode, use_jit):
  params = _params(dtype)
  v = _params(dtype, key=1)
  f = lambda p: _loss(p, dtype)
  product = lambda p, v: hvp(f, p, v, mode=mode)
  if use_jit:
    product = jax.jit(product)
  expected = _dense_hessian_times(lambda p: _loss(p, jnp.float64), _params(jnp.float64), v)
  expected = jax.tree.map(lambda e: e.astype(dtype), expected)
  _assert_tree_close(product(params, v), expected, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_hvp_fn_matches_hvp_for_many_vectors(mode):
  params = _params(jnp.float64)
  f = lambda p: _loss(p, jnp.float64)
  matvec = jax.jit(hvp_fn(f, params, mode=mode))
  for key in range(3):
    v = _params(jnp.float64, key=10 + key)
    _assert_tree_close(matvec(v), _dense_hessian_times(f, params, v), jnp.float64)


def test_hvp_closed_form_cubic():
  x = jnp.array([1.0, -2.0, 3.0])
  v = jnp.array([0.5, 1.0, -1.0])
  for mode in MODES:
    np.testing.assert_allclose(hvp(lambda x: jnp.sum(x**3), x, v, mode=mode), 6 * x * v)


def test_hvp_is_differentiable():
  v = jnp.array([0.3, -0.7])
  f = lambda x: jnp.sin(x[0]) * jnp.exp(x[1])
  check_grads(lambda x: hvp(f, x, v), (jnp.array([0.4, 0.2]),), order=2, modes=["fwd", "rev"])


def test_hvp_errors_name_the_problem():
  x = {"a": jnp.ones(3)}
  with pytest.raises(ValueError, match="Unknown mode 'fwd_fwd'"):
    hvp(lambda p: p["a"].sum(), x, x, mode="fwd_fwd")
  with pytest.raises(ValueError, match="same pytree structure"):
    hvp(lambda p: p["a"].sum(), x, jnp.ones(3))
  with pytest.raises(ValueError, match=r"v\['a'\] has shape \(2,\)"):
    hvp(lambda p: p["a"].sum(), x, {"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="one scalar output"):
    hvp(lambda p: p["a"] ** 2, x, x)
  with pytest.raises(ValueError, match="one scalar output"):
    hvp_fn(lambda p: p["a"] ** 2, x)


def _dense_ggn(model_fn, loss_fn, params):
  flat, unravel = ravel_pytree(params)
  outputs = model_fn(params)
  flat_out, unravel_out = ravel_pytree(outputs)
  jac = jax.jacrev(lambda z: ravel_pytree(model_fn(unravel(z)))[0])(flat)
  loss_hess = jax.hessian(lambda o: loss_fn(unravel_out(o)))(flat_out)
  return jac.T @ loss_hess @ jac, unravel


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_ggn_matches_dense_jt_h_j(dtype):
  model_fn = lambda p: _model(p, _inputs(p["dense"]["w"].dtype))
  loss_fn = lambda logits: _xent(logits, _labels().astype(logits.dtype))
  ggn64, unravel = _dense_ggn(model_fn, loss_fn, _params(jnp.float64))
  v = _params(dtype, key=3)
  expected = unravel(ggn64 @ ravel_pytree(jax.tree.map(lambda a: a.astype(jnp.float64), v))[0])
  expected = jax.tree.map(lambda e: e.astype(dtype), expected)
  params = _params(dtype)
  _assert_tree_close(
    jax.jit(lambda p, v: ggn_vp(model_fn, loss_fn, p, v))(params, v), expected, dtype
  )
  _assert_tree_close(ggn_fn(model_fn, loss_fn, params)(v), expected, dtype)


def test_ggn_with_pytree_outputs_and_psd():
  params = _params(jnp.float64)
  x = _inputs(jnp.float64)

  def model_fn(p):
    h = _model(p, x)
    return {"logits": h, "aux": (h**2).sum(-1)}

  def loss_fn(out):
    return _xent(out["logits"], _labels()) + 0.1 * jnp.sum(out["aux"] ** 2)

  dense, unravel = _dense_ggn(model_fn, loss_fn, params)
  matvec = ggn_fn(model_fn, loss_fn, params)
  for key in range(2):
    v = _params(jnp.float64, key=20 + key)
    _assert_tree_close(matvec(v), unravel(dense @ ravel_pytree(v)[0]), jnp.float64)
  assert np.linalg.eigvalsh(dense).min() > -1e-10  # convex loss: GGN is PSD


def test_ggn_equals_hessian_for_linear_model():
  X = jax.random.normal(jax.random.key(0), (6, 3), jnp.float64)
  y = jnp.arange(6.0)
  model_fn = lambda w: X @ w
  loss_fn = lambda z: 0.5 * jnp.sum((z - y) ** 2)
  w, v = jnp.ones(3), jnp.array([1.0, -2.0, 0.5])
  np.testing.assert_allclose(ggn_vp(model_fn, loss_fn, w, v), X.T @ X @ v, rtol=1e-12)
  np.testing.assert_allclose(
    ggn_vp(model_fn, loss_fn, w, v), hvp(lambda w: loss_fn(model_fn(w)), w, v), rtol=1e-12
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_empirical_fisher_matches_explicit_loop(dtype):
  params = _params(dtype)
  xs = _inputs(dtype)
  labels = _labels().astype(dtype)
  batch = {"x": xs, "y": labels}
  loss_fn = lambda p, ex: _xent(_model(p, ex["x"][None]), ex["y"][None])
  v = _params(dtype, key=4)
  expected = jax.tree.map(jnp.zeros_like, params)
  for i in range(xs.shape[0]):
    g = jax.grad(loss_fn)(params, {"x": xs[i], "y": labels[i]})
    gv = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True))
    expected = jax.tree.map(lambda e, gi: e + gi * gv / xs.shape[0], expected, g)
  matvec = jax.jit(lambda p, v: empirical_fisher_fn(loss_fn, p, batch)(v))
  _assert_tree_close(matvec(params, v), expected, dtype)


def test_empirical_fisher_rejects_ragged_batch_and_vector_loss():
  with pytest.raises(ValueError, match="leading example axis"):
    empirical_fisher_fn(
      lambda p, ex: p * ex["a"].sum(), 1.0, {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}
    )
  with pytest.raises(ValueError, match="scalar per example"):
    empirical_fisher_fn(lambda p, x: p * x, jnp.ones(2), jnp.ones((3, 2)))
