r"""Physics-informed neural networks (PINNs): 2-D Poisson, 1+1-D heat, 5-D Poisson.

A network :math:`u_\theta` is fitted to a PDE by least squares on its residuals at collocation
points, as in Dangel, Müller & Zeinhofer (2024):

.. math::
   L(\theta) = \tfrac12 \operatorname{mean}_{x \in \Omega} r_\Omega(x)^2
             + \tfrac12 \operatorname{mean}_{x \in \partial\Omega} r_{\partial\Omega}(x)^2,

with :math:`r_\Omega = -\Delta u_\theta - f` (Poisson) or
:math:`r_\Omega = \partial_t u_\theta - \tfrac14 \partial_x^2 u_\theta` (heat), and
:math:`r_{\partial\Omega} = u_\theta - u^\star` on the boundary (and the initial line). The
input derivatives come from :func:`curvopt.autodiff.operators.laplacian` /
:func:`~curvopt.autodiff.operators.hessian_diagonal` (forward mode, no dense Hessian).

For Newton-CG the model is the residual vector and the loss is the weighted
:math:`\tfrac12\|\cdot\|^2` above, so the generalised Gauss-Newton matrix is the Gauss-Newton
matrix :math:`J^\top W J` of the residuals, which for these linear PDEs is the energy natural
gradient (ENGD) Gram matrix of Müller & Zeinhofer (2023). With its defaults, ``newton_cg``
forms it from per-point residual gradients and solves exactly (in parameter space for the
small published networks, in sample space when parameters outnumber points).

Problems (``task.problem``):

* ``poisson2d``: :math:`-\Delta u = 2\pi^2 \sin(\pi x)\sin(\pi y)` on :math:`[0,1]^2`,
  :math:`u = 0` on the boundary, :math:`u^\star = \sin(\pi x)\sin(\pi y)`;
* ``heat``: :math:`u_t - \tfrac14 u_{xx} = 0` on :math:`(t, x) \in [0,1]^2`,
  :math:`u(0, x) = \sin(\pi x)`, :math:`u = 0` at :math:`x \in \{0, 1\}`,
  :math:`u^\star = e^{-\pi^2 t/4}\sin(\pi x)`; the boundary set holds ``num_boundary``
  points on :math:`x \in \{0,1\}` and ``num_initial`` on :math:`t = 0`;
* ``poisson5d``: :math:`-\Delta u = \pi^2 \sum_i \cos(\pi x_i)` on :math:`[0,1]^5`,
  :math:`u = u^\star = \sum_i \cos(\pi x_i)` on the boundary.

Metrics: ``l2_error``, the root-mean-square of :math:`u_\theta - u^\star` over
``eval_factor * num_interior`` fixed uniform points (the "L2 error" of the paper's tables),
``relative_l2_error`` (the same divided by the RMS of :math:`u^\star`) and ``pde_loss`` (the
loss on the initial collocation points). The
report adds ``solution.png`` (prediction, exact solution and error on a grid, one row per
optimiser; a 2-D slice through the centre for ``poisson5d``) and ``pinn_curves.png`` (loss
and L2 error against steps and seconds).

References:
  Dangel, Müller & Zeinhofer, "Kronecker-factored approximate curvature for physics-informed
  neural networks", NeurIPS 2024.
  Müller & Zeinhofer, "Achieving high accuracy with PINNs via energy natural gradient
  descent", ICML 2023.
  Raissi, Perdikaris & Karniadakis, "Physics-informed neural networks", J. Comput. Phys. 2019.
"""

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.autodiff.operators import hessian_diagonal, laplacian
from curvopt.launcher.config import ConfigError
from curvopt.launcher.tasks import Task

PROBLEMS = ("poisson2d", "heat", "poisson5d")
DIMS = {"poisson2d": 2, "heat": 2, "poisson5d": 5}


@dataclass
class Config:
  name: str = "pinn"
  problem: str = "poisson2d"
  hidden: list[int] = field(default_factory=lambda: [64])
  num_interior: int = 900
  num_boundary: int = 120
  num_initial: int = 0
  resample: bool = False
  eval_factor: int = 10
  data_seed: int = 0
  plot_grid: int = 41


# ---------------------------------------------------------------- exact solutions and sources


def exact_solution(problem: str, x: jax.Array) -> jax.Array:
  """:math:`u^\\star` at points ``x`` of shape ``(..., d)`` (heat: ``x = (t, x)``)."""
  if problem == "poisson2d":
    return jnp.prod(jnp.sin(jnp.pi * x), axis=-1)
  if problem == "heat":
    return jnp.exp(-(jnp.pi**2) * x[..., 0] / 4) * jnp.sin(jnp.pi * x[..., 1])
  return jnp.sum(jnp.cos(jnp.pi * x), axis=-1)


