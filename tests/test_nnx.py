"""flax nnx Modules as the point, against the split/merge composition written by hand.

The model is a small CNN with BatchNorm (in training mode: batch statistics, and running
averages that a call would update) and Dropout (an RNG count that a call would advance), so
that non-Param state of every kind rides along. Each curvopt call on the Module must equal the
hand-written pure function of ``nnx.split``'s Param state, and leave the Module untouched.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import curvopt
from curvopt.autodiff.derivatives import empirical_ntk, hessian, jacobian
from curvopt.curvature.estimators import hutchinson_diagonal, hutchinson_trace, top_eigenvalues
from curvopt.curvature.products import empirical_fisher_fn, ggn_fn, ggn_vp, hvp, hvp_fn

F64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)

# flax's BatchNorm keeps float32 running statistics and writes float64 batch means into them in
# training mode; JAX warns about that cast (in the user's model, not in curvopt).
pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")


class CNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs, **F64)
    self.bn = nnx.BatchNorm(3, rngs=rngs, **F64)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.lin = nnx.Linear(3 * 4 * 4, 2, rngs=rngs, **F64)

  def __call__(self, x):
    h = nnx.tanh(self.bn(self.conv(x)))
    h = self.drop(h)
    return self.lin(h.reshape(h.shape[0], -1))


def _model():
  return CNN(nnx.Rngs(0, dropout=1))


def _batch():
  k1, k2 = jax.random.split(jax.random.key(5))
  x = jax.random.normal(k1, (6, 4, 4, 1), jnp.float64)
  y = jax.nn.one_hot(jax.random.randint(k2, (6,), 0, 2), 2, dtype=jnp.float64)
  return x, y


def _xent(logits, y):
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def _loss(model):
  x, y = _batch()
  return _xent(model(x), y)


def _by_hand(f, model, wrt=nnx.Param):
  """The composition users write today: split once, merge inside a pure function."""
  graphdef, params, rest = nnx.split(model, wrt, ...)
  return (lambda p, *a: f(nnx.merge(graphdef, p, rest, copy=True), *a)), params


def _tangent(model, seed, wrt=nnx.Param):
  state = nnx.state(model, wrt)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
  )


@functools.cache
def _dense_hessian():
  """The Hessian of the loss in the flattened Param state, by jax.hessian (computed once)."""
  pure, params = _by_hand(_loss, _model())
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.jit(jax.hessian(lambda z: pure(unravel(z))))(flat))


def _snapshot(model):
  as_numpy = lambda a: np.asarray(
    jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
  )
  return jax.tree.map(as_numpy, nnx.state(model, ...))


def _assert_untouched(model, before):
  after = _snapshot(model)
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(a, b)


def _assert_state_close(got, want, rtol=1e-10):
  assert isinstance(got, nnx.State)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


def test_raw_jax_fails_on_a_module_with_batchnorm_and_dropout():
  # The raw error: the Dropout RNG count is uint32 state, not differentiable.
  with pytest.raises(TypeError, match="grad requires real- or complex-valued inputs.*uint32"):
    jax.grad(_loss)(_model())


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_fwd", "rev_rev"])
def test_hvp_on_a_module_equals_the_hand_split(mode):
  model, v = _model(), _tangent(_model(), 1)
  before = _snapshot(model)
  got = hvp(_loss, model, v, mode=mode)
  pure, params = _by_hand(_loss, model)
  want = jax.jvp(jax.grad(pure), (params,), (v,))[1]
  _assert_state_close(got, want)
  _assert_untouched(model, before)  # BatchNorm statistics and the RNG count did not move
  # And against the dense Hessian of the flattened Param state (independent of jvp/grad).
  want_dense = _dense_hessian() @ ravel_pytree(v)[0]  # conv bias rows are 0 (BatchNorm)
  np.testing.assert_allclose(ravel_pytree(got)[0], want_dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev"])
def test_hvp_fn_on_a_module_under_jit(mode):
  model = _model()
  v1, v2 = _tangent(model, 1), _tangent(model, 2)
  matvec = hvp_fn(_loss, model, mode=mode)
  pure, params = _by_hand(_loss, model)
  for v in (v1, v2):
    want = jax.jvp(jax.grad(pure), (params,), (v,))[1]
    _assert_state_close(matvec(v), want)
    _assert_state_close(jax.jit(matvec)(v), want)


def test_wrt_filter_differentiates_only_the_selected_state():
  model = _model()
  wrt = nnx.All(nnx.Param, nnx.PathContains("lin"))
  v = _tangent(model, 3, wrt)
  got = hvp(_loss, model, v, wrt=wrt)
  assert set(got.keys()) == {"lin"}
  pure, params = _by_hand(_loss, model, wrt)
  _assert_state_close(got, jax.jvp(jax.grad(pure), (params,), (v,))[1])
  with pytest.raises(ValueError, match="nnx.state\\(model, nnx.Param\\)"):
    hvp(_loss, model, v)  # a tangent of the filtered state, but wrt= not passed
  with pytest.raises(TypeError, match="wrt= selects"):
    hvp(lambda p: jnp.sum(p**2), jnp.ones(2), jnp.ones(2), wrt=nnx.Param)


def test_ggn_on_a_module_equals_the_hand_split():
  model = _model()
  x, y = _batch()
  v = _tangent(model, 4)
  pure, params = _by_hand(lambda m: m(x), model)
  loss = lambda logits: _xent(logits, y)
  out, jvp = jax.linearize(pure, params)
  (want,) = jax.linear_transpose(jvp, params)(jax.jvp(jax.grad(loss), (out,), (jvp(v),))[1])
  _assert_state_close(ggn_vp(lambda m: m(x), loss, model, v), want)
  _assert_state_close(ggn_fn(lambda m: m(x), loss, model)(v), want)


def test_empirical_fisher_on_a_module_equals_per_example_gradients():
  model = _model()
  model.eval()  # per-example losses: running statistics, no dropout
  x, y = _batch()
  v = _tangent(model, 5)
  example_loss = lambda m, ex: _xent(m(ex[0][None]), ex[1][None])
  pure, params = _by_hand(example_loss, model)
  grads = [jax.grad(pure)(params, (x[i], y[i])) for i in range(x.shape[0])]  # a loop
  flat_g = jnp.stack([ravel_pytree(g)[0] for g in grads])
  want = flat_g.T @ (flat_g @ ravel_pytree(v)[0]) / x.shape[0]
  got = empirical_fisher_fn(example_loss, model, (x, y))(v)
  assert isinstance(got, nnx.State)
  np.testing.assert_allclose(ravel_pytree(got)[0], want, rtol=1e-9)


@pytest.mark.parametrize("method", ["jacobian_contraction", "ntk_vector_products"])
def test_empirical_ntk_on_a_module(method):
  model = _model()
  model.eval()
  x, _ = _batch()
  apply = lambda m, xb: m(xb)
  got = empirical_ntk(apply, model, x[:3], x[3:], method=method)
  pure, params = _by_hand(apply, model)

  def flat_j(xb):  # (B, out, P): per-example, per-output gradients, by loops
    rows = []
    for i in range(xb.shape[0]):
      grad_o = lambda o: jax.grad(lambda p: pure(p, xb[i : i + 1])[0, o])(params)  # noqa: B023
      rows.append(jnp.stack([ravel_pytree(grad_o(o))[0] for o in range(2)]))
    return jnp.stack(rows)

  j1, j2 = flat_j(x[:3]), flat_j(x[3:])
  want = jnp.einsum("aop,bqp->aboq", j1, j2)  # (B1, B2, out, out)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_jacobian_and_hessian_of_a_module():
  model = _model()
  model.eval()
  x, _ = _batch()
  pure, params = _by_hand(lambda m, xb: m(xb), model)
  want = jax.jacrev(pure)(params, x[:2])
  for mode in ("auto", "fwd", "rev"):
    got = jacobian(lambda m, xb: m(xb), mode=mode)(model, x[:2])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  wrt = nnx.All(nnx.Param, nnx.PathContains("lin"))
  pure_lin, params_lin = _by_hand(lambda m: _loss(m), model, wrt)
  got_h = hessian(_loss, wrt=wrt)(model)
  want_h = jax.hessian(pure_lin)(params_lin)
  for a, b in zip(jax.tree.leaves(got_h), jax.tree.leaves(want_h), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_estimators_take_the_module_or_its_state_as_like():
  model = _model()
  before = _snapshot(model)
  matvec = hvp_fn(_loss, model)
  pure, params = _by_hand(_loss, model)
  by_hand = jax.linearize(jax.grad(pure), params)[1]
  want = hutchinson_trace(by_hand, params, 0, num_samples=4)
  for like in (model, nnx.state(model, nnx.Param)):
    got = hutchinson_trace(matvec, like, 0, num_samples=4)
    np.testing.assert_allclose(got.estimate, want.estimate, rtol=1e-9)
  diag = hutchinson_diagonal(matvec, model, 1, num_samples=2)
  assert isinstance(diag, nnx.State)
  assert jax.tree.structure(diag) == jax.tree.structure(params)
  # Against the dense Hessian: the top eigenvalue, within its residual bound.
  top = top_eigenvalues(matvec, model, 2, k=1, num_iters=40)
  assert isinstance(top.eigenvectors, nnx.State)
  eig = np.linalg.eigvalsh(_dense_hessian())
  lam = eig[np.argmax(np.abs(eig))]
  assert abs(float(top.eigenvalues[0]) - lam) <= max(1e-8, 2 * float(top.residual_norms[0]))
  _assert_untouched(model, before)


def test_curvopt_does_not_import_flax():
  code = "import sys, curvopt; print(any(m.split('.')[0] == 'flax' for m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# End to end: the README's flax nnx section, with no split/merge in user code.


class SmallCNN(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.lin = nnx.Linear(4 * 6 * 6, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    return self.lin(h.reshape(h.shape[0], -1))


def _digits_like():
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (32, 6, 6, 1))
  y = jax.random.randint(ky, (32,), 0, 3)
  return x, y


def _xent_int(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.long  # an end-to-end training (about 10 s): the long tier
def test_end_to_end_cnn_with_batchnorm_curvature_and_newton_cg():
  x, y = _digits_like()
  model = SmallCNN(nnx.Rngs(0))
  loss = lambda m: _xent_int(m(x), y)

  # Curvature at the model, in training mode (BatchNorm uses batch statistics).
  grads = nnx.grad(loss)(model)  # an nnx.State of the Params
  hg = curvopt.hvp(loss, model, grads)
  top = curvopt.top_eigenvalues(curvopt.hvp_fn(loss, model), model, 0, k=2, num_iters=20)
  # Checks: Hg against the split/merge composition by hand, and the Ritz pair's residual
  # ‖H y − θ y‖ recomputed with hvp (not taken from Lanczos).
  pure, params = _by_hand(loss, model)
  want = jax.jvp(jax.grad(pure), (params,), (grads,))[1]
  _assert_state_close(hg, want, rtol=1e-5)
  y0 = jax.tree.map(lambda a: a[0], top.eigenvectors)
  residual = optax.tree.norm(
    optax.tree.sub(curvopt.hvp(loss, model, y0), optax.tree.scale(top.eigenvalues[0], y0))
  )
  assert float(residual) <= 1e-2 * abs(float(top.eigenvalues[0]))
  assert abs(float(top.eigenvalues[0])) >= abs(float(top.eigenvalues[1]))

  # Newton-CG (Gauss-Newton) through nnx.Optimizer: the Module goes in, no split/merge.
  tx = curvopt.newton_cg(
    model_fn=lambda m, x: m(x), loss_fn=lambda out, y: _xent_int(out, y), module=model
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    value, grads = nnx.value_and_grad(lambda m: _xent_int(m(x), y))(model)
    optimizer.update(model, grads, x=x, y=y)
    return value

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(10)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.3 * losses[0]
  # Diagnostics through nnx.Optimizer are OptArray variables: read them with [...].
  state = optimizer.opt_state[0]
  assert float(state.damping[...]) > 0 and int(state.info.num_failed[...]) == 0
  assert np.isfinite(float(state.info.rho[...]))


def test_end_to_end_ghost_dp_sgd_through_nnx_optimizer():
  x, y = _digits_like()
  model = SmallCNN(nnx.Rngs(0))
  model.eval()  # DP: BatchNorm uses running statistics (no cross-example coupling)
  example_loss = lambda m, ex: _xent_int(m(ex["x"][None]), ex["y"][None])
  batch = {"x": x, "y": y}

  # The expected step by hand: per-example gradients of the Param state (split/merge), each
  # clipped to norm 1, summed; zero noise; SGD at 0.5 on the sum over the expected batch size.
  pure, params = _by_hand(example_loss, model)
  per_example = jax.vmap(jax.grad(pure), (None, 0))(params, batch)
  flat = jax.vmap(lambda g: ravel_pytree(g)[0])(per_example)
  norms = jnp.linalg.norm(flat, axis=1)
  clipped = flat * jnp.minimum(1.0, 1.0 / norms)[:, None]
  expected = -0.5 * clipped.sum(0) / 32
  assert float(norms.max()) > 1.0  # some examples are clipped

  clipped_sum = curvopt.clipped_sum_fn(example_loss, 1.0, method="ghost")
  tx = curvopt.dp_sgd(0.5, l2_norm_clip=1.0, noise_multiplier=0.0, key=0, expected_batch_size=32)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def dp_step(model, optimizer, batch):
    optimizer.update(model, clipped_sum(model, batch))

  before = ravel_pytree(nnx.state(model, nnx.Param))[0]
  dp_step(model, optimizer, batch)
  after = ravel_pytree(nnx.state(model, nnx.Param))[0]
  np.testing.assert_allclose(after - before, expected, rtol=1e-4, atol=1e-6)
