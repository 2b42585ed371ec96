r"""Data-parallel (and model-parallel) placement helpers built on :mod:`jax.sharding`.

curvopt's optimisers need no special code to run on many devices: put the mini-batch on a
device mesh with its leading (example) axis split over a ``"data"`` axis, replicate the
parameters and optimiser state, and call the ordinary ``jax.jit``-ed step. XLA's SPMD
partitioner then runs every per-example computation where its examples live and inserts the
reductions (all-reduce) wherever a batch sum or mean is taken: in the gradient, in every
Hessian/GGN-vector product inside the CG loop, in the loss used for the reduction ratio, and
in the clipped sum of DP-SGD. Dot products and norms of CG act on replicated parameters and
need no communication. The numbers are those of one device up to the order of floating-point
summation.

The helpers here only build the meshes and shardings that pattern needs:

* :func:`data_mesh`: a 1-D mesh over (the first ``num_devices``) devices, axis ``"data"``.
* :func:`batch_sharding` / :func:`replicated`: ``NamedSharding(mesh, P("data"))`` and
  ``NamedSharding(mesh, P())``, e.g. for ``jax.jit(..., out_shardings=...)``.
* :func:`shard_batch`: place a batch pytree with its leading axis split over ``"data"``.
* :func:`replicate`: place a pytree (parameters, optimiser state) whole on every device.
* :func:`place_state`: put an optimiser state on the mesh, keeping leaves already sharded
  there (a Newton-CG direction sharded like model-parallel parameters) and replicating the
  rest (counters, damping, PRNG keys). Without it the scalars of ``tx.init(params)`` live on
  one device, the first step's outputs on the mesh, and the step compiles twice.

On several hosts call ``jax.distributed.initialize()`` first; :func:`shard_batch` then takes
*this host's* slice of the global batch (``jax.make_array_from_process_local_data``) and
:func:`replicate` expects the same values on every host. Parameters too large to replicate
can be split over a second mesh axis with ``jax.device_put(params, NamedSharding(mesh,
P(None, "model")))`` on a ``jax.make_mesh((d, m), ("data", "model"),
axis_types=(AxisType.Auto,) * 2)`` mesh; the optimisers are pytree-native and need nothing
more.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from curvopt._typing import PyTree


def data_mesh(
  num_devices: int | None = None,
  axis_name: str = "data",
  *,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  r"""A one-dimensional device mesh for data parallelism.

  The axis type is ``Auto`` (the partitioner propagates shardings), so functions written for
  one device, such as :func:`curvopt.newton_cg` or
  :func:`curvopt.clipped_grad`, run unchanged on it.

  Args:
    num_devices: use the first ``num_devices`` devices (all of them by default; on several
      hosts, all devices of all processes).
    axis_name: name of the mesh axis the batch is split over.
    devices: explicit devices (overrides the default ``jax.devices()``).

  Returns:
    A :class:`jax.sharding.Mesh` of shape ``{axis_name: num_devices}``.

  Raises:
    ValueError: if more devices are requested than exist, or ``num_devices < 1``.

  Examples:
    >>> mesh = data_mesh(1)
    >>> dict(mesh.shape)
    {'data': 1}
  """
  available = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    num_devices = len(available)
  if not 1 <= num_devices <= len(available):
    raise ValueError(
      f"num_devices={num_devices!r} but {len(available)} device(s) are available. On CPU, "
      "simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX "
      "starts; on several hosts call jax.distributed.initialize() first."
    )
  return Mesh(np.array(available[:num_devices]), (axis_name,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh, axis_name: str = "data") -> NamedSharding:
  """``NamedSharding(mesh, P(axis_name))``: leading axis split over ``axis_name``.

  Args:
    mesh: the device mesh.
    axis_name: the mesh axis that splits the examples.

  Returns:
    The sharding of a batch (and of per-example outputs such as clipped-gradient norms).

  Examples:
    >>> batch_sharding(data_mesh(1)).spec
    P('data',)
  """
  _check_axis(mesh, axis_name)
  return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, P())``: a full copy on every device of ``mesh``.

  Args:
    mesh: the device mesh.

  Returns:
    The sharding of replicated parameters and optimiser state.

  Examples:
    >>> replicated(data_mesh(1)).is_fully_replicated
    True
  """
  return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: PyTree, mesh: Mesh, axis_name: str = "data") -> PyTree:
  r"""Places every leaf of ``batch`` with its leading (example) axis split over ``axis_name``.

  Example :math:`i` of a global batch of :math:`B` goes to device
  :math:`\lfloor i\, n / B \rfloor` of the :math:`n` devices along ``axis_name`` (replicated
  over any other mesh axis). :math:`B` must be a multiple of :math:`n`: pad the batch and pass
  an ``is_padding`` mask (:func:`curvopt.privacy.poisson_sample` does) when it is not.

  In a multi-process run (after ``jax.distributed.initialize()``) each process passes its own
  slice of the global batch, of size :math:`B / \text{process count}`, and gets back the global
  array (``jax.make_array_from_process_local_data``).

  Args:
    batch: pytree of arrays sharing a leading example axis.
    mesh: the device mesh.
    axis_name: the mesh axis that splits the examples.

  Returns:
    The same pytree of :class:`jax.Array` placed with ``NamedSharding(mesh, P(axis_name))``.

  Raises:
    ValueError: for an unknown axis, a scalar leaf, or a batch size that is not a multiple of
      the number of devices along ``axis_name``.

  Examples:
    >>> x = shard_batch(jnp.arange(8.0).reshape(4, 2), data_mesh(1))
    >>> x.sharding.spec, x.shape
    (P('data',), (4, 2))
  """
  sharding = batch_sharding(mesh, axis_name)
  n = mesh.shape[axis_name]
  multi = jax.process_count() > 1

  def place(path, leaf):
    shape = np.shape(leaf)
    where = f"batch{jax.tree_util.keystr(path)}"
    if not shape:
      raise ValueError(f"{where} is a scalar; every batch leaf needs a leading example axis.")
    size = shape[0] * (jax.process_count() if multi else 1)
    if size % n:
      raise ValueError(
        f"{where} has {size} examples, not a multiple of the {n} devices on mesh axis "
        f"{axis_name!r}; pad the batch to a multiple of {n} and pass is_padding=."
      )
    if multi:
      return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
    return jax.device_put(leaf, sharding)

  return jax.tree_util.tree_map_with_path(place, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a full copy of every leaf of ``tree`` on every device of ``mesh``.

  Use it for parameters and optimiser states (including PRNG keys) in data-parallel training.
  In a multi-process run every process must pass the same values.

  Args:
    tree: pytree of arrays (or scalars).
    mesh: the device mesh.

  Returns:
    The same pytree of :class:`jax.Array` placed with ``NamedSharding(mesh, P())``.

  Examples:
    >>> p = replicate({"w": jnp.ones(3)}, data_mesh(1))
    >>> p["w"].sharding.is_fully_replicated
    True
  """
  sharding = replicated(mesh)
  if jax.process_count() > 1:

    def place(leaf):
      if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.device_put(leaf, sharding)
      return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(place, tree)
  return jax.device_put(tree, sharding)


def place_state(state: PyTree, mesh: Mesh) -> PyTree:
  """Puts an optimiser state on ``mesh``: sharded leaves stay, every other leaf is replicated.

  ``tx.init(params)`` returns parameter-shaped leaves placed like ``params`` but scalars
  (step counts, damping, PRNG keys) on a single device, while a jitted step returns them on
  the whole mesh; the second step would then see new input shardings and compile again.
  Placing the initial state with this function makes every step's inputs alike, so one
  compiled program serves them all.

  Args:
    state: an optimiser state (any pytree of arrays).
    mesh: the device mesh of the parameters and batches.

  Returns:
    The same pytree with every leaf on ``mesh``: leaves already ``NamedSharding`` on ``mesh``
    unchanged, all others replicated.

  Examples:
    >>> mesh = data_mesh(1)
    >>> state = place_state((jnp.zeros(()), replicate(jnp.ones(2), mesh)), mesh)
    >>> [leaf.sharding.mesh.shape == mesh.shape for leaf in state]
    [True, True]
  """

  def on_mesh(leaf):
    s = getattr(leaf, "sharding", None)
    return isinstance(s, NamedSharding) and s.mesh == mesh

  leaves, treedef = jax.tree.flatten(state)
  todo = [i for i, leaf in enumerate(leaves) if not on_mesh(leaf)]
  for i, leaf in zip(todo, replicate([leaves[i] for i in todo], mesh), strict=True):
    leaves[i] = leaf
  return jax.tree.unflatten(treedef, leaves)


def _check_axis(mesh: Mesh, axis_name: str) -> None:
  if axis_name not in mesh.shape:
    raise ValueError(
      f"Mesh has no axis {axis_name!r}; its axes are {tuple(mesh.axis_names)}. Pass "
      "axis_name= naming the axis that splits the batch."
    )
