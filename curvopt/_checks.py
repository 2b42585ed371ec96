"""Argument checks shared by the public functions: clear errors that name the fix."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; expected one of {tuple(choices)}.")


def check_same_structure(x: Any, v: Any, x_name: str = "x", v_name: str = "v") -> None:
  """Raises ``ValueError`` unless ``v`` has the tree structure and leaf shapes of ``x``."""
  x_def, v_def = jax.tree.structure(x), jax.tree.structure(v)
  if x_def != v_def:
    raise ValueError(
      f"{v_name} must have the same pytree structure as {x_name}; got {v_def} for {v_name} "
      f"and {x_def} for {x_name}."
    )
  for path_and_x, v_leaf in zip(
    jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(v), strict=True
  ):
    path, x_leaf = path_and_x
    if jax.numpy.shape(x_leaf) != jax.numpy.shape(v_leaf):
      raise ValueError(
        f"{v_name}{jax.tree_util.keystr(path)} has shape {jax.numpy.shape(v_leaf)} but "
        f"{x_name}{jax.tree_util.keystr(path)} has shape {jax.numpy.shape(x_leaf)}; "
        f"{v_name} must match {x_name} leaf by leaf."
      )


def check_scalar_output(f_name: str, out_shape: Any) -> None:
  """Raises ``ValueError`` unless ``out_shape`` (from ``jax.eval_shape``) is one scalar."""
  leaves = jax.tree.leaves(out_shape)
  if len(leaves) != 1 or leaves[0].shape != ():
    shapes = jax.tree.map(lambda s: s.shape, out_shape)
    raise ValueError(
      f"{f_name} needs a function with one scalar output; it returned shapes {shapes}. "
      "Reduce the output to a scalar (e.g. .sum() or .mean()) first."
    )


def batch_size(batch: Any, name: str = "batch") -> int:
  """The common leading-axis size of ``batch``'s leaves; ``ValueError`` if they disagree."""
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError(f"{name} has no array leaves; pass a pytree of arrays with an example axis.")
  sizes = {}
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} is a scalar; every leaf of {name} needs a leading "
        "example axis."
      )
    sizes[jax.tree_util.keystr(path)] = shape[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(
      f"The leaves of {name} disagree on the leading (example) axis: {sizes}. Every leaf must "
      "have the same number of examples along axis 0."
    )
  return next(iter(sizes.values()))


def check_nonnegative(name: str, value: Any) -> None:
  """``ValueError`` for a concrete negative (or NaN) ``value``; traced values pass."""
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if not v >= 0.0:
    raise ValueError(f"{name} must be >= 0; got {value!r}.")
