"""Pruning masks of single arrays (numerics layer: jax only).

A mask is a boolean array of the weight's shape: True keeps, False prunes.

* :func:`magnitude_mask` prunes exactly ``round(sparsity * size)`` entries, the
  smallest ``|x|`` first; ties are broken by flat (row-major) index, lower index
  pruned first, so the result is deterministic. Entries already pruned by
  ``prev_mask`` rank below every survivor, so masks only grow sparser while the
  target sparsity does not fall. The count is computed in float32, exact for
  arrays of up to 2**24 entries.
* :func:`threshold_mask` prunes every entry with ``|x| < threshold``.

Example:
    >>> import jax.numpy as jnp
    >>> magnitude_mask(jnp.array([3.0, -1.0, 1.0, 2.0]), 0.5)
    Array([ True, False, False,  True], dtype=bool)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prune_count(sparsity, size: int) -> jax.Array:
    """Number of entries pruned for ``sparsity`` of ``size``: ``round(sparsity * size)``."""
    count = jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)
    return jnp.clip(count, 0, size)


def magnitude_mask(x: jax.Array, sparsity, prev_mask: jax.Array | None = None) -> jax.Array:
    """Keeps the ``size - round(sparsity * size)`` largest-magnitude entries of ``x``.

    ``sparsity`` may be a traced scalar (it comes from a schedule under jit).
    """
    score = jnp.abs(jnp.asarray(x, jnp.float32)).ravel()
    if prev_mask is not None:
        score = jnp.where(prev_mask.ravel(), score, -1.0)
    order = jnp.argsort(score, stable=True)
    rank = jnp.zeros(score.shape, jnp.int32).at[order].set(jnp.arange(score.size, dtype=jnp.int32))
    return (rank >= prune_count(sparsity, score.size)).reshape(x.shape)


def threshold_mask(x: jax.Array, threshold, prev_mask: jax.Array | None = None) -> jax.Array:
    """Keeps entries with ``|x| >= threshold`` (and, if given, inside ``prev_mask``)."""
    keep = jnp.abs(x) >= jnp.asarray(threshold, x.dtype)
    return keep if prev_mask is None else keep & prev_mask


def apply_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` with pruned entries set to exactly 0 (their gradient is 0 too)."""
    return jnp.where(mask, x, jnp.zeros_like(x))
