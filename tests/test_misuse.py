"""Misuse gets a named error (or a status), never a raw JAX error or a silent NaN.

Each test first reproduces what plain JAX (or the old behaviour) gives for the same mistake, then
checks curvopt's message: which argument, which leaf, which dtypes, and the fix.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvopt
from curvopt._checks import as_key
from curvopt.curvature.estimators import (
  hutchinson_diagonal,
  hutchinson_trace,
  hutchpp_trace,
  lanczos,
  spectral_density,
  top_eigenvalues,
)
from curvopt.curvature.products import empirical_fisher_fn, ggn_fn, ggn_vp, hvp, hvp_fn

X32 = {"w": jnp.array([1.0, 2.0, 3.0], jnp.float32)}
V64 = {"w": jnp.array([1.0, 0.0, -1.0], jnp.float64)}
CAST = re.escape("jax.tree.map(lambda a, b: a.astype(b.dtype), v, ")


def _f(p):
  return jnp.sum(p["w"] ** 3)


def _model(p):
  return 2.0 * p["w"]


def _loss(z):
  return jnp.sum(z**2)


def _example_loss(p, e):
  return jnp.sum(p["w"] * e) ** 2


_BATCH = jnp.ones((4, 3), jnp.float32)

# (name, raw JAX composition a user would write, its error, curvopt's call).
_DTYPE_CASES = [
  (
    "hvp",
    lambda x, v: jax.jvp(jax.grad(_f), (x,), (v,)),
    (TypeError, "primal and tangent arguments to jax.jvp do not match"),
    lambda x, v: hvp(_f, x, v),
  ),
  (
    "hvp",
    lambda x, v: jax.grad(lambda y: jax.jvp(_f, (y,), (v,))[1])(x),
    (TypeError, "primal and tangent arguments to jax.jvp do not match"),
    lambda x, v: hvp(_f, x, v, mode="rev_fwd"),
  ),
  (
    "hvp_fn's matvec",
    lambda x, v: jax.linearize(jax.grad(_f), x)[1](v),
    (ValueError, "linearized function called on tangent values inconsistent"),
    lambda x, v: hvp_fn(_f, x)(v),
  ),
  (
    "hvp_fn's matvec",
    lambda x, v: jax.vjp(jax.grad(_f), x)[1](v),
    (ValueError, "unexpected JAX type"),
    lambda x, v: hvp_fn(_f, x, mode="rev_rev")(v),
  ),
  (
    "ggn_vp",
    lambda x, v: jax.linearize(_model, x)[1](v),
    (ValueError, "linearized function called on tangent values inconsistent"),
    lambda x, v: ggn_vp(_model, _loss, x, v),
  ),
  (
    "ggn_fn's matvec",
    lambda x, v: jax.linearize(_model, x)[1](v),
    (ValueError, "linearized function called on tangent values inconsistent"),
    lambda x, v: ggn_fn(_model, _loss, x)(v),
  ),
  (
    "empirical_fisher_fn's matvec",
    lambda x, v: jax.linearize(lambda p: jax.vmap(_example_loss, (None, 0))(p, _BATCH), x)[1](v),
    (ValueError, "linearized function called on tangent values inconsistent"),
    lambda x, v: empirical_fisher_fn(_example_loss, x, _BATCH)(v),
  ),
]


@pytest.mark.parametrize("name,raw,raw_error,call", _DTYPE_CASES)
def test_tangent_dtype_mismatch_is_named(name, raw, raw_error, call):
  error, match = raw_error
  with pytest.raises(error, match=match):
    raw(X32, V64)
  point = "params" if "ggn" in name or "fisher" in name else "x"
  want = (
    f"{re.escape(name)}: v\\['w'\\] has dtype float64 but {point}\\['w'\\] has dtype float32.*"
    + CAST.replace("v, ", f"v, {point}")
  )
  with pytest.raises(TypeError, match=want):
    call(X32, V64)
  with pytest.raises(TypeError, match=want):
    jax.jit(call)(X32, V64)
  # The fix the message names makes the call work, and gives the float32 reference.
  fixed = jax.tree.map(lambda a, b: a.astype(b.dtype), V64, X32)
  out = call(X32, fixed)
  assert out["w"].dtype == jnp.float32


def test_python_scalar_tangent_takes_the_points_dtype():
  x = jnp.float32(2.0)
  with pytest.raises(TypeError, match="primal and tangent"):  # plain JAX, with x64 on
    jax.jvp(jax.grad(lambda t: t**3), (x,), (1.0,))
  out = hvp(lambda t: t**3, x, 1.0)
  assert out.dtype == jnp.float32 and float(out) == 12.0
  assert float(hvp_fn(lambda t: t**3, x)(1.0)) == 12.0


_ESTIMATORS = {
  "hutchinson_trace": lambda m, like, key: hutchinson_trace(m, like, key, num_samples=2),
  "hutchpp_trace": lambda m, like, key: hutchpp_trace(m, like, key, num_samples=3),
  "hutchinson_diagonal": lambda m, like, key: hutchinson_diagonal(m, like, key, num_samples=2),
  "lanczos": lambda m, like, key: lanczos(m, like, key, num_iters=3),
  "top_eigenvalues": lambda m, like, key: top_eigenvalues(m, like, key, k=1, num_iters=3),
  "spectral_density": lambda m, like, key: spectral_density(
    m, like, key, num_iters=3, num_runs=2, grid=11
  ),
}


@pytest.mark.parametrize("name", list(_ESTIMATORS))
def test_estimator_like_dtype_unlike_the_matvec_point_is_named(name):
  estimate = _ESTIMATORS[name]
  raw_matvec = jax.linearize(jax.grad(_f), X32)[1]  # what hvp_fn did before
  with pytest.raises(ValueError, match="linearized function called on tangent values"):
    estimate(raw_matvec, V64, jax.random.key(0))
  want = (
    f"{name}: like\\['w'\\] has dtype float64, but the matvec was built at a point whose leaf "
    "has dtype float32.*like=params.*" + re.escape("a.astype(b.dtype), like, params")
  )
  with pytest.raises(TypeError, match=want):
    estimate(hvp_fn(_f, X32), V64, jax.random.key(0))
  estimate(hvp_fn(_f, X32), X32, jax.random.key(0))  # the fix: like is the point


def test_as_key_accepts_int_seeds_typed_and_raw_keys():
  want = jax.random.key_data(jax.random.key(3))
  with pytest.raises(TypeError, match="invalid PRNG key data"):  # what the estimators gave
    jax.random.split(0, 2)
  for key in (3, np.int64(3), jnp.int32(3), jnp.uint8(3), jax.random.key(3)):
    np.testing.assert_array_equal(jax.random.key_data(as_key(key)), want)
  raw = jax.random.PRNGKey(3)
  assert as_key(raw) is raw
  traced = jax.jit(lambda seed: jax.random.key_data(as_key(seed)))(3)
  np.testing.assert_array_equal(traced, want)


@pytest.mark.parametrize("name", list(_ESTIMATORS))
def test_estimators_accept_int_seeds_like_dp_sgd(name):
  estimate = _ESTIMATORS[name]
  matvec = lambda v: {"w": jnp.array([1.0, 2.0, 4.0]) * v["w"]}
  like = {"w": jnp.zeros(3)}
  seeded, keyed = jax.jit(
    lambda: (estimate(matvec, like, 3), estimate(matvec, like, jax.random.key(3)))
  )()
  jax.tree.map(np.testing.assert_array_equal, seeded, keyed)
  raw = jax.jit(lambda key: estimate(matvec, like, key))(jax.random.PRNGKey(3))
  jax.tree.map(np.testing.assert_array_equal, raw, keyed)


@pytest.mark.parametrize(
  "bad,match",
  [
    (1.5, "got float"),
    (True, "not a bool"),
    ("0", "got str"),
    (jax.random.split(jax.random.key(0), 2), "batch of keys of shape \\(2,\\)"),
    (jnp.zeros(3, jnp.uint32), "dtype uint32 and shape \\(3,\\)"),
    (jnp.zeros((), jnp.float32), "dtype float32"),
  ],
)
def test_bad_keys_get_a_named_type_error(bad, match):
  with pytest.raises(TypeError, match=f"key must be .*{match}"):
    as_key(bad)
  with pytest.raises(TypeError, match=match):
    hutchinson_trace(lambda v: v, jnp.zeros(3), bad, num_samples=2)


def _overflowing_hessian():
  # exp(100) overflows float32: the loss, its gradient and its Hessian are inf.
  w = jnp.full((3,), 100.0, jnp.float32)
  return hvp_fn(lambda w: jnp.sum(jnp.exp(w)), w), w


@pytest.mark.parametrize(
  "name", ["hutchinson_trace", "hutchpp_trace", "lanczos", "top_eigenvalues", "spectral_density"]
)
def test_non_finite_operator_is_reported(name):
  estimate = _ESTIMATORS[name]
  overflow, like32 = _overflowing_hessian()
  like = {"w": jnp.zeros(3)}
  nan_matvec = lambda v: {"w": jnp.array([1.0, jnp.nan, 1.0]) * v["w"]}
  finite_matvec = lambda v: {"w": jnp.array([1.0, 2.0, 4.0]) * v["w"]}

  @jax.jit
  def run():
    results = [estimate(overflow, like32, 0), estimate(nan_matvec, like, 0)]
    results.append(estimate(finite_matvec, like, 0))
    return results, [r.finite for r in results]  # the property works under jit too

  results, flags = run()
  assert [bool(f) for f in flags] == [False, False, True]
  assert [bool(r.finite) for r in results] == [False, False, True]
  assert all(f.dtype == jnp.bool_ and f.shape == () for f in flags)


# ------------------------------------------------------------- Newton-CG's update (issue 24)
# Each row: the raw error the user's functions give when called the way a library that does
# not check would call them, then curvopt's named error.


def _classifier():
  x = jax.random.normal(jax.random.key(0), (12, 3))
  y = (x[:, 0] > 0).astype(jnp.float32)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  model_fn = lambda p, x: x @ p["w"] + p["b"]
  loss_fn = lambda z, y: jnp.mean((z - y) ** 2)
  return params, x, y, model_fn, loss_fn


def _grad(params, x, y, model_fn, loss_fn):
  return jax.grad(lambda p: loss_fn(model_fn(p, x), y))(params)


def test_forgotten_data_keywords_name_what_is_missing():
  params, x, y, model_fn, loss_fn = _classifier()
  with pytest.raises(TypeError, match="missing 1 required positional argument: 'x'"):
    jax.linearize(lambda p: model_fn(p), params)  # the raw error
  tx = curvopt.newton_cg(model_fn=model_fn, loss_fn=loss_fn)
  g = _grad(params, x, y, model_fn, loss_fn)
  with pytest.raises(TypeError, match=r"model_fn needs the data argument\(s\) \['x'\].*x=x"):
    tx.update(g, tx.init(params), params)
  with pytest.raises(TypeError, match=r"loss_fn needs the data argument\(s\) \['y'\].*y=y"):
    tx.update(g, tx.init(params), params, x=x)


def test_positional_data_get_a_keyword_hint():
  params, x, y, model_fn, loss_fn = _classifier()
  tx = curvopt.newton_cg(model_fn=model_fn, loss_fn=loss_fn)
  g = _grad(params, x, y, model_fn, loss_fn)
  with pytest.raises(TypeError, match="positional"):
    optax.chain(optax.sgd(1.0)).update(g, optax.sgd(1.0).init(params), params, x, y)  # raw
  with pytest.raises(TypeError, match=r"the data go by keyword.*update\(grads, state, params, x=x"):
    tx.update(g, tx.init(params), params, x, y)


def test_integer_parameters_are_refused_at_init():
  params = {"w": jnp.zeros(20, jnp.int32)}
  with pytest.raises(ValueError, match="cannot convert float NaN to integer"):
    int(jnp.asarray(jnp.nan))  # what the damping state's NaN diagnostics hit with int params
  tx = curvopt.newton_cg(curvature="hessian")
  with pytest.raises(TypeError, match=r"params\['w'\] has dtype int32.*floating-point"):
    tx.init(params)


def test_data_of_different_lengths_are_named_with_their_sizes():
  params, x, y, model_fn, loss_fn = _classifier()
  with pytest.raises(TypeError, match="incompatible shapes for broadcasting"):
    loss_fn(model_fn(params, x), y[:5])  # raw
  tx = curvopt.newton_cg(model_fn=model_fn, loss_fn=loss_fn)
  g = _grad(params, x, y, model_fn, loss_fn)
  with pytest.raises(ValueError, match=r"different leading sizes \{'x': \[12\], 'y': \[5\]\}"):
    tx.update(g, tx.init(params), params, x=x, y=y[:5])


def test_a_forgotten_value_fn_with_the_hessian_is_named():
  params, x, y, model_fn, loss_fn = _classifier()
  tx = curvopt.newton_cg(curvature="hessian")
  g = _grad(params, x, y, model_fn, loss_fn)
  with pytest.raises(ValueError, match=r"value_fn=\(params, \*\*data\) -> loss"):
    tx.update(g, tx.init(params), params, x=x, y=y)


@pytest.mark.parametrize("rate", [-1.0, 0.0])
def test_a_non_positive_learning_rate_is_refused(rate):
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    curvopt.newton_cg(rate, curvature="hessian")
  schedule = optax.constant_schedule(-1.0)  # a schedule is the user's business
  curvopt.newton_cg(schedule, curvature="hessian")


def test_nnx_state_without_module_names_module():
  from flax import nnx

  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
  loss_fn = lambda z, y: jnp.mean((z - y) ** 2)
  state = nnx.state(model, nnx.Param)
  with pytest.raises(TypeError, match="'State' object is not callable"):
    (lambda m, x: m(x))(state, x)  # raw
  optimizer = nnx.Optimizer(
    model, curvopt.newton_cg(model_fn=lambda m, x: m(x), loss_fn=loss_fn), wrt=nnx.Param
  )
  grads = nnx.grad(lambda m: loss_fn(m(x), y))(model)
  with pytest.raises(TypeError, match=r"module=model"):
    optimizer.update(model, grads, x=x, y=y)
  with pytest.raises(TypeError, match=r"optimizer.update\(model, grads, x=x"):
    optimizer.update(model, grads)  # and forgotten data through nnx
