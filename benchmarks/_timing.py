"""Timing helper shared by the benchmark scripts: compile first, then the median of repeats."""

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


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
  """Prints a Markdown table (copy-pasteable into the README)."""
  print(f"\n### {title}\n")
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    cells = [f"{c:.3g}" if isinstance(c, float) else str(c) for c in row]
    print("| " + " | ".join(cells) + " |")
