"""Test configuration: strict dtype promotion and deterministic hypothesis profiles.

Strict dtype promotion makes silent upcasts in jaxqp fail loudly. Tests that run optax
optimizers opt out with ``@pytest.mark.standard_promotion``: optax itself computes
``decay ** count`` (a Python float to an int32 power) in adam's bias correction, which strict
promotion rejects.

The fast tier (``python -m pytest -m "not slow"``) skips what trains models or starts
interpreters (``@pytest.mark.slow`` on the test), and runs only a spread sample of the large
parametrized grids listed in ``GRID_SAMPLES``; the full run (CI) runs every case.

Hypothesis runs derandomized by default (profile ``ci``, 50 examples per property; ``fast``, 15,
in the fast tier): every run on every machine draws the same examples, so CI
does not depend on the draw. Developers hunt for new counterexamples on
purpose with ``HYPOTHESIS_PROFILE=random python -m pytest tests`` (fresh random draws each run);
a failure found that way is pinned with ``@example(...)`` in the test.
"""

import os
import tempfile

import jax
import pytest
from hypothesis import settings

# JAX's persistent compilation cache, shared by the xdist workers and kept between runs: eager
# tests compile hundreds of small per-shape ops, and both workers need many of the same ones.
# Cache hits return the same executable, so no result depends on it.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxqp-tests-xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

settings.register_profile("ci", max_examples=50, derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("fast", settings.get_profile("ci"), max_examples=15)
settings.register_profile("random", max_examples=200, derandomize=False, deadline=None, print_blob=True)


def pytest_configure(config):
    """Picks the hypothesis profile: ``HYPOTHESIS_PROFILE`` if set, else "fast" for the fast tier."""
    fast_tier = "not slow" in (config.option.markexpr or "")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast" if fast_tier else "ci"))


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield


# Parametrized grids whose full sweep is slow: {test function: cases kept in the fast tier}.
# The kept cases are evenly spread over the grid in collection order (its first case, and its
# last when more than one is kept); the others are marked slow.
GRID_SAMPLES = {
    "test_export_stores_nm_and_decodes_bit_for_bit": 3,
    "test_int_dense_equals_fake_quant_forward_and_gradients": 1,
    "test_pow2_export_decodes_bit_for_bit": 3,
    "test_pack_round_trip_odd_lengths": 8,
    "test_linen_layer_input_is_quantized": 1,
    "test_int8_matmul_is_exact_integer_arithmetic": 3,
    "test_block_mask_matches_reference_with_ragged_edges": 3,
    "test_group_padding_any_length_matches_loop_reference": 3,
    "test_criteria_prune_exactly": 1,
    "test_other_layouts_fall_back_exactly": 1,
    "test_nm_along_the_last_axis": 1,
    "test_low_bit_pow2_serves_as_an_exact_int8_kernel": 1,
    "test_polynomial_matches_closed_form": 1,
}


def spread(count: int, keep: int) -> set[int]:
    """``keep`` indices evenly spread over ``range(count)``, first and last included."""
    if keep >= count:
        return set(range(count))
    if keep == 1:
        return {0}
    return {round(i * (count - 1) / (keep - 1)) for i in range(keep)}


def pytest_collection_modifyitems(config, items):
    del config
    grids: dict[str, list] = {}
    for item in items:
        name = getattr(item, "originalname", None)
        if name in GRID_SAMPLES:
            grids.setdefault(f"{item.path}::{name}", []).append(item)
    for cases in grids.values():
        kept = spread(len(cases), GRID_SAMPLES[cases[0].originalname])
        for index, item in enumerate(cases):
            if index not in kept:
                item.add_marker(pytest.mark.slow)


# A script run in a subprocess by test_sharding.py (it must configure devices before JAX starts).
collect_ignore = ["sharded_step.py"]
