"""Test problems shared by the tests of curvopt.linalg (dense matrices with known spectra)."""

import jax.numpy as jnp
import numpy as np


def spd(n, cond, seed, dtype=np.float64):
  """A random symmetric positive-definite matrix with eigenvalues geomspace(1, cond, n)."""
  return with_spectrum(np.geomspace(1.0, cond, n), seed, dtype)


def with_spectrum(eigenvalues, seed, dtype=np.float64):
  """``Q diag(eigenvalues) Qᵀ`` for a random orthogonal ``Q``."""
  eigenvalues = np.asarray(eigenvalues, np.float64)
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(eigenvalues.size, eigenvalues.size)))
  return ((q * eigenvalues) @ q.T).astype(dtype)


def split(v):
  """A flat vector of size 12 as a two-leaf pytree (tests pytree-native code)."""
  return {"w": v[:8].reshape(2, 4), "b": v[8:]}


def join(tree):
  """Inverse of :func:`split`."""
  return jnp.concatenate([tree["w"].ravel(), tree["b"]])
