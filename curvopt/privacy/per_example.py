r"""Per-example gradients :math:`g_i = \nabla_\theta \ell(\theta, x_i)` by ``vmap(grad)``.

The building block of per-example clipping (:mod:`curvopt.privacy.clipping`) and DP-SGD
(:mod:`curvopt.privacy.dp_sgd`); also useful on its own (gradient noise, influence, the
empirical Fisher).
"""

from typing import Any

import jax
import jax.numpy as jnp

from curvopt import _checks, _nnx
from curvopt._typing import Batch, LossFn, Params


def per_example_grads(
  loss_fn: LossFn, params: Params, batch: Batch, *, chunk_size: int | None = None
) -> Params:
  r"""Gradients :math:`g_i = \nabla_\theta \ell(\theta, x_i)` of every example of a batch.

  ``vmap(grad(loss_fn), in_axes=(None, 0))``: each leaf of the result has ``params``' leaf
  shape with a leading example axis. With ``chunk_size``, the batch is processed ``chunk_size``
  examples at a time by :func:`jax.lax.map` (a sequential loop over vmapped chunks, the last
  one possibly smaller), so the intermediate activations stay bounded; the result is the same.
  Wrap the call in :func:`jax.jit` for speed.

  Args:
    loss_fn: ``(params, example) -> scalar`` for ONE example (``example`` is ``batch`` without
      its leading axis).
    params: any pytree of arrays, or a flax ``nnx.Module`` (then ``loss_fn(module, example)``
      and the gradients are taken with respect to its ``nnx.Param`` state; other state such as
      BatchNorm statistics and RNG counts is held constant).
    batch: pytree of arrays sharing a leading example axis of size ``B``.
    chunk_size: optional number of examples processed at once.

  Returns:
    A pytree with ``params``' structure, leaves of shape ``(B, *leaf.shape)`` (an ``nnx.State``
    of the Module's parameters for a Module).

  Raises:
    ValueError: if the leaves of ``batch`` disagree on the leading axis, ``loss_fn`` does not
      return one scalar per example, or ``chunk_size < 1``.

  Examples:
    For :math:`\ell(w, x) = \tfrac12 (w \cdot x)^2` the gradient is :math:`(w \cdot x)\, x`.

    >>> X = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> per_example_grads(lambda w, x: 0.5 * (w @ x) ** 2, jnp.ones(2), X).tolist()
    [[1.0, 0.0], [3.0, 6.0]]
  """
  _checks.batch_size(batch)
  loss_fn, params = _nnx.pure(loss_fn, params)
  check_scalar_loss(loss_fn, params, batch)
  grad_fn = jax.grad(loss_fn)
  if chunk_size is None:
    return jax.vmap(grad_fn, in_axes=(None, 0))(params, batch)
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}.")
  return jax.lax.map(lambda x: grad_fn(params, x), batch, batch_size=int(chunk_size))


def check_scalar_loss(loss_fn: LossFn, params: Params, batch: Batch) -> None:
  """``ValueError`` unless ``loss_fn(params, example)`` is one real scalar (checked by shape)."""
  example = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batch
  )
  out: Any = jax.eval_shape(loss_fn, params, example)
  leaves = jax.tree.leaves(out)
  if len(leaves) != 1 or leaves[0].shape != ():
    shapes = jax.tree.map(lambda s: s.shape, out)
    raise ValueError(
      f"loss_fn must return one scalar per example; it returned shape {shapes}. loss_fn(params, "
      "example) sees ONE example (no batch axis): reduce its output (e.g. .sum() or .mean()) over "
      "the example's own axes."
    )
