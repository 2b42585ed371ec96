"""newton_cg (defaults) on a few Moré-Garbow-Hillstrom problems against scipy's Newton-CG.

The problems come from ``benchmarks/mgh.py`` (ACM TOMS 7(1), 1981, standard starting points,
published minima); the full table is produced by that script.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import mgh

CHOSEN = ("Beale", "Helical valley", "Wood", "Kowalik-Osborne")


def test_problem_definitions_against_published_values():
  by_name = {p.name: p for p in mgh.PROBLEMS}
  # Known minimisers give the published minima (closed forms from the paper).
  np.testing.assert_allclose(by_name["Beale"].objective(jnp.array([3.0, 0.5])), 0.0, atol=1e-20)
  np.testing.assert_allclose(by_name["Wood"].objective(jnp.ones(4)), 0.0, atol=1e-20)
  np.testing.assert_allclose(
    by_name["Helical valley"].objective(jnp.array([1.0, 0.0, 0.0])), 0.0, atol=1e-20
  )
  np.testing.assert_allclose(
    by_name["Box 3-D (m=10)"].objective(jnp.array([1.0, 10.0, 1.0])), 0.0, atol=1e-20
  )
  # Values at the standard starting points (MGH 1981 and its FORTRAN test drivers).
  np.testing.assert_allclose(by_name["Rosenbrock"].objective(jnp.array([-1.2, 1.0])), 24.2)
  np.testing.assert_allclose(by_name["Wood"].objective(jnp.array([-3.0, -1.0, -3.0, -1.0])), 19192)
  np.testing.assert_allclose(
    by_name["Powell singular"].objective(jnp.array([3.0, -1.0, 0.0, 1.0])), 215.0
  )
  np.testing.assert_allclose(by_name["Beale"].objective(jnp.ones(2)), 14.203125)


@pytest.mark.long
@pytest.mark.parametrize("name", CHOSEN)
def test_reaches_published_minimum_within_3x_scipy_newton_cg(name):
  problem = next(p for p in mgh.PROBLEMS if p.name == name)
  scipy_hit, scipy_nit, _ = mgh.run_scipy(problem, "Newton-CG", 500)
  budget = 3 * (scipy_hit if scipy_hit is not None else scipy_nit)
  ours, f_final = mgh.run_newton_cg(problem, budget)
  assert ours is not None and ours <= budget, (ours, budget, f_final)
  assert mgh.reached(f_final, problem.f_star)
