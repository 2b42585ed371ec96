r"""The objective an optimiser minimises, and how ``update``'s data reach it.

curvopt's optimisers follow optax's extra-arguments convention:
``update(grads, state, params, *, value=None, grad=None, value_fn=None, **data)``. The data
keyword arguments are routed, by the parameter names their signatures declare, to
``value_fn(params, **data) -> loss`` or to the model/loss split ``model_fn(params, **data) ->
outputs`` and ``loss_fn(outputs, **data) -> loss`` given at construction, exactly as optax's
line searches route them. A :class:`Problem` holds that split and checks each ``update``
call before any user function runs, so that the likely mistakes (data forgotten, passed
positionally, of different lengths; an nnx Module without ``module=``; integer parameters)
get an error that names the problem and the fix, not a traceback from inside JAX.
"""

import inspect
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvopt import _nnx
from curvopt._typing import Params

__all__ = ["Problem", "arg_names", "route", "value_fn_from_model"]


def arg_names(fn: Callable) -> list[str]:
  """Names ``fn`` accepts as keywords, excluding ``*args``/``**kwargs`` (optax's rule)."""
  return [
    name
    for name, p in inspect.signature(fn).parameters.items()
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
  ]


def _required_names(fn: Callable) -> list[str]:
  """Data names ``fn`` needs: its keyword-able parameters after the first, without default."""
  params = list(inspect.signature(fn).parameters.values())[1:]
  return [
    p.name
    for p in params
    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
  ]


def route(fn: Callable, data: dict) -> dict:
  """The data keyword arguments that ``fn``'s signature names, as optax's line searches do."""
  names = arg_names(fn)
  return {k: v for k, v in data.items() if k in names}


