"""The launcher's edges (issue 15): forgiving where it is safe, named errors everywhere else."""

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from curvopt.launcher import config as config_lib
from curvopt.launcher import optimizers as opt_lib
from curvopt.launcher import records, runner
from experiments import run as RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(source, overrides=()):
  return config_lib.load_config(
    source, list(overrides), tasks=runner._LazySchemas(RUN.TASKS), optimizers=opt_lib.OPTIMIZERS
  )


def _quick(**extra):
  cfg = {
    "name": "edges",
    "task": {"name": "logreg", "dataset": "digits"},
    "optimizers": [{"name": "newton_cg", "cg_max_steps": 5}],
    "budget": {"steps": 2},
    "eval_every": 1,
    "progress": False,
  }
  cfg.update(extra)
  return cfg


def test_a_scalar_seed_is_a_list_of_one():
  assert _load(_quick(), ["seeds=0"]).experiment.seeds == [0]
  assert _load(_quick(), ["seeds=[3, 4]"]).experiment.seeds == [3, 4]


@pytest.mark.parametrize("value", ["-1", "0"])
def test_learning_rate_must_be_positive(value):
  with pytest.raises(config_lib.ConfigError, match=r"'optimizers\[0\].learning_rate'.*> 0"):
    _load(_quick(), [f"optimizers.0.learning_rate={value}"])


def test_choices_come_from_the_optimisers_signature():
  with pytest.raises(config_lib.ConfigError, match=r"'optimizers\[0\].curvature'.*'hessian'"):
    _load(_quick(), ["optimizers.0.curvature=kfac"])


def test_values_the_optimiser_rejects_are_named_before_any_work(tmp_path):
  cfg = _load(_quick(output_dir=str(tmp_path)), ["optimizers.0.damping=-1"])
  with pytest.raises(config_lib.ConfigError, match=r"'optimizers\[0\]'.*damping"):
    runner.run_experiment(cfg, RUN.TASKS["logreg"](), echo=False)
  assert not os.listdir(tmp_path)


def test_every_newton_cg_option_is_a_config_key():
  import inspect

  import curvopt

  schema = opt_lib.OPTIMIZERS["newton_cg"].schema
  fields = {f for f in schema.__dataclass_fields__}
  options = set(inspect.signature(curvopt.newton_cg).parameters) - {"model_fn", "loss_fn", "module"}
  assert options <= fields, options - fields


def test_labels_follow_overridden_values():
  path = os.path.join(ROOT, "configs", "dp_sgd_digits.yaml")
  cfg = _load(path, ["optimizers.2.noise_multiplier=3.5"])
  labels = [config_lib.label_of(o) for o in cfg.optimizers]
  assert labels == ["sgd_non_private", "dp_sgd_sigma0.8", "dp_sgd_sigma3.5"]
  with pytest.raises(config_lib.ConfigError, match="unknown option"):
    config_lib.label_of(_load(_quick(), ["optimizers.0.label='{sigma}'"]).optimizers[0])


def test_epsilon_summarises_the_accountants_warnings(caplog):
  from curvopt import privacy

  with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
    warnings.simplefilter("always")
    eps = privacy.epsilon(0.8, 128 / 1437, 40, 1e-5)
  assert eps > 0
  assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
  summaries = [w for w in caught if "Rényi order" in str(w.message)]
  assert len(summaries) <= 1  # one summary (or none, if every order converged)


def test_step_zero_records_no_optimiser_diagnostics(tmp_path):
  cfg = _load(_quick(output_dir=str(tmp_path)))
  result = runner.run_experiment(cfg, RUN.TASKS["logreg"](), echo=False)
  first, later = result.records[0], result.records[-1]
  assert first["step"] == 0
  for key in ("damping", "rho", "loss"):  # the optimiser's: none before its first step
    assert key not in first, key
    assert key in later, key
  assert first["grad_norm"] > 0.1  # the task's own evaluation, not a zero placeholder
  lines = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
  assert "rho" not in lines[0]


def test_steps_to_target_states_its_resolution():
  recs = [
    {"optimizer": "a", "seed": 0, "step": s, "wall_time": 0.1 * s, "loss": 1.0 / (s + 1)}
    for s in range(0, 25, 5)
  ]
  rows = records.summary_rows(recs, "loss", target=0.1)
  assert rows[0]["steps_to_target"] == [10] and rows[0]["resolution"] == 5
  table = records.summary_markdown(rows, "loss", target=0.1)
  assert "10 (evaluated every 5)" in table


