r"""Empirical privacy audit of ``curvopt.dp_sgd``: canaries, jax_privacy's auditor, injected faults.

DP-SGD with noise multiplier :math:`\sigma`, Poisson rate :math:`q` and :math:`T` steps promises
:math:`(\varepsilon, \delta)`-DP with :math:`\varepsilon` = ``privacy.epsilon(σ, q, T, δ)``: no
test can tell from the released iterates whether one example (a *canary*) was in the training set
with a true-positive rate above :math:`e^\varepsilon` times its false-positive rate plus
:math:`\delta`. This script runs curvopt's ``clipped_sum_fn`` + ``dp_sgd`` many times (``vmap``
over runs of a tiny linear model), half of the runs with the canary in the dataset and half
without, scores the canary in each run, and hands the two score samples to
``jax_privacy.auditing.CanaryScoreAuditor.epsilon_clopper_pearson`` (Jagielski, Ullman & Oprea
2020; Nasr et al. 2021): a lower bound on :math:`\varepsilon` at :math:`\delta` that holds with
95% confidence (Clopper-Pearson intervals on the rates, Bonferroni over all thresholds). No
statistics are written here.

Canaries (Nasr et al. 2023, "Tight auditing of differentially private machine learning"):

* **Dirac gradient (white box, strongest).** The canary's gradient is :math:`M e_0` whatever the
  parameters (:math:`M \gg C`), on a coordinate no other example touches; the auditor sees every
  iterate (as DP-SGD's guarantee allows), turns each step's :math:`\theta_0` update into
  :math:`x_t = -\Delta\theta_{0,t} \bar B / (\eta\sigma C)` (:math:`N(0,1)`, plus
  :math:`1/\sigma` when the canary was sampled) and scores the run by the claimed mechanism's
  log-likelihood ratio :math:`\sum_t \log(1 - q + q\, e^{x_t/\sigma - 1/(2\sigma^2)})`. With fixed
  batches the auditor knows the steps whose batch holds the canary's slot and sums :math:`x_t`
  over them instead.
* **Input space (realistic).** The canary is an ordinary example of the squared loss: an outlier
  input :math:`A e_0` on a feature no other example uses, with a target far off. The auditor sees
  only the final model and scores the run by :math:`-\theta_{0,T}`.

Injected faults (each must push the lower bound above the claimed :math:`\varepsilon` where the
attack has the power to show it): the noise halved (``noise_multiplier=σ/2``, accounted at σ);
clipping skipped (the clip factor patched to 1 in ``curvopt.privacy.clipping``); a ``ClippedSum``
built at 10× the clip with its record forged to the claimed clip (the check bypassed); and Poisson
sampling replaced by fixed batches (batch ``t`` is the slots ``tB .. tB+B-1`` mod N).

Usage (a separate environment; jax-privacy is not a curvopt dependency)::

  python -m venv /tmp/audit && /tmp/audit/bin/pip install -e '.[audit]'
  /tmp/audit/bin/python benchmarks/privacy_audit.py            # the full table, a few minutes
  /tmp/audit/bin/python benchmarks/privacy_audit.py --runs 2000 --rows 3   # a smoke run

The table it prints is in ``docs/privacy.md``.
"""

import argparse
import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from typing import Any
from unittest import mock

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax_privacy import auditing

from curvopt import clipped_sum_fn, dp_sgd, privacy
from curvopt.privacy import clipping

jax.config.update("jax_enable_x64", True)

CLIP = 1.0
DELTA = 1e-5
LEARNING_RATE = 0.1
DIM = 4  # features; coordinate 0 belongs to the canary alone
DIRAC = 1e3  # the Dirac canary's gradient norm, M >> C
TARGET = 1e2  # the input canary's target offset, so its gradient norm stays >> 10 C


@dataclasses.dataclass(frozen=True)
class Config:
  """A DP-SGD configuration: noise multiplier, Poisson rate, steps and dataset size."""

  sigma: float
  q: float
  steps: int
  num_examples: int

  @property
  def expected_batch_size(self) -> float:
    return self.q * self.num_examples

  def __str__(self) -> str:
    return f"σ={self.sigma:g} q={self.q:g} T={self.steps} N={self.num_examples}"


