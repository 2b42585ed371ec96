"""A non-finite example never poisons the batch (issue 17), for every method, dtype and chunk size.

XLA may mix examples inside one batched operation: ``vmap(grad)`` of a float64 convolution on CPU
spreads one example's NaN to every example's kernel gradient. Every result here is checked
against a Python loop of ``jax.grad`` over the finite examples alone.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mlp_apply, mlp_params

from curvopt.privacy.clipping import clipped_sum_fn

B = 5
CLIP = 1.0
METHODS = [("vmap", None), ("vmap", 2), ("ghost", None)]
DN = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------------------------------------
# Models: plain jnp, so that the dtype is exactly the parameters' dtype.


def _mlp_init(key, dtype):
  return mlp_params(key, (6, 5, 2), dtype)


def _mlp_loss(p, ex):
  return 0.5 * jnp.sum(jnp.square(mlp_apply(p, ex["x"]) - ex["y"]))


def _mlp_batch(key, dtype):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.normal(kx, (B, 6), dtype), "y": jax.random.normal(ky, (B, 2), dtype)}


def _cnn_init(key, dtype):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "conv": jax.random.normal(k1, (3, 3, 2, 4), dtype) / 3,
    "bias": jnp.zeros((4,), dtype) + 0.1,
    "depthwise": jax.random.normal(k2, (3, 3, 1, 4), dtype) / 3,  # goes to ghost's fallback
    "head": jax.random.normal(k3, (4, 2), dtype) / 2,
  }


def _cnn_loss(p, ex):
  x = ex["x"][None]
  x = jnp.tanh(jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME", dimension_numbers=DN))
  x = x + p["bias"]
  x = jax.lax.conv_general_dilated(
    x, p["depthwise"], (1, 1), "SAME", dimension_numbers=DN, feature_group_count=4
  )
  out = jnp.tanh(x).mean(axis=(0, 1, 2)) @ p["head"]
  return 0.5 * jnp.sum(jnp.square(out - ex["y"]))


def _cnn_batch(key, dtype):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (B, 5, 5, 2), dtype),
    "y": jax.random.normal(ky, (B, 2), dtype),
  }


SEQ, D, HEADS = 8, 16, 2


def _transformer_init(key, dtype):
  ks = jax.random.split(key, 7)
  dense = lambda k, a, b: jax.random.normal(k, (a, b), dtype) / np.sqrt(a)
  return {
    "ln1": {"scale": jnp.ones((D,), dtype), "bias": jnp.zeros((D,), dtype)},
    "q": dense(ks[0], D, D),
    "k": dense(ks[1], D, D),
    "v": dense(ks[2], D, D),
    "o": dense(ks[3], D, D),
    "ln2": {"scale": jnp.ones((D,), dtype), "bias": jnp.zeros((D,), dtype)},
    "mlp_in": dense(ks[4], D, 2 * D),
    "mlp_out": dense(ks[5], 2 * D, D),
    "head": dense(ks[6], D, 2),
  }


def _layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = jnp.square(x - mu).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _transformer_loss(p, ex):
  x = ex["x"]  # (SEQ, D)
  h = _layer_norm(x, p["ln1"])
  split = lambda t: t.reshape(SEQ, HEADS, D // HEADS)
  q, k, v = split(h @ p["q"]), split(h @ p["k"]), split(h @ p["v"])
  att = jax.nn.softmax(jnp.einsum("thd,shd->hts", q, k) / np.sqrt(D // HEADS), axis=-1)
  x = x + jnp.einsum("hts,shd->thd", att, v).reshape(SEQ, D) @ p["o"]
  h = _layer_norm(x, p["ln2"])
  x = x + jax.nn.gelu(h @ p["mlp_in"]) @ p["mlp_out"]
  out = x.mean(axis=0) @ p["head"]
  return 0.5 * jnp.sum(jnp.square(out - ex["y"]))


def _transformer_batch(key, dtype):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (B, SEQ, D), dtype),
    "y": jax.random.normal(ky, (B, 2), dtype),
  }


MODELS = {
  "mlp": (_mlp_init, _mlp_loss, _mlp_batch),
  "cnn_depthwise": (_cnn_init, _cnn_loss, _cnn_batch),
  "transformer": (_transformer_init, _transformer_loss, _transformer_batch),
}


def _problem(name, dtype):
  init, loss, make_batch = MODELS[name]
  return loss, init(jax.random.key(0), dtype), make_batch(jax.random.key(1), dtype)


# ---------------------------------------------------------------------------------------------
# The reference: a Python loop of jax.grad over the finite examples.


@functools.cache
def _jit_grad(loss_fn):
  return jax.jit(jax.grad(loss_fn))


def _loop_clipped_sum(loss_fn, params, batch, keep):
  grad_fn = _jit_grad(loss_fn)
  total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  for i in np.flatnonzero(keep):
    g = grad_fn(params, jax.tree.map(lambda x: x[i], batch))
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
    factor = min(1.0, CLIP / norm)
    total = jax.tree.map(lambda t, x: t + factor * np.asarray(x, np.float64), total, g)
  return total


def _assert_close(actual, expected, dtype):
  rtol = 2e-4 if dtype == jnp.float32 else 1e-9
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    a = np.asarray(a)
    assert np.all(np.isfinite(a)), jax.tree_util.keystr(path)
    atol = rtol * max(float(np.max(np.abs(b))), 1e-12)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _sum_fn(loss_fn, method, chunk_size, jit=True):
  fn = clipped_sum_fn(loss_fn, CLIP, method=method, chunk_size=chunk_size)
  return jax.jit(fn) if jit else fn


@pytest.fixture(autouse=True)
def _quiet_fallback():
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="ghost clipping has no norm rule")
    yield


# ---------------------------------------------------------------------------------------------
# The issue's own reproduction.


@pytest.mark.parametrize("method, chunk_size", METHODS)
@pytest.mark.parametrize("depthwise", [False, True])
def test_issue_reproduction_float64_convolution(method, chunk_size, depthwise):
  """The snippet of issue 17 (plus its depthwise variant): one NaN example, one dropped."""
  groups = 2 if depthwise else 1
  w = jax.random.normal(jax.random.key(0), (3, 3, 2 // groups, 4), jnp.float64)
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 2), jnp.float64).at[1].set(jnp.nan)

  def loss(w, xi):
    y = jax.lax.conv_general_dilated(
      xi[None], w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=groups
    )
    return jnp.sum(jnp.tanh(y))

  r = clipped_sum_fn(loss, 1.0, method=method, chunk_size=chunk_size)(w, x)
  assert int(r.num_dropped) == 1
  norms = np.asarray(r.norms)
  assert np.isnan(norms[1]) and np.all(np.isfinite(np.delete(norms, 1)))
  _assert_close(r.sum, _loop_clipped_sum(loss, w, x, np.arange(4) != 1), jnp.float64)


# ---------------------------------------------------------------------------------------------
# One NaN example, NaN padding: every model, method, dtype.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("method, chunk_size", METHODS)
@pytest.mark.parametrize(
  "model",
  ["mlp", *(pytest.param(m, marks=pytest.mark.long) for m in ("cnn_depthwise", "transformer"))],
)
def test_nan_example_is_dropped_alone_and_nan_padding_changes_nothing(
  model, method, chunk_size, dtype
):
  loss_fn, params, batch = _problem(model, dtype)
  fn = _sum_fn(loss_fn, method, chunk_size)

  # One NaN example: dropped alone; the sum is the loop's over the others.
  bad = dict(batch, x=batch["x"].at[2].set(jnp.nan))
  r = fn(params, bad)
  assert (int(r.num_dropped), int(r.num_examples)) == (1, B)
  norms = np.asarray(r.norms)
  assert np.isnan(norms[2]) and np.all(np.isfinite(np.delete(norms, 2)))
  ref = _loop_clipped_sum(loss_fn, params, batch, np.arange(B) != 2)
  _assert_close(r.sum, ref, dtype)

  # NaN (and inf) padding rows change nothing: the same as finite padding, and as the loop over
  # the real examples.
  is_padding = jnp.array([False, True, False, False, True])
  padded = dict(batch, x=batch["x"].at[1].set(jnp.nan).at[4].set(jnp.inf))
  r_pad = fn(params, padded, is_padding)
  assert (int(r_pad.num_dropped), int(r_pad.num_examples)) == (0, 3)
  np.testing.assert_array_equal(np.asarray(r_pad.norms)[[1, 4]], 0.0)
  ref_pad = _loop_clipped_sum(loss_fn, params, batch, ~np.asarray(is_padding))
  _assert_close(r_pad.sum, ref_pad, dtype)
  r_finite_pad = fn(params, batch, is_padding)
  for a, b in zip(jax.tree.leaves(r_pad.sum), jax.tree.leaves(r_finite_pad.sum), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Non-finite values born inside the model (finite inputs): the guard's rare path.


def _overflow_cnn_loss(p, ex):
  """The CNN loss times exp(scale): an example with scale = 1e4 overflows to inf."""
  return _cnn_loss(p, ex) * jnp.exp(ex["scale"])


def _nan_gradient_cnn_loss(p, ex):
  """A finite loss whose gradient is NaN where the example's ``gate`` is 0 (sqrt at 0)."""
  return _cnn_loss(p, ex) + jnp.sqrt(ex["gate"] * jnp.sum(jnp.square(p["depthwise"])))


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("method, chunk_size", METHODS)
def test_overflow_and_nan_gradient_inside_the_model_float64(method, chunk_size, jit):
  loss_fn, params, batch = _problem("cnn_depthwise", jnp.float64)
  fn = _sum_fn(_overflow_cnn_loss, method, chunk_size, jit)
  batch = dict(batch, scale=jnp.zeros((B,)).at[3].set(1e4))
  r = fn(params, batch)
  assert int(r.num_dropped) == 1 and np.isnan(np.asarray(r.norms)[3])
  keep = np.arange(B) != 3
  _assert_close(r.sum, _loop_clipped_sum(_overflow_cnn_loss, params, batch, keep), jnp.float64)

  # Finite loss, NaN gradient (found by the one-example-at-a-time pass), plus a NaN input.
  fn = _sum_fn(_nan_gradient_cnn_loss, method, chunk_size, jit)
  batch = dict(batch, gate=jnp.ones((B,)).at[0].set(0.0))
  batch["x"] = batch["x"].at[4].set(jnp.nan)
  r = fn(params, batch)
  assert int(r.num_dropped) == 2
  assert np.all(np.isnan(np.asarray(r.norms)[[0, 4]]))
  keep = ~np.isin(np.arange(B), [0, 4])
  _assert_close(r.sum, _loop_clipped_sum(_nan_gradient_cnn_loss, params, batch, keep), jnp.float64)


def test_every_example_non_finite_gives_zero_and_counts_all():
  loss_fn, params, batch = _problem("mlp", jnp.float64)
  r = jax.jit(clipped_sum_fn(loss_fn, CLIP))(params, dict(batch, x=batch["x"] * jnp.nan))
  assert int(r.num_dropped) == B
  assert all(float(jnp.abs(s).max()) == 0.0 for s in jax.tree.leaves(r.sum))


def test_infinite_inputs_that_the_model_tolerates_are_kept():
  """Only NaN inputs are masked up front: -inf is a legitimate attention mask entry."""

  def loss_fn(w, ex):
    scores = ex["x"] @ w + ex["mask"]  # -inf: masked out by the softmax
    return -jax.nn.log_softmax(scores)[0]

  w = jnp.eye(3) * 0.5
  batch = {
    "x": jax.random.normal(jax.random.key(2), (4, 3)),
    "mask": jnp.zeros((4, 3)).at[:, 2].set(-jnp.inf),
  }
  r = clipped_sum_fn(loss_fn, CLIP)(w, batch)
  assert int(r.num_dropped) == 0
  _assert_close(r.sum, _loop_clipped_sum(loss_fn, w, batch, np.ones(4, bool)), jnp.float64)
