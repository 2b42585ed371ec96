"""The launcher under Ctrl-C, a seconds budget and its progress bar."""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from curvopt.launcher import config as config_lib
from curvopt.launcher import optimizers as opt_lib
from curvopt.launcher import pacing, runner
from curvopt.launcher import records as records_lib
from experiments import run as RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "experiments", "run.py")
QUICKSTART = os.path.join(ROOT, "configs", "logreg_quick.yaml")


def _load(source, overrides=()):
  schemas = runner._LazySchemas(RUN.TASKS)
  return config_lib.load_config(
    source, list(overrides), tasks=schemas, optimizers=opt_lib.OPTIMIZERS
  )


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _same_metrics(a, b):
  strip = lambda recs: sorted(
    ({k: v for k, v in r.items() if k not in ("wall_time", "compile_time")} for r in recs),
    key=lambda r: (r["optimizer"], r["seed"], r["step"]),
  )
  assert strip(a) == strip(b)


@pytest.mark.long  # two launcher subprocesses (about 12 s): the long tier
def test_ctrl_c_stops_with_a_checkpoint_and_the_resume_command_continues_identically(tmp_path):
  steps = 600
  args = [
    "name=sigint",
    f"output_dir={tmp_path}",
    f"budget.steps={steps}",
    "eval_every=50",
    "checkpoint_interval_s=1000",  # only the stop itself saves a checkpoint mid-run
    "progress=false",
    "optimizers=[{name: newton_cg, cg_max_steps: 20}, {name: adam, learning_rate: 0.05}]",
  ]
  # x64 as in this process (conftest); this checkout's curvopt, whatever is installed.
  env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONPATH=ROOT)
  proc = subprocess.Popen(
    [sys.executable, RUN_PY, QUICKSTART, *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  # Ctrl-C once Newton-CG has trained 50 of its 600 steps (about 1 s before its end).
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    dirs = list((tmp_path / "sigint").glob("*"))
    if dirs and any(r["step"] >= 50 for r in records_lib.read_metrics(f"{dirs[0]}/metrics.jsonl")):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert "Ctrl-C: stopping after the current step" in err
  (run_dir,) = [str(p) for p in (tmp_path / "sigint").glob("*")]
  assert f"run directory: {run_dir}" in out
  (line,) = [ln for ln in out.splitlines() if ln.startswith("resume with: ")]
  command = line.removeprefix("resume with: ")
  assert command == runner.resume_command(RUN_PY, run_dir)
  assert shlex.split(command)[1:] == [RUN_PY, "--resume", run_dir]
  partial = _records(run_dir)
  assert {r["optimizer"] for r in partial} == {"newton_cg"}  # stopped during the first run
  assert 50 <= max(r["step"] for r in partial) < steps

  # The printed command's arguments, given to the launcher's main() in this process, continue
  # to the same metrics as one uninterrupted run.
  assert runner.main(shlex.split(command)[2:], tasks=RUN.TASKS) == 0
  full = runner.run_experiment(
    _load(QUICKSTART, [a for a in args if not a.startswith("output_dir")]),
    RUN.TASKS["logreg"](),
    run_dir=str(tmp_path / "full"),
    echo=False,
  )
  _same_metrics(full.records, _records(run_dir))


def test_a_second_ctrl_c_exits_at_once():
  script = (
    "import os, signal, time\n"
    "from curvopt.launcher.interrupt import StopOnInterrupt\n"
    "with StopOnInterrupt() as stop:\n"
    "  stop.exit_message = 'resume hint'\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  for _ in range(500):\n"
    "    if stop():\n"
    "      break\n"
    "    time.sleep(0.01)\n"
    "  print('stop requested:', stop(), flush=True)\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(60)  # a long call: the second Ctrl-C does not wait for it\n"
    "print('not reached')\n"
  )
  tic = time.monotonic()
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
  )
  assert out.returncode == 130 and time.monotonic() - tic < 50
  assert "stop requested: True" in out.stdout and "not reached" not in out.stdout
  assert "exiting now" in out.stderr and "resume hint" in out.stderr


def test_a_seconds_budget_is_kept_to_within_a_step(tmp_path):
  # One evaluation every 10**6 steps: chunks of eval_every steps would overshoot by far.
  seconds = 1.0
  cfg = _load(
    QUICKSTART,
    [
      "budget.steps=null",
      f"budget.seconds={seconds}",
      "eval_every=1000000",
      "progress=false",
      f"output_dir={tmp_path}",
      "optimizers=[{name: newton_cg, cg_max_steps: 20}]",
    ],
  )
  result = runner.run_experiment(cfg, RUN.TASKS["logreg"](), echo=False)
  last = max(result.records, key=lambda r: r["step"])
  per_step = last["wall_time"] / last["step"]
  assert last["step"] > 20  # many steps, each far shorter than the budget
  assert seconds <= last["wall_time"] < seconds + 3 * per_step + 0.05
  assert "budget: 1 s per run" in result.summary


def test_progress_under_a_seconds_budget_shows_time_not_steps():
  exp = SimpleNamespace(
    budget=SimpleNamespace(steps=None, seconds=30.0), eval_every=10, checkpoint_interval_s=5.0
  )
  budgets = [pacing.Budget(exp, SimpleNamespace(steps=None, eval_every=None))] * 2
  stream = io.StringIO()
  progress = pacing.Progress(True, budgets, file=stream)
  progress.advance("adam", 1000, 12.0)
  progress.bar.refresh()
  text = stream.getvalue()
  progress.close()
  assert "12/60 s of training" in text and "elapsed" in text and "left" in text
  assert "step" not in text


def test_a_budget_needs_steps_or_seconds():
  with pytest.raises(config_lib.ConfigError, match="'budget.steps'"):
    _load(QUICKSTART, ["budget.steps=null"])


def test_every_config_states_its_expected_time_and_is_in_the_table():
  import glob

  with open(os.path.join(ROOT, "docs", "launcher.md")) as f:
    table = f.read()
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
    name = os.path.basename(path).removesuffix(".yaml")
    with open(path) as f:
      assert "# Expected time: " in f.read(), name
    assert f"\n| {name} | " in table, name
