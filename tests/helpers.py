"""Problems and assertions shared by the test modules (one place, as optimistix's helpers).

* :func:`mlp_params` / :func:`mlp_apply`: a small tanh MLP over a pytree of parameters;
* :func:`regression_problem`: that MLP on a smooth regression target, with the model/loss
  split Newton-CG's Gauss-Newton curvature needs;
* :func:`dense_ggn`: the dense Gauss-Newton matrix of such a problem, a float64 reference;
* :func:`assert_tree_close`: leaf-by-leaf ``assert_allclose`` of two pytrees;
* :func:`spd` / :func:`with_spectrum`: dense symmetric matrices with known spectra (the tests
  of curvopt.linalg);
* :func:`split` / :func:`join`: a flat vector of size 12 as a two-leaf pytree and back.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def assert_tree_close(actual: Any, expected: Any, rtol: float = 1e-10, atol: float = 0.0):
  """``np.testing.assert_allclose`` on every pair of leaves (same structure required)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), (
    jax.tree.structure(actual),
    jax.tree.structure(expected),
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol),
    actual,
    expected,
  )


def mlp_params(key: Any, sizes: Sequence[int], dtype: Any = jnp.float64) -> list[dict]:
  """``[{"w": (m, n), "b": (n,)}, ...]`` with LeCun-normal weights and small random biases."""
  keys = jax.random.split(jax.random.key(key) if isinstance(key, int) else key, len(sizes) - 1)
  params = []
  for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True):
    kw, kb = jax.random.split(k)
    params.append(
      {
        "w": jax.random.normal(kw, (m, n), dtype) / math.sqrt(m),  # a Python float keeps dtype
        "b": 0.1 * jax.random.normal(kb, (n,), dtype),
      }
    )
  return params


def mlp_apply(params: list[dict], x: jax.Array, activation: Callable = jnp.tanh) -> jax.Array:
  """The MLP of :func:`mlp_params`: ``activation`` between layers, linear output."""
  for layer in params[:-1]:
    x = activation(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


class Regression(NamedTuple):
  """A least-squares problem ``loss_fn(model_fn(params, x), y)``."""

  params: Any
  x: jax.Array
  y: jax.Array
  model_fn: Callable
  loss_fn: Callable

  def value_fn(self, params, x=None, y=None):
    x = self.x if x is None else x
    y = self.y if y is None else y
    return self.loss_fn(self.model_fn(params, x), y)


def regression_problem(
  seed: int = 0, n: int = 32, sizes: Sequence[int] = (3, 5, 2), dtype: Any = jnp.float64
) -> Regression:
  """The MLP of :func:`mlp_params` fitted to ``(sin x0, x1 x2, ...)`` plus a little noise."""
  k_params, k_x, k_noise = jax.random.split(jax.random.key(seed), 3)
  params = mlp_params(k_params, sizes, dtype)
  x = jax.random.normal(k_x, (n, sizes[0]), dtype)
  targets = [jnp.sin(x[:, 0]), x[:, 1] * x[:, -1]]
  y = jnp.stack([targets[i % 2] for i in range(sizes[-1])], axis=1)
  y = y + 0.1 * jax.random.normal(k_noise, y.shape, dtype)
  # Newton-CG reads the data keywords off model_fn's signature: (params, x), no activation.
  model_fn = lambda params, x: mlp_apply(params, x)
  loss_fn = lambda z, y: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=-1))
  return Regression(params, x, y, model_fn, loss_fn)


def dense_ggn(params: Any, x: Any, y: Any, model_fn: Callable, loss_fn: Callable) -> np.ndarray:
  """``Jᵀ H J`` of ``loss_fn(model_fn(params, x), y)`` over the flattened parameters.

  ``J`` is the Jacobian of the outputs (``jax.jacrev``), ``H`` the Hessian of the loss in the
  outputs (``jax.hessian``). The arguments are a :class:`Regression`'s fields in order.
  """
  flat, unravel = ravel_pytree(params)
  outputs = model_fn(params, x)
  jac = jax.jacrev(lambda v: model_fn(unravel(v), x).ravel())(flat)
  h_out = jax.hessian(lambda z: loss_fn(z.reshape(outputs.shape), y))(outputs.ravel())
  return np.asarray(jac.T @ h_out @ jac)


def spd(n: int, cond: float, seed: int, dtype: Any = np.float64) -> np.ndarray:
  """A random symmetric positive-definite matrix with eigenvalues ``geomspace(1, cond, n)``."""
  return with_spectrum(np.geomspace(1.0, cond, n), seed, dtype)


def with_spectrum(eigenvalues: Any, seed: int, dtype: Any = np.float64) -> np.ndarray:
  """``Q diag(eigenvalues) Qᵀ`` for a random orthogonal ``Q``."""
  eigenvalues = np.asarray(eigenvalues, np.float64)
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(eigenvalues.size, eigenvalues.size)))
  return ((q * eigenvalues) @ q.T).astype(dtype)


def split(v: jax.Array) -> dict:
  """A flat vector of size 12 as a two-leaf pytree (tests pytree-native code)."""
  return {"w": v[:8].reshape(2, 4), "b": v[8:]}


def join(tree: dict) -> jax.Array:
  """Inverse of :func:`split`."""
  return jnp.concatenate([tree["w"].ravel(), tree["b"]])
