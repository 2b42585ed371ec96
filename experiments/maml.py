"""MAML sinusoid regression (Finn, Abbeel & Levine 2017).

Each task is :math:`y = A \\sin(x - \\varphi)` with :math:`A \\sim U[0.1, 5]`,
:math:`\\varphi \\sim U[0, \\pi]`, :math:`x \\sim U[-5, 5]`; ``k_shot`` support and query points
per task; a 1-40-40-1 ReLU network. Each meta-step draws ``meta_batch`` fresh tasks from the
seed and the step. Variants (the ``variant`` of an optimiser entry; the optimiser is the outer
one):

* ``maml``: :func:`curvopt.meta.maml_loss`, differentiating through ``inner_steps`` SGD steps;
* ``fomaml``: first-order MAML (``first_order=True``);
* ``imaml``: implicit MAML (Rajeswaran et al. 2019), proximal inner problem solved with
  ``imaml_inner_steps`` steps of ``imaml_inner_optimizer`` (L-BFGS with line search by
  default, or SGD at ``imaml_inner_lr``), meta-gradient by CG (memory flat in the inner
  steps). The implicit gradient is the meta-gradient only at the inner minimiser: with
  fixed-step SGD the solve diverges once the support curvature at θ exceeds
  ``2/lr - proximal_lambda`` (here eigenvalues of several hundred), so ``prox_residual``
  reports the solve's stationarity residual;
* ``pretrain``: no meta-learning, plain regression on all the tasks' points.

Evaluation (the same protocol for every variant): on ``eval_tasks`` fixed held-out tasks,
adapt with ``eval_inner_steps`` SGD steps at ``inner_lr`` on the support set and measure the
query MSE (``post_mse``; ``pre_mse`` before adaptation). ``prox_post_mse`` adapts instead by
iMAML's proximal inner solve, the protocol iMAML is trained for (Rajeswaran et al. evaluate
with it): an iMAML θ need not suit fixed-step SGD, whose steps can diverge from it, and
``prox_residual`` is the median stationarity residual of that solve. The report adds the
meta-gradient's memory (XLA's compiled temporary buffer size) against the number of inner steps.

References:
  Finn, Abbeel & Levine, "Model-agnostic meta-learning for fast adaptation of deep networks",
  ICML 2017.
  Rajeswaran, Finn, Kakade & Levine, "Meta-learning with implicit gradients", NeurIPS 2019.
"""

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax

from curvopt.launcher.tasks import Task, dense_init, mlp_apply
from curvopt.recipes.meta import maml_loss


@dataclass
class Config:
  name: str = "maml"
  hidden: list[int] = field(default_factory=lambda: [40, 40])
  k_shot: int = 10
  meta_batch: int = 25
  inner_lr: float = 0.01
  inner_steps: int = 1
  imaml_inner_steps: int = 16
  imaml_inner_lr: float | None = None  # None: inner_lr (SGD inner solver only)
  # "lbfgs": optax.lbfgs with its zoom line search, robust to the support loss's curvature
  # (fixed-step SGD diverges once the curvature at θ exceeds 2/lr - λ); "sgd": imaml_inner_lr.
  imaml_inner_optimizer: str = "lbfgs"
  proximal_lambda: float = 2.0
  cg_steps: int = 5
  eval_tasks: int = 200
  eval_inner_steps: int = 10
  memory_inner_steps: list[int] = field(default_factory=lambda: [1, 5, 20])


def sample_tasks(key, num_tasks: int, k_shot: int, dtype):
  """``num_tasks`` sinusoid tasks with ``k_shot`` support and query points each."""
  k_amp, k_phase, k_xs, k_xq = jax.random.split(key, 4)
  amp = jax.random.uniform(k_amp, (num_tasks, 1, 1), dtype, 0.1, 5.0)
  phase = jax.random.uniform(k_phase, (num_tasks, 1, 1), dtype, 0.0, jnp.pi)
  xs = jax.random.uniform(k_xs, (num_tasks, k_shot, 1), dtype, -5.0, 5.0)
  xq = jax.random.uniform(k_xq, (num_tasks, k_shot, 1), dtype, -5.0, 5.0)
  return {
    "support_x": xs,
    "support_y": amp * jnp.sin(xs - phase),
    "query_x": xq,
    "query_y": amp * jnp.sin(xq - phase),
  }


