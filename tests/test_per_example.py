"""Tests for curvopt/per_example.py: every result against an explicit Python loop of jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_close, mlp_apply, mlp_params

from curvopt import (
  ClippedSum,
  DPSGDState,
  clip_per_example,
  clipped_grad,
  clipped_sum_fn,
  dp_aggregate,
  dp_sgd,
  per_example_grads,
)

B = 7
SIZES = (3, 4, 2)  # helpers.mlp_params: 3 inputs, 4 tanh units, 2 classes


def loss_fn(params, example):
  logits = mlp_apply(params, example["x"])
  return -jax.nn.log_softmax(logits)[example["y"]] * example["scale"]


def make_batch(dtype, size=B, key=1):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  return {
    "x": 2.0 * jax.random.normal(k1, (size, 3), dtype),
    "y": jax.random.randint(k2, (size,), 0, 2),
    # a spread of gradient sizes so that some examples are clipped and some are not
    "scale": jnp.exp(jax.random.uniform(k3, (size,), dtype, -3.0, 2.0)),
  }


def example(batch, i):
  return jax.tree.map(lambda x: x[i], batch)


single_grad = jax.jit(jax.grad(loss_fn))


def loop_grads(params, batch, size=B):
  """Reference: one jax.grad call per example, in float64 numpy."""
  return [
    jax.tree.map(lambda g: np.asarray(g, np.float64), single_grad(params, example(batch, i)))
    for i in range(size)
  ]


def global_norm(g):
  return np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))


def tol(dtype):
  return 1e-5 if dtype == jnp.float32 else 1e-12


@pytest.mark.parametrize(
  "dtype, chunk_size, jit",
  [
    (jnp.float32, None, False),
    (jnp.float64, None, True),
    (jnp.float32, 3, True),
    (jnp.float64, 3, False),
    (jnp.float32, 7, True),
    (jnp.float64, 10, True),
  ],
)
def test_per_example_grads_equal_loop(dtype, chunk_size, jit):
  params, batch = mlp_params(0, SIZES, dtype), make_batch(dtype)
  f = lambda p, b: per_example_grads(loss_fn, p, b, chunk_size=chunk_size)
  grads = (jax.jit(f) if jit else f)(params, batch)
  for i, ref in enumerate(loop_grads(params, batch)):
    got = jax.tree.map(lambda g: g[i], grads)
    jax.tree.map(lambda g: np.testing.assert_equal(g.dtype, dtype), got)
    assert_tree_close(got, ref, rtol=tol(dtype), atol=tol(dtype))


def reference_clipped_mean(params, batch, clip, per_layer=False, is_padding=None):
  grads = loop_grads(params, batch)
  real = [i for i in range(B) if is_padding is None or not is_padding[i]]
  total = jax.tree.map(np.zeros_like, grads[0])
  leaves0 = jax.tree.leaves(grads[0])
  for i in real:
    g = grads[i]
    if per_layer is False:
      factor = min(1.0, clip / global_norm(g))
      total = jax.tree.map(lambda t, x, f=factor: t + f * x, total, g)
    else:
      if per_layer == "size":
        sizes = [x.size for x in leaves0]
        clips = [clip * np.sqrt(s / sum(sizes)) for s in sizes]
      else:
        clips = [clip / np.sqrt(len(leaves0))] * len(leaves0)
      clips = jax.tree.unflatten(jax.tree.structure(g), clips)
      total = jax.tree.map(
        lambda t, x, c: t + min(1.0, c / np.linalg.norm(x.ravel())) * x, total, g, clips
      )
  return jax.tree.map(lambda t: t / len(real), total), grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("per_layer", [False, True, "size"])
def test_clipped_grad_equals_loop(dtype, chunk_size, per_layer):
  params, batch = mlp_params(0, SIZES, dtype), make_batch(dtype)
  clip = 1.0
  fn = jax.jit(clipped_grad(loss_fn, clip, per_layer=per_layer, chunk_size=chunk_size))
  mean, norms = fn(params, batch)
  ref_mean, grads = reference_clipped_mean(params, batch, clip, per_layer)
  norms_ref = [global_norm(g) for g in grads]
  assert min(norms_ref) < clip < max(norms_ref), "the batch must mix clipped and unclipped"
  assert_tree_close(mean, ref_mean, rtol=10 * tol(dtype), atol=10 * tol(dtype))
  if per_layer is False:
    np.testing.assert_allclose(norms, norms_ref, rtol=tol(dtype))
  else:
    leaf_norms = [
      jax.tree.map(lambda x: np.linalg.norm(x.ravel()), g) for g in grads
    ]  # per example, per leaf
    ref = jax.tree.map(lambda *ns: np.array(ns), *leaf_norms)
    assert_tree_close(norms, ref, rtol=tol(dtype))


def test_clip_factor_scales_large_norms_down():
  """Each example's contribution has norm min(‖g‖, C) and g's direction (not C/‖g‖ inverted)."""
  grads = jnp.array([[30.0, 40.0], [0.3, 0.4], [0.0, 0.0]], jnp.float64)
  loss = lambda w, g: w @ g  # gradient wrt w is the example itself
  for i, g in enumerate(grads):
    mean, norms = clipped_grad(loss, 2.0)(jnp.zeros(2, jnp.float64), grads[i : i + 1])
    n = float(jnp.linalg.norm(g))
    np.testing.assert_allclose(float(norms[0]), n)
    np.testing.assert_allclose(np.linalg.norm(mean), min(n, 2.0), atol=1e-15)
    if n > 0:
      np.testing.assert_allclose(mean / np.linalg.norm(mean), g / n)


def test_infinite_clip_is_plain_mean_gradient():
  params, batch = mlp_params(0, SIZES, jnp.float64), make_batch(jnp.float64)
  mean, _ = clipped_grad(loss_fn, jnp.inf)(params, batch)
  batch_loss = lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch))
  assert_tree_close(mean, jax.grad(batch_loss)(params), rtol=1e-12)


def test_zero_clip_gives_zero():
  params, batch = mlp_params(0, SIZES, jnp.float64), make_batch(jnp.float64)
  mean, _ = clipped_grad(loss_fn, 0.0)(params, batch)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(mean))


def test_padding_matches_unpadded_batch_and_ignores_garbage():
  params, batch = mlp_params(0, SIZES, jnp.float64), make_batch(jnp.float64)
  is_padding = jnp.array([False, True, False, False, True, False, False])
  garbage = dict(batch, x=batch["x"].at[1].set(jnp.nan).at[4].set(jnp.inf))
  mean, norms = clipped_grad(loss_fn, 1.0)(params, garbage, is_padding)
  ref, _ = reference_clipped_mean(params, batch, 1.0, is_padding=np.asarray(is_padding))
  assert_tree_close(mean, ref, rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(norms)[[1, 4]], 0.0)
  real = jax.tree.map(lambda x: x[~is_padding], batch)
  mean_real, _ = clipped_grad(loss_fn, 1.0)(params, real)
  assert_tree_close(mean, mean_real, rtol=1e-12)


def test_non_finite_example_is_dropped_not_poisoning():
  params, batch = mlp_params(0, SIZES, jnp.float64), make_batch(jnp.float64)
  bad = dict(batch, x=batch["x"].at[2].set(jnp.nan))
  result = clipped_sum_fn(loss_fn, 1.0)(params, bad)
  assert int(result.num_dropped) == 1 and int(result.num_examples) == B
  assert not np.isfinite(result.norms[2]) and np.all(np.isfinite(np.delete(result.norms, 2)))
  grads = loop_grads(params, batch)
  ref = jax.tree.map(np.zeros_like, grads[0])
  for i in [0, 1, 3, 4, 5, 6]:
    ref = jax.tree.map(
      lambda t, x, i=i: t + min(1.0, 1.0 / global_norm(grads[i])) * x, ref, grads[i]
    )
  assert_tree_close(result.sum, ref, rtol=1e-12)
  # chunked and per-layer paths are NaN-safe too
  for kwargs in [dict(chunk_size=3), dict(per_layer=True)]:
    s = clipped_sum_fn(loss_fn, 1.0, **kwargs)(params, bad)
    assert int(s.num_dropped) == 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(s.sum))


def test_no_recompilation_across_padding_masks():
  params, batch = mlp_params(0, SIZES, jnp.float32), make_batch(jnp.float32)
  traces = []

  def counted_loss(p, ex):
    traces.append(1)
    return loss_fn(p, ex)

  fn = jax.jit(clipped_grad(counted_loss, 1.0))
  fn(params, batch, jnp.arange(B) >= B)
  # traced by the shape check, the batched pass and the non-finite guard's one-at-a-time pass
  traced_once = len(traces)
  for n_pad in range(1, 4):
    fn(params, batch, jnp.arange(B) >= B - n_pad)
  assert len(traces) == traced_once
  assert fn._cache_size() == 1


def test_optax_would_poison_the_sum():
  """Why we do not call optax.per_example_global_norm_clip: a NaN example poisons its sum."""
  g = [jnp.array([[1.0, 0.0], [jnp.nan, 0.0]])]
  assert np.isnan(optax.per_example_global_norm_clip(g, 1.0)[0][0]).any()
  out, state = clip_per_example(1.0).update(g, clip_per_example(1.0).init(None))
  np.testing.assert_allclose(out[0], [0.5, 0.0])
  assert int(state.num_dropped) == 1


@pytest.mark.parametrize("per_layer", [False, True])
def test_clip_per_example_equals_clipped_grad(per_layer):
  params, batch = mlp_params(0, SIZES, jnp.float64), make_batch(jnp.float64)
  grads = per_example_grads(loss_fn, params, batch)
  tx = clip_per_example(1.0, per_layer=per_layer)
  out, state = jax.jit(tx.update)(grads, tx.init(params))
  ref, _ = clipped_grad(loss_fn, 1.0, per_layer=per_layer)(params, batch)
  assert_tree_close(out, ref, rtol=1e-12)
  assert 0 < int(state.last_num_clipped) < B
  # agrees with optax's own clip when there is nothing to drop
  if per_layer is False:
    summed, num = optax.per_example_global_norm_clip(jax.tree.leaves(grads), 1.0)
    assert_tree_close(jax.tree.leaves(out), [s / B for s in summed], rtol=1e-12)
    assert int(num) == int(state.last_num_clipped)


@pytest.mark.parametrize("per_layer", [False, True])
def test_ghost_method_agrees_with_vmap(per_layer):
  params, batch = mlp_params(0, SIZES, jnp.float64), make_batch(jnp.float64)
  bad = dict(batch, x=batch["x"].at[2].set(jnp.nan))  # NaN safety through the ghost path too
  is_padding = jnp.arange(B) == 5
  ghost = jax.jit(clipped_sum_fn(loss_fn, 1.0, method="ghost", per_layer=per_layer))
  vmap = clipped_sum_fn(loss_fn, 1.0, method="vmap", per_layer=per_layer)
  got, ref = ghost(params, bad, is_padding), vmap(params, bad, is_padding)
  assert_tree_close(got.sum, ref.sum, rtol=1e-10, atol=1e-14)
  assert_tree_close(got.norms, ref.norms, rtol=1e-10)
  assert (int(got.num_dropped), int(got.num_clipped)) == (1, int(ref.num_clipped))


def test_bad_inputs():
  params, batch = mlp_params(0, SIZES, jnp.float32), make_batch(jnp.float32)
  ragged = dict(batch, y=batch["y"][:-1])
  with pytest.raises(ValueError, match="disagree on the leading"):
    per_example_grads(loss_fn, params, ragged)
  with pytest.raises(ValueError, match="disagree on the leading"):
    clipped_grad(loss_fn, 1.0)(params, ragged)
  with pytest.raises(ValueError, match="l2_norm_clip must be >= 0"):
    clipped_grad(loss_fn, -1.0)
  with pytest.raises(ValueError, match="l2_norm_clip must be >= 0"):
    dp_sgd(0.1, l2_norm_clip=-1.0, noise_multiplier=1.0, key=0)
  with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
    dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=-0.5, key=0)
  with pytest.raises(ValueError, match="expected_batch_size must be > 0"):
    dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=0, expected_batch_size=0)
  with pytest.raises(ValueError, match="Unknown method"):
    clipped_grad(loss_fn, 1.0, method="loop")
  with pytest.raises(ValueError, match="Unknown per_layer"):
    clipped_grad(loss_fn, 1.0, per_layer="module")
  with pytest.raises(ValueError, match="chunk_size"):
    per_example_grads(loss_fn, params, batch, chunk_size=0)
  with pytest.raises(ValueError, match=r"is_padding must have shape \(7,\)"):
    clipped_grad(loss_fn, 1.0)(params, batch, jnp.zeros(5, bool))
  with pytest.raises(TypeError, match="boolean"):
    clipped_grad(loss_fn, 1.0)(params, batch, jnp.zeros(B))
  with pytest.raises(TypeError, match="key must be"):
    dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key="seed")


# ------------------------------------------------------------------------------------------
# DP-SGD.


def test_noise_is_added_to_the_sum_then_divided_by_expected_batch_size():
  """Output std = σC/B̄ (not σC: that over-noises by a factor B̄), mean 0, from a fixed key."""
  sigma, clip, expected = 1.5, 2.0, 32
  n = 20_000
  zeros = jnp.zeros((expected, n), jnp.float32)  # 32 all-zero per-example gradients
  tx = dp_aggregate(clip, sigma, jax.random.key(3), expected_batch_size=expected)
  out, state = jax.jit(tx.update)(zeros, tx.init(jnp.zeros(n, jnp.float32)))
  std_ref = sigma * clip / expected
  # the sample std of n Gaussians has relative standard error 1/sqrt(2n) = 0.35%: allow 6 of them
  np.testing.assert_allclose(float(jnp.std(out)), std_ref, rtol=6 / np.sqrt(2 * n))
  assert abs(float(jnp.mean(out))) < 6 * std_ref / np.sqrt(n)
  assert out.dtype == jnp.float32 and int(state.count) == 1
  # the next step draws fresh noise from the key kept in the state
  out2, _ = jax.jit(tx.update)(zeros, state)
  assert abs(float(jnp.corrcoef(out, out2)[0, 1])) < 6 / np.sqrt(n)
  # same key, same noise: no hidden Python state
  again, _ = tx.update(zeros, tx.init(None))
  np.testing.assert_allclose(out, again, rtol=1e-6)


def test_noise_generated_in_float32_for_bfloat16_gradients():
  n = 20_000
  tx = dp_aggregate(1.0, 1.0, 0, expected_batch_size=1)
  out, _ = tx.update(jnp.zeros((1, n), jnp.bfloat16), tx.init(None))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(jnp.std(out.astype(jnp.float32))), 1.0, rtol=0.05)


def test_division_by_expected_not_realised_batch_size():
  g = jnp.array([[3.0, 4.0], [0.6, 0.0], [1.0, 1.0], [0.0, 0.5]], jnp.float64)
  is_padding = jnp.array([False, False, True, False])
  tx = dp_aggregate(1.0, 0.0, 0, expected_batch_size=10)
  out, state = tx.update(g, tx.init(None), is_padding=is_padding)
  np.testing.assert_allclose(out, (g[0] / 5 + g[1] + g[3]) / 10)
  assert int(state.last_num_clipped) == 1
  # no expected size: the static (padded) leading axis, never the data-dependent count
  tx = dp_aggregate(1.0, 0.0, 0)
  out, _ = tx.update(g, tx.init(None), is_padding=is_padding)
  np.testing.assert_allclose(out, (g[0] / 5 + g[1] + g[3]) / 4)


def test_batch_of_one_and_all_zero_gradients():
  opt = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0, key=0)
  params = {"w": jnp.ones(3, jnp.float32)}
  updates, _ = opt.update({"w": jnp.zeros((1, 3), jnp.float32)}, opt.init(params), params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  updates, _ = opt.update({"w": jnp.array([[0.0, 3.0, 4.0]], jnp.float32)}, opt.init(params))
  np.testing.assert_allclose(updates["w"], [0.0, -0.06, -0.08], rtol=1e-6)


def test_dp_sgd_drops_and_counts_non_finite_examples():
  opt = dp_sgd(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, key=0, expected_batch_size=3)
  g = jnp.array([[0.5, 0.0], [jnp.nan, 1.0], [0.0, jnp.inf]], jnp.float32)
  state = opt.init(jnp.zeros(2, jnp.float32))
  step = jax.jit(opt.update)
  for _ in range(2):
    updates, state = step(g, state)
    assert np.all(np.isfinite(updates))
  dp_state = state[0]
  assert isinstance(dp_state, DPSGDState)
  assert int(dp_state.last_num_dropped) == 2 and int(dp_state.num_dropped) == 4
  assert int(dp_state.count) == 2


def test_clipped_sum_input_equals_per_example_input():
  """The loss-function path (e.g. ghost clipping) and the per-example path noise the same."""
  params, batch = mlp_params(0, SIZES, jnp.float32), make_batch(jnp.float32)
  is_padding = jnp.arange(B) >= 5
  opt = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=7, expected_batch_size=6)
  state = opt.init(params)
  grads = per_example_grads(loss_fn, params, batch)
  u1, s1 = opt.update(grads, state, params, is_padding=is_padding)
  cs = clipped_sum_fn(loss_fn, 1.0)(params, batch, is_padding)
  assert isinstance(cs, ClippedSum)
  u2, s2 = jax.jit(opt.update)(cs, state, params)
  assert_tree_close(u1, u2, rtol=1e-5, atol=1e-7)
  assert int(s1[0].last_num_clipped) == int(s2[0].last_num_clipped)


def test_dp_sgd_momentum_matches_optax_sgd_on_clipped_mean():
  params = jnp.zeros(2, jnp.float64)
  gs = [jnp.array([[3.0, 4.0], [0.6, 0.0]]), jnp.array([[0.0, 0.2], [-6.0, 8.0]])]
  opt = dp_sgd(0.5, l2_norm_clip=1.0, noise_multiplier=0.0, key=0, momentum=0.9)
  ref = optax.sgd(0.5, momentum=0.9)
  s, r = opt.init(params), ref.init(params)
  for g in gs:
    u, s = opt.update(g, s, params)
    mean = sum(x * min(1.0, 1.0 / float(jnp.linalg.norm(x))) for x in g) / 2
    ur, r = ref.update(mean, r, params)
    np.testing.assert_allclose(u, ur, rtol=1e-12)


def test_dp_sgd_jit_compiles_once_over_poisson_batches():
  from curvopt.privacy import poisson_sample

  params, data = mlp_params(0, SIZES, jnp.float32), make_batch(jnp.float32, size=50)
  opt = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=0, expected_batch_size=5)
  traces = []

  @jax.jit
  def step(params, state, key):
    traces.append(1)
    b = poisson_sample(key, 50, 0.1, 12)
    batch = jax.tree.map(lambda x: x[b.indices], data)
    grads = per_example_grads(loss_fn, params, batch)
    updates, state = opt.update(grads, state, params, is_padding=b.is_padding)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for k in jax.random.split(jax.random.key(1), 4):
    params, state = step(params, state, k)
  assert len(traces) == 1 and int(state[0].count) == 4


@pytest.mark.long
def test_dp_sgd_logistic_regression_on_digits_beats_80_percent():
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  from curvopt.privacy import epsilon, padded_batch_size, poisson_sample

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
  n = len(x_tr)
  expected, steps = 128, 300
  q = expected / n
  size = padded_batch_size(n, q)
  data = {"x": jnp.asarray(x_tr), "y": jnp.asarray(y_tr)}

  def loss(params, ex):
    logits = ex["x"] @ params["w"] + params["b"]
    return -jax.nn.log_softmax(logits)[ex["y"]]

  params = {"w": jnp.zeros((64, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)}
  opt = dp_sgd(
    2.0, l2_norm_clip=1.0, noise_multiplier=1.0, key=0, expected_batch_size=expected, momentum=0.5
  )

  def step(carry, key):
    params, state = carry
    b = poisson_sample(key, n, q, size)
    batch = jax.tree.map(lambda a: a[b.indices], data)
    grads = per_example_grads(loss, params, batch)
    updates, state = opt.update(grads, state, params, is_padding=b.is_padding)
    return (optax.apply_updates(params, updates), state), b.num_truncated

  keys = jax.random.split(jax.random.key(1), steps)
  (params, state), truncated = jax.jit(lambda c: jax.lax.scan(step, c, keys))(
    (params, opt.init(params))
  )
  accuracy = float(jnp.mean(jnp.argmax(x_te @ params["w"] + params["b"], -1) == y_te))
  eps = epsilon(1.0, q, steps, 1e-5)
  assert int(truncated.sum()) == 0 and int(state[0].count) == steps
  assert accuracy > 0.8, (accuracy, eps)
  assert 0 < eps < np.inf


# ------------------------------------------------------------------------------------------
# Named errors for misuse (issue 15).


@pytest.mark.parametrize("method, chunk_size", [("vmap", None), ("vmap", 3), ("ghost", None)])
def test_non_scalar_per_example_loss_is_a_named_error_for_every_method(method, chunk_size):
  params, batch = mlp_params(0, SIZES, jnp.float32), make_batch(jnp.float32)

  def vector_loss(p, ex):
    return jnp.tanh(ex["x"] @ p[0]["w"])  # shape (4,): forgot to reduce

  fn = clipped_grad(vector_loss, 1.0, method=method, chunk_size=chunk_size)
  with pytest.raises(ValueError, match=r"one scalar per example.*\(4,\).*ONE example"):
    fn(params, batch)
  with pytest.raises(ValueError, match=r"one scalar per example.*\(4,\)"):
    per_example_grads(vector_loss, params, batch, chunk_size=chunk_size)


def test_dp_sgd_update_with_a_missing_leaf_is_a_named_error_at_update_time():
  params, batch = mlp_params(0, SIZES, jnp.float32), make_batch(jnp.float32)
  grads = per_example_grads(loss_fn, params, batch)
  missing = [{"w": grads[0]["w"]}, grads[1]]  # no "b" in the first layer
  opt = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0, key=0)
  state = opt.init(params)
  with pytest.raises(ValueError, match="same pytree structure as params.*every parameter leaf"):
    opt.update(missing, state, params)
  wrong_shape = [grads[0], dict(grads[1], w=grads[1]["w"][:, :3])]
  with pytest.raises(ValueError, match=r"\[1\]\['w'\] has shape \(3, 2\).*leading example axis"):
    opt.update(wrong_shape, state, params)
  clipped = clipped_sum_fn(loss_fn, 1.0)(params, batch)
  bad_sum = clipped._replace(sum=clipped.sum[:1])
  with pytest.raises(ValueError, match="ClippedSum's sum"):
    opt.update(bad_sum, state, params)
  # the well-formed inputs pass, under jit too
  jax.jit(opt.update)(grads, state, params)
  jax.jit(opt.update)(clipped, state, params)


def test_keys_int_numpy_raw_and_typed_seeds_agree():
  """dp_sgd takes the seeds the rest of the library takes; they give the same noise."""
  params = jnp.zeros(3)
  g = jnp.ones((2, 3))
  outs = []
  for key in [0, np.int64(0), jnp.int32(0), jax.random.key(0), jax.random.PRNGKey(0)]:
    tx = dp_aggregate(1.0, 1.0, key, expected_batch_size=2)
    out, _ = tx.update(g, tx.init(params))
    outs.append(np.asarray(out))
  for out in outs[1:]:
    np.testing.assert_array_equal(out, outs[0])
  with pytest.raises(TypeError, match="key must be"):
    dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=0.5)
  with pytest.raises(TypeError, match="key must be"):
    dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=True)
  with pytest.raises(TypeError, match="single key"):
    dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=jax.random.split(jax.random.key(0)))
