"""Tests for curvopt.curvature.kronecker: K-FAC's factors against explicit per-example formulas.

Each model below is written once, for ONE example, with an optional perturbation ``eps[name]``
added where parameter ``name`` acts (a layer's output) and, beside its outputs, the input
vectors of that layer (an MLP's activations, a convolution's patches cut out by hand). The
references loop over the examples in Python: with :math:`J_n = \\partial f_b / \\partial
\\epsilon_n` from ``jax.jacrev`` and the example's output Hessian :math:`H_b` (a diagonal
block of ``jax.hessian`` of the batch loss), the K-FAC block of a layer is
:math:`A \\otimes G` with :math:`A = \\frac1N \\sum_{b,n} a a^\\top` and
:math:`G = \\sum_{b,n} J_n^\\top H_b J_n` ("expand"), or the sums over positions taken first
("reduce"). Blocks are compared as dense matrices in the leaf's own flattened coordinates.
"""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_ggn, mlp_params

from curvopt.curvature import kronecker
from curvopt.curvature.kronecker import (
  DiagonalBlock,
  damped_inverse,
  kronecker_factors,
  kronecker_matvec,
)

F64 = jnp.float64


class _Shapes(dict):
  """Passed as ``eps``: records the shape of every perturbed layer output."""


def _perturb(eps, name, y):
  if isinstance(eps, _Shapes):
    eps[name] = y.shape
    return y
  return y if eps is None else y + eps[name]


def _cross_entropy(logits, y):
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(logits * y, -1))


# ------------------------------------------------------------------------------- models
# forward(params, x, eps) -> (outputs of one example, {name: (kind, inputs (N, K))})


def _mlp_forward(params, x, eps=None):
  acts, h = {}, x
  for i, layer in enumerate(params):
    acts[f"w{i}"] = ("dense", h[None])
    acts[f"b{i}"] = ("bias", jnp.ones((1, 1)))
    h = _perturb(eps, f"w{i}", h @ layer["w"]) + layer["b"]
    h = _perturb(eps, f"b{i}", h)
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return h, acts


def _cnn_params(key):
  k = jax.random.split(key, 3)
  return {
    "kernel": jax.random.normal(k[0], (3, 3, 2, 4), F64) / 4,
    "bias": 0.1 * jax.random.normal(k[1], (4,), F64),
    "head": jax.random.normal(k[2], (3 * 3 * 4, 3), F64) / 6,
  }


def _cnn_forward(params, x, eps=None):
  """A strided, padded convolution (NHWC/HWIO, stride 2, padding 1) and a dense head."""
  y = jax.lax.conv_general_dilated(
    x[None], params["kernel"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )[0]  # (3, 3, 4)
  y = _perturb(eps, "kernel", y) + params["bias"]
  y = _perturb(eps, "bias", y)
  h = jnp.tanh(y).reshape(-1)
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  patches = [
    padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :].reshape(-1) for i in range(3) for j in range(3)
  ]
  acts = {
    "kernel": ("dense", jnp.stack(patches)),
    "bias": ("bias", jnp.ones((9, 1))),
    "head": ("dense", h[None]),
  }
  return _perturb(eps, "head", h @ params["head"]), acts


def _transformer_params(key, d_in=3, d=4, f=6, classes=3):
  names = {
    "w_in": (d_in, d),
    "ln_g": (d,),
    "ln_b": (d,),
    "wq": (d, d),
    "wk": (d, d),
    "wv": (d, d),
    "wo": (d, d),
    "w1": (d, f),
    "b1": (f,),
    "w2": (f, d),
    "w_out": (d, classes),
  }
  keys = jax.random.split(key, len(names))
  return {
    n: (1.0 if n == "ln_g" else 0.0) + jax.random.normal(k, s, F64) / np.sqrt(s[0])
    for (n, s), k in zip(names.items(), keys, strict=True)
  }


