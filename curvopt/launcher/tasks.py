"""What a task gives the runner: parameters, data for a step, the objective, an evaluation.

A task family (in ``experiments/``) subclasses :class:`Task`. Everything the runner calls
inside the compiled step (``batch``, ``objective``, ``model_fn``/``output_loss``,
``per_example_loss``, ``evaluate``) must be traceable; the data order is a pure function of the
seed's data key and the step number, so a resumed run sees the same batches as an uninterrupted
one.
"""

import copy
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from curvopt import sharding
from curvopt._typing import Params
from curvopt.launcher.config import ConfigError

DataBatch = dict[str, jax.Array]


class Task:
  """Base class of a task family.

  Attributes:
    metric: the primary metric, a key of :meth:`evaluate`'s output.
    higher_is_better: whether larger values of ``metric`` are better.
    variants: allowed ``variant`` values of an optimiser entry (``None`` always allowed: the
      default objective).
    train_data: dict of arrays with a leading example axis (used by mini-batching and DP-SGD).
    batch_size: mini-batch size; ``None`` for full batch.
    shuffle: with ``batch_size=None``, permute the full batch at every step (so that a
      Newton-CG curvature chunk, rows ``[j s, (j + 1) s)``, is a fresh random sample).
    summary_metrics: further :meth:`evaluate` (or host) metrics shown in the summary table.
    mesh: the data-parallel device mesh (set by the runner from the config's ``mesh:``
      section); ``None`` on one device.
    data_axis: the mesh axis the batch is split over.
  """

  metric: str = "test_loss"
  higher_is_better: bool = False
  summary_metrics: tuple[str, ...] = ()
  variants: tuple[str, ...] = ()
  batch_size: int | None = None
  shuffle: bool = False

  def __init__(self, cfg: Any, dtype: Any):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.train_data: DataBatch = {}
    self.mesh: Mesh | None = None
    self.data_axis = "data"

  def on_mesh(self, mesh: Mesh | None, data_axis: str = "data") -> "Task":
    """A copy of this task whose steps split each batch over ``mesh`` (``self`` if ``None``).

    The copy's training data is replicated on the mesh; ``self`` is left unchanged.
    """
    if mesh is None:
      return self
    placed = copy.copy(self)
    placed.mesh, placed.data_axis = mesh, data_axis
    placed.train_data = sharding.replicate(self.train_data, mesh)
    return placed

  def with_batching(self, batch_size: int | None, shuffle: bool = False) -> "Task":
    """A copy of this task whose steps draw ``batch_size`` examples (``None``: all of them).

    What an optimiser entry's ``batch_size``/``shuffle`` keys set: Adam on mini-batches beside
    a full-batch Newton-CG in one config. ``self`` is left unchanged.

    Raises:
      ValueError: for a task that draws its own batches (overrides :meth:`batch`), or a
        ``batch_size`` outside ``[1, num_train()]``.
    """
    if type(self).batch is not Task.batch:
      raise ValueError(
        f"task {type(self).__name__} draws its own batches, so an optimiser entry cannot set "
        "batch_size or shuffle; drop them (or set the task's own batch options)."
      )
    n = self.num_train()
    if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size <= n):
      raise ValueError(
        f"batch_size must be 'task', null (the full batch) or an integer in [1, {n}] (the "
        f"training set size); got {batch_size!r}."
      )
    batched = copy.copy(self)
    batched.batch_size, batched.shuffle = batch_size, bool(shuffle)
    return batched

  # ---- to override ----
  def init_params(self, key: jax.Array) -> Params:
    raise NotImplementedError

  def loss(self, params: Params, **batch: jax.Array) -> jax.Array:
    """The training objective on a batch, with the batch keys as named keyword arguments."""
    raise NotImplementedError

  def evaluate(self, params: Params) -> dict[str, jax.Array]:
    raise NotImplementedError

  # ---- defaults ----
  def objective(self, variant: str | None) -> Callable[..., jax.Array]:
    """The objective an optimiser entry with this ``variant`` minimises."""
    del variant
    return self.loss

  def num_train(self) -> int:
    return int(jax.tree.leaves(self.train_data)[0].shape[0])

  def batch(self, data_key: jax.Array, step: jax.Array) -> DataBatch:
    """Data for ``step``: the full training set (permuted if ``shuffle``), or a mini-batch
    drawn without replacement."""
    if self.batch_size is None and not self.shuffle:
      return self.train_data
    # The indices of the largest of n i.i.d. uniforms: a uniformly random subset in random
    # order. top_k costs a seventh of jax.random.permutation's sorts on CPU (0.3 against 2 ms
    # for 128 of 1797 examples, more than an MLP's Adam step); a full shuffle is one argsort.
    u = jax.random.uniform(jax.random.fold_in(data_key, step), (self.num_train(),))
    if self.batch_size is None:
      idx = jnp.argsort(u)
    else:
      idx = jax.lax.top_k(u, self.batch_size)[1]
    return jax.tree.map(lambda a: a[idx], self.train_data)

  def data_devices(self) -> int:
    """Number of devices the batch is split over (1 without a mesh)."""
    return 1 if self.mesh is None else int(self.mesh.shape[self.data_axis])

  def constrain_batch(self, batch: Any) -> Any:
    """Inside the compiled step: split each batch leaf's leading axis over the mesh.

    A ``jax.lax.with_sharding_constraint`` to ``NamedSharding(mesh, P(data_axis))`` on every
    leaf with a leading axis (scalars stay replicated), so the per-example work of the step
    runs where its examples live and XLA all-reduces the batch sums; the identity without a
    mesh.
    """
    if self.mesh is None:
      return batch
    spec = sharding.batch_sharding(self.mesh, self.data_axis)
    return jax.tree.map(
      lambda a: jax.lax.with_sharding_constraint(a, spec) if jnp.ndim(a) else a, batch
    )

  def step_batch(self, data_key: jax.Array, step: jax.Array) -> DataBatch:
    """:meth:`batch`, split over the data-parallel mesh (what the optimisers' steps call)."""
    return self.constrain_batch(self.batch(data_key, step))

  def gauss_newton_split(self, variant: str | None) -> tuple[Callable, Callable] | None:
    """``(model_fn, loss_fn)`` whose generalised Gauss-Newton matrix is the objective's.

    ``model_fn(params, **batch) -> outputs`` and ``loss_fn(outputs, **batch) -> loss`` (each
    naming the batch keys it uses), or ``None`` when the objective has no such split. The
    default uses the task's ``model_fn`` and ``output_loss`` methods if it defines them.
    """
    del variant
    if hasattr(self, "model_fn") and hasattr(self, "output_loss"):
      return self.model_fn, self.output_loss
    return None

  def per_example_loss(self, params: Params, example: DataBatch) -> jax.Array:
    """Loss of one example (no leading axis): the batch objective on a batch of one."""
    return self.loss(params, **jax.tree.map(lambda a: jnp.expand_dims(a, 0), example))

  def report(self, run_dir: str, records: list[dict]) -> str:
    """Extra Markdown for ``summary.md`` (task-specific analyses); empty by default."""
    del run_dir, records
    return ""

  def check_variant(self, path: str, variant: str | None) -> None:
    if variant is not None and variant not in self.variants:
      raise ConfigError(
        f"config key '{path}': invalid value {variant!r} for task {type(self).__name__}; "
        f"allowed values: {list(self.variants) or 'none (leave it unset)'}."
      )