CONFIGS = (Config(3.0, 0.5, 8, 8), Config(2.0, 0.05, 50, 20), Config(4.0, 1.0, 1, 4))
FAULTS = ("none", "noise halved", "clipping skipped", "10x clip, check bypassed", "fixed batches")
CANARIES = ("dirac", "input")


def dataset(num_examples: int, canary: str) -> dict[str, jax.Array]:
  """``N - 1`` ordinary regression examples (feature 0 is 0) and the canary in the last slot."""
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (num_examples, DIM)).at[:, 0].set(0.0)
  y = jax.random.normal(ky, (num_examples,))
  if canary == "input":
    x = x.at[-1].set(jnp.zeros(DIM).at[0].set(1.0))
    y = y.at[-1].set(-TARGET)
  dirac = jnp.zeros(num_examples, bool).at[-1].set(canary == "dirac")
  return {"x": x, "y": y, "dirac": dirac}


def loss_fn(theta: jax.Array, example: dict[str, jax.Array]) -> jax.Array:
  """Squared error; the Dirac canary's loss is :math:`M\\theta_0` (gradient :math:`M e_0`)."""
  ordinary = 0.5 * jnp.square(theta @ example["x"] - example["y"])
  return jnp.where(example["dirac"], DIRAC * theta[0], ordinary)


def batch_of(config: Config, fault: str, key: jax.Array, t: jax.Array, canary_in: jax.Array):
  """``(indices, is_padding)`` of step ``t``: Poisson (padded) or, as a fault, fixed batches."""
  n = config.num_examples
  if fault == "fixed batches":
    size = round(config.expected_batch_size)
    indices = (t * size + jnp.arange(size)) % n
    is_padding = jnp.zeros(size, bool)
  else:
    sample = privacy.poisson_sample(key, n, config.q, privacy.padded_batch_size(n, config.q))
    indices, is_padding = sample.indices, sample.is_padding
  return indices, is_padding | ((indices == n - 1) & ~canary_in)  # "out": the canary is absent


def step_fn(config: Config, fault: str) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
  """``(optimiser, step)``: one DP-SGD step of curvopt, with the fault (if any) injected."""
  sigma = config.sigma / 2 if fault == "noise halved" else config.sigma
  opt = dp_sgd(
    LEARNING_RATE,
    l2_norm_clip=CLIP,
    noise_multiplier=sigma,
    key=0,
    expected_batch_size=config.expected_batch_size,
  )
  built_clip = 10 * CLIP if fault.startswith("10x") else CLIP
  sum_fn = clipped_sum_fn(loss_fn, built_clip)

  def step(theta, state, batch, is_padding):
    clipped = sum_fn(theta, batch, is_padding)
    if fault.startswith("10x"):  # a forged record: the ClippedSum claims the clip C
      record = dataclasses.replace(clipped.clipping, l2_norm_clip=CLIP)
      clipped = clipped._replace(clipping=record)
    updates, state = opt.update(clipped, state, theta)
    return optax.apply_updates(theta, updates), state

  return opt, step


def runs_fn(config: Config, fault: str, canary: str) -> Callable[[jax.Array, jax.Array], Any]:
  """``(keys, canary_in) -> per-step θ₀ updates, (runs, T)``: a jitted ``vmap`` over runs."""
  data = dataset(config.num_examples, canary)
  opt, step = step_fn(config, fault)

  def one_run(key, canary_in):
    noise_key, data_key = jax.random.split(key)
    theta = jnp.zeros(DIM)
    state = opt.init(theta)
    state = (state[0]._replace(key=noise_key), *state[1:])

    def body(carry, t):
      theta, state = carry
      indices, is_padding = batch_of(config, fault, jax.random.fold_in(data_key, t), t, canary_in)
      batch = jax.tree.map(lambda a: a[indices], data)
      new_theta, state = step(theta, state, batch, is_padding)
      return (new_theta, state), new_theta[0] - theta[0]

    _, updates = jax.lax.scan(body, (theta, state), jnp.arange(config.steps))
    return updates

  return jax.jit(jax.vmap(one_run))


