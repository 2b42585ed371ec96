r"""The sensitivity of the clipped sum is the clip norm DP-SGD's noise is calibrated to (issue 23).

For every clipping mode (global, per-layer uniform, per-layer by size) and every way of computing
the clipped sum (``vmap``, ``vmap`` in chunks, ghost, and ``dp_aggregate`` fed per-example
gradients), the largest change of the sum when one example is added to a batch,
:math:`\max_{x'} \|S(D \cup \{x'\}) - S(D)\|`, is measured over adversarial examples and must
equal the clip norm :math:`C` that ``dp_aggregate`` accepts for that sum, never more: the
add-or-remove sensitivity that ``privacy.epsilon`` assumes. The adversarial examples are built
to saturate the bound (a huge residual makes every layer's gradient exceed its share
:math:`C_k`) or to miss it (a zero input leaves the first weight matrix without gradient).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mlp_apply, mlp_params

from curvopt import clipped_sum_fn, dp_aggregate, per_example_grads

SIZES = (3, 4, 2)
CLIP = 0.7
N = 5


def loss_fn(params, example):
  return 0.5 * jnp.sum(jnp.square(mlp_apply(params, example["x"]) - example["y"]))


def base_batch():
  kx, ky = jax.random.split(jax.random.key(4))
  return {
    "x": jax.random.normal(kx, (N, 3), jnp.float64),
    "y": jax.random.normal(ky, (N, 2), jnp.float64),
  }


def adversaries(batch):
  """Candidate added examples: saturating ones and ones that leave a layer below its share."""
  k1, k2 = jax.random.split(jax.random.key(5))
  x = jax.random.normal(k1, (3,), jnp.float64)
  return [
    {"x": x, "y": jnp.array([1e6, -1e6])},  # every leaf far above its clip
    {"x": batch["x"][2], "y": batch["y"][2] + 1e5},  # a duplicate of a member, huge residual
    {"x": jnp.zeros(3), "y": jnp.array([-1e6, 3e5])},  # no gradient on the first weights
    {"x": 1e3 * jax.random.normal(k2, (3,), jnp.float64), "y": jnp.full(2, 1e4)},  # tanh flat
    {"x": x, "y": mlp_apply(PARAMS, x) + 1e-3},  # a small gradient, far below the clip
  ]


PARAMS = mlp_params(0, SIZES, jnp.float64)


def sum_fn(method, per_layer):
  """``(params, batch) -> clipped sum`` by one method; ``dp`` is dp_aggregate's own clipping."""
  if method == "dp":
    tx = dp_aggregate(CLIP, 0.0, 0, expected_batch_size=1, per_layer=per_layer)
    return jax.jit(lambda p, b: tx.update(per_example_grads(loss_fn, p, b), tx.init(p), p)[0])
  chunk_size = 2 if method == "chunked" else None
  fn = clipped_sum_fn(
    loss_fn,
    CLIP,
    method="ghost" if method == "ghost" else "vmap",
    per_layer=per_layer,
    chunk_size=chunk_size,
  )
  tx = dp_aggregate(CLIP, 1.0, 0, per_layer=per_layer)

  def checked(p, b):
    result = fn(p, b)
    tx.update(result, tx.init(p), p)  # the noise's clip accepts this sum (else: ValueError)
    return result.sum

  return jax.jit(checked)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("per_layer", [False, "uniform", "size"])
@pytest.mark.parametrize("method", ["vmap", "chunked", "ghost", "dp"])
def test_add_one_sensitivity_equals_the_calibrated_clip(method, per_layer):
  batch = base_batch()
  fn = sum_fn(method, per_layer)
  without = flat(fn(PARAMS, batch))
  changes = []
  for extra in adversaries(batch):
    bigger = jax.tree.map(lambda b, e: jnp.concatenate([b, e[None]]), batch, extra)
    changes.append(np.linalg.norm(flat(fn(PARAMS, bigger)) - without))
  changes = np.array(changes)
  assert np.all(changes <= CLIP * (1 + 1e-12)), changes  # never above the calibrated clip
  np.testing.assert_allclose(changes.max(), CLIP, rtol=1e-10)  # and attained
  if per_layer:  # per-layer: an example without gradient on one leaf stays below C
    assert changes[2] < CLIP * (1 - 1e-3)
  else:  # global: any example with a gradient norm above C moves the sum by exactly C
    np.testing.assert_allclose(changes[:4], CLIP, rtol=1e-10)
  assert changes[4] < 0.1 * CLIP


def test_noise_of_a_clipped_sum_has_the_recorded_clip_times_sigma():
  """The ClippedSum path draws N(0, σ²C²) on the sum, C being the clip the sum records."""
  n, sigma, clip = 20_000, 1.5, 2.0
  fn = clipped_sum_fn(lambda w, x: w @ x, clip, per_layer="size")
  zeros = fn(jnp.zeros(n, jnp.float32), jnp.zeros((3, n), jnp.float32))
  tx = dp_aggregate(clip, sigma, jax.random.key(1), expected_batch_size=1, per_layer="size")
  out, _ = jax.jit(tx.update)(zeros, tx.init(None))
  # the sample std of n Gaussians has relative standard error 1/sqrt(2n): allow 6 of them
  np.testing.assert_allclose(float(jnp.std(out)), sigma * clip, rtol=6 / np.sqrt(2 * n))
