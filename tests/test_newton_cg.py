"""Tests for curvopt.newton_cg against dense solves, scipy's Newton-CG and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from helpers import dense_ggn, regression_problem
from jax.flatten_util import ravel_pytree

import curvopt
from curvopt import (
  CG,
  GGN,
  DiagonalPreconditioner,
  LevenbergMarquardt,
  MartensDiagonal,
)
from curvopt.curvature.products import hvp_fn
from curvopt.optimizers.newton_cg import (
  NewtonCGState,
  newton_cg,
  scale_by_newton_cg,
  value_fn_from_model,
)

# ---------------------------------------------------------------------------------- helpers


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


@pytest.mark.long
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
    damping=LevenbergMarquardt(init=0.0, adapt=False, accept_ratio=None),
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
  # The first trial (lambda = 0.1, d = g / 2.1) leaves the domain: it is rejected and re-solved
  # inside the same update with lambda raised to the curvature along d, 2.1 (retry_damping), so
  # the returned step is g / 4.1, finite and decreasing; then rho > 3/4 shrinks lambda by 1/3.
  assert int(inner.num_rejected) == 1 and int(inner.num_trials) == 2
  assert int(inner.num_failed) == 0
  np.testing.assert_allclose(updates, 3.0 / 4.1 * np.ones(3), rtol=1e-8)
  assert float(f(x + updates)) < float(f(x)) and float(inner.rho) > 0.75
  np.testing.assert_allclose(inner.damping, 2.1 / 3, rtol=1e-8)
  for _ in range(30):
    updates, state = step(x, state)
    x = optax.apply_updates(x, updates)
    assert np.all(np.isfinite(x))
  # Converges to the interior minimiser: 2x / (1 - x^2) = 3.
  np.testing.assert_allclose(x, (-1 + np.sqrt(1 + 9)) / 3 * np.ones(3), rtol=1e-8)

  # A NaN loss at the current point is rejected too.
  # (every trial is then rejected: after 1 + max_retries solves the update is zero, counted).
  nan_f = lambda x: f(x) * jnp.nan
  updates, state = tx.update(jnp.ones(3), tx.init(x), x, value_fn=nan_f)
  np.testing.assert_array_equal(updates, np.zeros(3))
  assert int(state[0].num_failed) == 1 and int(state[0].num_trials) == 9
  assert int(state[0].num_rejected) == 9


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "hessian"])
def test_direction_matches_dense_solve(curvature):
  params, x, y, model_fn, loss_fn = regression_problem()
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
    damping=LevenbergMarquardt(init=lam, adapt=False, accept_ratio=None),
    solver=CG(tol=1e-12, progress_tol=None, max_steps=200),
  )
  kwargs = {} if curvature == "ggn" else {"value_fn": value_fn}
  update = jax.jit(lambda g, s, p, x, y: tx.update(g, s, p, x=x, y=y, **kwargs))
  d, state = update(g, tx.init(params), params, x, y)
  # Dense references in float64.
  if curvature == "hessian":
    c = jax.hessian(fv)(flat)
  elif curvature == "ggn":
    c = dense_ggn(params, x, y, model_fn, loss_fn)
  else:
    per_ex = jax.vmap(
      lambda xi, yi: jax.grad(lambda v: value_fn(unravel(v), x=xi[None], y=yi[None]))(flat)
    )(x, y)
    c = per_ex.T @ per_ex / x.shape[0]
  expected = np.linalg.solve(c + lam * np.eye(flat.size), ravel_pytree(g)[0])
  np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-7, atol=1e-10)
  # rho against its definition with the dense undamped quadratic model.
  dd = ravel_pytree(d)[0]
  predicted = -ravel_pytree(g)[0] @ dd + 0.5 * dd @ c @ dd
  np.testing.assert_allclose(state.rho, (fv(flat - dd) - fv(flat)) / predicted, rtol=1e-7)


def test_custom_curvature_protocol_and_preconditioners_agree():
  params, x, y, model_fn, loss_fn = regression_problem(1)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  damping = LevenbergMarquardt(init=5.0, adapt=False, accept_ratio=None)
  cg = lambda preconditioner=None: CG(tol=1e-12, progress_tol=None, preconditioner=preconditioner)
  hessian = scale_by_newton_cg("hessian", damping=damping, solver=cg())
  reference, _ = hessian.update(g, hessian.init(params), params, value_fn=value_fn, x=x, y=y)
  ones = DiagonalPreconditioner(lambda p, objective, data: optax.tree.ones_like(p))
  variants = [
    scale_by_newton_cg(lambda p, o, d: hvp_fn(o, p), damping=damping, solver=cg()),
    scale_by_newton_cg("hessian", damping=damping, solver=cg(MartensDiagonal())),
    scale_by_newton_cg("hessian", damping=damping, solver=cg(ones)),
    # The shortcuts build the same parts.
    scale_by_newton_cg(
      "hessian",
      damping=damping,
      cg_tol=1e-12,
      preconditioner=lambda p, objective, data: optax.tree.ones_like(p),
    ),
  ]
  for tx in variants:
    update = jax.jit(lambda g, s, p, x, y, tx=tx: tx.update(g, s, p, value_fn=value_fn, x=x, y=y))
    d, state = update(g, tx.init(params), params, x, y)
    np.testing.assert_allclose(ravel_pytree(d)[0], ravel_pytree(reference)[0], rtol=1e-8)


def test_damping_adapts_from_rho():
  # Exact quadratic: rho = 1 > 3/4, damping shrinks by the default 1/3, then by (1/3)^2 once
  # the previous step was very good too, down to the bound.
  f = lambda x: jnp.sum((x - 1.0) ** 2)
  tx = newton_cg(curvature="hessian", damping=LevenbergMarquardt(bounds=(2e-3, 10.0)))
  x, state = jnp.zeros(2), tx.init(jnp.zeros(2))
  dampings = []
  for _ in range(4):
    updates, state = tx.update(jax.grad(f)(x), state, x, value_fn=f)
    x = optax.apply_updates(x, updates)
    dampings.append(float(state[0].damping))
  np.testing.assert_allclose(dampings, [1 / 3, 1 / 27, 1 / 243, 2e-3])


def test_ggn_minibatches_as_data_kwargs_train_and_compile_once():
  params, x, y, model_fn, loss_fn = regression_problem(2, n=64)
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
  for _epoch in range(8):
    for i in range(4):
      params, state = step(params, state, x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)])
  assert len(traces) == 1 and step._cache_size() == 1
  assert float(value_fn(params, x=x, y=y)) < 0.5 * initial
  assert int(state[0].count) == 32 and np.isfinite(float(state[0].rho))


@pytest.mark.long
def test_chains_with_backtracking_linesearch_under_jit():
  params, x, y, model_fn, loss_fn = regression_problem(3)
  value_fn = lambda p, x, y: loss_fn(model_fn(p, x), y)
  by_hand = optax.chain(
    scale_by_newton_cg("hessian", damping=LevenbergMarquardt(init=1e-2, accept_ratio=None)),
    optax.scale(-1.0),
    optax.scale_by_backtracking_linesearch(max_backtracking_steps=20),
  )
  wrapped = newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=LevenbergMarquardt(init=1e-2, accept_ratio=None),
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


@pytest.mark.long
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


@pytest.mark.parametrize("preconditioner", [None, "martens"])
def test_curvature_batch_size_uses_rotating_chunk(preconditioner):
  params, x, y, model_fn, loss_fn = regression_problem(4, n=48)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  lam = 0.2
  tx = scale_by_newton_cg(
    GGN(batch_size=16),
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=LevenbergMarquardt(init=lam, adapt=False, accept_ratio=None),
    solver=CG(
      tol=1e-12,
      progress_tol=None,
      max_steps=200,
      warm_start=0.0,
      preconditioner=preconditioner and MartensDiagonal(),
    ),
  )
  update = jax.jit(lambda g, s, p, x, y: tx.update(g, s, p, x=x, y=y))
  # count = 3 wraps around to the first chunk (48 // 16 = 3 chunks).
  for count, rows in [(0, slice(0, 16)), (1, slice(16, 32)), (2, slice(32, 48)), (3, slice(0, 16))]:
    state = tx.init(params)._replace(count=jnp.asarray(count, jnp.int32))
    d, state = update(g, state, params, x, y)
    # Full-batch gradient, curvature of the chunk only (dense reference).
    c = dense_ggn(params, x[rows], y[rows], model_fn, loss_fn)
    flat_g = ravel_pytree(g)[0]
    expected = np.linalg.solve(c + lam * np.eye(flat_g.size), flat_g)
    np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-7, atol=1e-10)
    # rho measures the full-batch loss against the chunk-curvature model.
    fv = lambda v: value_fn(ravel_pytree(params)[1](v), x=x, y=y)
    flat = ravel_pytree(params)[0]
    predicted = -flat_g @ expected + 0.5 * expected @ c @ expected
    np.testing.assert_allclose(state.rho, (fv(flat - expected) - fv(flat)) / predicted, rtol=1e-6)
  assert update._cache_size() == 1


def test_curvature_batch_size_misuse():
  params, x, y, model_fn, loss_fn = regression_problem(0, n=8)
  g = jax.grad(value_fn_from_model(model_fn, loss_fn))(params, x=x, y=y)
  tx = scale_by_newton_cg(GGN(batch_size=16), model_fn=model_fn, loss_fn=loss_fn)
  with pytest.raises(ValueError, match="exceeds the 8 examples"):
    tx.update(g, tx.init(params), params, x=x, y=y)
  tx = scale_by_newton_cg(GGN(batch_size=4), model_fn=model_fn, loss_fn=loss_fn)
  with pytest.raises(ValueError, match="same leading example axis"):
    tx.update(g, tx.init(params), params, x=x, y=y[:6])
  with pytest.raises(ValueError, match="GGN.batch_size"):
    GGN(batch_size=0)
  with pytest.raises(TypeError, match=r"curvature_batch_size -> curvature=curvopt.GGN\(batch_size"):
    scale_by_newton_cg("ggn", model_fn=model_fn, loss_fn=loss_fn, curvature_batch_size=4)


def test_cg_backtracking_through_newton_cg_picks_best_saved_iterate():
  params, x, y, model_fn, loss_fn = regression_problem(5)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  flat, unravel = ravel_pytree(params)
  fv = lambda v: value_fn(unravel(v), x=x, y=y)
  lam, max_steps = 1e-3, 12
  tx = newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=LevenbergMarquardt(init=lam, adapt=False, accept_ratio=None),
    solver=CG(tol=0.0, progress_tol=None, max_steps=max_steps, warm_start=0.0, backtracking=True),
  )
  g = jax.grad(value_fn)(params, x=x, y=y)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, x=x, y=y))
  updates, state = update(g, tx.init(params), params)
  # Reference: plain CG in numpy on the dense damped GGN, iterates saved at ceil(1.3^j) and
  # the final one (preferred on ties), the best by the true loss of params - x_k.
  a = np.asarray(dense_ggn(params, x, y, model_fn, loss_fn)) + lam * np.eye(flat.size)
  b = np.asarray(ravel_pytree(g)[0])
  xk, r, p, iterates = np.zeros_like(b), b.copy(), b.copy(), {}
  for k in range(1, max_steps + 1):
    ap = a @ p
    alpha = (r @ r) / (p @ ap)
    xk, r_new = xk + alpha * p, r - alpha * ap
    p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    iterates[k] = xk
  saved = sorted({int(np.ceil(1.3**j)) for j in range(20)} & set(range(1, max_steps + 1)))
  candidates = [iterates[k] for k in saved] + [iterates[max_steps]]
  losses = [float(fv(flat - c)) for c in candidates]
  best = min(range(len(losses)), key=lambda i: (losses[i], -i))
  assert best < len(candidates) - 1  # backtracking actually chose an earlier iterate
  np.testing.assert_allclose(ravel_pytree(updates)[0], -candidates[best], rtol=1e-6, atol=1e-12)
  assert int(state[0].cg_steps) == max_steps
  assert float(fv(flat + ravel_pytree(updates)[0])) <= float(fv(flat - iterates[max_steps]))


def test_chains_with_zoom_linesearch_under_jit():
  params, x, y, model_fn, loss_fn = regression_problem(6)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  common = dict(damping=LevenbergMarquardt(init=1e-2, accept_ratio=None), cg_max_steps=30)
  wrapped = newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=15),
    **common,
  )
  by_hand = optax.chain(
    scale_by_newton_cg("ggn", model_fn=model_fn, loss_fn=loss_fn, **common),
    optax.scale(-1.0),
    optax.scale_by_zoom_linesearch(max_linesearch_steps=15),
  )
  trajectories = []
  for tx in (wrapped, by_hand):

    @jax.jit
    def step(p, state, tx=tx):
      value, grad = jax.value_and_grad(value_fn)(p, x=x, y=y)
      updates, state = tx.update(
        grad, state, p, value=value, grad=grad, value_fn=value_fn, x=x, y=y
      )
      return optax.apply_updates(p, updates), state, value, grad, updates

    p, state, losses = params, tx.init(params), []
    for _ in range(6):
      new_p, state, value, grad, updates = step(p, state)
      new_value = value_fn(new_p, x=x, y=y)
      # Armijo sufficient decrease (zoom's c1 = 1e-4) checked on the true loss.
      slope = optax.tree.vdot(grad, updates)
      assert float(slope) < 0 and float(new_value) <= float(value) + 1e-4 * float(slope)
      losses.append(float(new_value))
      p = new_p
    assert losses[-1] < 0.5 * float(value_fn(params, x=x, y=y))
    trajectories.append(losses)
  np.testing.assert_allclose(trajectories[0], trajectories[1], rtol=1e-10)


def test_float32_run_stays_float32_and_matches_float64_solve():
  params, x, y, model_fn, loss_fn = regression_problem(7, dtype=jnp.float32)
  assert x.dtype == jnp.float32
  value_fn = value_fn_from_model(model_fn, loss_fn)
  lam = 0.5
  tx = newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=lam,
    solver=CG(tol=1e-6, max_steps=50, progress_tol=None),
  )

  @jax.jit
  def step(p, state):
    value, grads = jax.value_and_grad(value_fn)(p, x=x, y=y)
    updates, state = tx.update(grads, state, p, value=value, x=x, y=y)
    return optax.apply_updates(p, updates), state, updates

  state = tx.init(params)
  new_params, state, updates = step(params, state)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((new_params, updates)))
  inner = state[0]
  for name in ("damping", "rho", "loss"):
    assert getattr(inner, name).dtype == jnp.float32, name
  # First direction against a dense float64 solve at the same (float32-valued) point.
  p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  x64, y64 = x.astype(jnp.float64), y.astype(jnp.float64)
  c = dense_ggn(p64, x64, y64, model_fn, loss_fn)
  g64 = ravel_pytree(jax.grad(value_fn)(p64, x=x64, y=y64))[0]
  expected = -np.linalg.solve(c + lam * np.eye(g64.size), g64)
  np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=2e-4, atol=2e-5)
  losses = [float(value_fn(params, x=x, y=y))]
  params = new_params
  for _ in range(15):
    params, state, _ = step(params, state)
    losses.append(float(value_fn(params, x=x, y=y)))
  assert np.all(np.isfinite(losses)) and np.all(np.diff(losses) <= 1e-6)
  assert losses[-1] < 0.5 * losses[0]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_misuse_raises_with_the_fix():
  with pytest.raises(ValueError, match="model_fn"):
    newton_cg(curvature="ggn")
  with pytest.raises(ValueError, match="curvature"):
    newton_cg(curvature="newton")
  with pytest.raises(ValueError, match="preconditioner"):
    scale_by_newton_cg("hessian", preconditioner="jacobi")
  with pytest.raises(ValueError, match="CG.tol must be a number >= 0 or 'forcing'"):
    scale_by_newton_cg("hessian", cg_tol="fast")
  tx = scale_by_newton_cg("hessian")
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
  tx = scale_by_newton_cg("fisher")
  with pytest.raises(ValueError, match="leading example axis"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2), value_fn=lambda p: p @ p)


def test_grads_dtype_unlike_params_raise_a_named_error():
  tx = scale_by_newton_cg("hessian")
  params = jnp.ones(2, jnp.float64)
  with pytest.raises(TypeError, match="float32.*float64.*cast_like"):
    tx.update(jnp.ones(2, jnp.float32), tx.init(params), params, value_fn=lambda p: p @ p)


def test_undeclared_data_keyword_raises_naming_it_and_the_accepted_names():
  params, x, y, model_fn, loss_fn = regression_problem(8, n=8)
  g = jax.grad(value_fn_from_model(model_fn, loss_fn))(params, x=x, y=y)
  tx = newton_cg(model_fn=model_fn, loss_fn=loss_fn)
  with pytest.raises(ValueError, match=r"\['Y'\].*\['x', 'y'\]"):
    tx.update(g, tx.init(params), params, x=x, Y=y)
  tx = newton_cg(curvature="hessian")
  value_fn = lambda p, x, y: loss_fn(model_fn(p, x), y)
  with pytest.raises(ValueError, match=r"\['batch'\]"):
    tx.update(g, tx.init(params), params, value_fn=value_fn, x=x, y=y, batch=x)


def test_traced_hyperparameters_skip_construction_checks():
  # Under jit a hyper-parameter may be a tracer: no Python bool of it is taken.
  f = lambda x: jnp.sum((x - 1.0) ** 2)
  step = jax.jit(
    lambda x, lam, ratio: newton_cg(
      curvature="hessian", damping=LevenbergMarquardt(init=lam, accept_ratio=ratio)
    ).update(jax.grad(f)(x), newton_cg(curvature="hessian", damping=lam).init(x), x, value_fn=f)[0]
  )
  np.testing.assert_allclose(step(jnp.zeros(2), 0.0, 0.0), np.ones(2), rtol=1e-8)
  with pytest.raises(ValueError, match="damping must be >= 0"):
    newton_cg(curvature="hessian", damping=-1.0)


@pytest.mark.long
def test_flax_nnx_module_model_fn_with_batchnorm_without_split_merge():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear1 = nnx.Linear(3, 8, rngs=rngs, param_dtype=jnp.float64)
      self.norm = nnx.BatchNorm(8, rngs=rngs, param_dtype=jnp.float64)
      self.linear2 = nnx.Linear(8, 1, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      return self.linear2(jnp.tanh(self.norm(self.linear1(x))))

  x = jax.random.normal(jax.random.PRNGKey(0), (64, 3), jnp.float64)
  y = jnp.sin(x[:, :1]) + x[:, 1:2] ** 2
  model = Net(nnx.Rngs(0))
  loss_fn = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)
  tx = newton_cg(
    model_fn=lambda m, x: m(x),
    loss_fn=loss_fn,
    module=model,
    # The first step is then the plain damped solve, checked below.
    damping=LevenbergMarquardt(init=1e-2, accept_ratio=None),
    solver=CG(tol=1e-10, progress_tol=None),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
    optimizer.update(model, grads, x=x, y=y)
    return loss

  # The first direction against a dense GGN solve built with split/merge by hand.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat, unravel = ravel_pytree(nnx.to_pure_dict(params))

  def outputs(v):
    state = nnx.State(unravel(v))
    return nnx.merge(graphdef, state, rest, copy=True)(x).ravel()

  jac = jax.jacrev(outputs)(flat)
  ggn = jac.T @ jac / x.shape[0]
  g = jax.grad(lambda v: loss_fn(outputs(v)[:, None], y))(flat)
  expected = -np.linalg.solve(ggn + 1e-2 * np.eye(flat.size), g)
  before = flat
  losses = [float(train_step(model, optimizer, x, y))]
  after = ravel_pytree(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  np.testing.assert_allclose(after - before, expected, rtol=1e-5, atol=1e-8)
  losses += [float(train_step(model, optimizer, x, y)) for _ in range(15)]
  assert losses[-1] < 0.2 * losses[0] and np.all(np.isfinite(losses))
  # Diagnostics through nnx.Optimizer are OptArray variables: read them with [...].
  info = optimizer.opt_state[0].info
  assert int(info.num_failed[...]) == 0 and float(info.rho[...]) > 0
  with pytest.raises(TypeError, match="nnx.Module"):
    newton_cg(model_fn=lambda m, x: m(x), loss_fn=loss_fn, module={"w": 1.0})


def test_preconditioner_batch_size_takes_the_first_rows_of_the_curvature_chunk():
  # Truncated CG (3 steps), so the direction depends on the preconditioner: Martens' diagonal
  # from rows 16:24 (the first 8 of chunk 16:32) equals a diagonal from an explicit loop there.
  params, x, y, model_fn, loss_fn = regression_problem(5, n=48)
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)

  def loop_diagonal(params, objective, data):
    del objective, data
    grads = [jax.grad(value_fn)(params, x=x[i : i + 1], y=y[i : i + 1]) for i in range(16, 24)]
    return jax.tree.map(lambda *gs: sum(gi**2 for gi in gs) / len(gs), *grads)

  common = dict(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=LevenbergMarquardt(init=0.1, adapt=False, accept_ratio=None),
  )
  cg = lambda preconditioner: CG(
    max_steps=3, tol=0.0, progress_tol=None, preconditioner=preconditioner
  )
  state = lambda tx: tx.init(params)._replace(count=jnp.asarray(1, jnp.int32))
  ours = scale_by_newton_cg(GGN(16), solver=cg(MartensDiagonal(batch_size=8)), **common)
  ref = scale_by_newton_cg(GGN(16), solver=cg(DiagonalPreconditioner(loop_diagonal)), **common)
  whole = scale_by_newton_cg(GGN(16), solver=cg(MartensDiagonal()), **common)
  d, _ = jax.jit(lambda s: ours.update(g, s, params, x=x, y=y))(state(ours))
  d_ref, _ = ref.update(g, state(ref), params, x=x, y=y)
  d_whole, _ = whole.update(g, state(whole), params, x=x, y=y)
  np.testing.assert_allclose(ravel_pytree(d)[0], ravel_pytree(d_ref)[0], rtol=1e-9)
  assert not np.allclose(ravel_pytree(d)[0], ravel_pytree(d_whole)[0], rtol=1e-6)

  tx = scale_by_newton_cg(
    GGN(batch_size=16),
    model_fn=model_fn,
    loss_fn=loss_fn,
    preconditioner=MartensDiagonal(batch_size=32),
  )
  with pytest.raises(ValueError, match="MartensDiagonal.batch_size=32 exceeds the 16 examples"):
    tx.update(g, tx.init(params), params, x=x, y=y)


@pytest.mark.parametrize("curvature", ["ggn", "ggn_sampled"])
def test_kfac_preconditioner_gives_the_exact_direction(curvature):
  # CG still solves the exact damped GGN system; K-FAC only changes how fast.
  params, x, y, model_fn, loss_fn = regression_problem(9, n=48, sizes=(3, 8, 2))
  value_fn = value_fn_from_model(model_fn, loss_fn)
  g = jax.grad(value_fn)(params, x=x, y=y)
  lam = 1e-2
  tx = scale_by_newton_cg(
    model_fn=model_fn,
    loss_fn=loss_fn,
    damping=LevenbergMarquardt(init=lam, adapt=False, accept_ratio=None),
    solver=CG(
      tol=1e-11,
      progress_tol=None,
      max_steps=500,
      preconditioner=curvopt.KFACPreconditioner(curvature=curvature),
    ),
  )
  d, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, x=x, y=y))(g, tx.init(params), params)
  c = dense_ggn(params, x, y, model_fn, loss_fn)
  expected = np.linalg.solve(c + lam * np.eye(c.shape[0]), ravel_pytree(g)[0])
  np.testing.assert_allclose(ravel_pytree(d)[0], expected, rtol=1e-7, atol=1e-10)


def test_kfac_preconditioner_is_the_inverse_for_one_dense_layer():
  # One dense layer, linear model, squared loss: the GGN is exactly A x G, so with a tiny damping
  # K-FAC's inverse is the inverse up to the factored damping (relative 1e-6 here), and
  # preconditioned CG converges in a few steps to a tolerance that plain CG needs n for.
  x = jax.random.normal(jax.random.key(0), (40, 6)) * jnp.array([1.0, 3.0, 0.1, 2.0, 5.0, 0.5])
  y = jax.random.normal(jax.random.key(1), (40, 3))
  model_fn = lambda w, x: x @ w
  loss_fn = lambda z, y: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=-1))
  w = jnp.zeros((6, 3))
  g = jax.grad(lambda w: loss_fn(model_fn(w, x), y))(w)
  steps = {}
  exact = curvopt.KFACPreconditioner(curvature="ggn")  # the default samples the loss Hessian
  for name, pre in [("none", None), ("kfac", exact)]:
    tx = newton_cg(
      model_fn=model_fn,
      loss_fn=loss_fn,
      damping=LevenbergMarquardt(init=1e-12, adapt=False, accept_ratio=None),
      cg_tol=1e-9,
      preconditioner=pre,
    )
    updates, state = tx.update(g, tx.init(w), w, x=x, y=y)
    steps[name] = int(state[0].cg_steps)
    np.testing.assert_allclose(w + updates, jnp.linalg.lstsq(x, y)[0], rtol=1e-6, atol=1e-8)
  assert steps["kfac"] <= 3 < steps["none"] == 6, steps
