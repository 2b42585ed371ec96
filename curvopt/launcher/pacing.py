"""How long each run trains, how many steps each compiled call takes, and the progress bar.

A run's compiled loop takes its number of steps at run time, so the runner can call it in
chunks of any length without recompiling. :class:`Pacer` picks each length from the time per
step it measured on the previous chunk: about ``CHUNK_SECONDS`` of training (so Ctrl-C is
answered and the progress bar moves within about a second), never past the next evaluation,
and, under a seconds budget, at most half the time left, so the budget is overshot by less
than one step even when steps slow down by up to twice. (Chunks of ``eval_every`` steps, as
before, overshot a 120 s budget by up to 29% with 0.87 s steps and ``eval_every: 20``.)
"""

import sys
from typing import Any, TextIO

CHUNK_SECONDS = 1.0


class Budget:
  """Steps, evaluation cadence, seconds and checkpoint interval of one optimiser entry.

  ``steps`` is ``None`` when only ``seconds`` bounds the run.
  """

  def __init__(self, exp: Any, opt: Any):
    self.steps: int | None = opt.steps or exp.budget.steps
    self.every: int = opt.eval_every or exp.eval_every
    self.seconds: float | None = exp.budget.seconds
    self.checkpoint_interval_s: float = exp.checkpoint_interval_s

  def done(self, step: int, wall: float) -> bool:
    return (self.steps is not None and step >= self.steps) or (
      self.seconds is not None and wall >= self.seconds
    )

  def next_eval(self, step: int) -> int:
    """The first evaluated step after ``step``: the next multiple of ``every``, or the last."""
    nxt = (step // self.every + 1) * self.every
    return nxt if self.steps is None else min(nxt, self.steps)


class Pacer:
  """Chooses the length of each compiled call of one run (see the module docstring).

  Examples:
    >>> from types import SimpleNamespace as NS
    >>> budget = Budget(NS(budget=NS(steps=None, seconds=10.0), eval_every=1000,
    ...                    checkpoint_interval_s=60.0), NS(steps=None, eval_every=None))
    >>> pacer = Pacer(budget)
    >>> pacer.next(0, 0.0)  # the time per step is not known yet
    1
    >>> pacer.observe(1, 0.01); pacer.next(1, 0.01)  # 0.01 s per step; at most doubling
    2
    >>> pacer.observe(64, 0.64); pacer.next(65, 9.0)  # 1 s left: half of it
    50
  """

  def __init__(self, budget: Budget, chunk_seconds: float = CHUNK_SECONDS):
    self.budget = budget
    self.chunk_seconds = chunk_seconds
    self.per_step: float | None = None
    self.last = 0

  def observe(self, steps: int, seconds: float) -> None:
    """Records that the last call ran ``steps`` steps in ``seconds``."""
    self.per_step, self.last = seconds / steps, steps

  def next(self, step: int, wall: float) -> int:
    """The number of steps of the next call, at least 1, from step ``step`` at ``wall`` s."""
    n = self.budget.next_eval(step) - step
    if self.per_step is None:
      return 1
    per_step = max(self.per_step, 1e-9)
    n = min(n, 2 * self.last, max(1, int(self.chunk_seconds / per_step)))
    if self.budget.seconds is not None:
      n = min(n, max(1, int(0.5 * (self.budget.seconds - wall) / per_step)))
    return max(n, 1)


class Progress:
  """The progress bar over all runs of an experiment (``None``-safe: a disabled bar is inert).

  Under a seconds budget it counts seconds of training and shows the time elapsed and the time
  remaining (tqdm's estimate, which includes compilation and evaluation at the rate seen so
  far); otherwise it counts steps.
  """

  def __init__(self, enabled: bool, budgets: list[Budget], file: TextIO | None = None):
    self.bar = None
    self.seconds = bool(budgets) and budgets[0].seconds is not None
    if not enabled:
      return
    from tqdm.auto import tqdm

    common = {"file": file or sys.stderr, "dynamic_ncols": True, "leave": False}
    if self.seconds:
      fmt = (
        "{desc}{percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of training, "
        "{elapsed} elapsed, {remaining} left"
      )
      total = sum(b.seconds for b in budgets)
      self.bar = tqdm(total=total, unit="s", bar_format=fmt, **common)
    else:
      self.bar = tqdm(total=sum(b.steps for b in budgets), unit="step", **common)

  def advance(self, label: str, steps: int, seconds: float) -> None:
    """``steps`` steps taking ``seconds`` of training were run by ``label``."""
    if self.bar is not None:
      self.bar.set_description(label, refresh=False)
      self._update(seconds if self.seconds else steps)

  def skip(self, budget: Budget, step: int, wall: float) -> None:
    """A run ended (or was skipped) at ``step``, ``wall``: its unused budget is passed over."""
    if self.bar is None:
      return
    if self.seconds:
      self._update(budget.seconds - wall)
    else:
      self._update(budget.steps - step)

  def _update(self, amount: float) -> None:
    # A run may overshoot its seconds by part of a step: the bar stops at its total.
    self.bar.update(max(min(amount, self.bar.total - self.bar.n), 0))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
