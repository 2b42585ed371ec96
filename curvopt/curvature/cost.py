"""The floating-point cost of a function, from XLA's cost analysis, for choosing a solver."""

from collections.abc import Callable
from typing import Any

import jax


def flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float | None:
  """Floating-point operations of ``fn(*args, **kwargs)``, or ``None`` if XLA cannot say.

  The function is lowered (traced, not compiled) on abstract arguments with the shapes and
  dtypes of the given ones, which may themselves be tracers, and XLA's HLO cost analysis
  counts its operations.

  Examples:
    >>> flops(lambda a, b: a @ b, jnp.ones((4, 3)), jnp.ones((3, 2)))
    48.0
  """
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a)), (args, kwargs)
  )
  try:
    analysis = jax.jit(lambda a, k: fn(*a, **k)).lower(*abstract).cost_analysis()
  except (NotImplementedError, RuntimeError, TypeError, ValueError):
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  value = None if analysis is None else analysis.get("flops")
  return None if value is None else float(value)
