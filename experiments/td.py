"""TD(0) prediction on the random-walk chain (Sutton & Barto, Example 6.2 and §7.1).

``num_states`` non-terminal states in a row, episodes start in the middle and step left or
right with probability 1/2; leaving on the left pays ``left_reward``, on the right 1, and
nothing else is rewarded (undiscounted). The true values are linear,
:math:`v(i) = \\ell + (1 - \\ell)\\, i / (N + 1)`. A fixed set of episodes (from
``split_seed``) gives the transitions; each step draws a mini-batch of them.

A small value network (one-hot state -> tanh hidden layer -> value) is trained on

* ``semi_gradient`` (the default): :func:`curvopt.targets.td0_loss`, the stop-gradient target,
  whose negative gradient is the TD(0) update;
* ``residual_gradient``: :math:`\\tfrac12 (r + \\gamma v(s') - v(s))^2` differentiated through
  both values (Baird 1995), a true gradient method that converges to a different fixed point.

For Newton-CG the semi-gradient objective is not a fixed loss (its target moves with the
parameters), so the curvature is the Gauss-Newton matrix of the stop-gradient loss,
:math:`G = \\frac1B J^\\top J` with :math:`J` the Jacobian of :math:`v(s_{t-1})`, plugged in as a
custom curvature; the residual-gradient objective uses the ordinary GGN of the TD errors. The
metric is the RMS error against the true values, over the states.

References:
  Sutton & Barto, "Reinforcement Learning: An Introduction", 2nd ed. 2018, §6.2, §9.3, §11.5.
  Baird, "Residual algorithms", ICML 1995.
"""

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.launcher.tasks import Task, as_dtype, dense_init, mlp_apply
from curvopt.recipes.targets import td0_loss


@dataclass
class Config:
  name: str = "td"
  num_states: int = 19
  left_reward: float = -1.0
  num_episodes: int = 100
  hidden: list[int] = field(default_factory=lambda: [16])
  batch_size: int | None = 64
  split_seed: int = 0


def random_walk_transitions(num_states: int, left_reward: float, num_episodes: int, seed: int):
  """Transitions ``(s_tm1, r_t, s_t, discount_t)`` of ``num_episodes`` random-walk episodes.

  States are ``0 .. num_states - 1``; a terminal ``s_t`` is stored as the neighbouring state
  with ``discount_t = 0`` (its value is never used).
  """
  rng = np.random.default_rng(seed)
  s_tm1, r_t, s_t, d_t = [], [], [], []
  for _ in range(num_episodes):
    s = num_states // 2
    while True:
      nxt = s + (1 if rng.random() < 0.5 else -1)
      s_tm1.append(s)
      if nxt < 0 or nxt >= num_states:
        r_t.append(left_reward if nxt < 0 else 1.0)
        s_t.append(s)
        d_t.append(0.0)
        break
      r_t.append(0.0)
      s_t.append(nxt)
      d_t.append(1.0)
      s = nxt
  return {
    "s_tm1": np.asarray(s_tm1, np.int32),
    "r_t": np.asarray(r_t),
    "s_t": np.asarray(s_t, np.int32),
    "discount_t": np.asarray(d_t),
  }


class TD(Task):
  metric = "rms_error"
  variants = ("semi_gradient", "residual_gradient")
  summary_metrics = ("td_error_sq",)

  def __init__(self, cfg: Config, dtype):
    super().__init__(cfg, dtype)
    data = random_walk_transitions(
      cfg.num_states, cfg.left_reward, cfg.num_episodes, cfg.split_seed
    )
    self.train_data = as_dtype(data, dtype)
    self.batch_size = cfg.batch_size
    i = np.arange(1, cfg.num_states + 1)
    self.true_values = jnp.asarray(
      cfg.left_reward + (1.0 - cfg.left_reward) * i / (cfg.num_states + 1), dtype
    )

  def init_params(self, key):
    return dense_init(key, [self.cfg.num_states, *self.cfg.hidden, 1], self.dtype)

  def value(self, params, s):
    x = jax.nn.one_hot(s, self.cfg.num_states, dtype=self.dtype)
    return mlp_apply(params, x)[..., 0]

  def loss(self, params, s_tm1, r_t, s_t, discount_t):
    per_transition = jax.vmap(td0_loss, in_axes=(None, None, 0, 0, 0, 0))
    return per_transition(self.value, params, s_tm1, r_t, s_t, discount_t).mean()

  def td_errors(self, params, s_tm1, r_t, s_t, discount_t):
    return r_t + discount_t * self.value(params, s_t) - self.value(params, s_tm1)

  def residual_loss(self, params, s_tm1, r_t, s_t, discount_t):
    return 0.5 * jnp.mean(self.td_errors(params, s_tm1, r_t, s_t, discount_t) ** 2)

  def objective(self, variant):
    return self.residual_loss if variant == "residual_gradient" else self.loss

  def gauss_newton_split(self, variant):
    if variant == "residual_gradient":
      return self.td_errors, lambda delta: 0.5 * jnp.mean(delta**2)
    # Semi-gradient TD: the target is a constant, so the Gauss-Newton matrix of
    # 0.5 * mean((target - v(s_tm1))**2) is that of 0.5 * mean(v(s_tm1)**2).
    return (lambda params, s_tm1: self.value(params, s_tm1)), lambda v: 0.5 * jnp.mean(v**2)

  def evaluate(self, params):
    v = self.value(params, jnp.arange(self.cfg.num_states))
    return {
      "rms_error": jnp.sqrt(jnp.mean((v - self.true_values) ** 2)),
      "td_error_sq": jnp.mean(self.td_errors(params, **self.train_data) ** 2),
    }


def build(cfg: Config, dtype) -> TD:
  return TD(cfg, dtype)
