"""Doctest namespace and test-wide JAX settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvopt


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace.update(jax=jax, jnp=jnp, np=np, curvopt=curvopt)
