"""Direct support for flax nnx Modules, without importing flax unless a Module is passed.

curvopt's functions differentiate pure functions of a pytree. An nnx user has a stateful
``Module`` whose parameters (``nnx.Param``) are what to differentiate, while other state
(BatchNorm statistics, Dropout RNG counts, integer counters) must ride along untouched. The
helpers here turn ``(f, module)`` into ``(f_pure, params)`` with ``params`` the Module's ``wrt``
state (``nnx.Param`` by default) and ``f_pure(params) = f(merge(params))``; everything else is
captured as constants. Results shaped like ``params`` come back as ``nnx.State`` objects, which
``nnx.update(module, state)`` and ``nnx.Optimizer`` understand.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Any


def is_module(x: Any) -> bool:
  """Whether ``x`` is a flax nnx ``Module`` (``False`` when flax was never imported)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Module)


def is_state(x: Any) -> bool:
  """Whether ``x`` is a flax nnx ``State`` (``False`` when flax was never imported)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.State)


def split(module: Any, wrt: Any = None) -> tuple[Any, Callable[[Any], Any]]:
  """``(params, merge)``: the Module's ``wrt`` state and ``params -> Module`` rebuilding it.

  Args:
    module: an ``nnx.Module``.
    wrt: an nnx filter selecting the differentiated state; ``None`` means ``nnx.Param``.

  Returns:
    ``params`` (an ``nnx.State``) and ``merge(params) -> Module``, a pure function that builds
    a new Module from the graph definition, ``params`` and the rest of the state.
  """
  from flax import nnx  # noqa: PLC0415 (flax is optional: imported only for Modules)

  graphdef, params, rest = nnx.split(module, nnx.Param if wrt is None else wrt, ...)
  # Fresh Variables at every call: a Module that updates its own state (BatchNorm statistics in
  # training mode) may then mutate them inside a trace; the updates are discarded.
  return params, lambda p: nnx.merge(graphdef, p, rest, copy=True)


def pure(f: Callable[..., Any], x: Any, wrt: Any = None) -> tuple[Callable[..., Any], Any]:
  """``(f, x)`` unchanged for pytrees; ``(p, *a) -> f(merge(p), *a)`` and the params for Modules.

  Args:
    f: a function whose first argument is ``x``.
    x: a pytree, or an ``nnx.Module``.
    wrt: the nnx filter of the differentiated state (Modules only; default ``nnx.Param``).

  Returns:
    ``(f_pure, params)`` with ``f_pure(params, *args, **kwargs) == f(x, *args, **kwargs)``.

  Raises:
    TypeError: if ``wrt`` is given for an argument that is not an nnx Module.
  """
  if not is_module(x):
    if wrt is not None:
      raise TypeError(
        f"wrt= selects the differentiated state of an nnx.Module, but got a "
        f"{type(x).__name__}; drop wrt= for plain pytrees."
      )
    return f, x
  params, merge = split(x, wrt)
  return (lambda p, *args, **kwargs: f(merge(p), *args, **kwargs)), params


def state(x: Any, wrt: Any = None) -> Any:
  """The ``wrt`` state (``nnx.Param`` by default) of a Module; anything else unchanged.

  This is the space :func:`pure` differentiates in, so a Module can stand for the point (or
  for ``like`` in the estimators) wherever a pytree shaped like the params is expected.
  """
  if not is_module(x):
    return x
  from flax import nnx  # noqa: PLC0415 (flax is optional: imported only for Modules)

  return nnx.state(x, nnx.Param if wrt is None else wrt)


def pure_argnums(
  f: Callable[..., Any], args: tuple[Any, ...], argnums: int | Sequence[int], wrt: Any = None
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """Like :func:`pure` for the Modules among ``args[argnums]`` (as ``jax.grad``'s argnums).

  Returns:
    ``(f_pure, args)`` where each Module at a position in ``argnums`` is replaced by its
    ``wrt`` state, and ``f_pure`` merges it back before calling ``f``; ``(f, args)`` unchanged
    when there is no such Module.

  Raises:
    TypeError: if ``wrt`` is given but no differentiated argument is an nnx Module.
  """
  positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  merges = {}
  args = list(args)
  for i in positions:
    if is_module(args[i]):
      args[i], merges[i] = split(args[i], wrt)
  if not merges:
    if wrt is not None:
      raise TypeError(
        "wrt= selects the differentiated state of an nnx.Module, but no differentiated "
        "argument is a Module; drop wrt= for plain pytrees."
      )
    return f, tuple(args)

  def f_pure(*a, **kwargs):
    a = [merges[i](v) if i in merges else v for i, v in enumerate(a)]
    return f(*a, **kwargs)

  return f_pure, tuple(args)
