"""The Hessian-free deep autoencoder (Martens 2010) on scikit-learn's 8x8 digits.

A deep sigmoid (or tanh) encoder down to a small linear code and a mirrored decoder, with
logistic outputs and the cross-entropy reconstruction loss; the curvature for Newton-CG is the
Gauss-Newton matrix of the logits under that matching loss (Schraudolph 2002), as in Martens'
paper. The reported metric is the mean squared reconstruction error per image (the number in
Martens' tables), on the training and the held-out images (``test_fraction: 0`` trains on all
1797 images and reports no test error).

References:
  Martens, "Deep learning via Hessian-free optimization", ICML 2010.
  Hinton & Salakhutdinov, "Reducing the dimensionality of data with neural networks",
  Science 2006.
"""

import enum
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax

from curvopt.launcher.tasks import Task, as_dtype, dense_init, load_sklearn, train_test_split


class Activation(enum.Enum):
  sigmoid = "sigmoid"
  tanh = "tanh"


@dataclass
class Config:
  name: str = "autoencoder"
  encoder: list[int] = field(default_factory=lambda: [64, 128, 64, 32, 6])
  activation: Activation = Activation.sigmoid
  batch_size: int | None = None
  test_fraction: float = 0.2
  split_seed: int = 0


class Autoencoder(Task):
  metric = "train_mse"
  summary_metrics = ("test_mse", "train_loss")

  def __init__(self, cfg: Config, dtype):
    super().__init__(cfg, dtype)
    x, y = load_sklearn("digits")
    x_tr, _, x_te, _ = train_test_split(x / 16.0, y, cfg.test_fraction, cfg.split_seed)
    self.train_data = as_dtype({"x": x_tr}, dtype)
    self.test_data = as_dtype({"x": x_te}, dtype) if len(x_te) else None
    if self.test_data is None:
      self.summary_metrics = ("train_loss",)
    self.activation = jax.nn.sigmoid if cfg.activation is Activation.sigmoid else jnp.tanh
    self.batch_size = cfg.batch_size
    self.sizes = list(cfg.encoder) + list(cfg.encoder[-2::-1])
    self.code_layer = len(cfg.encoder) - 2  # index of the layer producing the (linear) code

  def init_params(self, key):
    return dense_init(key, self.sizes, self.dtype)

  def model_fn(self, params, x):
    h = x
    for i, layer in enumerate(params):
      h = h @ layer["w"] + layer["b"]
      if i != self.code_layer and i != len(params) - 1:
        h = self.activation(h)
    return h  # logits of the reconstruction

  def output_loss(self, logits, x):
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()

  def loss(self, params, x):
    return self.output_loss(self.model_fn(params, x), x)

  def evaluate(self, params):
    def mse(data):
      recon = jax.nn.sigmoid(self.model_fn(params, data["x"]))
      return jnp.mean(jnp.sum((recon - data["x"]) ** 2, -1))

    metrics = {
      "train_mse": mse(self.train_data),
      "train_loss": self.loss(params, **self.train_data),
    }
    if self.test_data is not None:
      metrics["test_mse"] = mse(self.test_data)
    return metrics


def build(cfg: Config, dtype) -> Autoencoder:
  return Autoencoder(cfg, dtype)
