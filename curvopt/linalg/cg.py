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

from curvopt._typing import Matvec
from curvopt.linalg.conv_layout import ConvLayout, with_conv_layout
from curvopt.linalg.flat import packing
from curvopt.linalg.status import CG_STATUSES, SolverStatus

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


class _Options(NamedTuple):
  """The static options of one solve (see :func:`conjugate_gradient`)."""

  damping: Any
  max_steps: int
  tol: Any
  progress_tol: float | None
  progress_window: int
  steihaug: bool
  backtrack_factor: float
  recompute_residual_every: int | None
  unroll: int
  conv_layout: ConvLayout


class _Setup(NamedTuple):
  """What every iteration reads: the damped operator, the preconditioner and constants."""

  operator: Matvec
  precond: Matvec
  b: Any
  b_norm: jax.Array
  tol: jax.Array
  dtype: Any
  options: _Options
  schedule: tuple[int, ...]

  def vdot(self, u: Any, v: Any) -> jax.Array:
    return jnp.real(optax.tree.vdot(u, v)).astype(self.dtype)


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
  (:func:`~curvopt.linalg.conv_layout.canonical_convolutions`), which removes that penalty;
  operators without convolutions are untouched.

  Newton-CG uses it through :class:`curvopt.linalg.solvers.CG`.

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
    flatten: run the loop on one vector per dtype (:func:`~curvopt.linalg.flat.packing`)
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
  _check_arguments(
    b, x0, max_steps, backtrack_fn, backtrack_factor, recompute_residual_every, unroll
  )
  options = _Options(
    damping,
    max_steps,
    tol,
    progress_tol,
    progress_window,
    steihaug,
    backtrack_factor,
    recompute_residual_every,
    unroll,
    conv_layout,
  )
  if flatten and len(jax.tree.leaves(b)) > 1:
    return _solve_packed(matvec, b, x0, preconditioner, backtrack_fn, options)
  setup = _setup(matvec, b, preconditioner, backtrack_fn is not None, options)
  c = jax.lax.while_loop(lambda c: ~c.done, _loop_body(setup, x0 is not None), _start(setup, x0))
  x, phi, selected = c.x, c.phi, c.selected_step
  if setup.schedule:
    x, phi, selected = _backtrack(c, backtrack_fn, x, phi, selected, setup.schedule)
  r_norm = jnp.sqrt(setup.vdot(c.r, c.r))
  b_norm = setup.b_norm
  relative = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)
  return CGResult(
    x=x,
    num_steps=c.k,
    relative_residual=relative.astype(setup.dtype),
    quadratic_value=phi,
    status=c.status,
    negative_curvature=c.status == _NEGATIVE,
    converged=(c.status == _RESIDUAL) | (c.status == _PROGRESS),
    selected_step=selected,
    min_curvature=c.min_curvature,
  )


def _check_arguments(b, x0, max_steps, backtrack_fn, backtrack_factor, every, unroll) -> None:
  if max_steps < 1:
    raise ValueError(f"max_steps must be a positive integer; got {max_steps!r}.")
  if backtrack_fn is not None and not backtrack_factor > 1:
    raise ValueError(f"backtrack_factor must be > 1; got {backtrack_factor!r}.")
  if x0 is not None and jax.tree.structure(x0) != jax.tree.structure(b):
    raise ValueError(
      f"x0 must have the pytree structure of b; got {jax.tree.structure(x0)} and "
      f"{jax.tree.structure(b)}."
    )
  for name, value in (("recompute_residual_every", every), ("unroll", unroll)):
    if value is not None and not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _solve_packed(matvec, b, x0, preconditioner, backtrack_fn, options: _Options) -> CGResult:
  """The same solve on one packed vector per dtype; the callables still see pytrees."""
  pack, unpack = packing(b)
  result = conjugate_gradient(
    lambda v: pack(matvec(unpack(v))),
    pack(b),
    None if x0 is None else pack(x0),
    preconditioner=None if preconditioner is None else lambda r: pack(preconditioner(unpack(r))),
    backtrack_fn=None if backtrack_fn is None else lambda v: backtrack_fn(unpack(v)),
    flatten=False,
    **options._asdict(),
  )
  return result._replace(x=unpack(result.x))