def _transformer_forward(p, x, eps=None):
  """A pre-LayerNorm transformer block on a sequence ``(T, d_in)``, mean-pooled to logits."""
  acts = {"w_in": ("dense", x)}
  h = _perturb(eps, "w_in", x @ p["w_in"])
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  xhat = (h - mu) / jnp.sqrt(var + 1e-3)
  acts["ln_g"], acts["ln_b"] = ("scale", xhat), ("bias", jnp.ones((x.shape[0], 1)))
  z = _perturb(eps, "ln_b", _perturb(eps, "ln_g", xhat * p["ln_g"]) + p["ln_b"])
  q, k, v = (_perturb(eps, n, z @ p[n]) for n in ("wq", "wk", "wv"))
  acts.update({n: ("dense", z) for n in ("wq", "wk", "wv")})
  att = jax.nn.softmax(q @ k.T / 2.0, axis=-1) @ v
  acts["wo"] = ("dense", att)
  h = h + _perturb(eps, "wo", att @ p["wo"])
  acts["w1"], acts["b1"] = ("dense", h), ("bias", jnp.ones((x.shape[0], 1)))
  u = jnp.tanh(_perturb(eps, "b1", _perturb(eps, "w1", h @ p["w1"]) + p["b1"]))
  acts["w2"] = ("dense", u)
  h = h + _perturb(eps, "w2", u @ p["w2"])
  pooled = h.mean(0)
  acts["w_out"] = ("dense", pooled[None])
  return _perturb(eps, "w_out", pooled @ p["w_out"]), acts


VOCAB, SEQ = 6, 3


def _tied_params(key):
  k = jax.random.split(key, 2)
  return {
    "embed": jax.random.normal(k[0], (VOCAB, 4), F64),
    "mix": jax.random.normal(k[1], (4, 4), F64) / 2,
  }


def _tied_forward(p, ids, eps=None):
  """A tied embedding: row lookups, a dense layer, and the table again as output projection."""
  rows = _perturb(eps, "embed", jnp.take(p["embed"], ids, axis=0))  # (T, 4)
  h = jnp.tanh(_perturb(eps, "mix", rows @ p["mix"]))
  logits = _perturb(eps, "logits", h @ p["embed"].T)  # (T, V)
  acts = {"embed": ("lookup", jax.nn.one_hot(ids, VOCAB, dtype=F64)), "mix": ("dense", rows)}
  acts["logits"] = ("projection", h)
  return logits, acts


# --------------------------------------------------------------------------- references


def _example_hessians(outputs, loss):
  """``H_b``: the diagonal blocks of the batch loss's Hessian in the outputs."""
  b = outputs.shape[0]
  flat = outputs.reshape(b, -1)
  full = jax.jit(jax.hessian(lambda z: loss(z.reshape(outputs.shape))))(flat)  # (B, C, B, C)
  return np.stack([full[i, :, i, :] for i in range(b)])


def _reference_cases(forward, params, xs, loss, curvature="ggn"):
  """Per example: the layers' inputs, ``J_n`` per position, and ``H_b`` (or the Fisher's)."""
  outputs = jax.jit(jax.vmap(lambda x: forward(params, x)[0]))(xs)
  if curvature == "ggn":
    hessians = _example_hessians(outputs, loss)
  else:  # empirical Fisher: B * grad grad^T per example
    g = jax.grad(loss)(outputs).reshape(outputs.shape[0], -1)
    hessians = outputs.shape[0] * np.einsum("bi,bj->bij", g, g)
  shapes, kinds = _Shapes(), {}

  def trace(x):
    kinds.update({n: kind for n, (kind, _) in forward(params, x, shapes)[1].items()})
    return x

  jax.eval_shape(trace, xs[0])
  zeros = {n: jnp.zeros(shape, F64) for n, shape in shapes.items()}

  @jax.jit
  def one(x):
    jac = jax.jacrev(lambda e: forward(params, x, e)[0].reshape(-1))(zeros)
    return {n: a for n, (_, a) in forward(params, x)[1].items()}, jac

  cases = []
  for b, x in enumerate(xs):
    inputs, jac = jax.tree.map(np.asarray, one(x))
    acts = {n: (kinds[n], a) for n, a in inputs.items()}
    cases.append((acts, jac, np.asarray(hessians[b])))
  return cases