class Maml(Task):
  metric = "post_mse"
  variants = ("maml", "fomaml", "imaml", "pretrain")
  summary_metrics = ("pre_mse", "prox_post_mse", "prox_residual")

  def __init__(self, cfg: Config, dtype):
    super().__init__(cfg, dtype)
    cfg_eval = sample_tasks(jax.random.key(12345), cfg.eval_tasks, cfg.k_shot, self.dtype)
    self.eval_data = cfg_eval
    self.batch_size = cfg.meta_batch

  def num_train(self) -> int:
    return self.cfg.meta_batch

  def batch(self, data_key, step):
    return sample_tasks(
      jax.random.fold_in(data_key, step), self.cfg.meta_batch, self.cfg.k_shot, self.dtype
    )

  def init_params(self, key):
    return dense_init(key, [1, *self.cfg.hidden, 1], self.dtype)

  def task_loss(self, params, batch):
    x, y = batch
    return jnp.mean((mlp_apply(params, x, jax.nn.relu) - y) ** 2)

  def meta_loss_fn(
    self, variant: str | None, inner_steps: int | None = None, has_aux: bool = False
  ):
    cfg = self.cfg
    if variant == "imaml":
      if cfg.imaml_inner_optimizer == "lbfgs":
        solver = {"inner_optimizer": optax.lbfgs()}
      elif cfg.imaml_inner_optimizer == "sgd":
        solver = {"inner_lr": cfg.imaml_inner_lr or cfg.inner_lr}
      else:
        raise ValueError(
          f"task.imaml_inner_optimizer={cfg.imaml_inner_optimizer!r}; use 'lbfgs' or 'sgd'."
        )
      return maml_loss(
        self.task_loss,
        **solver,
        inner_steps=inner_steps or cfg.imaml_inner_steps,
        implicit=True,
        proximal_lambda=cfg.proximal_lambda,
        cg_steps=cfg.cg_steps,
        has_aux=has_aux,
      )
    return maml_loss(
      self.task_loss,
      inner_lr=cfg.inner_lr,
      inner_steps=inner_steps or cfg.inner_steps,
      first_order=variant == "fomaml",
    )

  def objective(self, variant, inner_steps=None):
    if variant == "pretrain":

      def pretrain_loss(params, support_x, support_y, query_x, query_y):
        x = jnp.concatenate([support_x, query_x], 1)
        y = jnp.concatenate([support_y, query_y], 1)
        return self.task_loss(params, (x, y))

      return pretrain_loss
    meta_loss = jax.vmap(self.meta_loss_fn(variant, inner_steps), in_axes=(None, 0, 0))

    def loss(params, support_x, support_y, query_x, query_y):
      return meta_loss(params, (support_x, support_y), (query_x, query_y)).mean()

    return loss

  def loss(self, params, support_x, support_y, query_x, query_y):
    return self.objective("maml")(params, support_x, support_y, query_x, query_y)

  def evaluate(self, params):
    cfg, data = self.cfg, self.eval_data

    def adapt_and_score(sx, sy, qx, qy):
      def sgd(p, _):
        g = jax.grad(self.task_loss)(p, (sx, sy))
        return jax.tree.map(lambda a, b: a - cfg.inner_lr * b, p, g), None

      adapted, _ = jax.lax.scan(sgd, params, None, length=cfg.eval_inner_steps)
      return self.task_loss(params, (qx, qy)), self.task_loss(adapted, (qx, qy))

    support = (data["support_x"], data["support_y"])
    query = (data["query_x"], data["query_y"])
    pre, post = jax.vmap(adapt_and_score)(*support, *query)
    # iMAML's own protocol (Rajeswaran et al. 2019): adapt by the same proximal inner solve
    # as in meta-training; its stationarity residual shows whether that solve converged.
    prox_loss = self.meta_loss_fn("imaml", has_aux=True)
    prox_post, aux = jax.vmap(prox_loss, in_axes=(None, 0, 0))(params, support, query)
    return {
      "pre_mse": pre.mean(),
      "post_mse": post.mean(),
      "prox_post_mse": prox_post.mean(),
      "prox_residual": jnp.median(aux.inner_grad_norm),
    }

  def report(self, run_dir, records):
    """Meta-gradient memory (XLA temporary buffers) against the number of inner steps."""
    del run_dir, records
    params = self.init_params(jax.random.key(0))
    batch = sample_tasks(jax.random.key(1), self.cfg.meta_batch, self.cfg.k_shot, self.dtype)
    lines = [
      "### Meta-gradient memory vs inner steps",
      "",
      "XLA's temporary buffer size of the compiled meta-gradient (meta-batch "
      f"{self.cfg.meta_batch}, {self.cfg.k_shot}-shot):",
      "",
      "| inner steps | " + " | ".join(f"{v} (KiB)" for v in ("maml", "fomaml", "imaml")) + " |",
      "|---|---|---|---|",
    ]
    for k in self.cfg.memory_inner_steps:
      cells = []
      for variant in ("maml", "fomaml", "imaml"):
        grad = jax.jit(jax.grad(self.objective(variant, inner_steps=k)))
        stats = grad.lower(params, **batch).compile().memory_analysis()
        size = getattr(stats, "temp_size_in_bytes", None) if stats is not None else None
        cells.append("n/a" if size is None else f"{size / 1024:.0f}")
      lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build(cfg: Config, dtype) -> Maml:
  return Maml(cfg, dtype)
