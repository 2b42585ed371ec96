"""Tests of the experiment launcher: config validation, runs, outputs, plots, resume."""

import collections
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from curvopt.launcher import config as config_lib
from curvopt.launcher import optimizers as opt_lib
from curvopt.launcher import runner
from experiments import run as RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "experiments", "run.py")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _load(source, overrides=()):
  schemas = runner._LazySchemas(RUN.TASKS)
  return config_lib.load_config(
    source, list(overrides), tasks=schemas, optimizers=opt_lib.OPTIMIZERS
  )


def _quick(name="t"):
  return {
    "name": name,
    "task": {"name": "logreg", "dataset": "digits"},
    "optimizers": [{"name": "adam", "learning_rate": 0.05}, {"name": "lbfgs"}],
    "budget": {"steps": 6},
    "eval_every": 2,
    "progress": False,
  }


def _run(cfg, tmp_path, **kwargs):
  entry = RUN.TASKS[cfg.task.name]()
  cfg.experiment.output_dir = str(tmp_path)
  return runner.run_experiment(cfg, entry, echo=False, **kwargs)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
  "overrides, key, hint",
  [
    (["budget.stepz=3"], "budget.stepz", "steps, seconds"),
    (["eval_every=often"], "eval_every", "Integer"),
    (["precision=float16"], "precision", "float32, float64"),
    (["optimizers.0.learning_rat=0.1"], "optimizers[0].learning_rat", "learning_rate"),
    (["optimizers.1.linesearch=wolfe"], "optimizers[1].linesearch", "zoom"),
    (["optimizers.0.name=adamax"], "optimizers[0].name", "newton_cg"),
    (["task.name=mnist"], "task.name", "logreg"),
    (["task.l2=big"], "task.l2", "Float"),
    (["task.colour=red"], "task.colour", "dataset"),
    (["optimizers.1.label=adam"], "optimizers[1].label", "distinct"),
    (["budget.steps=0"], "budget.steps", ">= 1"),
  ],
)
def test_bad_configs_name_the_key(overrides, key, hint):
  with pytest.raises(config_lib.ConfigError) as err:
    _load(_quick(), overrides)
  assert f"'{key}'" in str(err.value) and hint in str(err.value), str(err.value)


def test_missing_required_values_are_named():
  cfg = _quick()
  del cfg["budget"]
  with pytest.raises(config_lib.ConfigError, match="'budget.steps'.*required"):
    _load(cfg)
  cfg = _quick()
  del cfg["optimizers"]
  with pytest.raises(config_lib.ConfigError, match="'optimizers'.*adam"):
    _load(cfg)


def test_unknown_variant_is_rejected_before_running(tmp_path):
  cfg = _load(_quick(), ["optimizers.0.variant=residual"])
  with pytest.raises(config_lib.ConfigError, match=r"'optimizers\[0\].variant'"):
    _run(cfg, tmp_path)
  assert not os.listdir(tmp_path)  # nothing written: validated before any work


def test_yaml_is_loaded_safely(tmp_path):
  path = tmp_path / "evil.yaml"
  path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
  with pytest.raises(config_lib.ConfigError, match="cannot read config"):
    _load(str(path))