def _flat_positions(j):
  """``(C, *positions, P)`` -> ``(N, C, P)``."""
  c, p = j.shape[0], j.shape[-1]
  return np.moveaxis(j.reshape(c, -1, p), 1, 0)


def _reference_block(cases, name, sharing="expand", eps_name=None):
  """``A ⊗ G`` of layer ``name`` in the leaf's flat coordinates, and ``tr A``."""
  eps_name = eps_name or name
  kind = cases[0][0][name][0]
  left, right, count = 0.0, 0.0, 0
  for acts, jac, h in cases:
    a = acts[name][1]  # (N, K)
    js = _flat_positions(jac[eps_name])  # (N, C, P)
    if kind == "scale":
      js = js * a[:, None, :]
      a = np.ones((a.shape[0], 1))
    if sharing == "reduce":
      a_bar, j_sum = a.mean(0), js.sum(0)
      left, right, count = left + np.outer(a_bar, a_bar), right + j_sum.T @ h @ j_sum, count + 1
    else:
      left = left + a.T @ a
      right = right + np.einsum("ncp,cd,ndq->pq", js, h, js)
      count += a.shape[0]
  left = left / count
  return np.kron(left, right), float(np.trace(left))


@jax.jit
def _dense_blocks(factors, params):
  """The implementation's block of every leaf as a dense matrix in flat coordinates."""
  zero = jax.tree.map(jnp.zeros_like, params)
  blocks = {}
  for name, leaf in params.items():

    def column(e, name=name, leaf=leaf):
      v = dict(zero, **{name: e.reshape(leaf.shape)})
      return kronecker_matvec(factors, v)[name].reshape(-1)

    blocks[name] = jax.vmap(column)(jnp.eye(leaf.size, dtype=leaf.dtype)).T
  return blocks


def _left_trace(factors, params, name):
  left = factors.blocks[sorted(params).index(name)].left
  return float(left.sum() if left.ndim == 2 else jnp.trace(left[0]))


def _batched(forward):
  return lambda params, batch: jax.vmap(lambda x: forward(params, x)[0])(batch)


def _factors(forward, loss_fn, params, xs, **kwargs):
  fn = jax.jit(
    lambda p, b: kronecker_factors(_batched(forward), lambda out, _: loss_fn(out), p, b, **kwargs)
  )
  return fn(params, xs)


def _check_blocks(forward, params, xs, loss, names, sharing="expand", curvature="ggn"):
  factors = _factors(forward, loss, params, xs, weight_sharing=sharing, curvature=curvature)
  cases = _reference_cases(forward, params, xs, loss, curvature)
  dense = _dense_blocks(factors, params)
  for name in names:
    ref, ref_trace = _reference_block(cases, name, sharing)
    np.testing.assert_allclose(dense[name], ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_left_trace(factors, params, name), ref_trace, rtol=1e-10)
  return factors


# ------------------------------------------------------------------------------- tests


def _mlp_problem(classes=3, n=6):
  params = {}
  for i, layer in enumerate(mlp_params(0, (4, 5, classes))):
    params[f"w{i}"], params[f"b{i}"] = layer["w"], layer["b"]
  xs = jax.random.normal(jax.random.key(1), (n, 4), F64)
  y = jax.nn.one_hot(jnp.arange(n) % classes, classes, dtype=F64)
  return params, xs, lambda out: _cross_entropy(out, y)


def _mlp_forward_dict(p, x, eps=None):
  return _mlp_forward([{"w": p[f"w{i}"], "b": p[f"b{i}"]} for i in range(2)], x, eps)


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_mlp_factors_equal_the_per_example_formulas(curvature):
  params, xs, loss = _mlp_problem()
  _check_blocks(_mlp_forward_dict, params, xs, loss, list(params), curvature=curvature)


