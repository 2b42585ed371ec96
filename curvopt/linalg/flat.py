r"""Pack a pytree into one flat vector per dtype, for solvers whose loops act on vectors.

A Krylov loop over a pytree of ``L`` leaves emits every vector operation (``axpy``, inner
products, ``where``) once per leaf, so the compiled loop body holds ``O(L)`` small kernels: on
XLA:CPU each is a separate LLVM function, and compiling them dominated the first call of a
Newton-CG step (a 14-leaf autoencoder: about 150 loop fusions in the CG body). Packed into
vectors, the same loop holds a handful of kernels; only the operator sees the pytree again.

Leaves are grouped by dtype, so no leaf is promoted (bfloat16 weights stay bfloat16 beside
float32 ones), unlike :func:`jax.flatten_util.ravel_pytree`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Packing", "packing"]


class Packing(NamedTuple):
  """How a pytree is packed: ``pack(tree) -> tuple of vectors``, ``unpack(vectors) -> tree``.

  Attributes:
    pack: pytree shaped like the template -> a tuple with one 1-D array per dtype.
    unpack: the inverse of ``pack``.
  """

  pack: Callable[[Any], tuple[jax.Array, ...]]
  unpack: Callable[[tuple[jax.Array, ...]], Any]


def packing(template: Any) -> Packing:
  """The packing of pytrees shaped like ``template`` into one vector per dtype.

  Args:
    template: a pytree of arrays (concrete or traced); only shapes and dtypes are read.

  Returns:
    A :class:`Packing`. ``pack`` casts each leaf to its template dtype and raises a
    ``ValueError`` for a tree of another structure.

  Examples:
    >>> tree = {"w": jnp.ones((2, 2)), "n": jnp.arange(3)}
    >>> layout = packing(tree)
    >>> [v.shape for v in layout.pack(tree)]
    [(4,), (3,)]
    >>> back = layout.unpack(layout.pack(tree))
    >>> jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), back, tree)
    {'n': True, 'w': True}
  """
  leaves, treedef = jax.tree.flatten(template)
  dtypes = [jnp.result_type(leaf) for leaf in leaves]
  shapes = [jnp.shape(leaf) for leaf in leaves]
  group_dtypes = sorted(set(dtypes), key=str)
  groups = [[i for i, dt in enumerate(dtypes) if dt == gd] for gd in group_dtypes]
  offsets = [np.cumsum([0] + [int(np.prod(shapes[i])) for i in g]).tolist() for g in groups]

  def pack(tree: Any) -> tuple[jax.Array, ...]:
    tree_leaves, tree_def = jax.tree.flatten(tree)
    if tree_def != treedef:
      raise ValueError(
        f"Expected a pytree with the structure {treedef}; got {tree_def}. The operator must "
        "return a pytree shaped like its input."
      )
    return tuple(
      jnp.concatenate([jnp.ravel(tree_leaves[i]).astype(gd) for i in g])
      if len(g) > 1
      else jnp.ravel(tree_leaves[g[0]]).astype(gd)
      for g, gd in zip(groups, group_dtypes, strict=True)
    )

  def unpack(vectors: tuple[jax.Array, ...]) -> Any:
    out: list[Any] = [None] * len(leaves)
    for g, offs, vector in zip(groups, offsets, vectors, strict=True):
      for j, i in enumerate(g):
        out[i] = vector[offs[j] : offs[j + 1]].reshape(shapes[i])
    return jax.tree.unflatten(treedef, out)

  return Packing(pack, unpack)
