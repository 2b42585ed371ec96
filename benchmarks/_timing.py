"""Timing helper shared by the benchmark scripts: compile first, then the median of repeats."""

import random
import time
from collections.abc import Callable

import jax


def median_seconds(
  fn: Callable[[], object], *, repeats: int = 20, min_seconds: float = 0.2
) -> float:
  """Median wall time of ``fn()`` (results blocked on) after one warm-up call.

  Repeats at least ``repeats`` times and until ``min_seconds`` have passed, so very fast calls
  are measured over many runs.
  """
  jax.block_until_ready(fn())
  times = []
  start = time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    if len(times) >= 1000:
      break
  times.sort()
  return times[len(times) // 2]


def interleaved_median_seconds(
  fns: dict[str, Callable[[], object]], *, repeats: int = 30, min_seconds: float = 0.5
) -> dict[str, float]:
  """Median wall time of each of ``fns``, timed in shuffled rounds so load drift hits all alike.

  On a shared machine the load changes over seconds; timing the candidates in turn, many
  rounds over, makes the *ratios* between them far steadier than timing one after another.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  order = list(fns)
  rng = random.Random(0)
  start = time.perf_counter()
  rounds = 0
  while rounds < repeats or time.perf_counter() - start < min_seconds:
    rng.shuffle(order)  # no candidate always runs on the caches its predecessor left
    for name in order:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t0)
    rounds += 1
    if rounds >= 1000:
      break
  return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
  """Prints a Markdown table (copy-pasteable into the README)."""
  print(f"\n### {title}\n")
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    cells = [f"{c:.3g}" if isinstance(c, float) else str(c) for c in row]
    print("| " + " | ".join(cells) + " |")
