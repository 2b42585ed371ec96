"""Tests for curvopt.implicit.fixed_point: tutorial numbers, unrolled references, status."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from curvopt.autodiff.implicit import FixedPointSolution, fixed_point


def _newton_sqrt(a, **kwargs):
  return fixed_point(lambda a, x: 0.5 * (x + a / x), a, a, **kwargs).value


def test_newton_sqrt_tutorial_numbers_float32():
  a = jnp.float32(2.0)
  value = _newton_sqrt(a)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, 1.4142135, rtol=1e-7)
  np.testing.assert_allclose(jax.grad(_newton_sqrt)(a), 0.35355338, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(jax.grad(_newton_sqrt))(a), -0.08838835, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_newton_sqrt_closed_form_float64(jit):
  a = jnp.array([0.5, 2.0, 9.0, 30.0])
  grad = jax.vmap(jax.grad(lambda a: _newton_sqrt(a, tol=1e-12)))
  grad2 = jax.vmap(jax.grad(jax.grad(lambda a: _newton_sqrt(a, tol=1e-12))))
  if jit:
    grad, grad2 = jax.jit(grad), jax.jit(grad2)
  np.testing.assert_allclose(grad(a), 0.5 / np.sqrt(a), rtol=1e-12)
  np.testing.assert_allclose(grad2(a), -0.25 * np.asarray(a) ** -1.5, rtol=1e-10)


def test_check_grads_order_2():
  check_grads(lambda a: _newton_sqrt(a, tol=1e-13), (jnp.array(2.0),), order=2, modes=["rev"])


def _tanh_map(params, x):
  # A pytree contraction: x = {"h", "g"}, params = {"W", "b", "c"}, Lipschitz < 1.
  h = jnp.tanh(params["W"] @ x["h"] + params["b"] + 0.2 * x["g"].sum())
  g = 0.5 * jnp.sin(x["g"]) + params["c"] * x["h"][:2]
  return {"h": h, "g": g}


def _tanh_problem(dtype=jnp.float64):
  rng = np.random.default_rng(0)
  W = rng.normal(size=(4, 4))
  W = 0.4 * W / np.linalg.norm(W, 2)
  params = {
    "W": jnp.asarray(W, dtype),
    "b": jnp.asarray(rng.normal(size=4), dtype),
    "c": jnp.asarray(0.3, dtype),
  }
  x0 = {"h": jnp.zeros(4, dtype), "g": jnp.zeros(2, dtype)}
  return params, x0


def _unrolled(params, x0, num_iters=200):
  return jax.lax.fori_loop(0, num_iters, lambda _, x: _tanh_map(params, x), x0)


def _readout(x):
  return jnp.sum(x["h"] ** 2) + jnp.sum(jnp.cos(x["g"]))


def test_pytree_gradient_matches_unrolled_backprop():
  params, x0 = _tanh_problem()
  implicit_loss = lambda p: _readout(fixed_point(_tanh_map, p, x0, tol=1e-13).value)
  unrolled_loss = lambda p: _readout(_unrolled(p, x0))
  sol = fixed_point(_tanh_map, params, x0, tol=1e-13)
  assert isinstance(sol, FixedPointSolution)
  assert bool(sol.converged) and int(sol.num_iters) < 200
  np.testing.assert_allclose(implicit_loss(params), unrolled_loss(params), rtol=1e-12)
  got, want = jax.grad(implicit_loss)(params), jax.grad(unrolled_loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = want
    for key in path:
      w = w[key.key]
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=str(path))


def test_pytree_second_derivative_matches_unrolled():
  params, x0 = _tanh_problem()

  def loss(b, solve):
    return _readout(solve({**params, "b": b}))

  implicit = lambda b: loss(b, lambda p: fixed_point(_tanh_map, p, x0, tol=1e-13).value)
  unrolled = lambda b: loss(b, lambda p: _unrolled(p, x0))
  hess_implicit = jax.jacrev(jax.grad(implicit))(params["b"])
  hess_unrolled = jax.hessian(unrolled)(params["b"])
  np.testing.assert_allclose(hess_implicit, hess_unrolled, rtol=1e-8, atol=1e-10)


def test_closed_over_tracers_are_differentiated():
  # The classic failure: f closes over a traced parameter. Gradients must equal passing it in a.
  params, x0 = _tanh_problem()

  def closed(W):
    f = lambda a, x: _tanh_map({**a, "W": W}, x)
    rest = {k: v for k, v in params.items() if k != "W"}
    return _readout(fixed_point(f, rest, x0, tol=1e-13).value)

  def explicit(W):
    return _readout(fixed_point(_tanh_map, {**params, "W": W}, x0, tol=1e-13).value)

  want = jax.grad(explicit)(params["W"])
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(jax.grad(closed)(params["W"]), want, rtol=1e-10)
  np.testing.assert_allclose(jax.jit(jax.grad(closed))(params["W"]), want, rtol=1e-10)
  batched = jax.vmap(jax.grad(closed))(jnp.stack([params["W"], 0.5 * params["W"]]))
  np.testing.assert_allclose(batched[0], want, rtol=1e-10)
  # grad outside vmap: the closed-over W is an AD tracer seen through a batching trace.
  scales = jnp.array([1.0, 0.5])
  over_batch = lambda W, fn: jax.vmap(lambda s: fn(s * W))(scales).sum()
  np.testing.assert_allclose(
    jax.grad(over_batch)(params["W"], closed),
    jax.grad(over_batch)(params["W"], explicit),
    rtol=1e-10,
  )


def test_non_convergence_is_reported():
  sol = fixed_point(lambda a, x: 2.0 * x + a, 1.0, jnp.float32(1.0), max_iter=30)
  assert not bool(sol.converged) and int(sol.num_iters) == 30 and float(sol.error) > 1.0
  # A NaN stops the loop early and is reported as not converged.
  sol = fixed_point(lambda a, x: jnp.log(x - a), 5.0, jnp.float64(1.0))
  assert not bool(sol.converged) and int(sol.num_iters) < 1000
  # A slow contraction given too few iterations.
  sol = jax.jit(lambda a: fixed_point(lambda a, x: 0.999 * x + a, a, jnp.zeros(3), max_iter=5))(
    jnp.ones(3)
  )
  assert not bool(sol.converged) and int(sol.num_iters) == 5
  ok = fixed_point(lambda a, x: 0.5 * x + a, 1.0, jnp.float64(0.0), tol=1e-10)
  assert bool(ok.converged) and abs(float(ok.value) - 2.0) < 1e-9


def test_no_recompilation_across_parameter_values():
  traces = []

  @jax.jit
  def solve_grad(a):
    traces.append(1)
    return jax.grad(lambda a: _newton_sqrt(a))(a)

  for a in (2.0, 3.0, 5.0):
    solve_grad(jnp.float32(a))
  assert len(traces) == 1


def test_backward_memory_does_not_grow_with_iterations():
  # The implicit backward keeps (a, x*) only; unrolled backprop keeps every iterate.
  params, x0 = _tanh_problem()

  def temp_bytes(loss):
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  implicit = lambda n: lambda p: _readout(fixed_point(_tanh_map, p, x0, max_iter=n).value)
  unrolled = lambda n: lambda p: _readout(_unrolled(p, x0, n))
  assert temp_bytes(implicit(10)) == temp_bytes(implicit(1000))
  assert temp_bytes(unrolled(1000)) - temp_bytes(unrolled(10)) >= 990 * 6 * 8


def test_misuse_errors():
  with pytest.raises(ValueError, match="tol"):
    fixed_point(lambda a, x: x, 1.0, 1.0, tol=0.0)
  with pytest.raises(ValueError, match="max_iter"):
    fixed_point(lambda a, x: x, 1.0, 1.0, max_iter=0)
  with pytest.raises(ValueError, match="structure, shapes and dtypes"):
    fixed_point(lambda a, x: jnp.concatenate([x, x]), 1.0, jnp.zeros(2))
  with pytest.raises(ValueError, match="dtype"):
    fixed_point(lambda a, x: x.astype(jnp.float32), 1.0, jnp.zeros(2, jnp.float64))
