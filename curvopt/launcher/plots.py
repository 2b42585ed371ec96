"""The comparison plot: a metric against steps and against wall-clock, one line per optimiser."""

from typing import Any

import numpy as np

from curvopt.launcher.records import group


def comparison_figure(records: list[dict], metric: str, *, title: str = "", log_y: bool = False):
  """A matplotlib figure with two panels (metric vs step, metric vs training seconds).

  With several seeds, each optimiser's line is the mean over seeds (at the steps every seed
  reached) and the band spans their minimum and maximum.

  Returns:
    ``matplotlib.figure.Figure``; each axis holds exactly one line per optimiser.
  """
  import matplotlib

  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
  for opt, seeds in group(records).items():
    steps = sorted(set.intersection(*[{r["step"] for r in rs} for rs in seeds.values()]))
    vals = np.array(
      [[_value(rs, s, metric) for s in steps] for rs in seeds.values()], dtype=np.float64
    )
    times = np.array(
      [[_value(rs, s, "wall_time") for s in steps] for rs in seeds.values()], dtype=np.float64
    )
    mean = np.nanmean(vals, 0) if len(steps) else np.array([])
    (line,) = ax_step.plot(steps, mean, label=opt, marker="." if len(steps) < 30 else None)
    ax_time.plot(np.nanmean(times, 0), mean, label=opt, color=line.get_color())
    if len(seeds) > 1:
      ax_step.fill_between(
        steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=line.get_color(), alpha=0.2
      )
  ax_step.set_xlabel("step")
  ax_time.set_xlabel("training time (s)")
  for ax in (ax_step, ax_time):
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if log_y:
      ax.set_yscale("log")
  ax_step.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def _value(rs: list[dict], step: int, key: str) -> Any:
  for r in rs:
    if r["step"] == step:
      v = r.get(key)
      return np.nan if v is None else v
  return np.nan


def save_figure(fig, path: str) -> None:
  import matplotlib.pyplot as plt

  fig.savefig(path, dpi=110)
  plt.close(fig)
