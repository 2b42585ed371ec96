"""Doctest namespace and test-wide JAX settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvopt


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace.update(jax=jax, jnp=jnp, np=np, curvopt=curvopt)


# The suite checks float32 and float64 side by side: enable x64 once, and let each test pick
# its dtype explicitly (float32 arrays stay float32 with x64 on).
jax.config.update("jax_enable_x64", True)
