"""Tests for curvopt.ghost: ghost norms and weighted sums against explicit per-example loops."""

import warnings

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from curvopt.privacy import ghost
from curvopt.privacy.ghost import ghost_clipped_sum

RTOL = 1e-4


def _loop_reference(loss_fn, params, batch, weights):
  """Per-example squared norms and weighted sum by a Python loop of ``jax.grad``."""
  size = jax.tree.leaves(batch)[0].shape[0]
  grad_fn = jax.jit(jax.grad(loss_fn))  # one compilation, one call per example
  grads = [grad_fn(params, jax.tree.map(lambda x: x[i], batch)) for i in range(size)]
  sq = jax.tree.map(lambda *gs: np.array([np.sum(np.square(g)) for g in gs]), *grads)
  total = jax.tree.map(
    lambda w, *gs: sum(np.asarray(w[i]) * np.asarray(gs[i]) for i in range(size)),
    weights,
    *grads,
  )
  return total, sq


def _leaf_weights(params, size, seed=0):
  """Different weights on every leaf (per-layer clipping), one of them exactly 0."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  ws = []
  for leaf in leaves:
    w = rng.uniform(0.1, 1.0, size)
    w[size // 2] = 0.0
    ws.append(jnp.asarray(w, jnp.result_type(leaf)))
  return jax.tree.unflatten(treedef, ws)


def _assert_tree_close(actual, expected, rtol=RTOL, atol_scale=1e-6):
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    b = np.asarray(b)
    atol = atol_scale * max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
    np.testing.assert_allclose(
      np.asarray(a), b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


def _check(loss_fn, params, batch, *, expect_warning=False, rtol=RTOL, eager=False):
  """Ghost (jitted, and eager if asked) against the loop; no fallback warning unless expected."""
  size = jax.tree.leaves(batch)[0].shape[0]
  weights = _leaf_weights(params, size)
  ref_total, ref_sq = _loop_reference(loss_fn, params, batch, weights)
  seen = []

  def weight_fn(sq):
    seen.append(jax.tree.map(jnp.shape, sq))
    return weights

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jit_total, jit_sq = jax.jit(lambda p, b: ghost_clipped_sum(loss_fn, p, b, weight_fn))(
      params, batch
    )
    if eager:
      total, sq = ghost_clipped_sum(loss_fn, params, batch, weight_fn)
      _assert_tree_close(sq, ref_sq, rtol)
      _assert_tree_close(total, ref_total, rtol)
  ghost_warnings = [w for w in caught if "ghost clipping" in str(w.message)]
  assert bool(ghost_warnings) == expect_warning, [str(w.message) for w in ghost_warnings]
  assert seen[0] == jax.tree.map(lambda _: (size,), params)
  _assert_tree_close(jit_sq, ref_sq, rtol)
  _assert_tree_close(jit_total, ref_total, rtol)
  return ghost_warnings


def _nnx_loss(model, loss):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, example):
    return loss(nnx.merge(graphdef, p), example)

  return loss_fn, params


def _regression(out, y):
  return 0.5 * jnp.sum(jnp.square(out - y))


# ---------------------------------------------------------------------------------------------
# Models.


class _MLP(nnx.Module):
  def __init__(self, sizes, use_bias, rngs):
    self.layers = nnx.List(
      [
        nnx.Linear(a, b, use_bias=use_bias, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
      ]
    )

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


class _CNN(nnx.Module):
  def __init__(self, use_bias, rngs):
    self.conv1 = nnx.Conv(2, 3, (3, 3), use_bias=use_bias, rngs=rngs)
    self.conv2 = nnx.Conv(3, 4, (2, 2), strides=2, padding="VALID", use_bias=use_bias, rngs=rngs)
    self.head = nnx.Linear(4 * 3 * 3, 2, use_bias=use_bias, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.conv1(x))
    x = jnp.tanh(self.conv2(x))
    return self.head(x.reshape(-1))


class _EmbedDense(nnx.Module):
  def __init__(self, use_bias, rngs):
    self.embed = nnx.Embed(7, 5, rngs=rngs)
    self.dense = nnx.Linear(5, 3, use_bias=use_bias, rngs=rngs)

  def __call__(self, tokens):
    return self.dense(jnp.tanh(self.embed(tokens))).mean(axis=0)


class _Sequence(nnx.Module):
  """Dense layers over a time axis; sizes chosen so both the Gram and direct rules run."""

  def __init__(self, use_bias, rngs):
    self.wide = nnx.Linear(3, 16, use_bias=use_bias, rngs=rngs)  # N(K+P) < KP: Gram
    self.narrow = nnx.Linear(16, 2, use_bias=use_bias, rngs=rngs)  # N(K+P) > KP: direct
    self.norm = nnx.LayerNorm(2, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.narrow(jnp.tanh(self.wide(x)))).sum(axis=0)


def _data(key, size, x_shape, y_dim, dtype=jnp.float32):
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (size, *x_shape), dtype)
  y = jax.random.normal(ky, (size, y_dim), dtype)
  return {"x": x, "y": y}


@pytest.mark.parametrize("use_bias", [True, False])
def test_nnx_mlp(use_bias):
  model = _MLP([6, 5, 4, 3], use_bias, nnx.Rngs(0))
  loss_fn, params = _nnx_loss(model, lambda m, ex: _regression(m(ex["x"]), ex["y"]))
  _check(loss_fn, params, _data(jax.random.key(1), 6, (6,), 3))


@pytest.mark.parametrize("use_bias", [True, False])
def test_nnx_cnn(use_bias):
  model = _CNN(use_bias, nnx.Rngs(0))
  loss_fn, params = _nnx_loss(model, lambda m, ex: _regression(m(ex["x"]), ex["y"]))
  _check(loss_fn, params, _data(jax.random.key(2), 4, (6, 6, 2), 2))


@pytest.mark.parametrize("use_bias", [True, False])
def test_nnx_embedding_dense(use_bias):
  model = _EmbedDense(use_bias, nnx.Rngs(0))
  loss_fn, params = _nnx_loss(model, lambda m, ex: _regression(m(ex["tokens"]), ex["y"]))
  tokens = jnp.array([[1, 2, 1, 6, 1], [0, 0, 0, 0, 0], [3, 4, 5, 6, 2], [6, 5, 6, 5, 6]])
  y = jax.random.normal(jax.random.key(3), (4, 3), jnp.float32)
  _check(loss_fn, params, {"tokens": tokens, "y": y})


@pytest.mark.parametrize("use_bias", [True, False])
def test_nnx_sequence_model(use_bias):
  model = _Sequence(use_bias, nnx.Rngs(0))
  loss_fn, params = _nnx_loss(model, lambda m, ex: _regression(m(ex["x"]), ex["y"]))
  # float64: a LayerNorm over 2 features amplifies float32 rounding between the batched and
  # the one-example evaluation beyond the tolerance.
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  _check(loss_fn, params, _data(jax.random.key(4), 5, (4, 3), 2, jnp.float64), rtol=1e-9)


class _LinenCNN(nn.Module):
  use_bias: bool

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), use_bias=self.use_bias)(x))
    x = jnp.tanh(nn.Conv(2, (3, 3), kernel_dilation=2, padding="VALID", use_bias=self.use_bias)(x))
    return nn.Dense(2, use_bias=self.use_bias)(x.reshape(-1))


class _LinenSeq(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(9, 4)(tokens)
    h = jnp.tanh(nn.Dense(6)(h))
    return nn.Dense(2)(h).sum(axis=0)


@pytest.mark.parametrize("use_bias", [True, False])
def test_linen_mlp_and_cnn(use_bias):
  model = _LinenCNN(use_bias)
  batch = _data(jax.random.key(5), 4, (7, 7, 2), 2)
  params = model.init(jax.random.key(0), batch["x"][0])
  _check(lambda p, ex: _regression(model.apply(p, ex["x"]), ex["y"]), params, batch)


def test_linen_embedding_sequence():
  model = _LinenSeq()
  tokens = jnp.array([[1, 1, 8, 0], [2, 3, 2, 3], [4, 4, 4, 4]])
  params = model.init(jax.random.key(0), tokens[0])
  y = jax.random.normal(jax.random.key(6), (3, 2), jnp.float32)
  loss_fn = lambda p, ex: _regression(model.apply(p, ex["tokens"]), ex["y"])
  _check(loss_fn, params, {"tokens": tokens, "y": y})


def test_plain_jnp_parameters_on_either_side_and_batched_heads():
  """``x @ W``, ``W @ x`` (parameter on the left) and a per-head einsum (dot batch dims)."""
  k = jax.random.split(jax.random.key(7), 4)
  params = {
    "w_in": jax.random.normal(k[0], (3, 4), jnp.float64),
    "w_left": jax.random.normal(k[1], (5, 4), jnp.float64),
    "heads": jax.random.normal(k[2], (2, 5, 3), jnp.float64),
    "b": jnp.array([0.1, -0.2, 0.3, 0.0, 0.5]),
  }

  def loss_fn(p, x):  # x: (T, 3)
    h = jnp.tanh(x @ p["w_in"])  # (T, 4)
    h = jnp.tanh((p["w_left"] @ h.T).T + p["b"])  # (T, 5)
    h2 = h.reshape(h.shape[0], 1, 5) * jnp.ones((1, 2, 1))  # (T, 2 heads, 5)
    out = jnp.einsum("thd,hde->the", h2, p["heads"])
    return jnp.sum(jnp.sin(out))

  x = jax.random.normal(k[3], (4, 6, 3), jnp.float64)
  _check(loss_fn, params, x, rtol=1e-9)


@pytest.mark.parametrize("unfold", ["whole batch", "chunks", "one offset at a time"])
@pytest.mark.parametrize("channels", [1, 8])
def test_plain_lax_convolutions_strided_dilated_nchw(channels, unfold, monkeypatch):
  """Padding, strides, input and kernel dilation, NCHW layout; 8 channels take the Gram rule.

  Each conv norm rule runs: patches of the whole batch, patches a chunk of examples at a time
  (``lax.map``) and the ``fori_loop`` over kernel offsets.
  """
  if unfold == "chunks":
    monkeypatch.setattr(ghost, "_UNFOLD_BYTES", 1)
    monkeypatch.setattr(ghost, "_MIN_UNFOLD_CHUNK", 1)
  elif unfold == "one offset at a time":
    monkeypatch.setattr(ghost, "_UNFOLD_BYTES", 0)
  k = jax.random.split(jax.random.key(12), 3)
  params = {
    "k1": jax.random.normal(k[0], (channels, 2, 3, 3), jnp.float64),  # OIHW
    "k2": jax.random.normal(k[1], (channels, channels, 3, 3), jnp.float64),
  }

  def loss_fn(p, img):  # img: (2, 5, 5) CHW
    h = jax.lax.conv_general_dilated(
      img[None],
      p["k1"],
      (2, 1),
      ((2, 2), (0, 1)),
      lhs_dilation=(1, 2),
      rhs_dilation=(2, 1),
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    h = jax.lax.conv_general_dilated(
      jnp.tanh(h), p["k2"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return jnp.sum(jnp.sin(h))

  x = jax.random.normal(k[2], (3, 2, 5, 5), jnp.float64)
  _check(loss_fn, params, x, rtol=1e-9)


def test_unsupported_parameters_fall_back_exactly_and_say_so_once():
  """A parameter through a nonlinearity and a grouped conv use the fallback; tied weights not."""
  k = jax.random.split(jax.random.key(8), 5)
  params = {
    "tied": jax.random.normal(k[0], (3, 3), jnp.float64),
    "gate": jax.random.normal(k[1], (3,), jnp.float64),
    "grouped": jax.random.normal(k[2], (3, 3, 1, 4), jnp.float64),
    "dense": jax.random.normal(k[3], (3, 2), jnp.float64),
  }

  def loss_fn(p, ex):
    h = jnp.tanh(ex["x"] @ p["tied"]) @ p["tied"].T * jax.nn.sigmoid(p["gate"])
    img = jax.lax.conv_general_dilated(
      ex["img"][None],
      p["grouped"],
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=2,
    )
    return jnp.sum(jnp.tanh(h @ p["dense"])) + jnp.sum(jnp.tanh(img))

  batch = {
    "x": jax.random.normal(k[4], (4, 3), jnp.float64),
    "img": jax.random.normal(k[4], (4, 5, 5, 2), jnp.float64),
  }
  caught = _check(loss_fn, params, batch, expect_warning=True, rtol=1e-9)
  assert len(caught) == 1  # one trace, one warning naming every such leaf
  message = str(caught[0].message)
  for name in ("'gate'", "'grouped'"):
    assert name in message
  assert "'dense'" not in message
  assert "'tied'" not in message  # x @ W and h @ W.T: stacked factors, cross terms included


def test_zero_weight_example_with_nan_contributes_exactly_zero():
  model = _MLP([4, 5, 2], True, nnx.Rngs(0))
  loss_fn, params = _nnx_loss(model, lambda m, ex: _regression(m(ex["x"]), ex["y"]))
  batch = _data(jax.random.key(9), 4, (4,), 2)
  batch["x"] = batch["x"].at[1, 2].set(jnp.nan)
  weight_fn = lambda sq: jax.tree.map(lambda s: jnp.where(jnp.isfinite(s), 0.5, 0.0), sq)
  total, sq = jax.jit(lambda p, b: ghost_clipped_sum(loss_fn, p, b, weight_fn))(params, batch)
  for s in jax.tree.leaves(sq):
    assert not np.isfinite(s[1]) and np.all(np.isfinite(np.delete(np.asarray(s), 1)))
  keep = jnp.array([0, 2, 3])
  ref, _ = _loop_reference(
    loss_fn,
    params,
    jax.tree.map(lambda x: x[keep], batch),
    jax.tree.map(lambda _: jnp.full((3,), 0.5, jnp.float32), params),
  )
  _assert_tree_close(total, ref)


def test_unused_parameter_has_zero_norm_and_sum():
  params = {"w": jnp.ones((3,), jnp.float32), "unused": jnp.ones((2,), jnp.float32)}
  x = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)
  total, sq = ghost_clipped_sum(
    lambda p, xi: xi @ p["w"], params, x, lambda s: jax.tree.map(jnp.ones_like, s)
  )
  np.testing.assert_allclose(sq["w"], [5.0, 50.0])
  np.testing.assert_array_equal(sq["unused"], [0.0, 0.0])
  np.testing.assert_array_equal(total["unused"], [0.0, 0.0])
  np.testing.assert_allclose(total["w"], [3.0, 5.0, 7.0])


def test_eager_matches_loop():
  """Outside jit too (plain ``jnp``, so that op-by-op dispatch stays cheap)."""
  k = jax.random.split(jax.random.key(11), 3)
  params = {"w": jax.random.normal(k[0], (3, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
  loss_fn = lambda p, ex: jnp.sum(jnp.tanh(ex @ p["w"] + p["b"]) ** 2)
  _check(loss_fn, params, jax.random.normal(k[1], (4, 5, 3), jnp.float32), eager=True)


def test_loss_closing_over_traced_values_under_jit():
  """A ``loss_fn`` built inside ``jit`` around traced values (a scale, data statistics)."""
  k = jax.random.split(jax.random.key(13), 2)
  params = {"w": jax.random.normal(k[0], (3, 2), jnp.float64)}
  x = jax.random.normal(k[1], (4, 3), jnp.float64)
  weights = _leaf_weights(params, 4)

  @jax.jit
  def run(p, batch, scale):
    mean = batch.mean(axis=0)
    loss_fn = lambda p, xi: scale * jnp.sum(jnp.tanh((xi - mean) @ p["w"]))
    return ghost_clipped_sum(loss_fn, p, batch, lambda s: weights)

  total, sq = run(params, x, 3.0)
  loss_fn = lambda p, xi: 3.0 * jnp.sum(jnp.tanh((xi - x.mean(axis=0)) @ p["w"]))
  ref_total, ref_sq = _loop_reference(loss_fn, params, x, weights)
  _assert_tree_close(sq, ref_sq, 1e-9)
  _assert_tree_close(total, ref_total, 1e-9)


def test_misuse_raises():
  with pytest.raises(ValueError, match="leading"):
    ghost_clipped_sum(
      lambda p, ex: ex["a"].sum() * p,
      jnp.ones(()),
      {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))},
      lambda s: s,
    )
  with pytest.raises(ValueError, match="one scalar per example"):
    ghost_clipped_sum(lambda p, x: x * p, jnp.ones(()), jnp.ones((3, 2)), lambda s: s)


# ---------------------------------------------------------------------------------------------
# Through the public API, against the vmap method.


@pytest.mark.parametrize("per_layer", [False, True])
def test_clipped_grad_ghost_matches_vmap(per_layer):
  import curvopt as per_example

  model = _CNN(True, nnx.Rngs(1))
  loss_fn, params = _nnx_loss(model, lambda m, ex: _regression(m(ex["x"]), ex["y"]))
  batch = _data(jax.random.key(10), 6, (6, 6, 2), 2)
  batch["x"] = batch["x"].at[4, 0, 0, 0].set(jnp.nan)
  is_padding = jnp.array([False, False, False, False, False, True])
  outs = {}
  for method in ("vmap", "ghost"):
    fn = per_example.clipped_grad(loss_fn, 0.5, method=method, per_layer=per_layer)
    outs[method] = jax.jit(fn)(params, batch, is_padding)
  mean_v, norms_v = outs["vmap"]
  mean_g, norms_g = outs["ghost"]
  _assert_tree_close(mean_g, mean_v)
  _assert_tree_close(jax.tree.map(jnp.nan_to_num, norms_g), jax.tree.map(jnp.nan_to_num, norms_v))
  assert all(np.all(np.isfinite(m)) for m in jax.tree.leaves(mean_g))


def test_dp_sgd_step_from_ghost_sum_matches_vmap():
  """A noised DP-SGD step fed the ghost clipped sum equals the one fed the vmap clipped sum."""
  import curvopt as per_example

  model = _EmbedDense(True, nnx.Rngs(2))
  loss_fn, params = _nnx_loss(model, lambda m, ex: _regression(m(ex["tokens"]), ex["y"]))
  tokens = jnp.array([[1, 2, 1, 6], [0, 0, 3, 0], [3, 4, 5, 6], [6, 5, 6, 5]])
  batch = {"tokens": tokens, "y": jax.random.normal(jax.random.key(14), (4, 3), jnp.float32)}
  is_padding = jnp.array([False, False, False, True])
  opt = per_example.dp_sgd(0.1, l2_norm_clip=0.3, noise_multiplier=1.1, key=3, per_layer=True)
  updates = {}
  for method in ("vmap", "ghost"):
    sum_fn = per_example.clipped_sum_fn(loss_fn, 0.3, method=method, per_layer=True)

    @jax.jit
    def step(p, b, pad, sum_fn=sum_fn):
      return opt.update(sum_fn(p, b, pad), opt.init(p), p)[0]

    updates[method] = step(params, batch, is_padding)
  _assert_tree_close(updates["ghost"], updates["vmap"])


def test_bfloat16_model_norms_in_float32():
  """Half-precision parameters: norms accumulate in float32, the sum keeps the leaf dtype."""
  k = jax.random.split(jax.random.key(15), 3)
  params32 = {"w": jax.random.normal(k[0], (8, 4), jnp.float32), "b": jnp.ones((4,), jnp.float32)}
  x32 = jax.random.normal(k[1], (5, 3, 8), jnp.float32)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
  loss_fn = lambda p, xi: jnp.sum(jnp.tanh(xi @ p["w"] + p["b"]).astype(jnp.float32) ** 2)
  ones = lambda s: jax.tree.map(jnp.ones_like, s)
  total, sq = jax.jit(lambda p, b: ghost_clipped_sum(loss_fn, p, b, ones))(
    params, x32.astype(jnp.bfloat16)
  )
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(sq))
  assert all(t.dtype == jnp.bfloat16 for t in jax.tree.leaves(total))
  # Reference in float32 on the same (bfloat16-rounded) values; bfloat16 has ~3 digits.
  up = lambda t: jax.tree.map(lambda v: v.astype(jnp.float32), t)
  ref_total, ref_sq = _loop_reference(
    loss_fn,
    up(params),
    x32.astype(jnp.bfloat16).astype(jnp.float32),
    jax.tree.map(lambda _: jnp.ones((5,), jnp.float32), params),
  )
  _assert_tree_close(sq, ref_sq, rtol=5e-2, atol_scale=5e-2)
  _assert_tree_close(up(total), ref_total, rtol=5e-2, atol_scale=5e-2)


@pytest.mark.parametrize("seq", [None, 2, 12])
def test_layer_applied_twice_needs_no_fallback(seq):
  """One weight at two dense products (cross terms by stacked factors) equals the loop.

  ``seq=None``: one row per site; ``2``: short sequences (Gram rule); ``12``: long (direct).
  """
  k = jax.random.split(jax.random.key(21), 4)
  params = {
    "shared": jax.random.normal(k[0], (4, 4), jnp.float64) / 2,
    "head": jax.random.normal(k[1], (4, 2), jnp.float64),
  }

  def loss_fn(p, ex):
    h = jnp.tanh(ex["x"] @ p["shared"])
    h = jnp.tanh(h @ p["shared"]) + h  # the same layer again
    out = h @ p["head"]
    return _regression(out if seq is None else out.mean(axis=0), ex["y"])

  shape = (4,) if seq is None else (seq, 4)
  batch = _data(k[2], 5, shape, 2, jnp.float64)
  _check(loss_fn, params, batch, rtol=1e-9)
  plan = ghost._ghost_jaxpr.find_sites(
    jax.make_jaxpr(
      lambda leaves, ex: loss_fn(dict(zip(["head", "shared"], leaves, strict=True)), ex)
    )([params["head"], params["shared"]], jax.tree.map(lambda x: x[0], batch)).jaxpr,
    2,
  )
  assert list(plan.reused) == [1] and len(plan.reused[1]) == 2 and not plan.unsupported


@pytest.mark.parametrize("form", ["take_matmul_transpose", "take_einsum", "one_hot_matmul"])
def test_tied_embedding_and_output_projection_needs_no_fallback(form):
  """A GPT-style tied embedding: the table's row lookups and its use as the output projection.

  The cross terms between the lookup and the projection come from stacking one-hot rows with
  the projection's factors in the table's own layout; the result equals the jax.grad loop.
  ``one_hot_matmul`` looks rows up as a dense product (contracting the table's row axis).
  """
  vocab, dim, seq = 7, 5, 6
  k = jax.random.split(jax.random.key(22), 4)
  params = {
    "embed": jax.random.normal(k[0], (vocab, dim), jnp.float64),
    "mix": jax.random.normal(k[1], (dim, dim), jnp.float64) / 2,
  }

  def loss_fn(p, ex):
    if form == "one_hot_matmul":
      rows = jax.nn.one_hot(ex["tokens"], vocab, dtype=jnp.float64) @ p["embed"]
    else:
      rows = jnp.take(p["embed"], ex["tokens"], axis=0)
    h = jnp.tanh(rows @ p["mix"])
    if form == "take_einsum":
      logits = jnp.einsum("td,vd->tv", h, p["embed"])
    else:
      logits = h @ p["embed"].T
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(seq), ex["targets"]])

  tokens = jax.random.randint(k[2], (5, seq), 0, vocab).at[0, :3].set(2)  # repeated ids
  batch = {"tokens": tokens, "targets": jax.random.randint(k[3], (5, seq), 0, vocab)}
  _check(loss_fn, params, batch, rtol=1e-9)
  if form != "one_hot_matmul":
    # The lookup's one-hot rows enter through id equalities and gathers: no (B, T, vocab)
    # one-hot is formed (the logits' own cotangent is the only vocabulary-wide factor).
    ones = lambda s: jax.tree.map(jnp.ones_like, s)
    jaxpr = jax.make_jaxpr(lambda p, b: ghost_clipped_sum(loss_fn, p, b, ones))(params, batch)
    shapes = _eqn_output_shapes(jaxpr.jaxpr, "eq")
    assert (5, seq, vocab) not in shapes and (5, seq, seq) in shapes, shapes


def _eqn_output_shapes(jaxpr, primitive):
  """Output shapes of every ``primitive`` equation in a jaxpr and its sub-jaxprs."""
  shapes = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes |= _eqn_output_shapes(sub, primitive)
  return shapes


def test_gpt_block_with_positions_and_tied_embedding_needs_no_fallback():
  """Embedding + position table, LayerNorm, 2-head attention, MLP, tied output projection."""
  vocab, seq, dim, heads = 11, 8, 16, 2
  k = jax.random.split(jax.random.key(23), 9)
  dense = lambda key, a, b: jax.random.normal(key, (a, b), jnp.float64) / np.sqrt(a)
  params = {
    "embed": jax.random.normal(k[0], (vocab, dim), jnp.float64),
    "pos": 0.1 * jax.random.normal(k[1], (seq, dim), jnp.float64),
    "ln": {"scale": 1.0 + 0.1 * jax.random.normal(k[2], (dim,), jnp.float64)},
    "q": dense(k[3], dim, dim),
    "k": dense(k[4], dim, dim),
    "v": dense(k[5], dim, dim),
    "o": dense(k[6], dim, dim),
    "mlp": dense(k[7], dim, 2 * dim),
  }

  def loss_fn(p, ex):
    x = jnp.take(p["embed"], ex["tokens"], axis=0) + p["pos"]
    mu = x.mean(-1, keepdims=True)
    h = (x - mu) / jnp.sqrt(jnp.square(x - mu).mean(-1, keepdims=True) + 1e-5) * p["ln"]["scale"]
    split = lambda t: t.reshape(seq, heads, dim // heads)
    q, kk, v = split(h @ p["q"]), split(h @ p["k"]), split(h @ p["v"])
    att = jax.nn.softmax(jnp.einsum("thd,shd->hts", q, kk) / np.sqrt(dim // heads), axis=-1)
    x = x + jnp.einsum("hts,shd->thd", att, v).reshape(seq, dim) @ p["o"]
    x = x + jax.nn.gelu(x @ p["mlp"]).reshape(seq, dim, 2).sum(-1)
    logits = x @ p["embed"].T
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(seq), ex["targets"]])

  batch = {
    "tokens": jax.random.randint(k[8], (4, seq), 0, vocab),
    "targets": jax.random.randint(jax.random.key(24), (4, seq), 0, vocab),
  }
  _check(loss_fn, params, batch, rtol=1e-9)
