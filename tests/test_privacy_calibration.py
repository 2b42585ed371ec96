"""DP-SGD noise cannot be calibrated to another clip than the one applied (issue 23).

Each test here is a way to feed ``dp_sgd`` whose noise, on the code before issue 23, did not
follow the clip actually applied (or a nonsense constant that was accepted, issue 24); each
asserts that the call is now refused with a named error before any noise is drawn, or that the
noise now follows the applied clip. The well-formed calls beside them are checked to pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import mlp_apply, mlp_params

from curvopt import clipped_sum_fn, dp_aggregate, dp_sgd, per_example_grads, privacy

SIZES = (3, 4, 2)
B = 6


def loss_fn(params, example):
  return 0.5 * jnp.sum(jnp.square(mlp_apply(params, example["x"]) - example["y"]))


def make_batch(size=B, dtype=jnp.float64):
  kx, ky = jax.random.split(jax.random.key(0))
  return {
    "x": 3.0 * jax.random.normal(kx, (size, 3), dtype),
    "y": jax.random.normal(ky, (size, 2), dtype),
  }


PARAMS = mlp_params(0, SIZES, jnp.float64)


def opt_of(clip=1.0, **kwargs):
  kwargs = {"noise_multiplier": 1.0, "key": 0, "expected_batch_size": B, **kwargs}
  return dp_sgd(0.1, l2_norm_clip=clip, **kwargs)


def test_clip_mismatch_is_refused_eagerly_and_under_jit():
  clipped = clipped_sum_fn(loss_fn, 10.0)(PARAMS, make_batch())
  opt = opt_of(1.0)
  state = opt.init(PARAMS)
  with pytest.raises(ValueError, match=r"l2_norm_clip=1\.0\) got a ClippedSum clipped at 10\.0"):
    opt.update(clipped, state, PARAMS)
  with pytest.raises(ValueError, match="clipped at 10.0"):  # an eager ClippedSum into jit
    jax.jit(opt.update)(clipped, state, PARAMS)

  @jax.jit
  def step(params, batch, state):  # built and consumed inside one jitted step
    return opt.update(clipped_sum_fn(loss_fn, 10.0)(params, batch), state, params)

  with pytest.raises(ValueError, match="clipped at 10.0"):
    step(PARAMS, make_batch(), state)
  # the same clip passes, eagerly and under jit
  same = clipped_sum_fn(loss_fn, 1.0)(PARAMS, make_batch())
  eager, _ = opt.update(same, state, PARAMS)
  jitted, _ = jax.jit(opt.update)(same, state, PARAMS)
  np.testing.assert_allclose(jax.tree.leaves(eager)[0], jax.tree.leaves(jitted)[0], rtol=1e-6)


def test_a_traced_clip_cannot_pass_silently():
  batch = make_batch()
  opt = opt_of(1.0)

  @jax.jit
  def traced_sum_clip(params, batch, clip, state):
    return opt.update(clipped_sum_fn(loss_fn, clip)(params, batch), state, params)

  with pytest.raises(ValueError, match="traced l2_norm_clip"):
    traced_sum_clip(PARAMS, batch, 10.0, opt.init(PARAMS))
  # dp_sgd's own clip traced (optax.inject_hyperparams) against a ClippedSum
  injected = optax.inject_hyperparams(dp_sgd, static_args=("key",))(
    learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=0, expected_batch_size=B
  )
  clipped = clipped_sum_fn(loss_fn, 10.0)(PARAMS, batch)
  with pytest.raises(ValueError, match="dp_sgd's l2_norm_clip is a traced value"):
    jax.jit(injected.update)(clipped, injected.init(PARAMS), PARAMS)
  # per-example gradients: dp_sgd applies its (traced) clip itself, so it is the noise's clip
  grads = per_example_grads(loss_fn, PARAMS, batch)
  jax.jit(injected.update)(grads, injected.init(PARAMS), PARAMS)


def test_clipping_mode_mismatch_is_refused():
  batch = make_batch()
  for built, used in [("size", False), (False, "uniform"), ("uniform", "size")]:
    clipped = clipped_sum_fn(loss_fn, 1.0, per_layer=built)(PARAMS, batch)
    opt = opt_of(1.0, per_layer=used)
    with pytest.raises(ValueError, match="clipping; build both with the same per_layer"):
      opt.update(clipped, opt.init(PARAMS), PARAMS)
  # True and "uniform" are the same split
  clipped = clipped_sum_fn(loss_fn, 1.0, per_layer=True)(PARAMS, batch)
  opt = opt_of(1.0, per_layer="uniform")
  opt.update(clipped, opt.init(PARAMS), PARAMS)


def test_a_clipped_sum_without_its_record_is_refused():
  """A ClippedSum built by hand (or forged from a sum clipped elsewhere) has no clip record."""
  from curvopt import ClippedSum

  clipped = clipped_sum_fn(loss_fn, 10.0)(PARAMS, make_batch())
  by_hand = ClippedSum(*clipped[:5])
  opt = opt_of(1.0)
  with pytest.raises(ValueError, match="does not record the clip"):
    opt.update(by_hand, opt.init(PARAMS), PARAMS)


def test_is_padding_with_a_clipped_sum_built_without_it_is_refused():
  """poisson_sample pads with copies of example 0: clipped as real, example 0 counts 3 times."""
  sample = privacy.PoissonBatch(
    jnp.array([2, 4, 5, 0, 0, 0]), jnp.array([False, False, False, True, True, True]), 0
  )
  batch = jax.tree.map(lambda x: x[sample.indices], make_batch())
  opt = opt_of(1.0, expected_batch_size=3)
  state = opt.init(PARAMS)
  unmasked = clipped_sum_fn(loss_fn, 1.0)(PARAMS, batch)
  with pytest.raises(ValueError, match="built without it"):
    opt.update(unmasked, state, PARAMS, is_padding=sample.is_padding)
  masked = clipped_sum_fn(loss_fn, 1.0)(PARAMS, batch, sample.is_padding)
  opt.update(masked, state, PARAMS, is_padding=sample.is_padding)  # the same mask: accepted
  with pytest.raises(ValueError, match=r"is_padding has shape \(4,\)"):
    opt.update(masked, state, PARAMS, is_padding=sample.is_padding[:4])


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def _nnx_loss(model, example):
  return 0.5 * jnp.sum(jnp.square(model(example["x"]) - example["y"]))


@pytest.mark.parametrize("per_layer", [False, "size"])
def test_mismatch_is_refused_through_nnx_optimizer(per_layer):
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, opt_of(1.0, per_layer=per_layer), wrt=nnx.Param)
  batch = make_batch(dtype=jnp.float32)

  @nnx.jit(static_argnums=3)
  def step(model, optimizer, batch, clip):
    optimizer.update(model, clipped_sum_fn(_nnx_loss, clip, per_layer=per_layer)(model, batch))

  with pytest.raises(ValueError, match="clipped at 10.0"):
    step(model, optimizer, batch, 10.0)
  params = lambda: nnx.as_pure(nnx.state(model, nnx.Param))
  before = params()
  step(model, optimizer, batch, 1.0)
  assert int(optimizer.opt_state[0].count[...]) == 1
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, params())
  assert all(jax.tree.leaves(moved))


def test_nnx_global_clipping_divides_by_the_recorded_batch_size():
  """The record keeps the batch size that nnx's filter dropped with the norms."""
  model = _MLP(nnx.Rngs(0))
  batch = make_batch(dtype=jnp.float32)
  tx = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=3)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  clipped = clipped_sum_fn(_nnx_loss, 1.0)(model, batch)
  params = nnx.state(model, nnx.Param)
  expected, _ = tx.update(per_example_grads(_nnx_loss, model, batch), tx.init(params), params)
  updates = optimizer.update(model, clipped)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(learning_rate=-0.5), "learning_rate must be > 0 and finite"),
    (dict(learning_rate=0.0), "learning_rate must be > 0 and finite"),
    (dict(learning_rate=float("nan")), "learning_rate must be > 0 and finite"),
    (dict(l2_norm_clip=float("inf")), "l2_norm_clip must be > 0 and finite"),
    (dict(l2_norm_clip=0.0), "l2_norm_clip must be > 0 and finite"),
    (dict(l2_norm_clip=jnp.ones(2)), "l2_norm_clip must be one number"),
    (dict(noise_multiplier=float("inf")), "noise_multiplier must be >= 0 and finite"),
    (dict(expected_batch_size=float("inf")), "expected_batch_size must be"),
    (dict(expected_batch_size=True), "expected_batch_size must be"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(momentum=-0.9), r"momentum must be in \[0, 1\)"),
    (dict(nesterov=True), "nesterov=True needs momentum"),
  ],
)
def test_nonsense_constants_are_refused(kwargs, message):
  args = dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=0)
  with pytest.raises(ValueError, match=message):
    dp_sgd(**{**args, **kwargs})


def test_schedules_and_traced_learning_rates_still_pass():
  dp_sgd(optax.linear_schedule(0.1, 0.0, 10), l2_norm_clip=1.0, noise_multiplier=1.0, key=0)
  tx = optax.inject_hyperparams(dp_sgd, static_args=("key", "l2_norm_clip"))(
    learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=0
  )
  grads = per_example_grads(loss_fn, PARAMS, make_batch())
  jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
  dp_aggregate(1.0, 0.0, 0)  # no noise is a valid (non-private) setting