def _setup(matvec, b, preconditioner, backtracking: bool, options: _Options) -> _Setup:
  matvec = with_conv_layout(matvec, options.conv_layout)
  damping = options.damping
  if isinstance(damping, (int, float)) and damping == 0:
    operator = matvec
  else:
    operator = lambda v: optax.tree.add_scale(matvec(v), damping, v)
  dtype = jnp.result_type(*[jnp.real(leaf).dtype for leaf in jax.tree.leaves(b)])
  setup = _Setup(
    operator=operator,
    precond=(lambda r: r) if preconditioner is None else preconditioner,
    b=b,
    b_norm=jnp.zeros((), dtype),
    tol=jnp.asarray(options.tol, dtype),
    dtype=dtype,
    options=options,
    schedule=_backtrack_schedule(options.max_steps, options.backtrack_factor)
    if backtracking
    else (),
  )
  return setup._replace(b_norm=jnp.sqrt(setup.vdot(b, b)))


def _initial(setup: _Setup, x: Any, r: Any, phi: jax.Array) -> _Carry:
  """The carry that starts CG from ``x`` with residual ``r = b - Ax`` and value ``phi``."""
  z = setup.precond(r)
  done = jnp.sqrt(setup.vdot(r, r)) <= setup.tol * setup.b_norm
  num_saved = len(setup.schedule)
  return _Carry(
    k=jnp.zeros((), jnp.int32),
    x=x,
    r=r,
    p=z,
    rz=setup.vdot(r, z),
    phi=phi,
    phi_history=jnp.zeros((setup.options.max_steps + 1,), setup.dtype).at[0].set(phi),
    status=jnp.where(done, _RESIDUAL, _MAX_STEPS).astype(jnp.int32),
    done=done,
    selected_step=jnp.zeros((), jnp.int32),
    saved_x=jax.tree.map(lambda leaf: jnp.zeros((num_saved, *leaf.shape), leaf.dtype), setup.b),
    saved_phi=jnp.full((num_saved,), jnp.inf, setup.dtype),
    min_curvature=jnp.asarray(jnp.inf, setup.dtype),
    warm=jnp.zeros((), bool),
  )


def _start(setup: _Setup, x0: Any | None) -> _Carry:
  """The loop's first carry; with a warm start, its first trip takes the product ``A x0``."""
  zeros = optax.tree.zeros_like(setup.b)
  carry = _initial(setup, zeros, setup.b, jnp.zeros((), setup.dtype))
  if x0 is None:
    return carry
  # The compiled program then holds the operator once, not twice.
  x0 = optax.tree.cast_like(x0, setup.b)
  return carry._replace(p=x0, done=jnp.zeros((), bool), warm=jnp.ones((), bool))


def _restart(setup: _Setup, x0: Any, ax0: Any) -> _Carry:
  r"""Start from the warm start ``x0``, kept only when it improves on zero (Martens 2010 §4.5).

  With ``r = b - A x0``, :math:`\phi(x_0) = -\tfrac12 x_0^\top (b + r)`.
  """
  r0 = optax.tree.sub(setup.b, ax0)
  phi0 = -0.5 * setup.vdot(x0, optax.tree.add(setup.b, r0))
  keep = phi0 < 0
  return _initial(
    setup,
    optax.tree.where(keep, x0, optax.tree.zeros_like(x0)),
    optax.tree.where(keep, r0, setup.b),
    jnp.where(keep, phi0, 0.0).astype(setup.dtype),
  )


def _loop_body(setup: _Setup, warm_started: bool) -> Callable[[_Carry], _Carry]:
  """One trip of the ``while_loop``: ``unroll`` iterations, the first possibly the restart."""

  def body(c: _Carry) -> _Carry:
    ap = setup.operator(c.p)
    if warm_started:
      new = jax.lax.cond(c.warm, lambda: _restart(setup, c.p, ap), lambda: _iteration(setup, c, ap))
    else:
      new = _iteration(setup, c, ap)
    # Scalars are in the widest real dtype; keep narrower leaves (bfloat16 weights) narrow.
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, c)

  if setup.options.unroll == 1:
    return body

  def masked(c: _Carry) -> _Carry:
    return jax.tree.map(lambda n, o: jnp.where(c.done, o, n), body(c), c)

  def unrolled(c: _Carry) -> _Carry:
    c = body(c)  # the loop condition guarantees this one is live
    for _ in range(setup.options.unroll - 1):
      c = masked(c)
    return c

  return unrolled