def train_test_split(
  x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A fixed random split (numpy, host side) so every optimiser sees the same data."""
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = perm[:n_test], perm[n_test:]
  return x[train], y[train], x[test], y[test]


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
  """Centres and scales features by the training set's statistics."""
  mean, std = train.mean(0), train.std(0)
  std = np.where(std > 0, std, 1.0)
  return tuple((a - mean) / std for a in (train, *others))


def load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
  """A dataset bundled with scikit-learn (no download): ``"digits"`` or ``"breast_cancer"``."""
  from sklearn import datasets

  loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}
  if name not in loaders:
    raise ConfigError(
      f"config key 'task.dataset': invalid value {name!r}; allowed: {list(loaders)}"
    )
  data = loaders[name]()
  return data.data.astype(np.float64), data.target.astype(np.int32)


def dense_init(key: jax.Array, sizes: list[int], dtype: Any, scale: str = "lecun") -> list[dict]:
  """Parameters of a stack of dense layers, ``[{"w": (m, n), "b": (n,)}, ...]``."""
  params = []
  for k, (m, n) in zip(
    jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:], strict=True), strict=True
  ):
    std = float(1.0 / np.sqrt(m) if scale == "lecun" else np.sqrt(2.0 / m))  # weak-typed
    params.append(
      {"w": std * jax.random.normal(k, (m, n), dtype=dtype), "b": jnp.zeros((n,), dtype=dtype)}
    )
  return params


def mlp_apply(params: list[dict], x: jax.Array, activation: Callable = jnp.tanh) -> jax.Array:
  """A dense network: ``activation`` between layers, linear output."""
  for layer in params[:-1]:
    x = activation(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def as_dtype(tree: Any, dtype: Any) -> Any:
  """Casts the floating leaves of ``tree`` to ``dtype``; integer leaves are kept."""
  return jax.tree.map(
    lambda a: (
      jnp.asarray(a, dtype)
      if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
      else jnp.asarray(a)
    ),
    tree,
  )