def source(problem: str, x: jax.Array) -> jax.Array:
  """The right-hand side :math:`f` of :math:`-\\Delta u = f` (zero for heat)."""
  if problem == "poisson2d":
    return 2 * jnp.pi**2 * jnp.prod(jnp.sin(jnp.pi * x), axis=-1)
  if problem == "poisson5d":
    return jnp.pi**2 * jnp.sum(jnp.cos(jnp.pi * x), axis=-1)
  return jnp.zeros(x.shape[:-1], x.dtype)


def interior_residual(problem: str, u: Callable[[jax.Array], jax.Array], x: jax.Array):
  """:math:`r_\\Omega` of the solution candidate ``u`` (one point -> scalar) at points ``x``."""
  if problem == "heat":
    u_t = jax.vmap(lambda p: jax.jvp(u, (p,), (jnp.array([1.0, 0.0], p.dtype),))[1])(x)
    u_xx = hessian_diagonal(u, x)[:, 1]
    return u_t - 0.25 * u_xx
  return -laplacian(u, x) - source(problem, x)


# ---------------------------------------------------------------- sampling


def sample_interior(key: jax.Array, n: int, d: int, dtype: Any) -> jax.Array:
  return jax.random.uniform(key, (n, d), dtype)


def sample_boundary(key: jax.Array, n: int, d: int, dtype: Any) -> jax.Array:
  """``n`` uniform points on the boundary of :math:`[0,1]^d` (a random face each)."""
  k_pt, k_face, k_side = jax.random.split(key, 3)
  x = jax.random.uniform(k_pt, (n, d), dtype)
  face = jax.random.randint(k_face, (n,), 0, d)
  side = jax.random.bernoulli(k_side, 0.5, (n,)).astype(dtype)
  return jnp.where(jax.nn.one_hot(face, d, dtype=bool), side[:, None], x)


def sample_heat_boundary(key: jax.Array, n_side: int, n_initial: int, dtype: Any) -> jax.Array:
  """``n_side`` points on :math:`x \\in \\{0,1\\}` and ``n_initial`` on :math:`t = 0`."""
  k1, k2, k3 = jax.random.split(key, 3)
  t = jax.random.uniform(k1, (n_side,), dtype)
  side = jax.random.bernoulli(k2, 0.5, (n_side,)).astype(dtype)
  x0 = jax.random.uniform(k3, (n_initial,), dtype)
  return jnp.concatenate(
    [jnp.stack([t, side], -1), jnp.stack([jnp.zeros_like(x0), x0], -1)], axis=0
  )


# ---------------------------------------------------------------- the task


def init_mlp(key: jax.Array, sizes: list[int], dtype: Any) -> list[dict]:
  """PyTorch's default ``nn.Linear`` initialisation: weights and biases U(±1/sqrt(fan_in))."""
  params = []
  for k, (m, n) in zip(
    jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:], strict=True), strict=True
  ):
    kw, kb = jax.random.split(k)
    bound = 1.0 / np.sqrt(m)
    params.append(
      {
        "w": jax.random.uniform(kw, (m, n), dtype, -bound, bound),
        "b": jax.random.uniform(kb, (n,), dtype, -bound, bound),
      }
    )
  return params


def mlp(params: list[dict], x: jax.Array) -> jax.Array:
  """The tanh MLP at one point ``(d,)`` -> scalar."""
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return (x @ params[-1]["w"] + params[-1]["b"])[0]