def test_cli_exits_nonzero_with_key_in_message():
  out = subprocess.run(
    [sys.executable, RUN_PY, os.path.join(ROOT, "configs", "logreg_quick.yaml"), "budget.stepz=1"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 2
  assert "'budget.stepz'" in out.stderr and "steps, seconds" in out.stderr


def test_overrides_reach_the_validated_config():
  cfg = _load(_quick(), ["optimizers.0.learning_rate=0.5", "seeds=[1, 2]", "precision=float64"])
  assert cfg.optimizers[0].learning_rate == 0.5
  assert cfg.experiment.seeds == [1, 2]
  assert cfg.experiment.precision is config_lib.Precision.float64


# ---------------------------------------------------------------- runs and outputs


# Keep the task-specific reports small in the smoke runs (they compile extra programs).
# Smaller models and fewer unrolled steps: every code path of each config, a fraction of the
# compile time (which dominates these runs).
SMOKE_OVERRIDES = {
  "maml_sinusoid.yaml": [
    "task.memory_inner_steps=[1]",
    "task.eval_tasks=8",
    "task.meta_batch=4",
    "task.hidden=[8]",
    "task.imaml_inner_steps=2",
    "task.eval_inner_steps=2",
    "task.cg_steps=2",
  ],
  "autoencoder_digits.yaml": ["task.encoder=[64, 8, 2]"],
  "autoencoder_tuned.yaml": ["task.encoder=[64, 8, 2]"],
  # PINNs: every optimiser and solver still runs, on a small network and point set (the dense
  # Gauss-Newton solve's matrix grows with the parameters, its products with the points).
  **{
    f"pinn_{problem}.yaml": [
      "task.hidden=[8]",
      "task.num_interior=64",
      "task.num_boundary=16",
      "task.eval_factor=2",
      "task.plot_grid=9",
      "optimizers.1.solver.max_steps=8",
      *(["task.num_initial=16"] if problem == "heat" else []),
    ]
    for problem in ("poisson2d", "heat", "poisson5d")
  },
  "quickstart.yaml": [
    "task.hidden=[8]",
    "task.num_interior=64",
    "task.num_boundary=16",
    "task.eval_factor=2",
    "task.plot_grid=9",
  ],
  "cnn_digits.yaml": ["task.channels=[2, 2]", "task.batch_size=64"],
  "mlp_digits.yaml": ["task.hidden=[8]"],
  "td0_random_walk.yaml": ["task.hidden=[4]", "task.num_episodes=10"],
  "hyperopt_ridge.yaml": ["task.report_unroll_steps=[5]"],
  "spectrum_mlp.yaml": ["task.lanczos_iters=8", "task.density_iters=8", "task.trace_samples=2"],
}


@pytest.mark.parametrize(
  "path",
  [
    p if p.endswith("logreg_quick.yaml") else pytest.param(p, marks=pytest.mark.long)
    for p in CONFIGS
  ],
  ids=[os.path.basename(p) for p in CONFIGS],
)
def test_every_config_validates_and_runs_a_few_steps(path, tmp_path):
  overrides = ["budget.steps=2", "eval_every=1", "progress=false", "seeds=[0]"]
  cfg = _load(path, overrides + SMOKE_OVERRIDES.get(os.path.basename(path), []))
  for opt in cfg.optimizers:  # per-optimiser budgets too
    opt.steps, opt.eval_every = None, None
  result = _run(cfg, tmp_path)
  labels = [config_lib.label_of(o) for o in cfg.optimizers]
  assert [r["optimizer"] for r in result.records if r["step"] == 0] == labels
  assert {r["step"] for r in result.records} == {0, 1, 2}
  assert all(name in os.listdir(result.run_dir) for name in ("metrics.jsonl", "summary.md"))
  assert cfg.experiment.name in result.summary


def test_outputs_exist_parse_and_plot_one_line_per_optimiser(tmp_path):
  cfg = _load(_quick(), ["seeds=[0, 1]"])
  result = _run(cfg, tmp_path)
  files = set(os.listdir(result.run_dir))
  assert {"config.yaml", "metrics.jsonl", "summary.md", "comparison.png", "checkpoints"} <= files
  # metrics.jsonl: one strict-JSON line per evaluation and (optimiser, seed).
  with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  assert len(recs) == 2 * 2 * 4  # optimisers x seeds x evaluations (steps 0, 2, 4, 6)
  assert {r["step"] for r in recs} == {0, 2, 4, 6}
  assert all(np.isfinite(r["train_loss"]) for r in recs)
  # the loss is the task's objective, recomputed independently from the saved checkpoint.
  # resolved config reloads into the same config.
  again = _load(os.path.join(result.run_dir, "config.yaml"))
  assert again.to_yaml() == cfg.to_yaml()
  summary = open(os.path.join(result.run_dir, "summary.md")).read()
  assert "| adam |" in summary and "| lbfgs |" in summary
  # the PNG is a PNG, and each panel has one line per optimiser.
  with open(os.path.join(result.run_dir, "comparison.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image

  assert matplotlib.image.imread(os.path.join(result.run_dir, "comparison.png")).ndim == 3
  for ax in result.figure.axes:
    assert [line.get_label() for line in ax.get_lines()] == ["adam", "lbfgs"]


def test_metrics_match_an_independent_computation(tmp_path):
  """The logged train loss is the objective at the logged parameters (checkpoint), recomputed."""
  import optax

  cfg = _load(_quick(), ["optimizers=[{name: sgd, learning_rate: 0.5}]", "budget.steps=3"])
  result = _run(cfg, tmp_path)
  task = RUN.TASKS["logreg"]().build(cfg.task, np.float32)
  x, y = np.asarray(task.train_data["x"], np.float64), np.asarray(task.train_data["y"])
  w, b = np.zeros((64, 10)), np.zeros(10)
  for _ in range(3):  # plain gradient descent, explicit numpy gradient of CE + l2/2 |w|^2
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    gw, gb = x.T @ p / len(y) + cfg.task.l2 * w, p.mean(0)
    w, b = w - 0.5 * gw, b - 0.5 * gb
  z = x @ w + b
  ce = optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  expected = float(ce + 0.5 * cfg.task.l2 * np.sum(w**2))
  final = [r for r in result.records if r["step"] == 3][0]
  np.testing.assert_allclose(final["train_loss"], expected, rtol=1e-5)


def test_one_compilation_per_optimiser(tmp_path):
  traces = collections.Counter()
  # 4 chunks of steps (one of length 1) for each of two seeds: still one trace per optimiser.
  cfg = _load(_quick(), ["budget.steps=7", "eval_every=2", "seeds=[0, 1]"])
  _run(cfg, tmp_path, hooks=runner.RunHooks(on_trace=lambda label: traces.update([label])))
  assert dict(traces) == {"adam": 1, "lbfgs": 1}


def _interrupt_after(n):
  def after_eval(num_evals):
    if num_evals >= n:
      raise KeyboardInterrupt

  return runner.RunHooks(after_eval=after_eval)


def test_resume_after_injected_interruption_matches_uninterrupted(tmp_path):
  # SGD, then DP-SGD (a PRNG key in its state); interrupted during DP-SGD's run.
  overrides = [
    "budget.steps=8",
    "checkpoint_interval_s=0",
    "optimizers=[{name: sgd}, {name: dp_sgd, expected_batch_size: 64}]",
  ]
  full = _run(_load(_quick("full"), overrides), tmp_path / "a")
  run_dir = str(tmp_path / "b")
  os.makedirs(run_dir)
  # 8th evaluation = DP-SGD at step 4: logged, not yet checkpointed (the last one is at 2).
  with pytest.raises(KeyboardInterrupt):
    _run(
      _load(_quick("cut"), overrides), tmp_path / "b", run_dir=run_dir, hooks=_interrupt_after(8)
    )
  logged = [
    (r["optimizer"], r["step"]) for r in runner.records.read_metrics(f"{run_dir}/metrics.jsonl")
  ]
  assert logged[-1] == ("dp_sgd", 4)
  cut = _load(os.path.join(run_dir, "config.yaml"))
  resumed = _run(cut, tmp_path / "b", run_dir=run_dir, resume=True)
  _assert_same_metrics(full.records, resumed.records)


def _assert_same_metrics(a, b):
  strip = lambda recs: [
    {k: v for k, v in r.items() if k not in ("wall_time", "compile_time")} for r in recs
  ]
  key = lambda r: (r["optimizer"], r["seed"], r["step"])
  assert sorted(strip(a), key=key) == sorted(strip(b), key=key)


@pytest.mark.long
def test_resume_after_kill_9_matches_uninterrupted(tmp_path):
  """A real subprocess is SIGKILLed mid-run, resumed with --resume, and ends identical."""
  args = [
    "name=kill",
    f"output_dir={tmp_path}",
    "budget.steps=12",
    "eval_every=2",
    "checkpoint_interval_s=0",
    "progress=false",
    # Newton-CG (a NamedTuple state with diagnostics) and Adam.
    "optimizers=[{name: newton_cg, cg_max_steps: 5}, {name: adam, learning_rate: 0.05}]",
  ]
  # x64 as in this process (conftest), so the in-process reference run computes identically.
  env = dict(os.environ, JAX_ENABLE_X64="1")
  quick = os.path.join(ROOT, "configs", "logreg_quick.yaml")
  # The launcher's own main(), with a hook that kills the process (kill -9) at the 10th
  # evaluation.
  kill_script = (
    "import os, sys\n"
    "from curvopt.launcher import runner\n"
    "from experiments import run\n"
    "def after_eval(n):\n"
    "  if n >= 10:\n"
    "    os.kill(os.getpid(), 9)\n"
    "hooks = runner.RunHooks(after_eval=after_eval)\n"
    "sys.exit(runner.main(sys.argv[1:], tasks=run.TASKS, hooks=hooks))\n"
  )
  killed = subprocess.run(
    [sys.executable, "-c", kill_script, quick, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert killed.returncode == -9, killed.stderr
  (run_dir,) = glob.glob(str(tmp_path / "kill" / "*"))
  partial = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert len(partial) == 10 and {r["optimizer"] for r in partial} == {"newton_cg", "adam"}
  resumed = subprocess.run(
    [sys.executable, RUN_PY, "--resume", run_dir],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert resumed.returncode == 0, resumed.stderr
  assert "| newton_cg |" in resumed.stdout
  records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  cfg = _load(quick, [a for a in args if not a.startswith("output_dir")])
  full = _run(cfg, tmp_path / "full")
  _assert_same_metrics(full.records, records)


# ---------------------------------------------------------------- task families


def test_dp_sgd_logs_the_privacy_spent(tmp_path):
  from curvopt import privacy

  cfg = _load(
    os.path.join(ROOT, "configs", "dp_sgd_digits.yaml"),
    ["budget.steps=4", "eval_every=2", "progress=false", "optimizers=[{name: dp_sgd}]"],
  )
  result = _run(cfg, tmp_path)
  opt = cfg.optimizers[0]
  n = RUN.TASKS["classification"]().build(cfg.task, np.float32).num_train()
  for r in result.records:
    expected = privacy.epsilon(opt.noise_multiplier, opt.expected_batch_size / n, r["step"], 1e-5)
    assert r["epsilon"] == pytest.approx(expected) and r["delta"] == 1e-5
  assert result.records[-1]["epsilon"] > 0


def test_random_walk_true_values_solve_the_bellman_equation():
  from experiments import td

  cfg = td.Config(num_states=7, left_reward=-1.0)
  task = td.build(cfg, np.float64)
  n = cfg.num_states  # v = P v + r over the non-terminal states, solved densely
  p, r = np.zeros((n, n)), np.zeros(n)
  for i in range(n):
    for j, reward in ((i - 1, cfg.left_reward), (i + 1, 1.0)):
      if 0 <= j < n:
        p[i, j] = 0.5
      else:
        r[i] += 0.5 * reward
  np.testing.assert_allclose(task.true_values, np.linalg.solve(np.eye(n) - p, r), atol=1e-12)
  data = task.train_data  # transitions are consistent: terminal ones end the episodes
  assert float(data["discount_t"].sum()) == len(data["r_t"]) - cfg.num_episodes


def test_hyperopt_implicit_hypergradient_matches_the_closed_form():
  from experiments import hyperopt

  task = hyperopt.build(hyperopt.Config(), np.float64)
  params = task.init_params(None)
  exact = jax.grad(lambda p: task.val_loss(task.exact_solution(p["log_lambda"])))(params)
  implicit = jax.grad(task.objective("implicit"))(params)
  # fixed_point stops at a 1e-6 relative step; the hyper-gradient inherits ~1e-4 of error.
  error = np.linalg.norm(implicit["log_lambda"] - exact["log_lambda"])
  assert error <= 1e-3 * np.linalg.norm(exact["log_lambda"])
  # the exact solution itself, against numpy's least squares on the augmented system
  lam = np.exp(np.asarray(params["log_lambda"]))
  x, y = np.asarray(task.data["x"]), np.asarray(task.data["y"])
  n = len(y)
  aug_x = np.vstack([x / np.sqrt(n), np.diag(np.sqrt(lam))])
  aug_y = np.concatenate([y / np.sqrt(n), np.zeros(len(lam))])
  np.testing.assert_allclose(
    task.exact_solution(params["log_lambda"]), np.linalg.lstsq(aug_x, aug_y)[0], rtol=1e-8
  )
