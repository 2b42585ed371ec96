"""Tests for curvopt.kfac: the quadratic-model step, Gauss-Newton agreement, compositions and
convergence against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import regression_problem

import curvopt
from curvopt.optimizers.kfac import kfac, quadratic_step

F64 = jnp.float64


def test_quadratic_step_minimises_the_two_dimensional_model():
  """Against the closed form -Q^{-1} b and a grid search of the model."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(2, 2))
  q, b = m @ m.T + 0.1 * np.eye(2), rng.normal(size=2)
  alpha, mu, change = quadratic_step(jnp.asarray(q), jnp.asarray(b), jnp.asarray(False))
  c = -np.linalg.solve(q, b)
  np.testing.assert_allclose([alpha, mu], c, rtol=1e-12)
  model = lambda c: b @ c + 0.5 * c @ q @ c  # noqa: E731
  np.testing.assert_allclose(change, model(c), rtol=1e-12)
  grid = [model(c + np.array([dx, dy])) for dx in (-1e-3, 0, 1e-3) for dy in (-1e-3, 0, 1e-3)]
  assert min(grid) >= model(c)
  # First update: no previous step, so only alpha.
  alpha, mu, change = quadratic_step(jnp.asarray(q), jnp.asarray(b), jnp.asarray(True))
  np.testing.assert_allclose([alpha, mu], [-b[0] / q[0, 0], 0.0], rtol=1e-12)


def _linear_problem():
  w = jnp.zeros((4, 3), F64)
  x = jax.random.normal(jax.random.key(0), (20, 4), F64)
  y = x @ jax.random.normal(jax.random.key(1), (4, 3), F64) + 0.1 * jax.random.normal(
    jax.random.key(2), (20, 3), F64
  )
  model_fn = lambda w, x: x @ w  # noqa: E731
  loss_fn = lambda z, y: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, -1))  # noqa: E731
  return w, x, y, model_fn, loss_fn


def test_first_step_on_a_linear_model_is_the_least_squares_solution():
  """Exact curvature: K-FAC is Gauss-Newton here, and the quadratic model picks alpha = -1."""
  w, x, y, model_fn, loss_fn = _linear_problem()
  tx = kfac(model_fn=model_fn, loss_fn=loss_fn, curvature="ggn", damping=1e-20)
  grads = jax.grad(lambda w: loss_fn(model_fn(w, x), y))(w)
  updates, state = jax.jit(tx.update)(grads, tx.init(w), w, x=x, y=y)
  np.testing.assert_allclose(w + updates, np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-8)
  np.testing.assert_allclose(state.info.learning_rate, -1.0, rtol=1e-8)


def _run(tx, problem, steps, data_like=True):
  value_fn = lambda p: problem.loss_fn(problem.model_fn(p, problem.x), problem.y)  # noqa: E731

  @jax.jit
  def step(params, state):
    grads = jax.grad(value_fn)(params)
    updates, state = tx.update(grads, state, params, x=problem.x, y=problem.y)
    params = optax.apply_updates(params, updates)
    return params, state, value_fn(params)

  params, state = problem.params, tx.init(problem.params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return np.array(losses), state


@pytest.fixture(scope="module")
def problem():
  return regression_problem(n=64, sizes=(3, 12, 12, 2))


def test_defaults_converge_faster_than_adam_and_the_state_is_consistent(problem):
  """The automatic learning rate, momentum and damping: the loss after 60 steps is below what
  Adam (tuned learning rate 1e-2) reaches in 300, and rho was measured every 5th update."""
  data = {"x": problem.x, "y": problem.y}
  tx = kfac(model_fn=problem.model_fn, loss_fn=problem.loss_fn, data_like=data)
  losses, state = _run(tx, problem, 60)
  adam, _ = _run(optax.adam(1e-2), problem, 300)
  assert losses[-1] < adam[-1] < losses[0], (losses[-1], adam[-1])
  assert int(state.count) == 60 and np.isfinite(float(state.info.rho))  # 60th: 60 % 5 == 0
  assert 0 < float(state.damping) < 1.0  # adapted down from 1 on a well-modelled problem


def test_fixed_learning_rate_momentum_chain_and_lazy_allocation(problem):
  """optax.chain with a clip in front; no data_like: the first update allocates the factors."""
  tx = optax.chain(
    optax.clip_by_global_norm(10.0),
    kfac(0.2, momentum=0.5, model_fn=problem.model_fn, loss_fn=problem.loss_fn),
  )
  losses, state = _run(tx, problem, 40)
  assert losses[-1] < 0.2 * losses[0]
  assert state[1].factors is not None and float(state[1].info.learning_rate) == -0.2


def test_inject_hyperparams_changes_the_learning_rate(problem):
  make = optax.inject_hyperparams(kfac, static_args=("model_fn", "loss_fn"))
  tx = make(learning_rate=0.1, model_fn=problem.model_fn, loss_fn=problem.loss_fn)
  state = tx.init(problem.params)
  grads = jax.grad(problem.value_fn)(problem.params)
  update = jax.jit(lambda s: tx.update(grads, s, problem.params, x=problem.x, y=problem.y)[0])
  base = update(state)
  state.hyperparams["learning_rate"] = jnp.asarray(0.3, F64)
  curvopt_tree = optax.tree.scale(3.0, base)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), update(state), curvopt_tree
  )


def test_nnx_optimizer_with_module_and_data_like():
  from flax import nnx

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(2, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  x = jax.random.normal(jax.random.key(3), (64, 2), jnp.float32)
  y = jnp.sin(2 * x[:, :1]) * x[:, 1:]
  model = Mlp(nnx.Rngs(0))
  tx = curvopt.kfac(
    model_fn=lambda m, x: m(x),
    loss_fn=lambda out, y: 0.5 * jnp.mean((out - y) ** 2),
    module=model,
    data_like={"x": x, "y": y},
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    value, grads = nnx.value_and_grad(lambda m: 0.5 * jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads, x=x, y=y)
    return value

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.1 * losses[0], losses


def test_misuse_is_named(problem):
  with pytest.raises(ValueError, match="momentum"):
    kfac(momentum=0.9, model_fn=problem.model_fn, loss_fn=problem.loss_fn)
  with pytest.raises(ValueError, match="damping"):
    kfac(0.1, damping=0.0, model_fn=problem.model_fn, loss_fn=problem.loss_fn)
  tx = kfac(0.1, model_fn=problem.model_fn, loss_fn=problem.loss_fn)
  with pytest.raises(ValueError, match="labels"):
    tx.update(problem.params, tx.init(problem.params), problem.params, x=problem.x, labels=1)
