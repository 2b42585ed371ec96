"""Tests for curvopt.implicit.fixed_point: tutorial numbers, unrolled references, status."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import grad, jit, vmap
from jax.test_util import check_grads

from curvopt.autodiff.implicit import (
  FixedPointSolution,
  NonConvergenceError,
  NonConvergenceWarning,
  fixed_point,
  fixed_point_solve,
)


def _newton_sqrt(a, **kwargs):
  return fixed_point(lambda a, x: 0.5 * (x + a / x), a, a, **kwargs)


# The JAX tutorial "Custom derivative rules", section on fixed_point, verbatim.
def newton_sqrt(a):
  update = lambda a, x: 0.5 * (x + a / x)
  return fixed_point(update, a, a)


@pytest.mark.parametrize("x64", [False, True])
def test_tutorial_newton_sqrt_as_the_tutorial_writes_it(x64):
  # Each line of the tutorial, with what it prints (float32) or the float64 closed form.
  with jax.enable_x64(x64):
    rtol = 1e-12 if x64 else 1e-6
    assert abs(float(newton_sqrt(2.0)) - np.sqrt(2.0)) <= rtol * np.sqrt(2.0)
    np.testing.assert_allclose(
      jit(vmap(newton_sqrt))(jnp.array([1.0, 2.0, 3.0, 4.0])), np.sqrt([1, 2, 3, 4]), rtol=rtol
    )
    np.testing.assert_allclose(grad(newton_sqrt)(2.0), 0.5 / np.sqrt(2.0), rtol=rtol)
    np.testing.assert_allclose(grad(grad(newton_sqrt))(2.0), -0.25 * 2.0**-1.5, rtol=10 * rtol)
    # The tutorial's printed float32 values.
    if not x64:
      assert newton_sqrt(2.0).dtype == jnp.float32
      assert str(newton_sqrt(2.0)) == "1.4142135"
      assert str(grad(newton_sqrt)(2.0)) == "0.35355338"


def test_returns_a_pytree_like_x_init_usable_in_arithmetic():
  # The second failing line: jnp.sum(fixed_point(f, p, x0) ** 2).
  params, x0 = _tanh_problem()
  x = fixed_point(_tanh_map, params, x0, tol=1e-13)
  assert jax.tree.structure(x) == jax.tree.structure(x0)
  for fx_leaf, x_leaf in zip(
    jax.tree.leaves(_tanh_map(params, x)), jax.tree.leaves(x), strict=True
  ):
    np.testing.assert_allclose(fx_leaf, x_leaf, rtol=1e-12, atol=1e-13)
  p, v0 = jnp.array([1.0, 2.0]), jnp.zeros(2)
  f = lambda p, x: 0.5 * x + p  # x* = 2p
  assert float(jnp.sum(fixed_point(f, p, v0) ** 2)) == pytest.approx(20.0, rel=1e-5)
  np.testing.assert_allclose(
    grad(lambda p: jnp.sum(fixed_point(f, p, v0, tol=1e-14) ** 2))(p), 8 * p, rtol=1e-12
  )


def test_fixed_point_solve_returns_the_status_and_the_same_value():
  params, x0 = _tanh_problem()
  sol = fixed_point_solve(_tanh_map, params, x0, tol=1e-13)
  assert isinstance(sol, FixedPointSolution)
  assert sol._fields == ("value", "num_iters", "converged", "error")
  assert bool(sol.converged) and 0 < int(sol.num_iters) < 200
  assert float(sol.error) <= 1e-13 * 2
  for a, b in zip(
    jax.tree.leaves(sol.value),
    jax.tree.leaves(fixed_point(_tanh_map, params, x0, tol=1e-13)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  readout = lambda p: _readout(fixed_point_solve(_tanh_map, p, x0, tol=1e-13).value)
  want = jax.grad(lambda p: _readout(_unrolled(p, x0)))(params)
  np.testing.assert_allclose(jax.grad(readout)(params)["b"], want["b"], rtol=1e-10)


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
  implicit_loss = lambda p: _readout(fixed_point(_tanh_map, p, x0, tol=1e-13))
  unrolled_loss = lambda p: _readout(_unrolled(p, x0))
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

  implicit = lambda b: loss(b, lambda p: fixed_point(_tanh_map, p, x0, tol=1e-13))
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
    return _readout(fixed_point(f, rest, x0, tol=1e-13))

  def explicit(W):
    return _readout(fixed_point(_tanh_map, {**params, "W": W}, x0, tol=1e-13))

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


def test_non_convergence_status():
  quiet = dict(on_failure="ignore")
  sol = fixed_point_solve(lambda a, x: 2.0 * x + a, 1.0, jnp.float32(1.0), max_iter=30, **quiet)
  assert not bool(sol.converged) and int(sol.num_iters) == 30 and float(sol.error) > 1.0
  # A NaN stops the loop early and is reported as not converged.
  sol = fixed_point_solve(lambda a, x: jnp.log(x - a), 5.0, jnp.float64(1.0), **quiet)
  assert not bool(sol.converged) and int(sol.num_iters) < 1000
  # A slow contraction given too few iterations.
  solve = lambda a: fixed_point_solve(
    lambda a, x: 0.999 * x + a, a, jnp.zeros(3), max_iter=5, **quiet
  )
  sol = jax.jit(solve)(jnp.ones(3))
  assert not bool(sol.converged) and int(sol.num_iters) == 5
  ok = fixed_point_solve(lambda a, x: 0.5 * x + a, 1.0, jnp.float64(0.0), tol=1e-10)
  assert bool(ok.converged) and abs(float(ok.value) - 2.0) < 1e-9


_DIVERGES = lambda a, x: 2.0 * x + a
_SLOW = lambda a, x: 0.999 * x + a


@pytest.mark.parametrize("transform", ["eager", "jit", "vmap", "grad", "solve"])
def test_non_convergence_warns_by_default(transform):
  fns = {
    "eager": lambda a: fixed_point(_DIVERGES, a, jnp.ones(2), max_iter=30),
    "jit": jax.jit(lambda a: fixed_point(_DIVERGES, a, jnp.ones(2), max_iter=30)),
    "vmap": jax.vmap(lambda a: fixed_point(lambda a, x: a * x + 1.0, a, 0.0, max_iter=30)),
    "grad": jax.grad(lambda a: fixed_point(_SLOW, a, jnp.ones(2), max_iter=5).sum()),
    "solve": lambda a: fixed_point_solve(_DIVERGES, a, jnp.ones(2), max_iter=30).value,
  }
  # vmap: a = 0.5 and 0.1 contract, a = 1.5 does not: one warning, for the failed element.
  arg = jnp.array([0.5, 1.5, 0.1]) if transform == "vmap" else jnp.ones(2)
  with pytest.warns(NonConvergenceWarning) as record:
    jax.block_until_ready(fns[transform](arg))
  messages = [str(r.message) for r in record]
  assert any("forward solve did not converge" in m for m in messages)
  if transform == "grad":  # the adjoint solve contracts as slowly: it is reported too
    assert len(messages) == 2 and "adjoint (backward) solve did not converge" in messages[1]
  else:
    assert len(messages) == 1
  if transform == "vmap":
    assert len(record) == 1 and "max_iter=30" in str(record[0].message)


def test_adjoint_non_convergence_warns():
  # x_init is the exact fixed point (x* = a / 0.001), so the forward solve converges at once;
  # the adjoint iteration contracts at 0.999 and cannot converge in 5 steps.
  a = jnp.array([1.0, 2.0])
  loss = lambda a: fixed_point(_SLOW, a, a / 0.001, max_iter=5).sum()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert float(loss(a)) == pytest.approx(3000.0)
  with pytest.warns(NonConvergenceWarning, match="adjoint"):
    jax.block_until_ready(jax.grad(loss)(a))


def test_non_convergence_raises_on_request():
  with pytest.raises(NonConvergenceError, match="did not converge"):
    fixed_point(_DIVERGES, 1.0, jnp.ones(2), max_iter=30, on_failure="raise")
  jitted = jax.jit(
    lambda a: fixed_point(_DIVERGES, a, jnp.ones(2), max_iter=30, on_failure="raise")
  )
  with pytest.raises(RuntimeError, match="forward solve did not converge"):
    jax.block_until_ready(jitted(1.0))
  nan = lambda a, x: jnp.log(x - a)
  with pytest.raises(NonConvergenceError, match="non-finite value after"):
    fixed_point(nan, 5.0, jnp.float64(1.0), on_failure="raise")


def test_converged_and_ignored_solves_are_silent():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.block_until_ready(jax.grad(grad(newton_sqrt))(2.0))
    jax.block_until_ready(jax.jit(jax.vmap(newton_sqrt))(jnp.arange(1.0, 5.0)))
    fixed_point(_DIVERGES, 1.0, jnp.ones(2), max_iter=30, on_failure="ignore")
    jax.grad(lambda a: fixed_point(_SLOW, a, a / 0.001, max_iter=5, on_failure="ignore").sum())(
      jnp.ones(2)
    )


def test_python_scalar_x_init_takes_fs_dtype():
  a = jnp.float32(2.0)  # float32 params, x64 on, x_init a Python float
  x = fixed_point(lambda a, x: 0.5 * (x + a / x), a, 1.0)
  assert x.dtype == jnp.float32 and abs(float(x) - np.sqrt(2.0)) < 1e-6


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

  implicit = lambda n: lambda p: _readout(fixed_point(_tanh_map, p, x0, max_iter=n))
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
  with pytest.raises(ValueError, match="on_failure"):
    fixed_point(lambda a, x: x, 1.0, 1.0, on_failure="silent")
