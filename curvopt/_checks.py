"""Argument checks shared by the public functions: clear errors that name the fix."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; expected one of {tuple(choices)}.")


def check_same_structure(
  x: Any, v: Any, x_name: str = "x", v_name: str = "v", hint: str = ""
) -> None:
  """Raises ``ValueError`` unless ``v`` has the tree structure and leaf shapes of ``x``.

  ``hint`` (a sentence) is appended to the message of a structure mismatch.
  """
  x_def, v_def = jax.tree.structure(x), jax.tree.structure(v)
  if x_def != v_def:
    raise ValueError(
      f"{v_name} must have the same pytree structure as {x_name}; got {v_def} for {v_name} "
      f"and {x_def} for {x_name}.{' ' + hint if hint else ''}"
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


class TangentDtypeError(TypeError):
  """A tangent leaf whose dtype differs from its point's; carries the leaf and both dtypes."""

  def __init__(self, message: str, path: str, v_dtype: Any, x_dtype: Any):
    super().__init__(message)
    self.path, self.v_dtype, self.x_dtype = path, v_dtype, x_dtype


def _is_weak(leaf: Any) -> bool:
  return isinstance(leaf, int | float) or bool(getattr(leaf, "weak_type", False))


def check_tangent(
  fn_name: str, x: Any, v: Any, x_name: str = "x", v_name: str = "v", hint: str = ""
) -> Any:
  """``v`` checked against the point ``x``: structure, shapes and dtypes, leaf by leaf.

  JAX's ``jvp``/``linearize`` need a tangent with exactly the point's dtypes; a mismatch
  otherwise surfaces as a raw error from deep inside the transformation. Python scalars (and
  other weakly typed leaves) in ``v`` are cast to ``x``'s dtype, as JAX would promote them.

  ``hint`` is appended to the message of a structure mismatch (see
  :func:`check_same_structure`).

  Returns:
    ``v``, with weakly typed leaves cast to ``x``'s dtypes.

  Raises:
    ValueError: for a different structure or leaf shape.
    TangentDtypeError: (a ``TypeError``) for an array leaf of another dtype, naming the leaf,
      both dtypes and the cast that fixes it.
  """
  check_same_structure(x, v, x_name, v_name, hint)

  def fix(path, x_leaf, v_leaf):
    x_dtype, v_dtype = jnp.result_type(x_leaf), jnp.result_type(v_leaf)
    if x_dtype == v_dtype:
      return v_leaf
    if _is_weak(v_leaf):
      return jnp.asarray(v_leaf, x_dtype)
    where = jax.tree_util.keystr(path)
    raise TangentDtypeError(
      f"{fn_name}: {v_name}{where} has dtype {v_dtype} but {x_name}{where} has dtype "
      f"{x_dtype}; the tangent must have the point's dtypes. Cast it: "
      f"{v_name} = jax.tree.map(lambda a, b: a.astype(b.dtype), {v_name}, {x_name}).",
      where,
      v_dtype,
      x_dtype,
    )

  return jax.tree_util.tree_map_with_path(fix, x, v)


def as_key(key: Any, name: str = "key") -> jax.Array:
  """A ``jax.random`` key from an int seed, a typed key or a raw ``uint32`` key.

  Int seeds (Python or NumPy ints, or integer scalar arrays, traced or not) become
  ``jax.random.key(seed)``; typed keys (``jax.random.key``) and raw keys
  (``jax.random.PRNGKey``: ``uint32`` of the default implementation's shape) pass unchanged.

  Raises:
    TypeError: for anything else (a float, a bool, a batch of keys), naming what to pass.
  """
  fix = f"pass a jax.random.key(seed), a raw jax.random.PRNGKey(seed) or an int seed as {name}"
  if isinstance(key, bool | np.bool_):
    raise TypeError(f"{name} must be a PRNG key or an int seed, not a bool; {fix}.")
  if isinstance(key, int | np.integer):
    return jax.random.key(key)
  if not hasattr(key, "dtype") or not hasattr(key, "shape"):
    raise TypeError(f"{name} must be a PRNG key or an int seed; got {type(key).__name__}: {fix}.")
  dtype, shape = key.dtype, tuple(key.shape)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if shape != ():
      raise TypeError(
        f"{name} must be a single key; got a batch of keys of shape {shape}. Pass one key, "
        "or vmap over the batch."
      )
    return key
  raw_shape = tuple(jax.random.key_data(jax.random.key(0)).shape)
  if dtype == jnp.uint32 and shape == raw_shape:
    return key
  if jnp.issubdtype(dtype, jnp.integer) and shape == ():
    return jax.random.key(key)
  raise TypeError(
    f"{name} must be a PRNG key or an int seed; got an array of dtype {dtype} and shape "
    f"{shape}: {fix}."
  )