def _iteration(setup: _Setup, c: _Carry, ap: Any) -> _Carry:
  """One CG iteration, given the product ``ap = A p``."""
  options, vdot = setup.options, setup.vdot
  pap = vdot(c.p, ap)
  rayleigh = pap / vdot(c.p, c.p)
  min_curvature = jnp.where(rayleigh < c.min_curvature, rayleigh, c.min_curvature)
  # r.p equals r.z in exact arithmetic; after a residual replacement only r.p gives the exact
  # line minimum along p (with r.z the step can overshoot and the iteration diverges).
  every = options.recompute_residual_every
  alpha = (c.rz if every is None else vdot(c.r, c.p)) / pap
  x_new = optax.tree.add_scale(c.x, alpha, c.p)
  r_new = optax.tree.add_scale(c.r, -alpha, ap)
  if every is not None:
    replace = (c.k + 1) % every == 0
    r_new = jax.lax.cond(
      replace, lambda: optax.tree.sub(setup.b, setup.operator(x_new)), lambda: r_new
    )
  phi_new = -0.5 * vdot(x_new, optax.tree.add(setup.b, r_new))
  negative = (pap <= 0) if options.steihaug else jnp.zeros((), bool)
  finite = jnp.isfinite(pap) & jnp.isfinite(alpha) & jnp.isfinite(phi_new)
  ok = finite & ~negative

  # Steihaug exit: keep the last iterate, or take the steepest-descent step at iteration 0.
  sd_phi = c.phi - c.rz + 0.5 * pap  # phi(x + p) with p = M^-1 r, so r.p = rz.
  take_sd = negative & (c.k == 0) & jnp.isfinite(sd_phi)
  x_out = optax.tree.where(ok, x_new, optax.tree.where(take_sd, optax.tree.add(c.x, c.p), c.x))
  phi_out = jnp.where(ok, phi_new, jnp.where(take_sd, sd_phi, c.phi))

  z_new = setup.precond(r_new)
  rz_new = vdot(r_new, z_new)
  k1 = c.k + 1
  residual_ok = jnp.sqrt(vdot(r_new, r_new)) <= setup.tol * setup.b_norm
  history = c.phi_history.at[k1].set(phi_new)
  progress_ok = _progress_ok(options, history, k1, phi_new)
  status = jnp.select(
    [~finite, negative, residual_ok, progress_ok, k1 >= options.max_steps],
    [_NONFINITE, _NEGATIVE, _RESIDUAL, _PROGRESS, _MAX_STEPS],
    c.status,
  ).astype(jnp.int32)
  saved_x, saved_phi = _save(setup.schedule, c.saved_x, c.saved_phi, k1, ok, x_new, phi_new)
  return _Carry(
    k=k1,
    x=x_out,
    r=optax.tree.where(ok, r_new, c.r),
    p=optax.tree.add_scale(z_new, rz_new / c.rz, c.p),
    rz=rz_new,
    phi=phi_out,
    phi_history=history,
    status=status,
    done=~ok | residual_ok | progress_ok | (k1 >= options.max_steps),
    selected_step=jnp.where(ok | take_sd, k1, c.k),
    saved_x=saved_x,
    saved_phi=saved_phi,
    min_curvature=min_curvature,
    warm=c.warm,
  )


def _progress_ok(options: _Options, history: jax.Array, k1: jax.Array, phi: jax.Array):
  r"""Martens' (2010) rule: :math:`(\phi_k - \phi_{k-s}) / \phi_k < s\,\epsilon`."""
  if options.progress_tol is None:
    return jnp.zeros((), bool)
  window = jnp.maximum(options.progress_window, jnp.ceil(0.1 * k1).astype(jnp.int32))
  phi_then = history[jnp.maximum(k1 - window, 0)]
  return (k1 > window) & (phi < 0) & ((phi - phi_then) / phi < window * options.progress_tol)


def _save(schedule, saved_x, saved_phi, k1, ok, x_new, phi_new):
  """Stores iterate ``k1`` when it is on the backtracking schedule (Martens 2010 §4.6)."""
  if not schedule:
    return saved_x, saved_phi
  schedule_arr = jnp.asarray(schedule, jnp.int32)
  slot = jnp.clip(jnp.searchsorted(schedule_arr, k1), 0, len(schedule) - 1)
  save = ok & (schedule_arr[slot] == k1)
  saved_x = jax.lax.cond(
    save,
    lambda s: jax.tree.map(lambda buf, leaf: buf.at[slot].set(leaf), s, x_new),
    lambda s: s,
    saved_x,
  )
  return saved_x, jnp.where(save, saved_phi.at[slot].set(phi_new), saved_phi)


def _backtrack(c: _Carry, backtrack_fn, x, phi, selected, schedule):
  """The saved iterate (or the final one, preferred on ties) with the smallest objective."""
  schedule_arr = jnp.asarray(schedule, jnp.int32)
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
  return x, phi, selected
