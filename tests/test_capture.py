"""Tests for curvopt.autodiff.capture: the call table, the evaluator and layer capture."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from curvopt.autodiff import capture


@jax.custom_jvp
def _smooth(x):
  return jnp.tanh(x)


_smooth.defjvp(lambda primals, tangents: (_smooth(primals[0]), tangents[0]))


@jax.custom_vjp
def _double(x):
  return 2 * x


_double.defvjp(lambda x: (2 * x, None), lambda _, ct: (2 * ct,))


@jax.custom_jvp
def _times(h, t):
  return h * t


_times.defjvps(lambda g, ans, h, t: g * t, lambda g, ans, h, t: h * g)


def _program(w, x):
  """One of each call primitive: jit, remat, custom_jvp, custom_vjp (holding a jit), scan."""
  h = jax.jit(lambda z: z @ w)(x)
  h = jax.checkpoint(jnp.sin)(h)
  h = _smooth(h) + _double(jax.nn.relu(h))
  return jax.lax.scan(lambda c, z: (c + z, c * z), jnp.zeros(h.shape[1:]), h)[1]


def _args():
  w = jax.random.normal(jax.random.key(0), (3, 4), jnp.float64)
  return w, jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)


def test_every_primitive_with_a_body_is_in_the_table():
  """A JAX upgrade that renames a call primitive fails here, not in four walkers."""
  closed = jax.make_jaxpr(_program)(*_args())
  names = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for sub in jex_core.jaxprs_in_params(eqn.params):
        names.add(eqn.primitive.name)
        visit(sub)

  visit(closed.jaxpr)
  assert names <= set(capture.CALLS)
  kinds = {capture.CALLS[name].kind for name in names}
  assert kinds == {"call", "remat", "custom", "loop"}


def test_interpret_inlines_the_chosen_calls_and_keeps_the_values():
  closed = jax.make_jaxpr(_program)(*_args())
  inlined = []

  def descend(eqn, invals, key):
    del invals
    sub = capture.body(eqn, capture.INLINABLE)
    if sub is not None:
      inlined.append((eqn.primitive.name, key))
    return sub

  out = capture.interpret(
    closed.jaxpr, closed.consts, list(_args()), lambda e, v, k: capture.bind(e, v), descend=descend
  )
  np.testing.assert_allclose(out[0], _program(*_args()), rtol=1e-14)
  assert {name for name, _ in inlined} >= {"jit", "custom_jvp_call", "custom_vjp_call"}
  assert all(len(key) >= 1 for _, key in inlined)
  # Loops are read, never inlined.
  assert capture.body(closed.jaxpr.eqns[-1], capture.INLINABLE) is None


def test_equations_descends_only_into_the_given_kinds():
  closed = jax.make_jaxpr(_program)(*_args())
  names = lambda kinds: {e.primitive.name for e in capture.equations(closed.jaxpr, kinds)}  # noqa: E731
  assert "dot_general" in names(("call",)) and "tanh" not in names(("call",))
  assert "tanh" in names(capture.INLINABLE) and "mul" in names((*capture.INLINABLE, "loop"))


def test_sites_and_leaf_index_through_shape_only_chains():
  """A weight read through reshape/transpose/neg, a bias through broadcast; leaf_index agrees
  with applying the chain to the entry labels."""
  w = jnp.arange(24.0).reshape(2, 3, 4)
  b = jnp.arange(4.0)

  def f(leaves, x):
    w, b = leaves
    kernel = -jnp.transpose(w.reshape(6, 4))  # (4, 6)
    return jnp.tanh(x @ kernel.T + b).sum()

  closed = jax.make_jaxpr(f)([w, b], jnp.ones((5, 6)))
  plan = capture.find_sites(closed.jaxpr, 2)
  assert not plan.unsupported and set(plan.sites) == {0, 1}
  assert plan.sites[0].kind == "dot" and plan.sites[1].kind == "elementwise"
  for leaf, value in ((0, w), (1, b)):
    site = plan.sites[leaf]
    labels = jnp.arange(value.size, dtype=jnp.float64).reshape(value.shape) + 1
    expected = np.abs(np.asarray(site.chain_fn(labels))) - 1
    np.testing.assert_array_equal(site.leaf_index(value.shape), expected)


def test_capture_gives_the_site_cotangents_and_fallback_gradients():
  """The probes' cotangents are the per-example gradients with respect to the site outputs;
  a leaf inside a custom-derivative call has no site and gets exact per-example gradients."""
  w, x = _args()
  s = jnp.array(0.7, jnp.float64)

  def f(leaves, example):
    w, s = leaves
    return _times(jnp.tanh(example @ w), s).sum()

  closed = jax.make_jaxpr(f)([w, s], x[0])
  plan = capture.find_sites(closed.jaxpr, 2)
  assert set(plan.sites) == {0} and set(plan.unsupported) == {1}
  site = plan.sites[0]
  captured = capture.capture(closed, [w, s], [x], {site.key: site}, fallback=[1])
  (fb_grads,), deltas = captured.vjp([jnp.ones(5, jnp.float64)])
  for i in range(5):
    pre = x[i] @ w
    want = jax.grad(lambda z: _times(jnp.tanh(z), s).sum())(pre)
    np.testing.assert_allclose(deltas[site.key][i], want, rtol=1e-13)
    want_s = jax.grad(lambda t: _times(jnp.tanh(pre), t).sum())(s)
    np.testing.assert_allclose(fb_grads[i], want_s, rtol=1e-13)
  np.testing.assert_allclose(captured.data[site.key][0], x, rtol=0)