def test_a_missing_extra_names_the_install_command():
  code = "import sys; sys.modules['omegaconf'] = None; import curvopt.launcher"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "pip install" in out.stderr and "[experiments]" in out.stderr, out.stderr


# ------------------------------------------------------------- per-entry batch size, shuffle


def _logreg_task():
  import jax.numpy as jnp

  cfg = _load(_quick())
  return RUN.TASKS["logreg"]().build(cfg.task, jnp.float64)


def test_with_batching_draws_distinct_examples_and_shuffles_the_full_batch():
  import jax
  import numpy as np

  task = _logreg_task()
  x = np.asarray(task.train_data["x"])
  key = jax.random.key(3)
  rows = lambda batch: {tuple(r) for r in np.asarray(batch["x"]).round(12)}
  mini = task.with_batching(16)
  batch = mini.batch(key, 0)
  assert batch["x"].shape[0] == 16 and len(rows(batch)) == 16 and rows(batch) <= rows({"x": x})
  assert rows(mini.batch(key, 1)) != rows(batch)  # a new subset each step
  shuffled = task.with_batching(None, shuffle=True)
  s0, s1 = shuffled.batch(key, 0), shuffled.batch(key, 1)
  assert rows(s0) == rows({"x": x}) and s0["x"].shape == x.shape  # a permutation of all rows
  assert not np.array_equal(s0["x"], x) and not np.array_equal(s0["x"], s1["x"])
  np.testing.assert_array_equal(shuffled.batch(key, 0)["x"], s0["x"])  # a function of the step
  assert task.batch_size is None and not task.shuffle  # the original is unchanged
  np.testing.assert_array_equal(task.batch(key, 0)["x"], x)


def test_an_entry_trains_on_its_own_batch_size():
  import jax
  import numpy as np

  task = _logreg_task()
  cfg = _load(_quick(optimizers=[{"name": "adam", "batch_size": 16}, {"name": "sgd"}]))
  params = task.init_params(jax.random.key(0))
  data_key = jax.random.key(1)
  for opt, expected in zip(cfg.optimizers, (task.with_batching(16), task), strict=True):
    method = opt_lib.build_method(opt, task, "optimizers[0]")
    _, _, diagnostics = jax.jit(method.step)(params, method.init(params, None), data_key, 0)
    loss = task.loss(params, **expected.batch(data_key, 0))
    np.testing.assert_allclose(diagnostics["loss"], loss, rtol=1e-12)


@pytest.mark.parametrize(
  "entry, match",
  [
    ({"name": "adam", "batch_size": 0}, r"'optimizers\[0\].batch_size'.*\[1, \d+\]"),
    ({"name": "adam", "batch_size": 10**6}, r"'optimizers\[0\].batch_size'.*\[1, \d+\]"),
    ({"name": "adam", "batch_size": "half"}, r"'optimizers\[0\].batch_size'.*null"),
    ({"name": "dp_sgd", "batch_size": 32}, r"dp_sgd draws Poisson-sampled batches"),
  ],
)
def test_bad_batch_options_are_named(entry, match):
  cfg = _load(_quick(optimizers=[entry]))
  with pytest.raises(config_lib.ConfigError, match=match):
    opt_lib.build_method(cfg.optimizers[0], _logreg_task(), "optimizers[0]")


def test_a_task_that_draws_its_own_batches_rejects_an_entry_batch_size():
  cfg = _load(os.path.join(ROOT, "configs", "maml_sinusoid.yaml"), ["optimizers.0.shuffle=true"])
  task = RUN.TASKS["maml"]().build(cfg.task, "float32")
  with pytest.raises(config_lib.ConfigError, match="draws its own batches"):
    opt_lib.build_method(cfg.optimizers[0], task, "optimizers[0]")


def test_the_summary_calls_a_tie_at_the_printed_precision():
  rows = [
    {"optimizer": "newton_cg", "final": [0.083241]},
    {"optimizer": "lbfgs", "final": [0.0832402]},
    {"optimizer": "adam", "final": [0.08748]},
  ]
  assert records.best_rows(rows, higher_is_better=False) == ["newton_cg", "lbfgs"]
  assert "tie between **newton_cg** and **lbfgs** (0.08324" in records.best_text(
    rows, "train_loss", higher_is_better=False
  )
  rows[1]["final"] = [0.08323]  # distinct as printed: one winner
  assert records.best_text(rows, "train_loss", False) == "lowest final train_loss: **lbfgs**"
  assert records.best_text(rows, "acc", True) == "highest final acc: **adam**"
