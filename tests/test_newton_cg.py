"""Tests for curvopt.newton_cg against dense solves, scipy's Newton-CG and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

from curvopt.newton_cg import NewtonCGState, newton_cg, scale_by_newton_cg, value_fn_from_model
from curvopt.products import hvp_fn

# ---------------------------------------------------------------------------------- helpers


def _mlp_problem(seed=0, n=32, dtype=jnp.float64):
  key = jax.random.PRNGKey(seed)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  params = {
    "w1": 0.5 * jax.random.normal(k1, (3, 5), dtype),
    "b1": jnp.zeros(5, dtype),
    "w2": 0.5 * jax.random.normal(k2, (5, 2), dtype),
  }
  x = jax.random.normal(k3, (n, 3), dtype)
  y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1) + 0.1 * jax.random.normal(
    k4, (n, 2), dtype
  )
  model_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  loss_fn = lambda z, y: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=-1))
  return params, x, y, model_fn, loss_fn


def _digits():
  from sklearn.datasets import load_digits

  data = load_digits()
  x = jnp.asarray(data.data / 16.0, jnp.float64)
  y = jax.nn.one_hot(data.target, 10, dtype=jnp.float64)
  return x, y


def _logistic(params, x, y):
  logits = x @ params["w"] + params["b"]
  return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1)) + 5e-4 * jnp.sum(
    params["w"] ** 2
  )


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("use_jit", [False, True])
def test_spd_quadratic_solved_in_one_step(use_jit):
  rng = np.random.default_rng(0)
  m = rng.normal(size=(7, 7))
  a = jnp.asarray(m @ m.T + 0.5 * np.eye(7))
  c = jnp.asarray(rng.normal(size=7))
  split = lambda v: {"u": v[:4], "v": v[4:].reshape(3, 1)}
  f = lambda p: 0.5 * ravel_pytree(p)[0] @ a @ ravel_pytree(p)[0] - c @ ravel_pytree(p)[0]
  tx = newton_cg(1.0, curvature="hessian", damping=0.0, adapt_damping=False, cg_tol=1e-12)
  params = split(jnp.zeros(7))
  update = lambda g, s, p: tx.update(g, s, p, value_fn=f)
  update = jax.jit(update) if use_jit else update
  updates, state = update(jax.grad(f)(params), tx.init(params), params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(ravel_pytree(params)[0], np.linalg.solve(a, c), rtol=1e-10)
  inner = state[0]
  assert isinstance(inner, NewtonCGState)
  # A quadratic is its own model: rho = 1 exactly.
  np.testing.assert_allclose(inner.rho, 1.0, rtol=1e-8)
  assert int(inner.num_rejected) == 0 and not bool(inner.negative_curvature)


@pytest.mark.slow
def test_digits_logistic_regression_as_few_iterations_as_scipy():
  x, y = _digits()
  params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  flat0, unravel = ravel_pytree(params)
  f = jax.jit(lambda v: _logistic(unravel(v), x, y))
  g = jax.jit(jax.grad(lambda v: _logistic(unravel(v), x, y)))
  hessp = jax.jit(
    lambda v, p: jax.jvp(jax.grad(lambda u: _logistic(unravel(u), x, y)), (v,), (p,))[1]
  )
  # scipy's Newton-CG: the first iteration at which ||g|| <= 1e-6.
  norms = []
  scipy.optimize.minimize(
    lambda v: float(f(v)),
    np.zeros(flat0.size),
    jac=lambda v: np.asarray(g(v)),
    hessp=lambda v, p: np.asarray(hessp(v, p)),
    method="Newton-CG",
    callback=lambda v: norms.append(np.linalg.norm(g(v))),
    options={"xtol": 1e-14, "maxiter": 100},
  )
  scipy_iters = next(i + 1 for i, n in enumerate(norms) if n <= 1e-6)

  tx = newton_cg(
    curvature="hessian",
    damping=0.0,
    adapt_damping=False,
    accept_ratio=None,
    cg_tol="forcing",
    cg_max_steps=200,
    warm_start=0.0,
    linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=20),
  )

  @jax.jit
  def step(params, state):
    value, grad = jax.value_and_grad(_logistic)(params, x, y)
    updates, state = tx.update(grad, state, params, value=value, value_fn=_logistic, x=x, y=y)
    return optax.apply_updates(params, updates), state

  state, iters = tx.init(params), 0
  while optax.tree.norm(jax.grad(_logistic)(params, x, y)) > 1e-6 and iters < 50:
    params, state = step(params, state)
    iters += 1
  assert optax.tree.norm(jax.grad(_logistic)(params, x, y)) <= 1e-6
  assert iters <= scipy_iters, (iters, scipy_iters)
  # Same minimiser as scipy's (strongly convex problem).
  res = scipy.optimize.minimize(
    lambda v: float(f(v)),
    np.zeros(flat0.size),
    jac=lambda v: np.asarray(g(v)),
    method="L-BFGS-B",
    options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 2000},
  )
  np.testing.assert_allclose(f(ravel_pytree(params)[0]), res.fun, rtol=1e-9)


def test_indefinite_function_steihaug_keeps_iterates_finite_and_decreasing():
  # Double well per coordinate plus a coupling: the Hessian at the start is indefinite.
  f = lambda x: jnp.sum(0.25 * x**4 - 0.5 * x**2) + 0.1 * x[0] * x[1]
  x = jnp.array([0.1, -0.2, 0.05, 2.0])
  assert np.linalg.eigvalsh(jax.hessian(f)(x)).min() < 0
  tx = newton_cg(curvature="hessian", damping=1e-3)
  step = jax.jit(lambda x, s: tx.update(jax.grad(f)(x), s, x, value_fn=f))
  state, losses, met_negative = tx.init(x), [float(f(x))], False
  for _ in range(40):
    updates, state = step(x, state)
    x = optax.apply_updates(x, updates)
    losses.append(float(f(x)))
    met_negative |= bool(state[0].negative_curvature)
  assert met_negative
  assert np.all(np.isfinite(losses)) and np.all(np.diff(losses) <= 0)
  # Ends at a local minimum: zero gradient, positive-definite Hessian (dense reference).
  assert float(jnp.linalg.norm(jax.grad(f)(x))) < 1e-8
  assert np.linalg.eigvalsh(jax.hessian(f)(x)).min() > 0


def test_nonfinite_loss_rejected_damping_raised():
  # log barrier: the undamped Newton step from 0 leaves the domain |x|^2 < 1.
  f = lambda x: -jnp.sum(jnp.log1p(-(x**2))) - 3.0 * jnp.sum(x)
  x = jnp.zeros(3)
  tx = newton_cg(curvature="hessian", damping=0.1, cg_tol=1e-10)
  step = jax.jit(lambda x, s: tx.update(jax.grad(f)(x), s, x, value_fn=f))
  state = tx.init(x)
  updates, state = step(x, state)
  inner = state[0]
  assert int(inner.num_rejected) == 1 and float(inner.rho) == -np.inf
  np.testing.assert_array_equal(updates, np.zeros(3))
  np.testing.assert_allclose(inner.damping, 0.15)
  for _ in range(30):
    updates, state = step(x, state)
    x = optax.apply_updates(x, updates)
    assert np.all(np.isfinite(x))
  # Converges to the interior minimiser: 2x / (1 - x^2) = 3.
  np.testing.assert_allclose(x, (-1 + np.sqrt(1 + 9)) / 3 * np.ones(3), rtol=1e-8)

  # A NaN loss at the current point is rejected too.
  nan_f = lambda x: f(x) * jnp.nan
  updates, state = tx.update(jnp.ones(3), tx.init(x), x, value_fn=nan_f)
  np.testing.assert_array_equal(updates, np.zeros(3))
  assert int(state[0].num_rejected) == 1


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "hessian"])
def test_direction_matches_dense_solve(curvature):
  params, x, y, model_fn, loss_fn = _mlp_problem()
  flat, unravel = ravel_pytree(params)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  fv = lambda v: value_fn(unravel(v), x=x, y=y)
  # The Hessian here is indefinite: damp enough for a positive-definite system.
  lam = (
    0.3 if curvature != "hessian" else 0.3 - min(0.0, np.linalg.eigvalsh(jax.hessian(fv)(flat))[0])
  )
  tx = scale_by_newton_cg(
    curvature,
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=lam,
    adapt_damping=False,
    accept_ratio=None,
    cg_tol=1e-12,
    cg_progress_tol=None,
    cg_max_steps=200,
  )
  kwargs = {} if curvature == "ggn" else {"value_fn": value_fn}
  update = jax.jit(lambda g, s, p, x, y: tx.update(g, s, p, x=x, y=y, **kwargs))
  d, state = update(g, tx.init(params), params, x, y)
  # Dense references in float64.
  if curvature == "hessian":
    c = jax.hessian(fv)(flat)
  elif curvature == "ggn":
    jac = jax.jacrev(lambda v: model_fn(unravel(v), x).ravel())(flat)
    h_out = jax.hessian(lambda z: loss_fn(z.reshape(y.shape), y))(model_fn(params, x).ravel())
    c = jac.T @ h_out @ jac
  else:
    per_ex = jax.vmap(
      lambda xi, yi: jax.grad(lambda v: value_fn(unravel(v), x=xi[None], y=yi[None]))(flat)
    )(x, y)
    c = per_ex.T @ per_ex / x.shape[0]
  expected = np.linalg.solve(c + lam * np.eye(flat.size), ravel_pytree(g)[0])
  np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-7, atol=1e-10)
  # rho against its definition with the dense damped quadratic.
  dd = ravel_pytree(d)[0]
  predicted = -ravel_pytree(g)[0] @ dd + 0.5 * dd @ (c + lam * np.eye(flat.size)) @ dd
  np.testing.assert_allclose(state.rho, (fv(flat - dd) - fv(flat)) / predicted, rtol=1e-7)


def test_custom_curvature_protocol_and_preconditioners_agree():
  params, x, y, model_fn, loss_fn = _mlp_problem(1)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  common = dict(
    damping=5.0, adapt_damping=False, accept_ratio=None, cg_tol=1e-12, cg_progress_tol=None
  )
  hessian = scale_by_newton_cg("hessian", **common)
  reference, _ = hessian.update(g, hessian.init(params), params, value_fn=value_fn, x=x, y=y)
  variants = [
    scale_by_newton_cg(lambda p, objective, data: hvp_fn(objective, p), **common),
    scale_by_newton_cg("hessian", preconditioner="martens", **common),
    scale_by_newton_cg(
      "hessian", preconditioner=lambda p, objective, data: optax.tree.ones_like(p), **common
    ),
  ]
  for tx in variants:
    update = jax.jit(lambda g, s, p, x, y, tx=tx: tx.update(g, s, p, value_fn=value_fn, x=x, y=y))
    d, state = update(g, tx.init(params), params, x, y)
    np.testing.assert_allclose(ravel_pytree(d)[0], ravel_pytree(reference)[0], rtol=1e-8)


def test_damping_adapts_from_rho():
  # Exact quadratic: rho = 1 > 3/4, damping shrinks by 2/3 each step down to the bound.
  f = lambda x: jnp.sum((x - 1.0) ** 2)
  tx = newton_cg(curvature="hessian", damping=1.0, damping_bounds=(0.3, 10.0))
  x, state = jnp.zeros(2), tx.init(jnp.zeros(2))
  dampings = []
  for _ in range(4):
    updates, state = tx.update(jax.grad(f)(x), state, x, value_fn=f)
    x = optax.apply_updates(x, updates)
    dampings.append(float(state[0].damping))
  np.testing.assert_allclose(dampings, [2 / 3, 4 / 9, 0.3, 0.3])


def test_ggn_minibatches_as_data_kwargs_train_and_compile_once():
  params, x, y, model_fn, loss_fn = _mlp_problem(2, n=64)
  tx = newton_cg(model_fn=model_fn, loss_fn=loss_fn, damping=1.0, cg_max_steps=20)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  traces = []

  @jax.jit
  def step(params, state, xb, yb):
    traces.append(None)  # runs once per compilation
    grads = jax.grad(value_fn)(params, x=xb, y=yb)
    updates, state = tx.update(grads, state, params, x=xb, y=yb)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  initial = float(value_fn(params, x=x, y=y))
  for _epoch in range(5):
    for i in range(4):
      params, state = step(params, state, x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)])
  assert len(traces) == 1 and step._cache_size() == 1
  assert float(value_fn(params, x=x, y=y)) < 0.5 * initial
  assert int(state[0].count) == 20 and np.isfinite(float(state[0].rho))


@pytest.mark.slow
def test_chains_with_backtracking_linesearch_under_jit():
  params, x, y, model_fn, loss_fn = _mlp_problem(3)
  value_fn = lambda p, x, y: loss_fn(model_fn(p, x), y)
  by_hand = optax.chain(
    scale_by_newton_cg("hessian", damping=1e-2, accept_ratio=None),
    optax.scale(-1.0),
    optax.scale_by_backtracking_linesearch(max_backtracking_steps=20),
  )
  wrapped = newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=1e-2,
    accept_ratio=None,
    linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=20),
  )
  for tx, kwargs in [(by_hand, {"value_fn": value_fn}), (wrapped, {})]:
    p, state = params, tx.init(params)

    @jax.jit
    def step(p, state, tx=tx, kwargs=kwargs):
      value, grad = jax.value_and_grad(value_fn)(p, x, y)
      updates, state = tx.update(grad, state, p, value=value, grad=grad, x=x, y=y, **kwargs)
      return optax.apply_updates(p, updates), state

    losses = [float(value_fn(p, x, y))]
    for _ in range(10):
      p, state = step(p, state)
      losses.append(float(value_fn(p, x, y)))
    assert np.all(np.diff(losses) <= 0) and losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_flax_nnx_optimizer():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear1 = nnx.Linear(3, 8, rngs=rngs, param_dtype=jnp.float64)
      self.linear2 = nnx.Linear(8, 1, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      return self.linear2(jnp.tanh(self.linear1(x)))

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 3), jnp.float64)
  y = jnp.sin(x[:, :1]) + x[:, 1:2] ** 2
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  optimizer = nnx.Optimizer(model, newton_cg(curvature="hessian", damping=1e-2), wrt=nnx.Param)

  def value_fn(params, x, y):
    return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value_fn=value_fn, x=x, y=y)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
  assert losses[-1] < 0.1 * losses[0]
  assert np.all(np.isfinite(losses))


def test_misuse_raises_with_the_fix():
  with pytest.raises(ValueError, match="model_fn"):
    newton_cg(curvature="ggn")
  with pytest.raises(ValueError, match="curvature"):
    newton_cg(curvature="newton")
  with pytest.raises(ValueError, match="preconditioner"):
    scale_by_newton_cg("hessian", preconditioner="jacobi")
  with pytest.raises(ValueError, match="cg_tol"):
    scale_by_newton_cg("hessian", cg_tol="fast")
  tx = scale_by_newton_cg("hessian")
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
  tx = scale_by_newton_cg("fisher")
  with pytest.raises(ValueError, match="leading example axis"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2), value_fn=lambda p: p @ p)
