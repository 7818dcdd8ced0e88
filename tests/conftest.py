"""Test configuration: strict dtype promotion, so silent upcasts in jaxqp fail loudly.

Tests that run optax optimizers opt out with ``@pytest.mark.standard_promotion``:
optax itself computes ``decay ** count`` (a Python float to an int32 power) in
adam's bias correction, which strict promotion rejects.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield

# A script run in a subprocess by test_sharding.py (it must configure devices before JAX starts).
collect_ignore = ["sharded_step.py"]