def test_cnn_with_a_strided_convolution_factors_equal_the_per_example_formulas():
  params = _cnn_params(jax.random.key(2))
  xs = jax.random.normal(jax.random.key(3), (4, 5, 5, 2), F64)
  y = jax.nn.one_hot(jnp.arange(4) % 3, 3, dtype=F64)
  _check_blocks(_cnn_forward, params, xs, lambda out: _cross_entropy(out, y), list(params))


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_transformer_block_factors_equal_the_per_example_formulas(sharing):
  params = _transformer_params(jax.random.key(4))
  xs = jax.random.normal(jax.random.key(5), (3, 5, 3), F64)
  y = jax.nn.one_hot(jnp.arange(3) % 3, 3, dtype=F64)
  _check_blocks(
    _transformer_forward, params, xs, lambda out: _cross_entropy(out, y), list(params), sharing
  )


def test_tied_embedding_pools_the_lookup_and_the_transposed_projection():
  """The table's block: rows from the lookups' one-hot vectors and the projection's logit
  cotangents, columns from the lookups' cotangents and the projection's inputs."""
  params = _tied_params(jax.random.key(6))
  ids = jax.random.randint(jax.random.key(7), (4, SEQ), 0, VOCAB)
  targets = jax.nn.one_hot((ids + 1) % VOCAB, VOCAB, dtype=F64)
  loss = lambda out: jnp.mean(jnp.sum(jax.nn.logsumexp(out, -1) - jnp.sum(out * targets, -1), -1))  # noqa: E731
  factors = _check_blocks(_tied_forward, params, ids, loss, ["mix"])
  cases = _reference_cases(_tied_forward, params, ids, loss)
  left, right, count = 0.0, 0.0, 0
  for acts, jac, h in cases:
    onehot, hidden = acts["embed"][1], acts["logits"][1]
    j_rows, j_logits = _flat_positions(jac["embed"]), _flat_positions(jac["logits"])
    left = left + onehot.T @ onehot + np.einsum("ncp,cd,ndq->pq", j_logits, h, j_logits)
    right = right + np.einsum("ncp,cd,ndq->pq", j_rows, h, j_rows) + hidden.T @ hidden
    count += 2 * onehot.shape[0]
  ref = np.kron(left / count, right)
  np.testing.assert_allclose(_dense_blocks(factors, params)["embed"], ref, rtol=1e-10, atol=1e-12)


def test_example_groups_of_different_sizes_pool_their_cases():
  """A PINN-like model: one network on two point sets (5 and 3 points), each with its own
  output leaf and mean loss; the factors pool the cases of both groups."""
  params, _, _ = _mlp_problem(classes=1)
  x_a = jax.random.normal(jax.random.key(17), (5, 4), F64)
  x_b = jax.random.normal(jax.random.key(18), (3, 4), F64)
  net = _batched(_mlp_forward_dict)
  model = lambda p, batch: {"a": net(p, batch["a"]), "b": jnp.sin(net(p, batch["b"]))}  # noqa: E731
  loss = lambda out, batch: 0.5 * jnp.mean(out["a"] ** 2) + 0.5 * jnp.mean(out["b"] ** 2)  # noqa: E731
  factors = jax.jit(lambda p, b: kronecker_factors(model, loss, p, b))(params, {"a": x_a, "b": x_b})
  sin_forward = lambda p, x, eps=None: (lambda o, acts: (jnp.sin(o), acts))(  # noqa: E731
    *_mlp_forward_dict(p, x, eps)
  )
  cases = _reference_cases(_mlp_forward_dict, params, x_a, lambda o: 0.5 * jnp.mean(o**2))
  cases += _reference_cases(sin_forward, params, x_b, lambda o: 0.5 * jnp.mean(o**2))
  dense = _dense_blocks(factors, params)
  for name in params:
    ref, _ = _reference_block(cases, name)
    np.testing.assert_allclose(dense[name], ref, rtol=1e-10, atol=1e-12)


