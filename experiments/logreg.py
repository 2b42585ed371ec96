"""Convex multinomial logistic regression on scikit-learn's bundled digits / breast-cancer data.

The objective is the mean cross-entropy plus ``l2/2 ||W||²``. For Newton-CG's Gauss-Newton
curvature the model returns the logits *and* the weights, and the loss adds the penalty on the
latter, so the GGN includes the regulariser exactly (for this model the GGN is the Hessian).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from curvopt.launcher.tasks import Task, as_dtype, load_sklearn, standardize, train_test_split


@dataclass
class Config:
  name: str = "logreg"
  dataset: str = "digits"
  l2: float = 1e-3
  test_fraction: float = 0.2
  split_seed: int = 0
  batch_size: int | None = None


class LogReg(Task):
  metric = "train_loss"
  summary_metrics = ("test_accuracy", "grad_norm")

  def __init__(self, cfg: Config, dtype):
    super().__init__(cfg, dtype)
    x, y = load_sklearn(cfg.dataset)
    x_tr, y_tr, x_te, y_te = train_test_split(x, y, cfg.test_fraction, cfg.split_seed)
    x_tr, x_te = standardize(x_tr, x_te)
    self.num_classes = int(y.max()) + 1
    self.train_data = as_dtype({"x": x_tr, "y": y_tr}, dtype)
    self.test_data = as_dtype({"x": x_te, "y": y_te}, dtype)
    self.batch_size = cfg.batch_size

  def init_params(self, key):
    del key  # convex: start at zero, the same point for every optimiser
    d = self.train_data["x"].shape[1]
    return {
      "w": jnp.zeros((d, self.num_classes), self.dtype),
      "b": jnp.zeros((self.num_classes,), self.dtype),
    }

  def model_fn(self, params, x):
    return {"logits": x @ params["w"] + params["b"], "w": params["w"]}

  def output_loss(self, outputs, y):
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], y).mean()
    return ce + 0.5 * self.cfg.l2 * jnp.sum(outputs["w"] ** 2)

  def loss(self, params, x, y):
    return self.output_loss(self.model_fn(params, x), y)

  def evaluate(self, params):
    def stats(data):
      logits = data["x"] @ params["w"] + params["b"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean()
      return ce, jnp.mean(jnp.argmax(logits, -1) == data["y"])

    test_loss, test_acc = stats(self.test_data)
    return {
      "train_loss": self.loss(params, **self.train_data),
      "test_loss": test_loss,
      "test_accuracy": test_acc,
      "grad_norm": optax.tree.norm(jax.grad(self.loss)(params, **self.train_data)),
    }


def build(cfg: Config, dtype) -> LogReg:
  return LogReg(cfg, dtype)
