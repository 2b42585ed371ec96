"""Digits classification with a small MLP or CNN (scikit-learn's bundled 8x8 digits).

Mini-batches are drawn without replacement from the seed and the step, so every optimiser and
every resumed run sees the same data order. For Newton-CG's Gauss-Newton curvature the model
returns the logits and the loss is the softmax cross-entropy (Schraudolph 2002's matching
loss); with ``l2 > 0`` the weights are returned too, so the penalty enters the GGN exactly.
Also the task of the DP-SGD comparison (``configs/dp_sgd_digits.yaml``).
"""

import enum
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt.launcher.tasks import (
  Task,
  as_dtype,
  dense_init,
  load_sklearn,
  mlp_apply,
  standardize,
  train_test_split,
)


class Model(enum.Enum):
  mlp = "mlp"
  cnn = "cnn"


class Activation(enum.Enum):
  tanh = "tanh"
  relu = "relu"


@dataclass
class Config:
  name: str = "classification"
  model: Model = Model.mlp
  hidden: list[int] = field(default_factory=lambda: [64, 64])
  channels: list[int] = field(default_factory=lambda: [8, 16])
  activation: Activation = Activation.tanh
  l2: float = 0.0
  batch_size: int | None = 128
  test_fraction: float = 0.2
  split_seed: int = 0


def _conv(x, w, b):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + b


def _avg_pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


class Classification(Task):
  metric = "test_accuracy"
  higher_is_better = True
  summary_metrics = ("test_loss", "train_loss")

  def __init__(self, cfg: Config, dtype):
    super().__init__(cfg, dtype)
    x, y = load_sklearn("digits")
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, cfg.test_fraction, cfg.split_seed)
    if cfg.model is Model.cnn:  # images in [0, 1], NHWC
      x_tr, x_te = x_tr.reshape(-1, 8, 8, 1) / 16.0, x_te.reshape(-1, 8, 8, 1) / 16.0
    else:
      x_tr, x_te = standardize(x_tr, x_te)
    self.train_data = as_dtype({"x": x_tr, "y": y_tr}, dtype)
    self.test_data = as_dtype({"x": x_te, "y": y_te}, dtype)
    self.batch_size = cfg.batch_size
    self.act = jnp.tanh if cfg.activation is Activation.tanh else jax.nn.relu

  def init_params(self, key):
    cfg = self.cfg
    if cfg.model is Model.mlp:
      return dense_init(key, [64, *cfg.hidden, 10], self.dtype)
    keys = jax.random.split(key, len(cfg.channels) + 1)
    convs, c_in = [], 1
    for k, c in zip(keys[:-1], cfg.channels, strict=True):
      std = float(np.sqrt(2.0 / (9 * c_in)))  # a Python float keeps the params' dtype
      convs.append(
        {
          "w": std * jax.random.normal(k, (3, 3, c_in, c), self.dtype),
          "b": jnp.zeros((c,), self.dtype),
        }
      )
      c_in = c
    side = 8 // 2 ** len(cfg.channels)
    return {"conv": convs, "dense": dense_init(keys[-1], [side * side * c_in, 10], self.dtype)}

  def logits(self, params, x):
    if self.cfg.model is Model.mlp:
      return mlp_apply(params, x, self.act)
    for layer in params["conv"]:
      x = _avg_pool(self.act(_conv(x, layer["w"], layer["b"])))
    return mlp_apply(params["dense"], x.reshape(x.shape[0], -1))

  def model_fn(self, params, x):
    out = {"logits": self.logits(params, x)}
    if self.cfg.l2:
      out["params"] = params
    return out

  def output_loss(self, outputs, y):
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], y).mean()
    if self.cfg.l2:
      loss += 0.5 * self.cfg.l2 * optax.tree.norm(outputs["params"], squared=True)
    return loss

  def loss(self, params, x, y):
    return self.output_loss(self.model_fn(params, x), y)

  def evaluate(self, params):
    def stats(data):
      logits = self.logits(params, data["x"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean()
      return ce, jnp.mean(jnp.argmax(logits, -1) == data["y"])

    train_loss, train_acc = stats(self.train_data)
    test_loss, test_acc = stats(self.test_data)
    return {
      "train_loss": train_loss,
      "train_accuracy": train_acc,
      "test_loss": test_loss,
      "test_accuracy": test_acc,
    }


def build(cfg: Config, dtype) -> Classification:
  return Classification(cfg, dtype)
