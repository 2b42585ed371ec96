"""flax nnx Modules straight into the per-example and DP functions (issue 15).

Every result is checked against a Python loop of ``jax.grad`` over a pure function built by
hand with ``nnx.split``/``nnx.merge`` (what a user had to write before), and DP-SGD through
``nnx.Optimizer`` against plain optax on that pure function.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from curvopt.privacy.clipping import ClippedSum, clipped_grad, clipped_sum_fn
from curvopt.privacy.dp_sgd import dp_sgd
from curvopt.privacy.ghost import ghost_clipped_sum
from curvopt.privacy.per_example import per_example_grads

B = 4


class _CNN(nnx.Module):
  """Conv, BatchNorm, Dropout, Linear: state that is not a parameter rides along."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(3 * 5 * 5, 2, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(self.norm(self.conv(x[None])))
    return self.head(self.drop(x).reshape(-1))


def _model():
  model = _CNN(nnx.Rngs(0, dropout=1))
  # Non-trivial running statistics, so that eval mode is seen to use them.
  model.norm.mean[...] = jnp.linspace(-0.5, 0.5, 3, dtype=jnp.float32)
  model.norm.var[...] = jnp.linspace(0.5, 2.0, 3, dtype=jnp.float32)
  return model


def _loss(model, ex):
  return 0.5 * jnp.sum(jnp.square(model(ex["x"]) - ex["y"]))


def _batch():
  kx, ky = jax.random.split(jax.random.key(3))
  return {"x": jax.random.normal(kx, (B, 5, 5, 2)), "y": jax.random.normal(ky, (B, 2))}


def _by_hand(model):
  """The boilerplate the direct path removes: a pure loss of the Param state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p, ex: _loss(nnx.merge(graphdef, p, rest, copy=True), ex)), params


def _loop_grads(model, batch):
  pure, params = _by_hand(model)
  grad_fn = jax.jit(jax.grad(pure))
  return params, [grad_fn(params, jax.tree.map(lambda x: x[i], batch)) for i in range(B)]


def _norm(g):
  return np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(g)))


def _assert_close(a, b, rtol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * np.abs(y).max())


@pytest.fixture(autouse=True)
def _quiet():
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="ghost clipping has no norm rule")
    yield


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_per_example_grads_of_a_module_equal_the_loop(mode):
  """BatchNorm (running averages in eval mode) and Dropout state: no uint32 error, exact values."""
  model = _model()
  model.eval() if mode == "eval" else model.train()
  if mode == "train":  # batch statistics of a single example would be degenerate
    model.norm.use_running_average = True
  batch = _batch()
  grads = jax.jit(lambda m, b: per_example_grads(_loss, m, b))(model, batch)
  assert isinstance(grads, nnx.State)
  params, loop = _loop_grads(model, batch)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for i, ref in enumerate(loop):
    _assert_close(jax.tree.map(lambda g, i=i: g[i], grads), ref)
  # the chunked path too, eagerly
  chunked = per_example_grads(_loss, model, batch, chunk_size=3)
  _assert_close(chunked, grads)


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_clipped_grad_and_sum_of_a_module_equal_the_loop(method):
  model = _model()
  model.eval()
  batch = _batch()
  batch["x"] = batch["x"].at[1].set(jnp.nan)  # dropped alone
  params, loop = _loop_grads(model, _batch())
  clip = 0.5 * np.median([_norm(g) for g in loop])
  ref = jax.tree.map(jnp.zeros_like, params)
  for i in (0, 2, 3):
    ref = jax.tree.map(lambda t, g, i=i: t + min(1.0, clip / _norm(loop[i])) * g, ref, loop[i])
  result = jax.jit(lambda m, b: clipped_sum_fn(_loss, clip, method=method)(m, b))(model, batch)
  assert isinstance(result.sum, nnx.State) and int(result.num_dropped) == 1
  _assert_close(result.sum, ref)
  mean, norms = clipped_grad(_loss, clip, method=method)(model, batch)
  _assert_close(mean, jax.tree.map(lambda r: r / B, ref))
  np.testing.assert_allclose(
    np.asarray(norms)[[0, 2, 3]], [_norm(loop[i]) for i in (0, 2, 3)], 1e-5
  )
  # the module is untouched: same parameters and BatchNorm statistics
  _assert_close(
    nnx.state(model, nnx.Param, nnx.BatchStat), nnx.state(_model(), nnx.Param, nnx.BatchStat)
  )


def test_ghost_clipped_sum_accepts_a_module():
  model = _model()
  model.eval()
  batch = _batch()
  ones = lambda sq: jax.tree.map(jnp.ones_like, sq)
  total, sq = ghost_clipped_sum(_loss, model, batch, ones)
  params, loop = _loop_grads(model, batch)
  _assert_close(total, jax.tree.map(lambda *g: sum(g), *loop))
  _assert_close(sq, jax.tree.map(lambda *g: np.array([np.sum(x**2) for x in g]), *loop))


@pytest.mark.parametrize("per_layer", [False, True])
def test_nnx_optimizer_with_dp_sgd_fed_a_ghost_clipped_sum(per_layer):
  """nnx turns the ClippedSum into a State; dp_sgd recognises it (issue 15)."""
  kwargs = dict(l2_norm_clip=0.3, noise_multiplier=1.1, key=7, expected_batch_size=B)
  kwargs["per_layer"] = per_layer
  model = _model()
  model.eval()
  optimizer = nnx.Optimizer(model, dp_sgd(0.1, **kwargs), wrt=nnx.Param)
  sum_fn = clipped_sum_fn(_loss, 0.3, method="ghost", per_layer=per_layer)

  @nnx.jit
  def step(model, optimizer, batch):
    clipped = sum_fn(model, batch)
    optimizer.update(model, clipped)
    return clipped

  batch = _batch()
  clipped = step(model, optimizer, batch)
  assert isinstance(clipped, ClippedSum)
  dp_state = optimizer.opt_state[0]
  assert int(dp_state.count[...]) == 1
  assert int(dp_state.last_num_dropped[...]) == -1  # the counts were filtered out by nnx

  # Plain optax on the hand-written pure function, same key: the same parameters.
  reference = _model()
  reference.eval()
  pure, params = _by_hand(reference)
  tx = dp_sgd(0.1, **kwargs)
  ref_sum = clipped_sum_fn(pure, 0.3, method="vmap", per_layer=per_layer)(params, batch)
  updates, _ = tx.update(ref_sum, tx.init(params), params)
  _assert_close(nnx.state(model, nnx.Param), optax.apply_updates(params, updates), rtol=1e-5)
