r"""Linear solvers that act on any matvec over pytrees.

:func:`conjugate_gradient` solves :math:`A x = b` for a symmetric operator given only as
``matvec: v -> Av``. It is the truncated-CG inner loop of Newton-CG / Hessian-free
optimisation (Martens 2010), so beyond textbook CG it stops early on non-positive curvature
(Steihaug 1983), on a relative residual, or when the quadratic model stops making progress
(Martens 2010 §4.4), and it can return the best of a few saved iterates according to a true
objective (Martens 2010 §4.6). The whole solve is one :func:`jax.lax.while_loop`: no host
round-trip per iteration, ``jit``/``vmap``-able, and pytree-native: ``b``, ``x0`` and the
operator are pytrees; the loop itself runs on one packed vector per dtype, which keeps the
compiled loop body small (see :mod:`curvopt.linalg.flat`).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt.linalg.flat import flat_layout
from curvopt.linalg.layout import ConvLayout, with_conv_layout
from curvopt.linalg.status import CG_STATUSES, SolverStatus

Matvec = Callable[[Any], Any]

__all__ = ["CG_STATUSES", "CGResult", "SolverStatus", "conjugate_gradient"]

_MAX_STEPS = SolverStatus.MAX_STEPS.value
_RESIDUAL = SolverStatus.RESIDUAL.value
_PROGRESS = SolverStatus.PROGRESS.value
_NEGATIVE = SolverStatus.NEGATIVE_CURVATURE.value
_NONFINITE = SolverStatus.NONFINITE.value


class CGResult(NamedTuple):
  r"""Outcome of :func:`conjugate_gradient`, and of every solver in :mod:`curvopt.linalg`.

  With ``damping=δ``, :math:`A` below stands for the damped operator :math:`A + δI`.

  Attributes:
    x: the returned iterate, shaped like ``b``.
    num_steps: CG iterations taken (operator products inside the loop); for a dense solve,
      the products used to form the matrix.
    relative_residual: :math:`\|b - A x_k\| / \|b\|` at the last iterate of the loop (the
      recursively updated residual, re-computed exactly every ``recompute_residual_every``
      steps).
    quadratic_value: :math:`\phi(x) = \tfrac12 x^\top A x - b^\top x` at the returned
      ``x`` (negative whenever ``x`` improves on ``0``).
    status: why the loop stopped, an ``int32`` :class:`SolverStatus` code (an index into
      :data:`CG_STATUSES`; ``SolverStatus.message(code)`` explains it).
    negative_curvature: whether a direction with :math:`p^\top A p \le 0` was met.
    converged: whether the residual or the progress criterion was met.
    selected_step: the iteration whose iterate is returned (differs from ``num_steps`` only
      with ``backtrack_fn``, or on an early non-finite exit).
    min_curvature: the smallest Rayleigh quotient :math:`p_k^\top A p_k / p_k^\top p_k` of
      the search directions (an upper bound on :math:`\lambda_{\min}(A)`; ``inf`` if none).
  """

  x: Any
  num_steps: jax.Array
  relative_residual: jax.Array
  quadratic_value: jax.Array
  status: jax.Array
  negative_curvature: jax.Array
  converged: jax.Array
  selected_step: jax.Array
  min_curvature: jax.Array


class _Carry(NamedTuple):
  k: jax.Array
  x: Any
  r: Any
  p: Any
  rz: jax.Array
  phi: jax.Array
  phi_history: jax.Array
  status: jax.Array
  done: jax.Array
  selected_step: jax.Array
  saved_x: Any
  saved_phi: jax.Array
  min_curvature: jax.Array
  warm: jax.Array  # this trip computes A x0 for the warm start instead of an iteration


def _backtrack_schedule(max_steps: int, factor: float) -> tuple[int, ...]:
  """Iterations ``ceil(factor**j)`` at which iterates are saved (Martens 2010 §4.6)."""
  steps, j = [], 0
  while True:
    step = math.ceil(factor**j)
    if step > max_steps:
      return tuple(sorted(set(steps)))
    steps.append(step)
    j += 1


def conjugate_gradient(
  matvec: Matvec,
  b: Any,
  x0: Any | None = None,
  *,
  damping: float | jax.Array = 0.0,
  preconditioner: Matvec | None = None,
  max_steps: int = 100,
  tol: float | jax.Array = 1e-5,
  progress_tol: float | None = None,
  progress_window: int = 10,
  steihaug: bool = True,
  backtrack_fn: Callable[[Any], jax.Array] | None = None,
  backtrack_factor: float = 1.3,
  recompute_residual_every: int | None = None,
  unroll: int = 1,
  conv_layout: ConvLayout = "auto",
  flatten: bool = True,
) -> CGResult:
  r"""Truncated preconditioned conjugate gradient for :math:`A x = b`, over pytrees.

  Minimises the quadratic :math:`\phi(x) = \tfrac12 x^\top A x - b^\top x` by (preconditioned)
  conjugate directions :math:`p_k`. The loop stops at the first of:

  * **residual**: :math:`\|b - A x_k\| \le \mathrm{tol}\,\|b\|`;
  * **progress** (Martens 2010, with ``progress_tol=ε``): after :math:`k > s` steps, where
    :math:`s = \max(\mathrm{window}, \lceil 0.1 k \rceil)`,
    :math:`\phi_k < 0` and :math:`(\phi_k - \phi_{k-s}) / \phi_k < s\, ε`;
  * **negative curvature** (Steihaug 1983, with ``steihaug=True``): :math:`p_k^\top A p_k \le 0`.
    The last iterate is returned, or, at the first iteration, the (preconditioned)
    steepest-descent step :math:`x_0 + M^{-1}(b - A x_0)`, which is :math:`M^{-1} b` from zero;
  * **non-finite** curvature or step: the last finite iterate is returned;
  * ``max_steps`` iterations.

  A warm start ``x0`` is used only if it improves on zero (:math:`\phi(x_0) < 0`); otherwise
  the solve starts from zero (Martens 2010 §4.5). It costs one extra product.

  In finite precision the recursively updated residual :math:`r_{k+1} = r_k - \alpha_k A p_k`
  drifts away from the true residual :math:`b - A x_{k+1}`, so long float32 solves stagnate
  at an accuracy worse than they report. ``recompute_residual_every=n`` replaces it by the true
  residual every ``n`` iterations (residual replacement, van der Vorst and Ye 2000), at one
  extra product each time; the search direction is kept and the step length becomes the exact
  line minimum :math:`r_k^\top p_k / p_k^\top A p_k`. Then ``relative_residual``, the
  residual stopping test and ``quadratic_value`` (which Newton-CG's reduction ratio uses) stay
  true to the returned ``x``; without it a long float32 solve can report a residual far below
  the one it reached. It does not lower the float32 accuracy floor
  :math:`\approx \epsilon\,\|A\|\,\|x\|`.

  ``unroll=k`` runs ``k`` iterations per trip of the ``while_loop`` (the iterations after the
  stopping one are masked out, so the result is the same as with ``unroll=1``; up to ``k - 1``
  products are wasted at the end).

  On CPU, XLA runs a convolution inside a loop body with a naive kernel unless its dimension
  numbers are already canonical, and the derivatives of convolutions are not: a CNN's GGN
  product inside the CG loop ran 4-10x slower than the same product in straight-line code.
  ``conv_layout="canonical"`` (the default ``"auto"`` on the CPU backend) re-emits the
  operator's convolutions in canonical layout
  (:func:`~curvopt.linalg.layout.canonical_convolutions`), which removes that penalty;
  operators without convolutions are untouched.

  This function follows the solver protocol of :mod:`curvopt.linalg.solve`.

  Args:
    matvec: symmetric linear operator ``v -> Av`` on pytrees shaped like ``b``.
    b: right-hand side, any pytree of floating arrays.
    x0: optional warm start shaped like ``b``.
    damping: :math:`\delta`, solve :math:`(A + \delta I) x = b` instead (may be traced).
    preconditioner: optional ``r -> M⁻¹ r`` for a symmetric positive-definite ``M``.
    max_steps: maximum number of CG iterations (static).
    tol: relative-residual tolerance, may be a traced scalar; ``0`` disables the test.
    progress_tol: Martens' progress tolerance ``ε`` (he uses ``5e-4``); ``None`` disables.
    progress_window: minimum window ``s`` of the progress test.
    steihaug: stop on non-positive curvature (otherwise continue as plain CG and stop only
      when the step becomes non-finite).
    backtrack_fn: optional objective ``x -> scalar``. Iterates at iterations
      :math:`\lceil \gamma^j \rceil` are kept, and the one (or the last) with the smallest
      finite ``backtrack_fn`` is returned (Martens 2010 §4.6). Memory grows with the number
      of saved iterates, about :math:`\log_\gamma(\mathrm{max\_steps})`.
    backtrack_factor: the ratio :math:`\gamma > 1` of the saving schedule.
    recompute_residual_every: replace the recursive residual by :math:`b - A x_k` every this
      many iterations (static positive int); ``None`` never does.
    unroll: iterations per ``while_loop`` trip (static positive int).
    conv_layout: ``"canonical"`` rewrites the operator's convolutions to XLA:CPU's canonical
      layout, ``"as_is"`` leaves them, ``"auto"`` rewrites on the CPU backend only.
    flatten: run the loop on one vector per dtype (:func:`~curvopt.linalg.flat.flat_layout`)
      instead of on the pytree; the operator, preconditioner and ``backtrack_fn`` still see
      pytrees. Same iterates; far fewer kernels to compile for many-leaf pytrees.

  Returns:
    A :class:`CGResult`.

  Raises:
    ValueError: for ``max_steps < 1``, ``backtrack_factor <= 1``, an ``x0`` shaped unlike
      ``b``, or a non-positive ``recompute_residual_every`` or ``unroll``.

  Examples:
    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> result = conjugate_gradient(lambda v: A @ v, jnp.array([1.0, 2.0]), tol=1e-6)
    >>> np.allclose(result.x, jnp.linalg.solve(A, jnp.array([1.0, 2.0])))
    True
    >>> int(result.num_steps), SolverStatus(int(result.status)).name
    (2, 'RESIDUAL')

    On an indefinite matrix the Steihaug exit returns the steepest-descent step:

    >>> result = conjugate_gradient(lambda v: -v, jnp.array([1.0, 2.0]))
    >>> result.x.tolist(), bool(result.negative_curvature)
    ([1.0, 2.0], True)

  References:
    Hestenes and Stiefel, "Methods of conjugate gradients for solving linear systems", 1952.
    Steihaug, "The conjugate gradient method and trust regions in large scale optimization",
    SIAM J. Numer. Anal. 1983. Martens, "Deep learning via Hessian-free optimization",
    ICML 2010. van der Vorst and Ye, "Residual replacement strategies for Krylov subspace
    iterative methods for the convergence of true residuals", SIAM J. Sci. Comput. 2000.
  """
  if max_steps < 1:
    raise ValueError(f"max_steps must be a positive integer; got {max_steps!r}.")
  if backtrack_fn is not None and not backtrack_factor > 1:
    raise ValueError(f"backtrack_factor must be > 1; got {backtrack_factor!r}.")
  if x0 is not None and jax.tree.structure(x0) != jax.tree.structure(b):
    raise ValueError(
      f"x0 must have the pytree structure of b; got {jax.tree.structure(x0)} and "
      f"{jax.tree.structure(b)}."
    )
  for name, value in (("recompute_residual_every", recompute_residual_every), ("unroll", unroll)):
    if value is not None and not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{name} must be a positive int; got {value!r}.")
  if flatten and len(jax.tree.leaves(b)) > 1:
    pack, unpack = flat_layout(b)
    result = conjugate_gradient(
      lambda v: pack(matvec(unpack(v))),
      pack(b),
      None if x0 is None else pack(x0),
      damping=damping,
      preconditioner=None if preconditioner is None else lambda r: pack(preconditioner(unpack(r))),
      max_steps=max_steps,
      tol=tol,
      progress_tol=progress_tol,
      progress_window=progress_window,
      steihaug=steihaug,
      backtrack_fn=None if backtrack_fn is None else lambda v: backtrack_fn(unpack(v)),
      backtrack_factor=backtrack_factor,
      recompute_residual_every=recompute_residual_every,
      unroll=unroll,
      conv_layout=conv_layout,
      flatten=False,
    )
    return result._replace(x=unpack(result.x))
  matvec = with_conv_layout(matvec, conv_layout)
  if isinstance(damping, (int, float)) and damping == 0:
    operator = matvec
  else:
    operator = lambda v: optax.tree.add_scale(matvec(v), damping, v)
  precond = (lambda r: r) if preconditioner is None else preconditioner
  dtype = jnp.result_type(*[jnp.real(leaf).dtype for leaf in jax.tree.leaves(b)])
  vdot = lambda u, v: jnp.real(optax.tree.vdot(u, v)).astype(dtype)
  zeros = optax.tree.zeros_like(b)
  b_norm = jnp.sqrt(vdot(b, b))
  tol = jnp.asarray(tol, dtype)

  schedule = _backtrack_schedule(max_steps, backtrack_factor) if backtrack_fn else ()
  num_saved = len(schedule)
  schedule_arr = jnp.asarray(schedule or (0,), jnp.int32)

  def initial(x: Any, r: Any, phi: jax.Array) -> _Carry:
    """The carry that starts CG from ``x`` with residual ``r = b - Ax`` and value ``phi``."""
    z = precond(r)
    done = jnp.sqrt(vdot(r, r)) <= tol * b_norm
    return _Carry(
      k=jnp.zeros((), jnp.int32),
      x=x,
      r=r,
      p=z,
      rz=vdot(r, z),
      phi=phi,
      phi_history=jnp.zeros((max_steps + 1,), dtype).at[0].set(phi),
      status=jnp.where(done, _RESIDUAL, _MAX_STEPS).astype(jnp.int32),
      done=done,
      selected_step=jnp.zeros((), jnp.int32),
      saved_x=jax.tree.map(lambda leaf: jnp.zeros((num_saved, *leaf.shape), leaf.dtype), b),
      saved_phi=jnp.full((num_saved,), jnp.inf, dtype),
      min_curvature=jnp.asarray(jnp.inf, dtype),
      warm=jnp.zeros((), bool),
    )

  def restart(ax0: Any) -> _Carry:
    r"""Start from the warm start, kept only when it improves on zero.

    With ``r = b - A x0``, :math:`\phi(x_0) = -\tfrac12 x_0^\top (b + r)`.
    """
    r0 = optax.tree.sub(b, ax0)
    phi0 = -0.5 * vdot(x0, optax.tree.add(b, r0))
    keep = phi0 < 0
    return initial(
      optax.tree.where(keep, x0, zeros),
      optax.tree.where(keep, r0, b),
      jnp.where(keep, phi0, 0.0).astype(dtype),
    )

  if x0 is None:
    carry = initial(zeros, b, jnp.zeros((), dtype))
  else:
    # The product A x0 is taken by the first trip of the loop (``warm``), so the compiled
    # program holds the operator once, not twice.
    x0 = optax.tree.cast_like(x0, b)
    carry = initial(zeros, b, jnp.zeros((), dtype))._replace(
      p=x0, done=jnp.zeros((), bool), warm=jnp.ones((), bool)
    )

  def body(c: _Carry) -> _Carry:
    ap = operator(c.p)
    if x0 is None:
      new = iteration(c, ap)
    else:
      new = jax.lax.cond(c.warm, lambda: restart(ap), lambda: iteration(c, ap))
    # Scalars are in the widest real dtype; keep narrower leaves (bfloat16 weights) narrow.
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, c)

  def iteration(c: _Carry, ap: Any) -> _Carry:
    """One CG iteration, given the product ``ap = A p``."""
    pap = vdot(c.p, ap)
    rayleigh = pap / vdot(c.p, c.p)
    min_curvature = jnp.where(rayleigh < c.min_curvature, rayleigh, c.min_curvature)
    # r.p equals r.z in exact arithmetic; after a residual replacement only r.p gives the exact
    # line minimum along p (with r.z the step can overshoot and the iteration diverges).
    alpha = (c.rz if recompute_residual_every is None else vdot(c.r, c.p)) / pap
    x_new = optax.tree.add_scale(c.x, alpha, c.p)
    r_new = optax.tree.add_scale(c.r, -alpha, ap)
    replace = jnp.zeros((), bool)
    if recompute_residual_every is not None:
      replace = (c.k + 1) % recompute_residual_every == 0
      r_new = jax.lax.cond(replace, lambda: optax.tree.sub(b, operator(x_new)), lambda: r_new)
    phi_new = -0.5 * vdot(x_new, optax.tree.add(b, r_new))
    negative = (pap <= 0) if steihaug else jnp.zeros((), bool)
    finite = jnp.isfinite(pap) & jnp.isfinite(alpha) & jnp.isfinite(phi_new)
    ok = finite & ~negative

    # Steihaug exit: keep the last iterate, or take the steepest-descent step at iteration 0.
    first = c.k == 0
    sd_x = optax.tree.add(c.x, c.p)
    sd_phi = c.phi - c.rz + 0.5 * pap  # phi(x + p) with p = M^-1 r, so r.p = rz.
    take_sd = negative & first & jnp.isfinite(sd_phi)
    x_out = optax.tree.where(ok, x_new, optax.tree.where(take_sd, sd_x, c.x))
    phi_out = jnp.where(ok, phi_new, jnp.where(take_sd, sd_phi, c.phi))

    z_new = precond(r_new)
    rz_new = vdot(r_new, z_new)
    p_new = optax.tree.add_scale(z_new, rz_new / c.rz, c.p)

    k1 = c.k + 1
    residual_ok = jnp.sqrt(vdot(r_new, r_new)) <= tol * b_norm
    history = c.phi_history.at[k1].set(phi_new)
    if progress_tol is None:
      progress_ok = jnp.zeros((), bool)
    else:
      window = jnp.maximum(progress_window, jnp.ceil(0.1 * k1).astype(jnp.int32))
      phi_then = history[jnp.maximum(k1 - window, 0)]
      progress_ok = (
        (k1 > window) & (phi_new < 0) & ((phi_new - phi_then) / phi_new < window * progress_tol)
      )
    status = jnp.select(
      [~finite, negative, residual_ok, progress_ok, k1 >= max_steps],
      [_NONFINITE, _NEGATIVE, _RESIDUAL, _PROGRESS, _MAX_STEPS],
      c.status,
    ).astype(jnp.int32)
    done = ~ok | residual_ok | progress_ok | (k1 >= max_steps)
    moved = ok | take_sd
    selected = jnp.where(moved, k1, c.k)

    saved_x, saved_phi = c.saved_x, c.saved_phi
    if num_saved:
      slot = jnp.clip(jnp.searchsorted(schedule_arr, k1), 0, num_saved - 1)
      save = ok & (schedule_arr[slot] == k1)
      saved_x = jax.lax.cond(
        save,
        lambda s: jax.tree.map(lambda buf, leaf: buf.at[slot].set(leaf), s, x_new),
        lambda s: s,
        saved_x,
      )
      saved_phi = jnp.where(save, saved_phi.at[slot].set(phi_new), saved_phi)

    return _Carry(
      k=k1,
      x=x_out,
      r=optax.tree.where(ok, r_new, c.r),
      p=p_new,
      rz=rz_new,
      phi=phi_out,
      phi_history=history,
      status=status,
      done=done,
      selected_step=selected,
      saved_x=saved_x,
      saved_phi=saved_phi,
      min_curvature=min_curvature,
      warm=c.warm,
    )

  if unroll == 1:
    loop_body = body
  else:

    def masked(c: _Carry) -> _Carry:
      new = body(c)
      return jax.tree.map(lambda n, o: jnp.where(c.done, o, n), new, c)

    def loop_body(c: _Carry) -> _Carry:
      c = body(c)  # the loop condition guarantees this one is live
      for _ in range(unroll - 1):
        c = masked(c)
      return c

  c = jax.lax.while_loop(lambda c: ~c.done, loop_body, carry)
  x, phi, selected = c.x, c.phi, c.selected_step

  if num_saved:
    # Candidates: the saved iterates reached by the loop, then the final one (preferred on ties).
    valid = (schedule_arr <= c.k) & jnp.isfinite(c.saved_phi)
    values = jax.lax.map(backtrack_fn, c.saved_x)
    values = jnp.where(valid & jnp.isfinite(values), values, jnp.inf)
    final_value = backtrack_fn(x)
    final_value = jnp.where(jnp.isfinite(final_value), final_value, jnp.inf)
    best = jnp.argmin(values)
    use_saved = values[best] < final_value
    x = optax.tree.where(use_saved, jax.tree.map(lambda buf: buf[best], c.saved_x), x)
    phi = jnp.where(use_saved, c.saved_phi[best], phi)
    selected = jnp.where(use_saved, schedule_arr[best], selected)

  r_norm = jnp.sqrt(vdot(c.r, c.r))
  relative = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)
  return CGResult(
    x=x,
    num_steps=c.k,
    relative_residual=relative.astype(dtype),
    quadratic_value=phi,
    status=c.status,
    negative_curvature=c.status == _NEGATIVE,
    converged=(c.status == _RESIDUAL) | (c.status == _PROGRESS),
    selected_step=selected,
    min_curvature=c.min_curvature,
  )
