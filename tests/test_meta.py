"""Tests for curvopt.meta.maml_loss: closed forms, hand-unrolled loops, dense implicit gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_close, mlp_apply, mlp_params

from curvopt.linalg.status import SolverStatus
from curvopt.recipes.meta import MamlAux, maml_loss


def _regression_task(rng, n=8, d=4, dtype=jnp.float64):
  X = jnp.asarray(rng.normal(size=(n, d)), dtype)
  y = jnp.asarray(rng.normal(size=n), dtype)
  return X, y


def _quadratic_loss(w, batch):
  X, y = batch
  return 0.5 * jnp.mean((X @ w - y) ** 2)


SIZES = (4, 5, 1)  # helpers.mlp_params: the tasks' 4 features, 5 tanh units, a scalar output


def _mlp_loss(params, batch):
  X, y = batch
  return jnp.mean((mlp_apply(params, X)[:, 0] - y) ** 2)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_gradient_closed_form_on_quadratic(inner_steps):
  # SGD on a quadratic: dφ_K/dθ = (I - αA_s)^K, so the meta-gradient is (I - αA_s)^K ∇L_q(φ_K).
  rng = np.random.default_rng(0)
  support, query = _regression_task(rng), _regression_task(rng)
  theta, lr = jnp.asarray(rng.normal(size=4)), 0.3
  meta_loss = maml_loss(_quadratic_loss, inner_lr=lr, inner_steps=inner_steps)
  X_s, y_s = support
  A_s = np.asarray(X_s.T @ X_s) / 8
  phi = np.asarray(theta)
  for _ in range(inner_steps):
    phi = phi - lr * (A_s @ phi - np.asarray(X_s.T @ y_s) / 8)
  X_q, y_q = map(np.asarray, query)
  grad_query = X_q.T @ (X_q @ phi - y_q) / 8
  want = np.linalg.matrix_power(np.eye(4) - lr * A_s, inner_steps) @ grad_query
  np.testing.assert_allclose(jax.grad(meta_loss)(theta, support, query), want, rtol=1e-12)


def _hand_unrolled_meta_loss(params, support, query, lr, steps):
  phi = params
  for _ in range(steps):
    grads = jax.grad(_mlp_loss)(phi, support)
    phi = jax.tree.map(lambda p, g: p - lr * g, phi, grads)
  return _mlp_loss(phi, query)


@pytest.mark.parametrize("jit", [False, True])
def test_maml_gradient_matches_hand_unrolled_loop_and_first_order_differs(jit):
  rng = np.random.default_rng(1)
  params, support, query = mlp_params(1, SIZES), _regression_task(rng), _regression_task(rng)
  meta_loss = maml_loss(_mlp_loss, inner_lr=0.1, inner_steps=4)
  fo_loss = maml_loss(_mlp_loss, inner_lr=0.1, inner_steps=4, first_order=True)
  grad, fo_grad = jax.grad(meta_loss), jax.grad(fo_loss)
  if jit:
    grad, fo_grad = jax.jit(grad), jax.jit(fo_grad)
  hand_unrolled = jax.jit(_hand_unrolled_meta_loss, static_argnums=(3, 4))
  want = jax.jit(jax.grad(hand_unrolled), static_argnums=(3, 4))(params, support, query, 0.1, 4)
  np.testing.assert_allclose(
    meta_loss(params, support, query), hand_unrolled(params, support, query, 0.1, 4), rtol=1e-12
  )
  assert_tree_close(grad(params, support, query), want, rtol=1e-10)
  # FOMAML: exactly the query gradient at the adapted parameters ...
  phi, mlp_grad = params, jax.jit(jax.grad(_mlp_loss))
  for _ in range(4):
    phi = jax.tree.map(lambda p, g: p - 0.1 * g, phi, mlp_grad(phi, support))
  got_fo = fo_grad(params, support, query)
  assert_tree_close(got_fo, jax.grad(_mlp_loss)(phi, query), rtol=1e-10)
  # ... which is not the second-order meta-gradient.
  diff = optax.tree.norm(optax.tree.sub(got_fo, want))
  assert diff > 1e-2 * optax.tree.norm(want)


def test_maml_with_optax_inner_optimizer_matches_python_loop():
  rng = np.random.default_rng(2)
  params, support, query = mlp_params(2, SIZES), _regression_task(rng), _regression_task(rng)
  opt = optax.adam(0.05)

  def unrolled(params):
    phi, state = params, opt.init(params)
    for _ in range(3):
      updates, state = opt.update(jax.grad(_mlp_loss)(phi, support), state, phi)
      phi = optax.apply_updates(phi, updates)
    return _mlp_loss(phi, query)

  meta_loss = jax.jit(maml_loss(_mlp_loss, inner_optimizer=opt, inner_steps=3))
  np.testing.assert_allclose(
    meta_loss(params, support, query), jax.jit(unrolled)(params), rtol=1e-12
  )
  assert_tree_close(
    jax.jit(jax.grad(meta_loss))(params, support, query),
    jax.jit(jax.grad(unrolled))(params),
    rtol=1e-8,
  )
  # optax.sgd(lr) is the inner_lr path.
  via_sgd = maml_loss(_mlp_loss, inner_optimizer=optax.sgd(0.1), inner_steps=2)
  via_lr = maml_loss(_mlp_loss, inner_lr=0.1, inner_steps=2)
  assert_tree_close(
    jax.jit(jax.grad(via_sgd))(params, support, query),
    jax.jit(jax.grad(via_lr))(params, support, query),
    rtol=1e-12,
  )


def test_maml_vmap_over_tasks_jit_without_recompilation():
  params = mlp_params(3, SIZES)
  num_tasks = 3
  traces = []
  meta_loss = maml_loss(_mlp_loss, inner_lr=0.1, inner_steps=2)

  @jax.jit
  def batch_meta_grad(params, supports, queries):
    traces.append(1)
    per_task = jax.vmap(meta_loss, in_axes=(None, 0, 0))
    return jax.grad(lambda p: per_task(p, supports, queries).mean())(params)

  for seed in range(2):
    tasks = [_regression_task(np.random.default_rng(10 + seed + t)) for t in range(2 * num_tasks)]
    supports = jax.tree.map(lambda *xs: jnp.stack(xs), *tasks[:num_tasks])
    queries = jax.tree.map(lambda *xs: jnp.stack(xs), *tasks[num_tasks:])
    got = batch_meta_grad(params, supports, queries)
    single = jax.jit(jax.grad(meta_loss))
    loop = [single(params, tasks[t], tasks[num_tasks + t]) for t in range(num_tasks)]
    want = jax.tree.map(lambda *gs: sum(gs) / num_tasks, *loop)
    assert_tree_close(got, want, rtol=1e-10)
  assert len(traces) == 1


def _newton_minimise(objective, x, steps=20):
  # Independent reference minimiser: dense Newton steps.
  hessian, grad = jax.jit(jax.hessian(objective)), jax.jit(jax.grad(objective))
  for _ in range(steps):
    x = x - np.linalg.solve(hessian(x), grad(x))
  return x


def _imaml_setup(rng, d=4):
  loss_fn = lambda w, batch: (
    jnp.mean(jnp.log1p(jnp.exp(-batch[1] * (batch[0] @ w))))
    + 0.5 * (jnp.mean(jnp.sin(batch[0] @ w) ** 2))
  )
  X_s, X_q = rng.normal(size=(10, d)), rng.normal(size=(10, d))
  support = (jnp.asarray(X_s), jnp.asarray(np.sign(rng.normal(size=10))))
  query = (jnp.asarray(X_q), jnp.asarray(np.sign(rng.normal(size=10))))
  return loss_fn, jnp.asarray(rng.normal(size=d)), support, query


def test_imaml_gradient_matches_dense_implicit_gradient():
  rng = np.random.default_rng(4)
  loss_fn, theta, support, query = _imaml_setup(rng)
  lam = 1.5
  meta_loss = maml_loss(
    loss_fn, inner_lr=0.3, inner_steps=300, implicit=True, proximal_lambda=lam, cg_steps=4
  )
  meta_loss = jax.jit(meta_loss)
  got = jax.jit(jax.grad(meta_loss))(theta, support, query)
  prox = lambda phi: loss_fn(phi, support) + 0.5 * lam * jnp.sum((phi - theta) ** 2)
  phi_star = _newton_minimise(prox, theta)
  H = np.asarray(jax.hessian(loss_fn)(phi_star, support))
  assert np.linalg.eigvalsh(H).min() < 0  # a non-convex support loss: H alone is indefinite
  want = np.linalg.solve(np.eye(4) + H / lam, jax.grad(loss_fn)(phi_star, query))
  np.testing.assert_allclose(meta_loss(theta, support, query), loss_fn(phi_star, query))
  np.testing.assert_allclose(got, want, rtol=1e-9)
  # Finite differences of the (converged) meta-loss agree too.
  eps = 1e-6
  fd = [
    (meta_loss(theta + eps * e, support, query) - meta_loss(theta - eps * e, support, query))
    / (2 * eps)
    for e in np.eye(4)
  ]
  np.testing.assert_allclose(got, fd, rtol=1e-6)


def test_imaml_lbfgs_inner_solver_matches_dense_gradient_where_unstable_sgd_does_not():
  # Stiff support loss (curvature ~1e3): SGD at a step above 2/(λ_max + λ) leaves the proximal
  # problem unsolved, the residual shows it and the implicit formula is then not the
  # meta-gradient; L-BFGS (line search, extra-args path) reaches a minimiser in 30 steps.
  rng = np.random.default_rng(10)
  base_loss, theta, support, query = _imaml_setup(rng)
  loss_fn = lambda w, batch: 1e3 * base_loss(w, batch)
  lam = 50.0
  prox = lambda phi: loss_fn(phi, support) + 0.5 * lam * jnp.sum((phi - theta) ** 2)
  results = {}
  for name, solver in (("lbfgs", {"inner_optimizer": optax.lbfgs()}), ("sgd", {"inner_lr": 0.0})):
    if name == "sgd":  # just above the stability limit at the minimiser L-BFGS found
      H = np.asarray(jax.hessian(loss_fn)(results["lbfgs"][1].adapted_params, support))
      solver = {"inner_lr": 2.5 / (np.linalg.eigvalsh(H).max() + lam)}
    meta_loss = maml_loss(
      loss_fn,
      **solver,
      inner_steps=30,
      implicit=True,
      proximal_lambda=lam,
      cg_steps=4,
      has_aux=True,
    )
    results[name] = jax.jit(jax.grad(meta_loss, has_aux=True))(theta, support, query)
  grad, aux = results["lbfgs"]
  phi = aux.adapted_params
  # Independent checks that φ is a strict local minimiser: stationarity, positive Hessian.
  assert np.linalg.norm(jax.grad(prox)(phi)) < 1e-9 * np.linalg.norm(jax.grad(prox)(theta))
  assert np.linalg.eigvalsh(jax.hessian(prox)(phi)).min() > 0
  H = np.asarray(jax.hessian(loss_fn)(phi, support))
  want = np.linalg.solve(np.eye(4) + H / lam, jax.grad(loss_fn)(phi, query))
  np.testing.assert_allclose(grad, want, rtol=1e-8)
  grad, aux = results["sgd"]
  assert not float(aux.inner_grad_norm) < 1.0  # NaN (diverged) or large: flagged
  assert not np.allclose(grad, want, rtol=1e-2)


def test_imaml_lbfgs_keeps_float32_params_under_x64():
  # optax.lbfgs's line search tries float64 points (x64 on): the loss still sees float32.
  rng = np.random.default_rng(11)
  params = mlp_params(11, SIZES, jnp.float32)
  support, query = (
    _regression_task(rng, dtype=jnp.float32),
    _regression_task(rng, dtype=jnp.float32),
  )
  seen = set()

  def loss_fn(p, batch):
    seen.update(str(leaf.dtype) for leaf in jax.tree.leaves(p))
    return _mlp_loss(p, batch)

  meta_loss = maml_loss(
    loss_fn, inner_optimizer=optax.lbfgs(), inner_steps=5, implicit=True, proximal_lambda=1.0
  )
  grads = jax.jit(jax.grad(meta_loss))(params, support, query)
  assert seen == {"float32"}
  assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_imaml_support_gradient_matches_unrolled_converged_loop():
  # Through a converged contraction, the unrolled derivative tends to the implicit one.
  rng = np.random.default_rng(5)
  loss_fn, theta, support, query = _imaml_setup(rng)
  lam, steps = 1.5, 300
  imaml = maml_loss(
    loss_fn, inner_lr=0.3, inner_steps=steps, implicit=True, proximal_lambda=lam, cg_steps=4
  )
  prox_loss = lambda phi, batch, theta: (
    loss_fn(phi, batch) + 0.5 * lam * jnp.sum((phi - theta) ** 2)
  )

  def unrolled(theta, X_s):
    batch = (X_s, support[1])
    step = lambda _, phi: phi - 0.3 * jax.grad(prox_loss)(phi, batch, theta)
    return loss_fn(jax.lax.fori_loop(0, steps, step, theta), query)

  g_theta, g_support = jax.jit(jax.grad(imaml, argnums=(0, 1)))(theta, support, query)
  want_theta, want_X = jax.jit(jax.grad(unrolled, argnums=(0, 1)))(theta, support[0])
  np.testing.assert_allclose(g_theta, want_theta, rtol=1e-9)
  np.testing.assert_allclose(g_support[0], want_X, rtol=1e-8, atol=1e-12)


def test_imaml_vmap_over_tasks():
  rng = np.random.default_rng(6)
  loss_fn, theta, s0, q0 = _imaml_setup(rng)
  _, _, s1, q1 = _imaml_setup(rng)
  imaml = maml_loss(
    loss_fn, inner_lr=0.3, inner_steps=100, implicit=True, proximal_lambda=2.0, cg_steps=4
  )
  stack = lambda *xs: jax.tree.map(lambda *leaves: jnp.stack(leaves), *xs)
  batched = jax.jit(
    jax.grad(lambda t: jax.vmap(imaml, in_axes=(None, 0, 0))(t, stack(s0, s1), stack(q0, q1)).sum())
  )
  single = jax.jit(jax.grad(imaml))
  want = single(theta, s0, q0) + single(theta, s1, q1)
  np.testing.assert_allclose(batched(theta), want, rtol=1e-10)


def _backward_temp_bytes(meta_loss, params, support, query):
  compiled = jax.jit(jax.grad(meta_loss)).lower(params, support, query).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_imaml_memory_is_flat_in_inner_steps_unlike_maml():
  rng = np.random.default_rng(7)
  d = 256
  params = jnp.asarray(rng.normal(size=d))
  support, query = _regression_task(rng, n=32, d=d), _regression_task(rng, n=32, d=d)
  sizes = {}
  for implicit in (False, True):
    for steps in (10, 100):
      kwargs = {"implicit": True, "proximal_lambda": 1.0} if implicit else {}
      meta_loss = maml_loss(_mlp_loss_linear, inner_lr=0.01, inner_steps=steps, **kwargs)
      sizes[implicit, steps] = _backward_temp_bytes(meta_loss, params, support, query)
  # Backprop through the loop keeps per-step residuals (here ≥ one float per example) ...
  assert sizes[False, 100] - sizes[False, 10] >= 90 * 32 * 8
  # ... the implicit meta-gradient keeps none.
  assert sizes[True, 100] == sizes[True, 10]


def _mlp_loss_linear(w, batch):
  X, y = batch
  return jnp.mean(jnp.tanh(X @ w - y) ** 2)


def test_misuse_errors():
  with pytest.raises(ValueError, match="exactly one of inner_lr"):
    maml_loss(_mlp_loss)
  with pytest.raises(ValueError, match="exactly one of inner_lr"):
    maml_loss(_mlp_loss, inner_lr=0.1, inner_optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match="inner_steps"):
    maml_loss(_mlp_loss, inner_lr=0.1, inner_steps=0)
  with pytest.raises(ValueError, match="pass implicit=True"):
    maml_loss(_mlp_loss, inner_lr=0.1, proximal_lambda=1.0)
  with pytest.raises(ValueError, match="proximal_lambda > 0"):
    maml_loss(_mlp_loss, inner_lr=0.1, implicit=True)
  with pytest.raises(ValueError, match="exclusive"):
    maml_loss(_mlp_loss, inner_lr=0.1, implicit=True, first_order=True, proximal_lambda=1.0)
  with pytest.raises(ValueError, match="cg_steps"):
    maml_loss(_mlp_loss, inner_lr=0.1, implicit=True, proximal_lambda=1.0, cg_steps=0)


def test_gradients_with_respect_to_hyper_parameters():
  rng = np.random.default_rng(9)
  loss_fn, theta, support, query = _imaml_setup(rng)

  def fd(fn, x, eps=1e-6):
    return (fn(x + eps) - fn(x - eps)) / (2 * eps)

  # Explicit MAML differentiates the inner learning rate (Meta-SGD).
  maml_of_lr = jax.jit(
    lambda lr: maml_loss(loss_fn, inner_lr=lr, inner_steps=3)(theta, support, query)
  )
  np.testing.assert_allclose(jax.grad(maml_of_lr)(0.3), fd(maml_of_lr, 0.3), rtol=1e-6)

  # iMAML: a traced value closed over by loss_fn gets its implicit gradient ...
  def imaml_of_scale(scale, lr=0.3):
    scaled = lambda w, batch: scale * loss_fn(w, batch)
    imaml = maml_loss(scaled, inner_lr=lr, inner_steps=300, implicit=True, proximal_lambda=1.5)
    return imaml(theta, support, query) / scale

  imaml_of_scale_jit = jax.jit(imaml_of_scale)
  got = jax.jit(jax.grad(imaml_of_scale))(1.2)
  np.testing.assert_allclose(got, fd(imaml_of_scale_jit, 1.2), rtol=1e-6)
  assert abs(float(got)) > 1e-3
  # ... and the inner optimiser's step size, which does not move the minimiser, gets zero.
  assert float(jax.jit(jax.grad(imaml_of_scale, argnums=1))(1.2, 0.3)) == 0.0


@pytest.mark.parametrize("implicit", [False, True])
def test_has_aux_reports_inner_residual(implicit):
  rng = np.random.default_rng(8)
  loss_fn, theta, support, query = _imaml_setup(rng)
  kwargs = {"implicit": True, "proximal_lambda": 1.5} if implicit else {}
  lam = kwargs.get("proximal_lambda", 0.0)
  residuals = []
  for steps in (2, 200):
    meta_loss = maml_loss(loss_fn, inner_lr=0.3, inner_steps=steps, has_aux=True, **kwargs)
    plain = jax.jit(maml_loss(loss_fn, inner_lr=0.3, inner_steps=steps, **kwargs))
    (loss, aux), grad = jax.jit(jax.value_and_grad(meta_loss, has_aux=True))(theta, support, query)
    assert isinstance(aux, MamlAux)
    np.testing.assert_allclose(loss, plain(theta, support, query), rtol=1e-12)
    np.testing.assert_allclose(grad, jax.jit(jax.grad(plain))(theta, support, query), rtol=1e-12)
    np.testing.assert_allclose(loss, loss_fn(aux.adapted_params, query), rtol=1e-12)
    # Independent residual: the inner objective's gradient norm, written out.
    inner = lambda phi: loss_fn(phi, support) + 0.5 * lam * jnp.sum((phi - theta) ** 2)
    want = np.linalg.norm(jax.grad(inner)(aux.adapted_params))
    np.testing.assert_allclose(aux.inner_grad_norm, want, rtol=1e-10)
    residuals.append(float(aux.inner_grad_norm))
  assert residuals[1] < 1e-3 * residuals[0]


def test_imaml_reports_the_implicit_cg_solve():
  # The aux CG result solves the backward system (I + H/λ)u = ∇L_query(φ*): its x is the
  # meta-gradient; too few CG steps show up as MAX_STEPS with a large residual.
  rng = np.random.default_rng(4)
  loss_fn, theta, support, query = _imaml_setup(rng)
  lam = 1.5
  prox = lambda phi: loss_fn(phi, support) + 0.5 * lam * jnp.sum((phi - theta) ** 2)
  phi_star = _newton_minimise(prox, theta)
  H = np.asarray(jax.hessian(loss_fn)(phi_star, support))
  want = np.linalg.solve(np.eye(4) + H / lam, jax.grad(loss_fn)(phi_star, query))
  for cg_steps, status in ((10, SolverStatus.RESIDUAL), (2, SolverStatus.MAX_STEPS)):
    meta_loss = maml_loss(
      loss_fn,
      inner_lr=0.3,
      inner_steps=300,
      implicit=True,
      proximal_lambda=lam,
      cg_steps=cg_steps,
      has_aux=True,
    )
    grad, aux = jax.jit(jax.grad(meta_loss, has_aux=True))(theta, support, query)
    solve = aux.implicit_solve
    assert int(solve.status) == status
    np.testing.assert_allclose(solve.x, grad, rtol=1e-10)  # the same solve as the backward pass
    rhs = np.asarray(jax.grad(loss_fn)(phi_star, query))
    true_residual = np.linalg.norm(rhs - (np.eye(4) + H / lam) @ np.asarray(grad))
    np.testing.assert_allclose(
      solve.relative_residual, true_residual / np.linalg.norm(rhs), rtol=1e-4, atol=1e-12
    )
    if status == SolverStatus.RESIDUAL:
      np.testing.assert_allclose(grad, want, rtol=1e-9)
      assert int(solve.num_steps) <= 5 and float(solve.min_curvature) > 0
    else:
      assert float(solve.relative_residual) > 1e-4
  _, aux = maml_loss(loss_fn, inner_lr=0.3, has_aux=True)(theta, support, query)
  assert aux.implicit_solve is None