def test_one_dense_layer_with_squared_loss_and_one_output_is_the_exact_ggn():
  w = jax.random.normal(jax.random.key(8), (5, 1), F64)
  x = jax.random.normal(jax.random.key(9), (7, 5), F64)
  y = jax.random.normal(jax.random.key(10), (7, 1), F64)
  model = lambda w, x: x @ w  # noqa: E731
  loss = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)  # noqa: E731
  factors = jax.jit(lambda w, x: kronecker_factors(model, lambda out, b: loss(out, y), w, x))(w, x)
  dense = np.asarray(
    jax.vmap(lambda e: kronecker_matvec(factors, e.reshape(5, 1)).ravel())(jnp.eye(5))
  )
  np.testing.assert_allclose(dense, dense_ggn(w, x, y, model, loss), rtol=1e-12, atol=1e-14)


def test_linear_model_preconditioned_direction_is_the_gauss_newton_direction():
  """One dense layer, several outputs: A ⊗ G is the GGN, so (A ⊗ G)^{-1} g is Newton's step."""
  w = jax.random.normal(jax.random.key(11), (4, 3), F64)
  x = jax.random.normal(jax.random.key(12), (9, 4), F64)
  y = jax.random.normal(jax.random.key(13), (9, 3), F64)
  model = lambda w, x: x @ w  # noqa: E731
  loss = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))  # noqa: E731
  factors = jax.jit(lambda w, x: kronecker_factors(model, lambda out, b: loss(out, y), w, x))(w, x)
  grad = jax.grad(lambda w: loss(model(w, x), y))(w)
  direction = kronecker_matvec(damped_inverse(factors, 0.0), grad)
  newton = np.linalg.solve(dense_ggn(w, x, y, model, loss), np.asarray(grad).ravel())
  np.testing.assert_allclose(np.asarray(direction).ravel(), newton, rtol=1e-10)


def test_damped_inverse_is_the_pi_corrected_factored_tikhonov_inverse():
  params, xs, loss = _mlp_problem()
  factors = _factors(_mlp_forward_dict, loss, params, xs)
  damping = 0.3
  inverse = damped_inverse(factors, damping)
  for name in ("w0", "b1"):
    i = sorted(params).index(name)
    a, g = (np.asarray(m[0]) for m in factors.blocks[i])
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    root = np.sqrt(damping)
    want = np.kron(
      np.linalg.inv(a + pi * root * np.eye(len(a))), np.linalg.inv(g + root / pi * np.eye(len(g)))
    )
    np.testing.assert_allclose(_dense_blocks(inverse, params)[name], want, rtol=1e-9)


def test_sampled_ggn_is_unbiased():
  """Rademacher samples of the output Hessian's square root: the mean converges to "ggn"."""
  params, xs, loss = _mlp_problem()
  exact = _factors(_mlp_forward_dict, loss, params, xs)
  sampled = _factors(
    _mlp_forward_dict, loss, params, xs, curvature="ggn_sampled", key=jax.random.key(0),
    num_samples=4000,
  )  # fmt: skip
  for e, s in zip(exact.blocks, sampled.blocks, strict=True):
    np.testing.assert_allclose(s.left, e.left, rtol=1e-12)
    err = np.linalg.norm(s.right - e.right) / np.linalg.norm(e.right)
    assert err < 0.06, err  # about 1/sqrt(4000) times a constant of order one


def test_unrecognised_parameter_gets_the_exact_ggn_diagonal_and_one_warning():
  """A scale inside a custom-derivative call has no layer: its block is the GGN's diagonal."""

  @jax.custom_jvp
  def scaled_tanh(h, s):
    return jnp.tanh(h * s)

  scaled_tanh.defjvps(
    lambda g, ans, h, s: g * s * (1 - ans**2), lambda g, ans, h, s: g * h * (1 - ans**2)
  )
  params = {"w": jax.random.normal(jax.random.key(14), (3, 2), F64), "s": jnp.array([0.5, 2.0])}
  x = jax.random.normal(jax.random.key(15), (5, 3), F64)
  y = jax.random.normal(jax.random.key(16), (5, 2), F64)
  model = lambda p, x: scaled_tanh(x @ p["w"], p["s"])  # noqa: E731
  loss = lambda out, y: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))  # noqa: E731
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    factors = kronecker_factors(model, lambda out, b: loss(out, y), params, x)
  caught = [str(w.message) for w in caught if "K-FAC" in str(w.message)]
  assert len(caught) == 1 and "params['s']" in caught[0] and "params['w']" not in caught[0]
  block = factors.blocks[sorted(params).index("s")]
  assert isinstance(block, DiagonalBlock)
  ggn = dense_ggn(params, x, y, model, loss)
  np.testing.assert_allclose(block.diagonal, np.diag(ggn)[:2], rtol=1e-12)  # "s" flattens first


