"""Test configuration: strict dtype promotion, so silent upcasts fail loudly."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