def scores(config: Config, fault: str, canary: str, updates: np.ndarray) -> np.ndarray:
  """The auditor's score of each run (higher: the canary looks present); see the module doc."""
  if canary == "input":
    return -updates.sum(axis=1)  # the final model only: -θ_{0,T}
  sigma, q = config.sigma, config.q
  x = -updates * config.expected_batch_size / (LEARNING_RATE * sigma * CLIP)
  if fault == "fixed batches":
    size = round(config.expected_batch_size)
    slot = (config.num_examples - 1 - size * np.arange(config.steps)) % config.num_examples
    return x[:, slot < size].sum(axis=1)  # the steps whose batch holds the canary's slot
  return np.log1p(q * np.expm1(x / sigma - 0.5 / sigma**2)).sum(axis=1)


def audit_row(config: Config, fault: str, canary: str, runs: int, seed: int) -> dict[str, Any]:
  """Runs ``runs`` trainings with and ``runs`` without the canary; the audit of their scores."""
  start = time.perf_counter()
  patch = (
    mock.patch.object(clipping, "_factor", lambda norm, clip: jnp.ones_like(norm))
    if fault == "clipping skipped"
    else contextlib.nullcontext()
  )
  with patch:  # the fault is compiled in: the patch only has to hold while tracing
    run = runs_fn(config, fault, canary)
    keys = jax.random.split(jax.random.key(seed), 2 * runs)
    chunks = []
    for i in range(0, 2 * runs, 10_000):
      k = keys[i : i + 10_000]
      chunks.append(np.asarray(run(k, jnp.arange(i, i + len(k)) < runs)))
  updates = np.concatenate(chunks)
  s = scores(config, fault, canary, updates)
  auditor = auditing.CanaryScoreAuditor(s[:runs], s[runs:])
  lower = auditor.epsilon_clopper_pearson(significance=0.05, delta=DELTA)
  claimed = privacy.epsilon(config.sigma, config.q, config.steps, DELTA, accountant="pld")
  return {
    "config": str(config),
    "fault": fault,
    "canary": canary,
    "claimed": claimed,
    "claimed_rdp": _rdp_epsilon(config),
    "lower": float(lower),
    "auroc": float(auditor.attack_auroc()),
    "seconds": time.perf_counter() - start,
  }


def _rdp_epsilon(config: Config) -> float:
  with warnings.catch_warnings():  # skipped fractional orders: still an upper bound
    warnings.simplefilter("ignore", RuntimeWarning)
    return privacy.epsilon(config.sigma, config.q, config.steps, DELTA)


def rows_to_run(limit: int | None) -> list[tuple[Config, str, str]]:
  """Every configuration without fault, then each fault where it is defined (q < 1)."""
  rows = [(c, "none", canary) for c in CONFIGS for canary in CANARIES]
  rows += [(c, f, canary) for f in FAULTS[1:] for c in CONFIGS if c.q < 1 for canary in CANARIES]
  return rows[:limit]


def verdict(row: dict[str, Any]) -> str:
  above = row["lower"] > row["claimed"]
  if row["fault"] == "none":
    return "VIOLATION" if above else "ok (not above)"
  return "caught" if above else "not seen"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=20_000, help="runs with, and as many without")
  parser.add_argument("--rows", type=int, default=None, help="only the first ROWS rows")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(
    f"curvopt DP-SGD audit: C={CLIP}, delta={DELTA}, {args.runs} runs with and {args.runs} "
    "without the canary per row; lower bound: jax_privacy CanaryScoreAuditor."
    "epsilon_clopper_pearson, 95% confidence. Claimed: privacy.epsilon (PLD; RDP in brackets)."
  )
  columns = ["configuration", "fault", "canary", "claimed ε: PLD [RDP]", "ε lower bound, 95%"]
  columns += ["AUROC", "verdict"]
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  failures, start = [], time.perf_counter()
  for i, (config, fault, canary) in enumerate(rows_to_run(args.rows)):
    row = audit_row(config, fault, canary, args.runs, args.seed + i)
    print(
      f"| {row['config']} | {fault} | {canary} | {row['claimed']:.2f} [{row['claimed_rdp']:.2f}] "
      f"| {row['lower']:.2f} | {row['auroc']:.3f} | {verdict(row)} |",
      flush=True,
    )
    if verdict(row) == "VIOLATION":
      failures.append(row)
  print(f"{i + 1} rows in {time.perf_counter() - start:.0f} s ({jax.devices()[0].platform}).")
  if failures:
    raise SystemExit(f"{len(failures)} configuration(s) above their claimed epsilon")


if __name__ == "__main__":
  main()
