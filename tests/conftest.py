"""Test configuration: strict dtype promotion and deterministic hypothesis profiles.

Strict dtype promotion makes silent upcasts in jaxqp fail loudly. Tests that run optax
optimizers opt out with ``@pytest.mark.standard_promotion``: optax itself computes
``decay ** count`` (a Python float to an int32 power) in adam's bias correction, which strict
promotion rejects.

Hypothesis runs derandomized by default (profile ``ci``): every run on every machine draws the
same examples, so CI does not depend on the draw. Developers hunt for new counterexamples on
purpose with ``HYPOTHESIS_PROFILE=random python -m pytest tests`` (fresh random draws each run);
a failure found that way is pinned with ``@example(...)`` in the test.
"""

import os

import jax
import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("random", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield


# A script run in a subprocess by test_sharding.py (it must configure devices before JAX starts).
collect_ignore = ["sharded_step.py"]
