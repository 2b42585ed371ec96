"""recompute_batch_stats: precise BatchNorm statistics after few (Newton-CG) steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import curvopt


class CNN(nnx.Module):
  """The README's nnx CNN: convolution, BatchNorm (momentum 0.99), ReLU, dense."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.lin = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    return self.lin(h.reshape(h.shape[0], -1))


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _digits(dtype):
  digits = load_digits()
  return jnp.asarray(digits.images[..., None] / 16.0, dtype), jnp.asarray(digits.target)


def _accuracy(model, x, y, *, train_mode):
  copy = nnx.clone(model)  # a training-mode pass would move the running averages
  copy.train() if train_mode else copy.eval()
  return float((jnp.argmax(copy(x), -1) == y).mean())


def test_statistics_are_those_of_the_layer_input_over_all_batches():
  x, _ = _digits(jnp.float32)  # flax keeps BatchNorm statistics in float32
  x = x[:100]
  model = CNN(nnx.Rngs(1))
  model.eval()
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  curvopt.recompute_batch_stats(model, [x[:37], x[37:64], x[64:]])  # unequal batches
  # Reference: numpy mean and biased variance of the BatchNorm input over all 100 images.
  h = np.asarray(model.conv(x), np.float64).reshape(-1, 8)
  np.testing.assert_allclose(model.bn.mean[...], h.mean(0), rtol=1e-5)
  np.testing.assert_allclose(model.bn.var[...], h.var(0), rtol=1e-5)
  assert model.bn.momentum == 0.99 and model.bn.use_running_average  # restored
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_a_model_without_batchnorm_and_empty_data_are_named():
  with pytest.raises(ValueError, match="no nnx.BatchNorm layer"):
    curvopt.recompute_batch_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [jnp.zeros((1, 2))])
  with pytest.raises(ValueError, match="batches is empty"):
    curvopt.recompute_batch_stats(CNN(nnx.Rngs(0)), [])


def test_eval_mode_matches_train_mode_after_newton_cg_with_recomputed_statistics():
  x, y = _digits(jnp.float32)
  x_train, y_train, x_test, y_test = x[:512], y[:512], x[1000:], y[1000:]
  model = CNN(nnx.Rngs(0))
  tx = curvopt.newton_cg(
    model_fn=lambda m, x: m(x), loss_fn=lambda out, y: _xent(out, y), module=model
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    value, grads = nnx.value_and_grad(lambda m: _xent(m(x), y))(model)
    optimizer.update(model, grads, x=x, y=y)
    return value

  for _ in range(15):
    train_step(model, optimizer, x_train, y_train)
  assert float(_xent(nnx.clone(model)(x_train), y_train)) < 1e-4  # training mode: fitted

  train_mode = _accuracy(model, x_test, y_test, train_mode=True)
  stale = _accuracy(model, x_test, y_test, train_mode=False)
  assert stale < train_mode - 0.03  # 15 steps at momentum 0.99: the averages lag behind

  model.eval()
  curvopt.recompute_batch_stats(model, [x_train[i : i + 128] for i in range(0, 512, 128)])
  precise = _accuracy(model, x_test, y_test, train_mode=False)
  assert abs(precise - train_mode) <= 0.01, (train_mode, stale, precise)
  # Over the training set the statistics are the full batch's: the same logits as training.
  np.testing.assert_allclose(
    model(x_train), _train_mode_logits(model, x_train), rtol=1e-4, atol=1e-4
  )


def _train_mode_logits(model, x):
  copy = nnx.clone(model)
  copy.train()
  return copy(x)
