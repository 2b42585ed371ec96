"""The public API: every SPEC name at ``curvopt.<name>``, every module importable as a module."""

import importlib
import pkgutil
import sys
import types

import pytest

import curvopt

# The names of ../shared/SPEC.md (and the README's "What is in the box"), unchanged by layout.
SPEC_NAMES = [
  # 1. derivatives
  "jacobian",
  "hessian",
  "batch_jacobian",
  "batch_hessian",
  "jacobian_diagonal",
  "jmp",
  "mjp",
  "jacobian_gram",
  "empirical_ntk",
  # 2. curvature products
  "hvp",
  "hvp_fn",
  "ggn_vp",
  "ggn_fn",
  "empirical_fisher_fn",
  # 3. estimators
  "hutchinson_trace",
  "hutchinson_diagonal",
  "lanczos",
  "top_eigenvalues",
  "spectral_density",
  # 4. recipes
  "td_target",
  "td0_loss",
  "lambda_returns",
  "straight_through",
  "clip_gradient",
  "log1pexp",
  "maml_loss",
  "fixed_point",
  # 5. optimisers, per-example gradients and privacy
  "newton_cg",
  "scale_by_newton_cg",
  "per_example_grads",
  "clipped_grad",
  "clip_per_example",
  "dp_sgd",
  # README additions
  "is_elementwise",
  "hutchpp_trace",
  "clipped_sum_fn",
  "dp_aggregate",
  "conjugate_gradient",
  "CGResult",
  "CG_STATUSES",
  "NewtonCGState",
  "CurvatureFn",
  "value_fn_from_model",
  "ClippedSum",
  "ClipPerExampleState",
  "DPSGDState",
  "EigenResult",
  "LanczosResult",
  "SpectralDensity",
  "TraceEstimate",
  "FixedPointSolution",
  "MamlAux",
]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_names_are_public(name):
  assert hasattr(curvopt, name), name
  assert name in curvopt.__all__, name


def test_privacy_epsilon_and_submodules_are_reachable():
  assert callable(curvopt.privacy.epsilon)
  for name in ("estimators", "ghost", "sharding", "privacy"):
    assert isinstance(getattr(curvopt, name), types.ModuleType), name
  assert isinstance(curvopt.launcher, types.ModuleType)


def test_every_module_imports_as_a_module_and_none_is_shadowed():
  names = [m.name for m in pkgutil.walk_packages(curvopt.__path__, "curvopt.")]
  assert "curvopt.optimizers.newton_cg" in names and "curvopt.linalg.cg" in names
  for name in names:
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType), name
    parent, _, leaf = name.rpartition(".")
    # ``import a.b.c as m`` binds getattr(a.b, "c"): it must be the module, not a function.
    assert getattr(sys.modules[parent], leaf) is module, name


def test_no_stray_names_leak_into_the_namespace():
  public = {k for k in vars(curvopt) if not k.startswith("_")}
  assert "importlib" not in public
  assert public - set(curvopt.__all__) <= {"launcher"}, public - set(curvopt.__all__)


def test_flax_is_not_imported_by_the_library():
  code = (
    "import sys, curvopt, curvopt.privacy.ghost, curvopt.optimizers.newton_cg;"
    "assert 'flax' not in sys.modules, 'flax imported'"
  )
  import subprocess

  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
