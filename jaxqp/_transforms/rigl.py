"""Dynamic sparsity: RigL / SET drop-and-grow, and resetting regrown weights' moments.

Transforms layer. :func:`drop_and_grow` changes a mask at constant sparsity;
:func:`reset_moments` zeroes, in any optax state, the entries of every subtree
that has the parameters' tree structure (adam's ``mu`` and ``nu``, a chain's
inner states, ...) where a weight was just grown. It matches structure, never
optimizer state types, so it works for any optax transformation.

Example:
    >>> import jax, jax.numpy as jnp
    >>> mask = jnp.array([True, True, False, False])
    >>> drop_and_grow(jnp.array([3.0, 0.1, 0.0, 0.0]), mask, jnp.array([0.0, 0.0, 5.0, 1.0]),
    ...               n=jnp.int32(1), grow="gradient", key=None)
    Array([ True, False,  True, False], dtype=bool)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .._specs.paths import paths_and_leaves
from .._specs.prune import RigL
from ..numerics._masks import count_true, magnitude_mask


def drop_fraction(spec: RigL, step) -> jax.Array:
    """RigL's cosine-decayed fraction ``f0 (1 + cos(pi step / end)) / 2`` (0 after ``end``)."""
    t = jnp.minimum(jnp.asarray(step, jnp.float32) / spec.end, 1.0)
    return spec.drop_fraction * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def drop_and_grow(w: jax.Array, mask: jax.Array, grad: jax.Array | None, n, grow: str, key) -> jax.Array:
    """Drops the ``n`` active entries with smallest ``|w|``, grows ``n`` inactive ones.

    Grown: largest ``|grad|`` among entries inactive after the drop (``grow="gradient"``)
    or uniformly random ones (``"random"``); ties by lower flat index. The count of
    active entries is unchanged.
    """
    size = math.prod(w.shape)
    active = count_true(mask)
    n = jnp.minimum(n, active)
    as_fraction = lambda count: count.astype(jnp.float32) / jnp.float32(size)
    dropped = magnitude_mask(w, as_fraction(size - active + n), mask)
    if grow == "gradient":
        if grad is None:  # pruning.py refuses this before tracing; kept for direct callers
            raise ValueError("drop_and_grow(grow='gradient') needs grad")
        score = jnp.abs(grad)
    else:
        score = jax.random.uniform(key, w.shape)
    grown = magnitude_mask(score, as_fraction(size - n), ~dropped)  # keeps the n best inactive
    return jnp.where(n > 0, dropped | grown, mask)


def rigl_due(spec: RigL, step) -> jax.Array:
    """Whether a RigL/SET update happens at ``step``."""
    return (step % spec.every == 0) & (step < spec.end) & (step > 0)


def rigl_mask(w, mask, grad, spec: RigL, step, key) -> jax.Array:
    """The mask after a RigL/SET update at ``step`` (unchanged off schedule)."""
    due = rigl_due(spec, step)
    n = jnp.round(drop_fraction(spec, step) * count_true(mask).astype(jnp.float32)).astype(jnp.int32)
    return jax.lax.cond(due, lambda: drop_and_grow(w, mask, grad, n, spec.grow, key), lambda: mask)


def reset_moments(opt_state, params, grown: dict[str, jax.Array]):
    """Zeroes ``grown`` entries in every params-shaped subtree of ``opt_state``."""
    if not grown:
        return opt_state
    treedef = jax.tree_util.tree_structure(params)
    shapes = [jnp.shape(p) for p in jax.tree_util.tree_leaves(params)]

    def like_params(node) -> bool:
        if jax.tree_util.tree_structure(node) != treedef:
            return False
        return [jnp.shape(a) for a in jax.tree_util.tree_leaves(node)] == shapes

    def reset(node):
        if not like_params(node):
            return node
        flat, tdef = paths_and_leaves(node)
        out = [jnp.where(grown[path], jnp.zeros_like(a), a) if path in grown else a for path, a in flat]
        return jax.tree_util.tree_unflatten(tdef, out)

    return jax.tree_util.tree_map(reset, opt_state, is_leaf=like_params)