def value_fn_from_model(
  model_fn: Callable[..., Any], loss_fn: Callable[..., jax.Array]
) -> Callable[..., jax.Array]:
  """Returns ``value_fn(params, **data) = loss_fn(model_fn(params, ...), ...)``.

  The returned function's signature names exactly the data arguments of ``model_fn`` and
  ``loss_fn`` (after their first argument), so optax's line searches, which pass only the
  keyword arguments a ``value_fn`` declares, route the mini-batch to it correctly.

  Args:
    model_fn: ``model_fn(params, **data) -> outputs``.
    loss_fn: ``loss_fn(outputs, **data) -> scalar``.

  Returns:
    The composed objective with an explicit signature ``(params, *, <data names>)``.

  Examples:
    >>> f = value_fn_from_model(lambda w, x: x @ w, lambda z, y: ((z - y) ** 2).sum())
    >>> str(inspect.signature(f))
    '(params, *, x, y)'
    >>> float(f(jnp.ones(2), x=jnp.eye(2), y=jnp.zeros(2)))
    2.0
  """
  names = list(dict.fromkeys(arg_names(model_fn)[1:] + arg_names(loss_fn)[1:]))

  def value_fn(params, **data):
    outputs = model_fn(params, **route(model_fn, data))
    return loss_fn(outputs, **route(loss_fn, data))

  value_fn.__signature__ = inspect.Signature(
    [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
  )
  return value_fn


def module_model_fn(model_fn: Callable[..., Any], module: Any) -> Callable[..., Any]:
  """``(params, **data) -> model_fn(module rebuilt from params, **data)``, same data names."""
  _, merge = _nnx.split(module)

  def pure_model_fn(params, **data):
    return model_fn(merge(params), **data)

  pure_model_fn.__signature__ = inspect.signature(model_fn)
  return pure_model_fn


class Problem(NamedTuple):
  """The model/loss split given at construction (either may be ``None``) and its checks.

  Attributes:
    name: the optimiser's name, for messages (``"newton_cg"``).
    model_fn: ``model_fn(params, **data) -> outputs`` (pure: a Module already split).
    loss_fn: ``loss_fn(outputs, **data) -> loss``.
    module: the flax ``nnx.Module`` given as ``module=``, or ``None``.
  """

  name: str
  model_fn: Callable[..., Any] | None
  loss_fn: Callable[..., jax.Array] | None
  module: Any = None

  @classmethod
  def build(cls, name: str, model_fn, loss_fn, module) -> "Problem":
    """Checks the construction arguments and wraps ``model_fn`` for a Module."""
    if (model_fn is None) != (loss_fn is None):
      raise ValueError(f"{name}: pass model_fn and loss_fn together (or neither).")
    for fn_name, fn in (("model_fn", model_fn), ("loss_fn", loss_fn)):
      if fn is not None and not callable(fn):
        raise TypeError(f"{name}: {fn_name} must be callable; got {type(fn).__name__}.")
    if module is not None:
      if not _nnx.is_module(module):
        raise TypeError(
          f"module= takes a flax nnx.Module (whose Param state is optimised); got a "
          f"{type(module).__name__}. For a plain pytree of parameters drop module=."
        )
      if model_fn is None:
        raise ValueError("module= is used by model_fn: pass model_fn=(module, **data) -> outputs.")
      model_fn = module_model_fn(model_fn, module)
    return cls(name, model_fn, loss_fn, module)

  @property
  def value_fn(self) -> Callable[..., jax.Array] | None:
    """The objective derived from the split (``None`` without one)."""
    if self.model_fn is None:
      return None
    return value_fn_from_model(self.model_fn, self.loss_fn)

  def functions(self, value_fn: Callable | None) -> list[tuple[str, Callable]]:
    """The user functions that receive data in this update, with their names."""
    named = [("model_fn", self.model_fn), ("loss_fn", self.loss_fn), ("value_fn", value_fn)]
    return [(n, f) for n, f in named if f is not None]

  def check_params(self, params: Params) -> None:
    """Refuses non-floating parameters (integers, booleans) with the leaf's path."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      dtype = jnp.result_type(leaf)
      if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
          f"{self.name}: params{jax.tree_util.keystr(path)} has dtype {dtype}; second-order "
          "optimisers need floating-point parameters. Cast it (e.g. .astype(jnp.float32)), or "
          "keep integer state out of the optimised pytree (nnx.Optimizer(..., wrt=nnx.Param))."
        )

  def check_update(self, positional: tuple, data: dict, value_fn: Callable | None) -> None:
    """Named errors for the data of one ``update`` call (before any user function runs)."""
    if positional:
      raise TypeError(
        f"{self.name}.update got {len(positional)} positional argument(s) after params; the "
        "data go by keyword, named as model_fn/loss_fn/value_fn name them: "
        "update(grads, state, params, x=x, y=y)."
      )
    functions = self.functions(value_fn)
    if data and not functions:
      raise ValueError(
        f"{self.name}.update got data keyword argument(s) {list(data)} but no function to "
        "pass them to: pass value_fn=(params, **data) -> loss to update() (curvature='hessian' "
        "needs it), or model_fn/loss_fn at construction."
      )
    accepted = list(dict.fromkeys(n for _, f in functions for n in arg_names(f)[1:]))
    unused = [name for name in data if name not in accepted]
    if unused:
      raise ValueError(
        f"{self.name}.update got data keyword argument(s) {unused} that no function declares; "
        f"{'/'.join(n for n, _ in functions) or 'the functions'} accept {accepted}. Rename the "
        "argument (or add it to the function's signature)."
      )
    for fn_name, fn in functions:
      missing = [n for n in _required_names(fn) if n not in data]
      if missing:
        raise TypeError(
          f"{self.name}.update: {fn_name} needs the data argument(s) {missing}, which were not "
          f"passed. Pass them by keyword: update(grads, state, params, "
          f"{', '.join(f'{n}={n}' for n in missing)}) (with flax: "
          f"optimizer.update(model, grads, {', '.join(f'{n}={n}' for n in missing)}))."
        )

  def diagnose(self, error: Exception, params: Params, data: dict) -> None:
    """Re-raises a user function's failure with the likely cause named, if one is found.

    Called only after an ``update`` failed, so it costs nothing on the normal path. Two
    mistakes are recognised: an nnx ``State`` (from ``nnx.Optimizer``) passed to a
    ``model_fn`` that expects the Module (``module=`` forgotten), and data arguments of
    different leading sizes.
    """
    if self.module is None and self.model_fn is not None and _nnx.is_state(params):
      raise TypeError(
        f"{self.name}: the parameters are an nnx.State (from nnx.Optimizer) and model_fn "
        f"failed on them ({type(error).__name__}: {error}). Pass the Module once at "
        f"construction: {self.name}(model_fn=lambda model, x: model(x), loss_fn=..., "
        "module=model); model_fn then receives the Module rebuilt from the parameters."
      ) from error
    sizes = {
      k: sorted({jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(v)}, key=str)
      for k, v in data.items()
    }
    if len({s for v in sizes.values() for s in v}) > 1:
      raise ValueError(
        f"{self.name}.update failed with data keyword arguments of different leading sizes "
        f"{sizes}: {type(error).__name__}: {error}. If they are one batch, pass equally long "
        "arrays."
      ) from error


def check_same_length(name: str, data: dict, what: str) -> int:
  """The common leading size of ``data``'s arguments, or a named error naming each size."""
  sizes = {}
  for key, value in data.items():
    for leaf in jax.tree.leaves(value):
      sizes.setdefault(key, set()).add(jnp.shape(leaf)[0] if jnp.ndim(leaf) else None)
  flat = {s for v in sizes.values() for s in v}
  if len(flat) != 1 or None in flat:
    shown = {k: sorted(map(str, v)) for k, v in sizes.items()}
    raise ValueError(
      f"{name}: {what} needs every data keyword argument to have the same leading example "
      f"axis; got leading sizes {shown}. Pass equally long arrays (or pass non-batch constants "
      "through model_fn/loss_fn closures)."
    )
  return flat.pop()


def check_number(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
  """A named error for a concrete bad number; traced values (inject_hyperparams) pass."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number; got {value!r}.") from None
  if not ok(number):
    raise ValueError(f"{name} must be {requirement}; got {value!r}.")


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raised_by_curvopt(error: BaseException) -> bool:
  """Whether the innermost frame of ``error``'s traceback is in curvopt's own source."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE)
