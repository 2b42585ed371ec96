"""Type aliases shared by every curvopt module, defined once so they mean the same everywhere."""

from collections.abc import Callable
from typing import Any

import jax

Params = Any
"""A pytree of arrays: the point derivatives are taken at (``params``, ``x``)."""

Batch = Any
"""A pytree of arrays sharing a leading example axis."""

PyTree = Any
"""Any pytree."""

Matvec = Callable[[Any], Any]
"""A linear operator on pytrees, ``v -> A v``."""

LossFn = Callable[[Params, Any], jax.Array]
"""``(params, example) -> scalar`` for one example."""
