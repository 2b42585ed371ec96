r"""Privacy accounting for DP-SGD (via Google's ``dp-accounting``) and Poisson sampling.

One DP-SGD step with Poisson sampling at rate :math:`q` and noise multiplier :math:`\sigma` is
the sampled Gaussian mechanism; ``steps`` of them compose. :func:`epsilon` hands exactly that
event, ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``, to an
established accountant (Rényi DP, Mironov 2017, or privacy-loss distributions, Koskela et al.
2020 / Doroshenko et al. 2022) rather than re-deriving the bound by hand.

The accounting assumes each example joins each batch independently with probability
:math:`q` (Poisson sampling), so batches vary in size. :func:`poisson_sample` draws such a
batch inside ``jit`` as indices padded to a fixed size with an ``is_padding`` mask, which
:func:`curvopt.dp_sgd` consumes without recompiling; :func:`padded_batch_size`
picks that fixed size so that truncation is (almost) never needed.
"""

import contextlib
import logging
import math
import re
import warnings
from typing import Literal, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS = ("rdp", "pld")


def _check_args(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1) (typically < 1/num_examples); got {delta!r}.")
  if not noise_multiplier >= 0.0:
    raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier!r}.")
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(
      f"sample_rate must be in (0, 1] (expected_batch_size / num_examples); got {sample_rate!r}."
    )
  if isinstance(steps, bool) or int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be a non-negative integer; got {steps!r}.")


def _accountant(accountant: Accountant) -> dp_accounting.PrivacyAccountant:
  if accountant == "rdp":
    return dp_accounting.rdp.RdpAccountant()
  if accountant == "pld":
    return dp_accounting.pld.PLDAccountant()
  raise ValueError(f"Unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}.")


class _CollectNonConvergence(logging.Filter):
  """Swallows dp-accounting's per-order "failed to converge" records, keeping their orders."""

  def __init__(self):
    super().__init__()
    self.orders: list[str] = []

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "failed to converge" not in message:
      return True
    order = re.search(r"alpha=([0-9]+(?:\.[0-9]+)?)", message)
    self.orders.append(f"{float(order.group(1)):g}" if order else "?")
    return False


@contextlib.contextmanager
def _summarised_accountant_warnings():
  """One Python warning instead of one absl log line per non-converging Rényi order."""
  collector = _CollectNonConvergence()
  logger = logging.getLogger("absl")
  logger.addFilter(collector)
  try:
    yield
  finally:
    logger.removeFilter(collector)
    if collector.orders:
      warnings.warn(
        f"dp-accounting's RDP accountant skipped {len(collector.orders)} fractional Rényi "
        f"order(s) whose series did not converge (alpha = {', '.join(collector.orders)}); "
        "epsilon is the minimum over the remaining orders, still a valid upper bound. Use "
        "accountant='pld' for a tighter value.",
        RuntimeWarning,
        stacklevel=4,
      )


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
  """The ``dp_accounting`` event of ``steps`` Poisson-sampled Gaussian DP-SGD steps."""
  step = dp_accounting.PoissonSampledDpEvent(
    float(sample_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
  )
  return dp_accounting.SelfComposedDpEvent(step, int(steps))


def epsilon(
  noise_multiplier: float,
  sample_rate: float,
  steps: int,
  delta: float,
  *,
  accountant: Accountant = "rdp",
) -> float:
  r"""Privacy spent :math:`\varepsilon` by DP-SGD at a given :math:`\delta`.

  ``steps`` steps of the Poisson-subsampled Gaussian mechanism with sampling rate
  :math:`q` = ``sample_rate`` and noise multiplier :math:`\sigma` (noise standard deviation
  :math:`\sigma C` on the sum of gradients clipped to :math:`C`), under the add-or-remove-one
  neighbouring relation. ``"rdp"`` (Rényi DP, Mironov 2017; Mironov, Talwar & Zhang 2019) is
  fast and slightly loose; ``"pld"`` (privacy-loss distributions) is tighter and slower.

  Args:
    noise_multiplier: :math:`\sigma \ge 0` (0 gives ``inf``).
    sample_rate: :math:`q \in (0, 1]`, the expected batch size over the dataset size.
    steps: number of DP-SGD steps, a non-negative integer.
    delta: :math:`\delta \in (0, 1)`.
    accountant: ``"rdp"`` or ``"pld"``.

  Returns:
    :math:`\varepsilon` as a Python float (``inf`` when no finite bound exists).

  Raises:
    ValueError: for ``delta`` outside (0, 1), a negative noise multiplier, ``sample_rate``
      outside (0, 1], negative or fractional ``steps``, or an unknown ``accountant``.

  Examples:
    Zero steps spend nothing; privacy is spent as steps accumulate.

    >>> epsilon(1.0, 0.01, 0, 1e-5)
    0.0
    >>> 0 < epsilon(1.0, 0.01, 100, 1e-5) < epsilon(1.0, 0.01, 1000, 1e-5)
    True

  References:
    Abadi et al., "Deep learning with differential privacy", CCS 2016.
    Mironov, "Rényi differential privacy", CSF 2017.
    Mironov, Talwar & Zhang, "Rényi differential privacy of the sampled Gaussian mechanism",
    2019.
  """
  _check_args(noise_multiplier, sample_rate, steps, delta)
  acc = _accountant(accountant)
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  with _summarised_accountant_warnings():
    acc.compose(dp_sgd_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(float(delta)))


def noise_multiplier_for_epsilon(
  target_epsilon: float,
  sample_rate: float,
  steps: int,
  delta: float,
  *,
  accountant: Accountant = "rdp",
  tol: float = 1e-4,
) -> float:
  r"""The smallest noise multiplier :math:`\sigma` with :func:`epsilon` :math:`\le` target.

  Calls ``dp_accounting.calibrate_dp_mechanism`` (Brent's method on the accountant's
  :math:`\varepsilon(\sigma)`, with a guarantee that the returned :math:`\sigma` does not
  overspend): the inverse of :func:`epsilon` in its first argument.

  Args:
    target_epsilon: :math:`\varepsilon > 0`.
    sample_rate: :math:`q \in (0, 1]`.
    steps: number of DP-SGD steps (a positive integer).
    delta: :math:`\delta \in (0, 1)`.
    accountant: ``"rdp"`` or ``"pld"``.
    tol: tolerance on :math:`\sigma`.

  Returns:
    :math:`\sigma` as a Python float.

  Raises:
    ValueError: for a non-positive target, or arguments :func:`epsilon` rejects.

  Examples:
    >>> sigma = noise_multiplier_for_epsilon(2.0, 0.01, 1000, 1e-5)
    >>> bool(epsilon(sigma, 0.01, 1000, 1e-5) <= 2.0 < epsilon(0.95 * sigma, 0.01, 1000, 1e-5))
    True
  """
  if not target_epsilon > 0:
    raise ValueError(f"target_epsilon must be > 0; got {target_epsilon!r}.")
  _check_args(1.0, sample_rate, steps, delta)
  if steps == 0:
    return 0.0
  _accountant(accountant)
  return float(
    dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant),
      lambda sigma: dp_sgd_event(sigma, sample_rate, steps),
      float(target_epsilon),
      float(delta),
      bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
      tol=tol,
    )
  )


