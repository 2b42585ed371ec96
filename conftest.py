"""Test-wide JAX settings: float64 for the test suite, JAX's defaults for doctests, and a
persistent compilation cache shared by every test process."""

import os

# jaxlib's CPU LAPACK calls (solve, Cholesky, eigh) spin-wait on OpenBLAS threads when the cores
# are busy: one thread each keeps them at a few milliseconds. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
  """Long tests first, so that neither xdist worker is left running one alone at the end.

  Tests marked ``slow`` (still run by CI; whole modules whose tests share a multi-device
  subprocess fixture are marked) move to the front in their order, so one worker starts them
  and runs each module fixture once; with ``--dist worksteal`` the idle worker then takes
  tests from the end of the other's queue: the short ones.
  """
  del config
  items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)
