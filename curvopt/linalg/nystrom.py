r"""Randomized Nyström approximation and preconditioner for positive semi-definite operators.

A sketch of :math:`\ell` products :math:`Y = A\Omega` with a random orthonormal test matrix
:math:`\Omega \in \mathbb R^{n\times\ell}` gives the Nyström approximation

.. math:: \hat A = (A\Omega)(\Omega^\top A \Omega)^{+}(A\Omega)^\top = U \hat\Lambda U^\top ,

a rank-:math:`\ell` eigendecomposition that captures the top of :math:`A`'s spectrum (Halko,
Martinsson and Tropp 2011; Tropp et al. 2017). For the damped system
:math:`(A + \mu I)x = b` it gives the preconditioner of Frangella, Tropp and Udell (2023)

.. math:: P^{-1} = U(\hat\Lambda + \mu I)^{-1}U^\top + \frac{1}{\hat\lambda_\ell + \mu}
   (I - UU^\top),

which maps the top :math:`\ell` eigen-directions of :math:`A + \mu I` close to 1 and leaves
the rest scaled by :math:`1/(\hat\lambda_\ell + \mu)`. With a sketch size :math:`\ell`
of about twice the effective dimension :math:`d_{\mathrm{eff}}(\mu) =
\mathrm{tr}\,A(A + \mu I)^{-1}`, the preconditioned system has a condition number bounded
by a small constant with high probability (Frangella, Tropp and Udell 2023, Thm. 5.1), so
PCG needs a number of iterations that does not grow with :math:`\lambda_{\max}/\mu`.
Used for Newton-CG as NysNewton-CG (Rathore et al. 2024).

Everything works on pytrees: the test matrix, the basis and the products are pytrees with a
leading axis of size ``rank``; only the small :math:`\ell\times\ell` algebra and a thin QR /
SVD of the stacked sketch flatten leaves.
"""

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt._checks import check_choice
from curvopt._typing import Matvec
from curvopt.linalg.cg import CGResult, conjugate_gradient
from curvopt.linalg.conv_layout import with_conv_layout

__all__ = ["NystromApproximation", "nystrom_approximation", "nystrom_cg", "nystrom_preconditioner"]


class NystromApproximation(NamedTuple):
  r"""A rank-:math:`\ell` eigendecomposition :math:`\hat A = U \hat\Lambda U^\top`.

  Attributes:
    basis: :math:`U`, a pytree like the operator's vectors with a leading axis of size
      :math:`\ell` (``basis[i]`` is the i-th orthonormal eigenvector).
    eigenvalues: :math:`\hat\Lambda`, shape ``(rank,)``, non-negative, in decreasing order.
  """

  basis: Any
  eigenvalues: jax.Array


def _stack_rows(tree: Any, rank: int) -> jax.Array:
  """``(rank, n)`` matrix whose rows are the flattened slices ``tree[i]``."""
  return jnp.concatenate([leaf.reshape(rank, -1) for leaf in jax.tree.leaves(tree)], axis=1)


