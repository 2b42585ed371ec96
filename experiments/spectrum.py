"""Hessian spectrum of an MLP during training on digits (PyHessian-style analysis).

At every evaluation the training-loss Hessian (on a fixed subset of training examples) is
probed with Hessian-vector products only: the top eigenvalues by Lanczos with full
reorthogonalisation, the trace by Hutchinson's estimator (with its standard error) and the
spectral density by stochastic Lanczos quadrature. Scalars go to ``metrics.jsonl``, densities
to ``arrays/``; the report adds ``spectrum.png`` (the density at several points of training)
and a table of the top eigenvalue and trace against the step.

References:
  Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019.
  Yao, Gholami, Keutzer & Mahoney, "PyHessian: neural networks through the lens of the
  Hessian", IEEE Big Data 2020.
"""

import glob
import os
from dataclasses import dataclass, field

import jax
import numpy as np

from curvopt.curvature import estimators, products
from experiments.classification import Classification, Model


@dataclass
class Config:
  name: str = "spectrum"
  hidden: list[int] = field(default_factory=lambda: [32])
  batch_size: int | None = 128
  hessian_examples: int = 512
  top_k: int = 3
  lanczos_iters: int = 40
  trace_samples: int = 30
  density_iters: int = 40
  density_runs: int = 2
  grid_points: int = 400
  test_fraction: float = 0.2
  split_seed: int = 0


@dataclass
class _ClassificationConfig:
  """The classification settings the spectrum task trains with."""

  model: Model
  hidden: list[int]
  batch_size: int | None
  test_fraction: float
  split_seed: int
  activation: object = None
  channels: tuple = ()
  l2: float = 0.0


class Spectrum(Classification):
  metric = "lambda_max"
  higher_is_better = False
  summary_metrics = ("trace", "test_accuracy", "train_loss")

  def __init__(self, cfg: Config, dtype):
    from experiments.classification import Activation

    inner = _ClassificationConfig(
      Model.mlp, cfg.hidden, cfg.batch_size, cfg.test_fraction, cfg.split_seed, Activation.tanh
    )
    super().__init__(inner, dtype)
    self.spec_cfg = cfg
    n = min(cfg.hessian_examples, self.num_train())
    self.hessian_data = jax.tree.map(lambda a: a[:n], self.train_data)

  def evaluate(self, params):
    cfg = self.spec_cfg
    out = super().evaluate(params)
    matvec = products.hvp_fn(lambda p: self.loss(p, **self.hessian_data), params)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    top = estimators.top_eigenvalues(matvec, params, k1, k=cfg.top_k, num_iters=cfg.lanczos_iters)
    trace = estimators.hutchinson_trace(matvec, params, k2, num_samples=cfg.trace_samples)
    density = estimators.spectral_density(
      matvec,
      params,
      k3,
      num_iters=cfg.density_iters,
      num_runs=cfg.density_runs,
      grid=cfg.grid_points,
    )
    out.update(
      lambda_max=top.eigenvalues[0],
      trace=trace.estimate,
      trace_stderr=trace.stderr,
      density_grid=density.grid,
      density=density.density,
    )
    for i in range(1, cfg.top_k):
      out[f"lambda_{i + 1}"] = top.eigenvalues[i]
    return out

  def report(self, run_dir, records):
    files = sorted(glob.glob(os.path.join(run_dir, "arrays", "*-seed*-step*.npz")))
    if not files:
      return ""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    by_opt: dict[str, list[str]] = {}
    for f in files:
      label = os.path.basename(f).rsplit("-seed", 1)[0]
      if "-seed" + str(records[0]["seed"]) + "-" in os.path.basename(f):
        by_opt.setdefault(label, []).append(f)
    fig, axes = plt.subplots(1, len(by_opt), figsize=(5.5 * len(by_opt), 4), squeeze=False)
    for ax, (label, fs) in zip(axes[0], by_opt.items(), strict=True):
      picks = [fs[i] for i in sorted({0, len(fs) // 3, 2 * len(fs) // 3, len(fs) - 1})]
      for f in picks:
        data = np.load(f)
        step = int(os.path.basename(f).rsplit("step", 1)[1].split(".")[0])
        ax.semilogy(data["density_grid"], np.maximum(data["density"], 1e-8), label=f"step {step}")
      ax.set_title(f"Hessian spectral density ({label})")
      ax.set_xlabel("eigenvalue")
      ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "spectrum.png"), dpi=110)
    plt.close(fig)
    lines = [f"### Hessian spectrum during training (seed {records[0]['seed']})", ""]
    lines += [
      "| optimizer | step | λ_max | λ_2 | trace ± s.e. | train loss |",
      "|---|---|---|---|---|---|",
    ]
    for r in records:
      if r["seed"] == records[0]["seed"]:
        lines.append(
          f"| {r['optimizer']} | {r['step']} | {r['lambda_max']:.4g} | {r.get('lambda_2', 0):.4g} "
          f"| {r['trace']:.4g} ± {r['trace_stderr']:.2g} | {r['train_loss']:.4g} |"
        )
    lines += ["", "Density plot: `spectrum.png`."]
    return "\n".join(lines) + "\n"


def build(cfg: Config, dtype) -> Spectrum:
  return Spectrum(cfg, dtype)