class Pinn(Task):
  metric = "l2_error"
  summary_metrics = ("relative_l2_error", "pde_loss")

  def __init__(self, cfg: Config, dtype):
    super().__init__(cfg, dtype)
    if cfg.problem not in PROBLEMS:
      raise ConfigError(
        f"config key 'task.problem': invalid value {cfg.problem!r}; allowed values: "
        f"{list(PROBLEMS)}."
      )
    for key in ("num_interior", "num_boundary", "eval_factor", "plot_grid"):
      if getattr(cfg, key) < 1:
        raise ConfigError(f"config key 'task.{key}': expected an integer >= 1.")
    if cfg.problem == "heat" and cfg.num_initial < 1:
      raise ConfigError("config key 'task.num_initial': the heat problem needs >= 1 point.")
    self.problem = cfg.problem
    self.dim = DIMS[cfg.problem]
    self.sizes = [self.dim, *cfg.hidden, 1]
    key = jax.random.key(cfg.data_seed)
    self.train_data = self.sample(key)
    k_eval = jax.random.fold_in(key, 10**6)
    self.eval_points = sample_interior(
      k_eval, cfg.eval_factor * cfg.num_interior, self.dim, self.dtype
    )
    self.u_eval = exact_solution(self.problem, self.eval_points)
    g = np.linspace(0.0, 1.0, cfg.plot_grid)
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    if self.dim > 2:  # a slice through the centre of the cube
      grid = np.concatenate([grid, np.full((len(grid), self.dim - 2), 0.5)], -1)
    self.plot_points = jnp.asarray(grid, self.dtype)

  def sample(self, key: jax.Array) -> dict[str, jax.Array]:
    """Fresh collocation points: ``{"x_interior": (N_Ω, d), "x_boundary": (N_∂Ω, d)}``."""
    k_int, k_bdy = jax.random.split(key)
    cfg = self.cfg
    interior = sample_interior(k_int, cfg.num_interior, self.dim, self.dtype)
    if self.problem == "heat":
      boundary = sample_heat_boundary(k_bdy, cfg.num_boundary, cfg.num_initial, self.dtype)
    else:
      boundary = sample_boundary(k_bdy, cfg.num_boundary, self.dim, self.dtype)
    return {"x_interior": interior, "x_boundary": boundary}

  def num_train(self) -> int:
    return self.cfg.num_interior

  def batch(self, data_key: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """The fixed points, or (``resample``) new ones for every step, from the seed and step."""
    if self.cfg.resample:
      return self.sample(jax.random.fold_in(data_key, step))
    return self.train_data

  def init_params(self, key):
    return init_mlp(key, self.sizes, self.dtype)

  def u(self, params) -> Callable[[jax.Array], jax.Array]:
    return lambda x: mlp(params, x)

  # The residual vector is the model, the weighted 1/2 |.|^2 the loss: GGN = Gauss-Newton.
  def model_fn(self, params, x_interior, x_boundary):
    u = self.u(params)
    return {
      "interior": interior_residual(self.problem, u, x_interior),
      "boundary": jax.vmap(u)(x_boundary) - exact_solution(self.problem, x_boundary),
    }

  def output_loss(self, residuals):
    return 0.5 * jnp.mean(residuals["interior"] ** 2) + 0.5 * jnp.mean(residuals["boundary"] ** 2)

  def loss(self, params, x_interior, x_boundary):
    return self.output_loss(self.model_fn(params, x_interior, x_boundary))

  def evaluate(self, params):
    u = jax.vmap(self.u(params))(self.eval_points)
    err = u - self.u_eval
    l2 = jnp.sqrt(jnp.mean(err**2))
    return {
      "l2_error": l2,
      "relative_l2_error": l2 / jnp.sqrt(jnp.mean(self.u_eval**2)),
      "pde_loss": self.loss(params, **self.train_data),
      "u_plot": jax.vmap(self.u(params))(self.plot_points),  # to arrays/, for solution.png
    }

  def report(self, run_dir: str, records: list[dict]) -> str:
    return write_report(self, run_dir, records)


def build(cfg: Config, dtype) -> Pinn:
  return Pinn(cfg, dtype)


# ---------------------------------------------------------------- report and plots


def _latest_arrays(run_dir: str) -> dict[str, np.ndarray]:
  """Label -> the last saved ``u_plot`` of each optimiser's first seed."""
  out = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "arrays", "*-seed*-step*.npz"))):
    label = os.path.basename(path).rsplit("-seed", 1)[0]
    with np.load(path) as data:
      if "u_plot" in data:
        out[label] = np.asarray(data["u_plot"])  # sorted: the last step wins
  return out