def _unstack_rows(matrix: jax.Array, like: Any) -> Any:
  """Inverse of :func:`_stack_rows`: rows of ``matrix`` back to leaves shaped like ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  sizes = [leaf.size for leaf in leaves]
  offsets = [sum(sizes[:i]) for i in range(len(sizes))]
  out = [
    matrix[:, o : o + s].reshape(matrix.shape[0], *leaf.shape).astype(leaf.dtype)
    for o, s, leaf in zip(offsets, sizes, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, out)


def _coefficients(basis: Any, v: Any) -> jax.Array:
  """:math:`U^\\top v`, shape ``(rank,)``."""
  terms = jax.tree.map(
    lambda u, x: jnp.tensordot(u, x, axes=x.ndim, precision=jax.lax.Precision.HIGHEST), basis, v
  )
  return sum(jax.tree.leaves(terms))


def _combine(basis: Any, coefficients: jax.Array) -> Any:
  """:math:`U c`, a pytree shaped like one row of ``basis``."""
  return jax.tree.map(lambda u: jnp.tensordot(coefficients.astype(u.dtype), u, axes=1), basis)


def nystrom_approximation(
  matvec: Matvec,
  like: Any,
  key: jax.Array,
  rank: int,
  *,
  batch_mode: Literal["vmap", "map"] = "vmap",
) -> NystromApproximation:
  r"""Randomized Nyström approximation of a PSD operator from ``rank`` products.

  Algorithm 2.1 of Frangella, Tropp and Udell (2023), with the shift that makes it stable in
  floating point (Li, Kluger and Tygert 2017; Tropp et al. 2017):

  1. :math:`\Omega = \mathrm{qr}(G)`, :math:`G` Gaussian :math:`n\times\ell`;
  2. :math:`Y = A\Omega` (``rank`` products, ``vmap``-ed or ``lax.map``-ed);
  3. shift :math:`\nu = \sqrt n\,\epsilon\,\|Y\|_2`, :math:`Y_\nu = Y + \nu\Omega`;
  4. :math:`C = \mathrm{chol}(\Omega^\top Y_\nu)`, :math:`B = Y_\nu C^{-1}`;
  5. thin SVD :math:`B = U\Sigma V^\top`, :math:`\hat\Lambda = \max(0, \Sigma^2 - \nu I)`.

  If the core matrix :math:`\Omega^\top Y_\nu` is not positive definite (the operator is
  indefinite, e.g. a Hessian away from a minimum), step 4 uses its eigendecomposition and
  drops the non-positive part, which gives the same :math:`\hat A` whenever the Cholesky
  factor exists.

  Args:
    matvec: ``v -> A v`` for a symmetric positive semi-definite :math:`A` on pytrees.
    like: a pytree with the structure, shapes and dtypes of the operator's vectors.
    key: PRNG key for the Gaussian test matrix.
    rank: sketch size :math:`\ell` (static, ``1 <= rank <= n``).
    batch_mode: ``"vmap"`` evaluates the ``rank`` products at once (fast, ``rank`` times
      the memory of one product); ``"map"`` evaluates them one after another.

  Returns:
    A :class:`NystromApproximation`.

  Raises:
    ValueError: for ``rank`` outside ``[1, n]`` or an unknown ``batch_mode``.

  Examples:
    A diagonal operator of rank 2 is recovered exactly:

    >>> d = jnp.array([5.0, 2.0, 0.0, 0.0])
    >>> approx = nystrom_approximation(lambda v: d * v, jnp.zeros(4), jax.random.key(0), 3)
    >>> [round(float(v), 4) for v in approx.eigenvalues]
    [5.0, 2.0, 0.0]

  References:
    Frangella, Tropp and Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal.
    Appl. 44(2), 2023. Tropp, Yurtsever, Udell and Cevher, "Fixed-rank approximation of a
    positive-semidefinite matrix from streaming data", NeurIPS 2017.
  """
  check_choice("batch_mode", batch_mode, ("vmap", "map"))
  leaves = jax.tree.leaves(like)
  n = sum(leaf.size for leaf in leaves)
  if not (isinstance(rank, int) and 1 <= rank <= n):
    raise ValueError(f"rank must be an int in [1, {n}] (the operator's dimension); got {rank!r}.")
  dtype = jnp.result_type(*leaves)
  keys = jax.random.split(key, len(leaves))
  gaussian = [
    jax.random.normal(k, (rank, leaf.size), dtype) for k, leaf in zip(keys, leaves, strict=True)
  ]
  omega_t, _ = jnp.linalg.qr(jnp.concatenate(gaussian, axis=1).T)  # (n, rank), orthonormal
  omega = _unstack_rows(omega_t.T, like)
  # Canonical convolutions on CPU: the sketch may run inside a loop or cond (lax.map, or a
  # preconditioner refreshed every k optimiser steps), see curvopt.linalg.conv_layout.
  matvec = with_conv_layout(matvec)
  if batch_mode == "vmap":
    y_tree = jax.vmap(matvec)(omega)
  else:
    y_tree = jax.lax.map(matvec, omega)
  y = _stack_rows(y_tree, rank).astype(dtype).T  # (n, rank)

  hi = jax.lax.Precision.HIGHEST
  y_norm = jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(jnp.matmul(y.T, y, precision=hi))))
  nu = jnp.sqrt(jnp.asarray(n, dtype)) * jnp.finfo(dtype).eps * y_norm
  y_nu = y + nu * omega_t
  core = jnp.matmul(omega_t.T, y_nu, precision=hi)
  core = 0.5 * (core + core.T)
  chol = jnp.linalg.cholesky(core)  # lower: core = L L^T, so B = Y_nu L^{-T}
  b_chol = jax.scipy.linalg.solve_triangular(chol, y_nu.T, lower=True).T
  # Fallback for an indefinite core: B = Y_nu V D^{-1/2} on the positive eigenvalues.
  d, v = jnp.linalg.eigh(core)
  positive = d > jnp.finfo(dtype).eps * jnp.max(jnp.abs(d)) * rank
  inv_sqrt = jnp.where(positive, 1.0 / jnp.sqrt(jnp.where(positive, d, 1.0)), 0.0)
  b_eigh = jnp.matmul(y_nu, v * inv_sqrt, precision=hi)
  b_mat = jnp.where(jnp.all(jnp.isfinite(b_chol)), b_chol, b_eigh)
  u, sigma, _ = jnp.linalg.svd(b_mat, full_matrices=False)
  eigenvalues = jnp.maximum(sigma**2 - nu, 0.0)
  return NystromApproximation(basis=_unstack_rows(u.T, like), eigenvalues=eigenvalues)


def nystrom_preconditioner(approx: NystromApproximation, mu: float | jax.Array) -> Matvec:
  r"""The Nyström preconditioner :math:`r \mapsto P^{-1} r` for :math:`A + \mu I`.

  .. math:: P^{-1} = U(\hat\Lambda + \mu I)^{-1}U^\top + \frac{1}{\hat\lambda_\ell + \mu}
     (I - UU^\top).

  This is Frangella, Tropp and Udell's (2023, eq. 5.3) :math:`P^{-1}` divided by
  :math:`\hat\lambda_\ell + \mu`. PCG's iterates do not depend on that scale, but with it
  :math:`P^{-1} \approx (A + \mu I)^{-1}`, so a steepest-descent fallback
  :math:`P^{-1} b` is already an approximate Newton step. When :math:`A` has rank below
  :math:`\ell` (so :math:`\hat\lambda_\ell = 0`) it is exactly :math:`(A + \mu I)^{-1}`.
  Directions with :math:`\hat\lambda_i + \mu = 0` are left unscaled.

  Args:
    approx: a :class:`NystromApproximation` of :math:`A`.
    mu: damping :math:`\mu \ge 0` (may be traced).

  Returns:
    ``r -> P^{-1} r`` on pytrees shaped like one row of ``approx.basis``, symmetric positive
    definite when :math:`\mu > 0`.

  Examples:
    >>> d = jnp.array([5.0, 2.0, 0.0, 0.0])
    >>> approx = nystrom_approximation(lambda v: d * v, jnp.zeros(4), jax.random.key(0), 3)
    >>> precond = nystrom_preconditioner(approx, 1.0)
    >>> [round(float(v), 4) for v in precond(jnp.ones(4))]    # (d + 1)^-1
    [0.1667, 0.3333, 1.0, 1.0]
  """
  eigenvalues = approx.eigenvalues
  dtype = eigenvalues.dtype
  mu = jnp.asarray(mu, dtype)
  shifted = eigenvalues + mu
  safe = lambda x: jnp.where(x > 0, x, 1.0)
  inner = 1.0 / safe(shifted)
  outer = 1.0 / safe(shifted[-1])

  def apply(r: Any) -> Any:
    coefficients = _coefficients(approx.basis, r)
    in_span = _combine(approx.basis, coefficients * (inner - outer))
    return optax.tree.add_scale(in_span, outer, r)  # U(Λ+μ)⁻¹Uᵀr + (λ_ℓ+μ)⁻¹(r - UUᵀr)

  return apply


def nystrom_cg(
  matvec: Matvec,
  b: Any,
  x0: Any | None = None,
  *,
  damping: float | jax.Array = 0.0,
  preconditioner: Matvec | None = None,
  key: jax.Array | None = None,
  rank: int = 10,
  batch_mode: Literal["vmap", "map"] = "vmap",
  **cg_options: Any,
) -> CGResult:
  r"""Nyström-preconditioned CG for :math:`(A + \delta I)x = b` (one-shot sketch).

  Sketches the undamped :math:`A` with ``rank`` products
  (:func:`nystrom_approximation`), then runs :func:`~curvopt.linalg.cg.conjugate_gradient`
  with :func:`nystrom_preconditioner` at :math:`\mu = \delta`. ``num_steps`` counts the CG
  iterations only; the sketch costs ``rank`` more products (batched). Same signature as
  :func:`~curvopt.linalg.cg.conjugate_gradient`. To reuse a sketch across solves
  (NysNewton-CG refreshes it every few steps), keep the :class:`NystromApproximation` and pass
  ``preconditioner=nystrom_preconditioner(approx, damping)`` to ``conjugate_gradient``.

  Args:
    matvec: ``v -> A v``, symmetric positive semi-definite, undamped.
    b: right-hand side pytree.
    x0: optional warm start.
    damping: :math:`\delta \ge 0` (may be traced); also the preconditioner's :math:`\mu`.
    preconditioner: must be ``None`` (the Nyström preconditioner replaces it).
    key: PRNG key of the sketch; ``None`` uses ``jax.random.key(0)`` (a fixed sketch).
    rank: sketch size (static).
    batch_mode: see :func:`nystrom_approximation`.
    **cg_options: passed to :func:`~curvopt.linalg.cg.conjugate_gradient` (``max_steps``,
      ``tol``, ``steihaug``, ...).

  Returns:
    A :class:`~curvopt.linalg.cg.CGResult`.

  Raises:
    ValueError: if a ``preconditioner`` is given.

  Examples:
    >>> d = jnp.array([100.0, 10.0, 0.0, 0.0])
    >>> result = nystrom_cg(lambda v: d * v, jnp.ones(4), damping=1.0, rank=3, tol=1e-4)
    >>> int(result.num_steps), [round(float(v), 4) for v in result.x]
    (1, [0.0099, 0.0909, 1.0, 1.0])
  """
  if preconditioner is not None:
    raise ValueError(
      "nystrom_cg builds its own preconditioner; pass preconditioner=None, or call "
      "conjugate_gradient(..., preconditioner=...) to use another one."
    )
  key = jax.random.key(0) if key is None else key
  approx = nystrom_approximation(matvec, b, key, rank, batch_mode=batch_mode)
  return conjugate_gradient(
    matvec,
    b,
    x0,
    damping=damping,
    preconditioner=nystrom_preconditioner(approx, damping),
    **cg_options,
  )
