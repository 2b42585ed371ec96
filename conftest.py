"""Test-wide JAX settings: float64 for the test suite, JAX's defaults for doctests, and a
persistent compilation cache shared by every test process."""

import os

# jaxlib's CPU LAPACK calls (solve, Cholesky, eigh) spin-wait on OpenBLAS threads when the cores
# are busy: one thread each keeps them at a few milliseconds. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The suite is compile-bound (about ten thousand small programs): XLA's CPU backend without
# LLVM's optimisation passes compiles a third faster. XLA's own HLO passes (fusion, algebraic
# simplification) still run. An XLA_FLAGS that sets the level itself is kept. Set before the
# backend starts, so the subprocesses of the tests inherit it too.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import curvopt  # noqa: E402

# Programs compiled once (the launcher's training loops, the solvers) are reused across tests
# and across runs of the suite; the directory can be moved with CURVOPT_COMPILATION_CACHE.
jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get("CURVOPT_COMPILATION_CACHE")
  or os.path.join(os.path.expanduser("~"), ".cache", "curvopt", "jax-tests"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# Tests (and the constants their modules build at import) use float64 where they ask for it.
jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _precision(request, doctest_namespace):
  """The suite checks float32 and float64 side by side, so tests run with x64 enabled (each
  test picks its dtypes explicitly; float32 arrays stay float32). Doctests run in JAX's default
  mode, as users' code does."""
  doctest_namespace.update(jax=jax, jnp=jnp, np=np, curvopt=curvopt)
  is_doctest = isinstance(request.node, pytest.DoctestItem)
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", not is_doctest)
  yield
  jax.config.update("jax_enable_x64", previous)


def pytest_collection_modifyitems(config, items):
  """The tests that read a multi-device subprocess (the module fixture ``sharded`` of
  tests/test_sharding.py and tests/test_launcher_mesh.py, all in the long tier) first.

  They move to the front in their order, so one worker starts them and runs each module
  fixture once; with ``--dist worksteal`` the idle worker takes tests from the end of the
  other's queue, far from them.
  """
  del config
  items.sort(key=lambda item: 0 if "sharded" in getattr(item, "fixturenames", ()) else 1)