def write_report(task: Pinn, run_dir: str, records: list[dict]) -> str:
  r"""Writes ``solution.png`` and ``pinn_curves.png``; returns a Markdown table.

  ``solution.png``: the exact solution once, then one column per optimiser with its last
  prediction (on the exact solution's colour scale) and its error :math:`|u_\theta - u^\star|`
  on one logarithmic colour scale shared by all optimisers, so the panels compare.
  ``pinn_curves.png``: loss and L2 error against steps (logarithmic axis, so a few hundred
  second-order steps and 10⁵ Adam steps both show) and against training seconds.
  """
  import matplotlib

  matplotlib.use("Agg", force=False)
  from curvopt.launcher.records import group

  runs = {label: min(seeds.items())[1] for label, seeds in group(records).items()}  # 1st seed
  _plot_curves(task, runs, os.path.join(run_dir, "pinn_curves.png"))
  preds = _latest_arrays(run_dir)
  order = list(runs)  # the config's order; labels not found (slugged) go last
  preds = dict(sorted(preds.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
  if preds:
    l2 = {label: max(rs, key=lambda r: r["step"]).get("l2_error") for label, rs in runs.items()}
    _plot_solutions(task, preds, l2, os.path.join(run_dir, "solution.png"))
  lines = [
    "| optimiser | steps | seconds | s/step | loss | l2_error | relative_l2_error |",
    "|---|---|---|---|---|---|---|",
  ]
  for label, rs in runs.items():
    last = max(rs, key=lambda r: r["step"])
    per_step = last["wall_time"] / max(last["step"], 1)
    lines.append(
      f"| {label} | {last['step']} | {last['wall_time']:.1f} | {per_step:.3g} | "
      f"{_num(last.get('pde_loss'))} | {_num(last.get('l2_error'))} | "
      f"{_num(last.get('relative_l2_error'))} |"
    )
  return (
    "### PINN\n\n" + "\n".join(lines) + "\n\nPlots: `solution.png` (exact solution, then each "
    "optimiser's prediction and error), `pinn_curves.png` (loss and L2 error).\n"
  )


def _num(value: float | None) -> str:
  return "—" if value is None else f"{value:.3g}"


def _plot_curves(task: Pinn, runs: dict[str, list[dict]], path: str) -> None:
  """Loss and L2 error against steps (log axis, step 0 left out) and training seconds."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
  for label, rs in runs.items():
    rs = sorted(rs, key=lambda r: r["step"])
    for row, key in enumerate(("pde_loss", "l2_error")):
      vals = np.array([np.nan if r.get(key) is None else r[key] for r in rs], np.float64)
      steps = np.array([r["step"] for r in rs])
      (line,) = axes[row, 0].loglog(steps[steps > 0], vals[steps > 0], label=label)
      times = [r["wall_time"] for r in rs]
      axes[row, 1].semilogy(times, vals, label=label, color=line.get_color())
  for row, key in enumerate(("pde_loss", "l2_error")):
    for col, xlabel in enumerate(("step (log scale)", "training time (s)")):
      axes[row, col].set_xlabel(xlabel)
      axes[row, col].set_ylabel(key)
      axes[row, col].grid(alpha=0.3)
      axes[row, col].grid(alpha=0.1, which="minor")
  axes[0, 1].legend(fontsize=9)
  fig.suptitle(f"PINN {task.problem}")
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_solutions(
  task: Pinn, preds: dict[str, np.ndarray], l2_errors: dict[str, float], path: str
) -> None:
  """The exact solution once; per optimiser its prediction and error, on shared scales."""
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm

  n = task.cfg.plot_grid
  exact = np.asarray(exact_solution(task.problem, task.plot_points)).reshape(n, n)
  errors = {label: np.abs(u.reshape(n, n) - exact) for label, u in preds.items()}
  top = max(float(e.max()) for e in errors.values())
  positive = [float(e[e > 0].min()) for e in errors.values() if (e > 0).any()]
  low = max(min(positive, default=top), top * 1e-8) if top > 0 else 1e-16
  norm = LogNorm(vmin=low, vmax=max(top, low * 10))
  names = ("$t$", "$x$") if task.problem == "heat" else ("$x_1$", "$x_2$")
  cols = len(preds) + 1
  fig, axes = plt.subplots(2, cols, figsize=(2.7 * cols + 1.0, 5.6), layout="constrained")
  panel = {"origin": "lower", "extent": (0, 1, 0, 1)}
  solution = axes[0, 0].imshow(exact.T, cmap="viridis", **panel)
  axes[0, 0].set_title("exact solution")
  axes[1, 0].axis("off")
  for j, (label, u) in enumerate(preds.items(), start=1):
    axes[0, j].imshow(u.reshape(n, n).T, cmap="viridis", norm=solution.norm, **panel)
    axes[0, j].set_title(label, fontsize=10)
    error = axes[1, j].imshow(np.maximum(errors[label], low).T, cmap="magma", norm=norm, **panel)
  for ax in axes.flat:
    if ax.axison:
      ax.set_xlabel(names[0])
      ax.set_ylabel(names[1])
      ax.set_xticks([0, 0.5, 1])
      ax.set_yticks([0, 0.5, 1])
  key = "top row: prediction\nbottom row: |u - u*|\n\nL2 error:\n" + "\n".join(
    f"{label}: {_num(l2_errors.get(label))}" for label in preds
  )
  axes[1, 0].text(0.0, 0.95, key, va="top", fontsize=9, transform=axes[1, 0].transAxes)
  fig.colorbar(solution, ax=axes[0, :], shrink=0.9, label="u")
  fig.colorbar(error, ax=axes[1, :], shrink=0.9, label="|u - u*| (shared, log scale)")
  slice_note = " (slice x_3 = x_4 = x_5 = 0.5)" if task.dim > 2 else ""
  fig.suptitle(f"PINN {task.problem}{slice_note}: last evaluated prediction of each optimiser")
  fig.savefig(path, dpi=90)
  plt.close(fig)