def test_nnx_module_gives_the_pytree_factors():
  from flax import nnx

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  model = Mlp(nnx.Rngs(0))
  xs = jax.random.normal(jax.random.key(1), (6, 4), jnp.float32)
  loss = lambda out, x: 0.5 * jnp.mean(jnp.sum(out**2, -1))  # noqa: E731
  factors = kronecker_factors(lambda m, x: m(x), loss, model, xs)
  state = nnx.state(model, nnx.Param)
  pure = lambda p, x: nnx.merge(nnx.graphdef(model), p)(x)  # noqa: E731
  want = kronecker_factors(pure, loss, state, xs)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), factors, want)
  v = jax.tree.map(jnp.ones_like, state)
  assert jax.tree.structure(kronecker_matvec(factors, v)) == jax.tree.structure(state)


def test_misuse_is_named():
  w, x = jnp.ones((2, 1)), jnp.ones((3, 2))
  model, loss = (lambda w, x: x @ w), (lambda y, x: y.sum())
  with pytest.raises(ValueError, match="curvature"):
    kronecker_factors(model, loss, w, x, curvature="hessian")
  with pytest.raises(ValueError, match="key"):
    kronecker_factors(model, loss, w, x, curvature="ggn_sampled")
  with pytest.raises(ValueError, match="leading example axis"):
    kronecker_factors(lambda w, x: (x @ w).sum(), loss, w, x)


# ----------------------------------------------------------------- sharded batches (4 devices)


def _sharded_main():
  """In a 4-device subprocess: the factors of a batch split over the devices, under jit."""
  from curvopt import sharding

  params, xs, loss = _mlp_problem(n=8)
  fn = jax.jit(
    lambda p, b: kronecker_factors(_batched(_mlp_forward_dict), lambda o, _: loss(o), p, b)
  )
  single = fn(params, xs)
  mesh = sharding.data_mesh(4)
  args = (sharding.replicate(params, mesh), sharding.shard_batch(xs, mesh))
  sharded = fn(*args)
  errors = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), sharded, single
  )
  hlo = fn.lower(*args).compile().as_text()
  print(
    json.dumps(
      {
        "devices": jax.device_count(),
        "error": max(jax.tree.leaves(errors)),
        "all_reduce": hlo.count(" all-reduce("),
      }
    )
  )


@pytest.mark.long
def test_sharded_batch_gives_the_single_device_factors():
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  root = pathlib.Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  facts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert facts["devices"] == 4 and facts["all_reduce"] >= 1
  assert facts["error"] < 1e-12


if __name__ == "__main__":
  _sharded_main()


def test_shifted_inverse_falls_back_to_the_clipped_eigendecomposition():
  """A factor whose rounding made it indefinite: Cholesky fails, the eigenvalues are clipped."""
  m = jnp.array([[[1.0, 0.0], [0.0, -1e-2]]], F64)
  inverse = kronecker._shifted_inverse(m, jnp.array([1e-3], F64))
  np.testing.assert_allclose(inverse[0], np.diag([1 / 1.001, 1e3]), rtol=1e-12)
  spd = jnp.array([[[2.0, 1.0], [1.0, 2.0]]], F64)
  np.testing.assert_allclose(
    kronecker._shifted_inverse(spd, jnp.array([0.5], F64))[0],
    np.linalg.inv(np.array([[2.5, 1.0], [1.0, 2.5]])),
    rtol=1e-12,
  )