class PoissonBatch(NamedTuple):
  """A Poisson-sampled batch as fixed-size indices.

  Attributes:
    indices: ``(batch_size,)`` int32 indices into the dataset; padded slots hold index 0.
    is_padding: ``(batch_size,)`` bool, ``True`` for padded slots.
    num_truncated: examples that were sampled but did not fit in ``batch_size`` (int32; 0
      unless ``batch_size`` is too small: see :func:`padded_batch_size`).
  """

  indices: jax.Array
  is_padding: jax.Array
  num_truncated: jax.Array


def poisson_sample(
  key: jax.Array, num_examples: int, sample_rate: float, batch_size: int
) -> PoissonBatch:
  r"""Poisson sampling: each example joins the batch independently with probability ``q``.

  The realised size is :math:`\mathrm{Binomial}(N, q)`; the sampled indices (in increasing
  order) fill a fixed ``batch_size`` and the rest is padding, so the batch shape is static
  and ``jit`` compiles once. Gather the data with ``jax.tree.map(lambda x: x[b.indices],
  data)`` and pass ``is_padding=b.is_padding`` to :func:`curvopt.dp_sgd`. If more
  than ``batch_size`` examples are sampled, the excess (the highest indices) is dropped and
  counted in ``num_truncated``; the accounting of :func:`epsilon` then no longer applies
  exactly, so choose ``batch_size`` with :func:`padded_batch_size`.

  Args:
    key: a ``jax.random`` key.
    num_examples: dataset size :math:`N` (static).
    sample_rate: :math:`q \in (0, 1]`.
    batch_size: the static padded batch size.

  Returns:
    A :class:`PoissonBatch`.

  Examples:
    >>> b = poisson_sample(jax.random.key(0), 10, 1.0, 12)
    >>> b.indices.tolist(), int(b.is_padding.sum()), int(b.num_truncated)
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0], 2, 0)
  """
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}.")
  if int(num_examples) < 1 or int(batch_size) < 1:
    raise ValueError(
      f"num_examples and batch_size must be positive; got {num_examples!r}, {batch_size!r}."
    )
  mask = jax.random.bernoulli(key, sample_rate, (int(num_examples),))
  count = jnp.sum(mask, dtype=jnp.int32)
  (indices,) = jnp.nonzero(mask, size=int(batch_size), fill_value=0)
  is_padding = jnp.arange(int(batch_size)) >= count
  return PoissonBatch(
    indices.astype(jnp.int32), is_padding, jnp.maximum(count - int(batch_size), 0)
  )


def padded_batch_size(num_examples: int, sample_rate: float, overflow_prob: float = 1e-9) -> int:
  r"""The smallest ``b`` with :math:`P(\mathrm{Binomial}(N, q) > b) \le` ``overflow_prob``.

  A fixed batch size for :func:`poisson_sample` that truncates a step with probability at most
  ``overflow_prob``.

  Args:
    num_examples: dataset size :math:`N`.
    sample_rate: :math:`q \in (0, 1]`.
    overflow_prob: tolerated probability that a step's batch does not fit.

  Returns:
    The padded batch size (an ``int``, at most ``N``).

  Examples:
    >>> padded_batch_size(1000, 1.0)
    1000

    A mean of 100 with standard deviation 10 needs 6.5 standard deviations of room:

    >>> padded_batch_size(60000, 100 / 60000)
    165
  """
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}.")
  if not 0.0 < overflow_prob < 1.0:
    raise ValueError(f"overflow_prob must be in (0, 1); got {overflow_prob!r}.")
  from scipy import stats  # noqa: PLC0415 (scipy comes with dp-accounting; imported on use)

  return max(
    1, min(int(num_examples), int(stats.binom.isf(overflow_prob, num_examples, sample_rate)))
  )
