"""Shared test setup.

* Keras runs on its JAX backend (set before anything imports keras), so no TensorFlow.
* Implicit rank promotion raises, so nothing in the library broadcasts by accident.
* 8 simulated CPU devices, for the sharding tests.
* Warnings are errors (see ``filterwarnings`` in pyproject.toml).
* No tuned table (``python -m flax_dotattn.tune``): the suite tests the shipped defaults,
  whatever this machine's cache holds; tests/test_tuning.py turns it on in a temp dir.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("FLAX_DOTATTN_TUNING", "off")
# 8 simulated CPU devices for the sharding tests; must be set before jax initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# Most tests run tiny shapes, where XLA's compile time dominates: without LLVM's
# optimisations tests/test_chunked.py and test_properties.py took 104 s instead of 142 s.
# Numerics are XLA's either way (the HLO passes are unchanged); the benchmark is not run
# with this flag. Set FLAX_DOTATTN_TEST_OPTIMIZE=1 to test optimised code.
if os.environ.get("FLAX_DOTATTN_TEST_OPTIMIZE") != "1" and (
    "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]
):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

# Hypothesis profiles for every test module: "ci" (default) is bounded and derandomised;
# HYPOTHESIS_PROFILE=dev explores more.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Scripts that regenerate recorded references (they need TensorFlow), not tests.
collect_ignore_glob = ["fixtures/*.py"]

_TOLERANCES = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 2e-5,
    jnp.dtype(jnp.float16): 2e-3,
    jnp.dtype(jnp.bfloat16): 2e-2,
}


def tolerance(dtype) -> float:
    """Absolute and relative tolerance for comparing results of ``dtype``."""
    return _TOLERANCES[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype=jnp.float32, factor: float = 1.0) -> None:
    """Asserts ``actual`` matches ``expected`` within the dtype-aware tolerance."""
    tol = tolerance(dtype) * factor
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol
    )


@pytest.fixture
def rng():
    return np.random.default_rng(0)
