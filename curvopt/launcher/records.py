"""Metrics logging (``metrics.jsonl``) and the summary table (``summary.md``)."""

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

RESERVED = ("optimizer", "seed", "step", "wall_time")


def to_python(value: Any) -> Any:
  """A JSON-safe Python scalar; non-finite floats become ``None`` (strict JSON has no NaN).

  Examples:
    >>> to_python(np.float32(0.5)), to_python(np.int32(3)), to_python(float("nan"))
    (0.5, 3, None)
  """
  value = np.asarray(value)
  if value.dtype == np.bool_:
    return bool(value)
  if np.issubdtype(value.dtype, np.integer):
    return int(value)
  value = float(value)
  return value if math.isfinite(value) else None


class MetricsLog:
  """Appends one JSON object per evaluation to ``metrics.jsonl``, flushed line by line."""

  def __init__(self, path: str):
    self.path = path

  def append(self, record: dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def read(self) -> list[dict[str, Any]]:
    return read_metrics(self.path)

  def keep(self, predicate) -> None:
    """Rewrites the log keeping only records for which ``predicate(record)`` holds."""
    kept = [r for r in self.read() if predicate(r)]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` file (a torn last line from a kill is skipped)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def group(records: Iterable[dict]) -> dict[str, dict[int, list[dict]]]:
  """``{optimizer: {seed: [records sorted by step]}}``, keeping the input's optimiser order."""
  out: dict[str, dict[int, list[dict]]] = {}
  for r in records:
    out.setdefault(r["optimizer"], {}).setdefault(r["seed"], []).append(r)
  for seeds in out.values():
    for rs in seeds.values():
      rs.sort(key=lambda r: r["step"])
  return out


def _better(a: float, b: float, higher_is_better: bool) -> bool:
  return a > b if higher_is_better else a < b


def _reached(value: float | None, target: float, higher_is_better: bool) -> bool:
  return value is not None and (value >= target if higher_is_better else value <= target)


def _fmt(values: Sequence[float | None], digits: int = 4) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return "—"
  if len(vals) < len(values):
    return f"{np.mean(vals):.{digits}g} ({len(values) - len(vals)} nan)"
  if len(vals) == 1 or np.std(vals) == 0:
    return f"{vals[0]:.{digits}g}"
  return f"{np.mean(vals):.{digits}g} ± {np.std(vals):.2g}"


def summary_rows(
  records: list[dict],
  metric: str,
  *,
  higher_is_better: bool = False,
  target: float | None = None,
  extra_metrics: Sequence[str] = (),
) -> list[dict[str, Any]]:
  """Per optimiser (over seeds): final and best metric, steps and time to target.

  The metric is evaluated every ``eval_every`` steps, so "steps to target" is the first
  evaluated step that met it: the target was reached within the ``resolution`` steps before
  (the spacing of the evaluations, reported per optimiser).

  Examples:
    >>> recs = [{"optimizer": "a", "seed": 0, "step": s, "wall_time": 0.1 * s, "loss": 1 / (s + 1)}
    ...         for s in range(4)]
    >>> row = summary_rows(recs, "loss", target=0.3)[0]
    >>> row["final"], row["best"], row["steps_to_target"], row["resolution"]
    ([0.25], [0.25], [3], 1)
  """
  rows = []
  for opt, seeds in group(records).items():
    finals, bests, steps_t, times_t, train_t, last_step = [], [], [], [], [], []
    extras: dict[str, list] = {m: [] for m in extra_metrics}
    for rs in seeds.values():
      vals = [r.get(metric) for r in rs]
      finals.append(vals[-1])
      finite = [v for v in vals if v is not None]
      bests.append((max if higher_is_better else min)(finite) if finite else None)
      train_t.append(rs[-1]["wall_time"])
      last_step.append(rs[-1]["step"])
      for m in extra_metrics:
        extras[m].append(rs[-1].get(m))
      if target is not None:
        hit = next((r for r in rs if _reached(r.get(metric), target, higher_is_better)), None)
        steps_t.append(hit["step"] if hit else None)
        times_t.append(hit["wall_time"] if hit else None)
    rows.append(
      {
        "optimizer": opt,
        "seeds": len(seeds),
        "steps": last_step,
        "final": finals,
        "best": bests,
        "steps_to_target": steps_t,
        "time_to_target": times_t,
        "resolution": _resolution(seeds.values()),
        "train_time": train_t,
        **{f"final_{m}": v for m, v in extras.items()},
      }
    )
  return rows


def _resolution(runs: Any) -> int | None:
  """The largest spacing between consecutive evaluated steps over ``runs``."""
  gaps = [b["step"] - a["step"] for rs in runs for a, b in zip(rs, rs[1:], strict=False)]
  return max(gaps, default=None)


def summary_markdown(
  rows: list[dict[str, Any]],
  metric: str,
  *,
  target: float | None = None,
  extra_metrics: Sequence[str] = (),
  higher_is_better: bool = False,
) -> str:
  """The summary table as Markdown (what is printed and saved to ``summary.md``)."""
  head = ["optimizer", "steps", f"final {metric}", f"best {metric}"]
  head += ["compile (s)" if m == "compile_time" else f"final {m}" for m in extra_metrics]
  if target is not None:
    head += [f"steps to {metric}{'≥' if higher_is_better else '≤'}{target:g}", "time to target (s)"]
  head += ["train time (s)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row["optimizer"], _fmt(row["steps"], 6), _fmt(row["final"]), _fmt(row["best"])]
    cells += [_fmt(row[f"final_{m}"]) for m in extra_metrics]
    if target is not None:
      reached = [v for v in row["steps_to_target"] if v is not None]
      n = len(row["steps_to_target"])
      suffix = "" if len(reached) == n else f" ({len(reached)}/{n} seeds)"
      if reached and row.get("resolution", 1) and row.get("resolution", 1) > 1:
        suffix = f" (evaluated every {row['resolution']})" + suffix
      cells += [
        (_fmt(reached, 6) if reached else "not reached") + suffix,
        _fmt([v for v in row["time_to_target"] if v is not None], 3) if reached else "—",
      ]
    cells.append(_fmt(row["train_time"], 3))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _final_means(rows: list[dict]) -> dict[str, float]:
  return {
    row["optimizer"]: float(np.mean(vals))
    for row in rows
    if (vals := [v for v in row["final"] if v is not None])
  }


def best_rows(rows: list[dict], higher_is_better: bool) -> list[str]:
  """The optimisers whose mean final metric is the best one as printed (4 significant digits).

  Several names mean a tie: the table cannot tell them apart.

  Examples:
    >>> rows = [{"optimizer": o, "final": [v]} for o, v in [("a", 0.08324), ("b", 0.083241),
    ...                                                       ("c", 0.0833)]]
    >>> best_rows(rows, higher_is_better=False)
    ['a', 'b']
  """
  means = _final_means(rows)
  if not means:
    return []
  best = _fmt([(max if higher_is_better else min)(means.values())])
  return [name for name, value in means.items() if _fmt([value]) == best]


def best_text(rows: list[dict], metric: str, higher_is_better: bool) -> str:
  """The summary's last line: the best optimiser, or a tie at the printed precision.

  Examples:
    >>> rows = [{"optimizer": o, "final": [v]} for o, v in [("a", 0.5), ("b", 0.50001)]]
    >>> best_text(rows, "loss", higher_is_better=False)
    'lowest final loss: tie between **a** and **b** (0.5 as printed)'
  """
  names = best_rows(rows, higher_is_better)
  if not names:
    return ""
  which = "highest" if higher_is_better else "lowest"
  if len(names) == 1:
    return f"{which} final {metric}: **{names[0]}**"
  tied = ", ".join(f"**{n}**" for n in names[:-1]) + f" and **{names[-1]}**"
  value = _fmt([_final_means(rows)[names[0]]])
  return f"{which} final {metric}: tie between {tied} ({value} as printed)"
