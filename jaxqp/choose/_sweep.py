"""The jitted loss of a parameter tree with one layer swapped for its compressed version (tools layer).

The layer to swap is a traced index: ``where(index == k, compressed_k, params_k)``
for every layer ``k``. So one compiled function measures every (layer, candidate)
pair, and the compressed tree is an argument, not a constant: a new candidate
does not recompile it either. The calibration batches are stacked and mapped
with ``lax.map`` inside the same function.

Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p, b: jnp.sum((p["w"] - b) ** 2)
    >>> f = swapped_loss(loss, {"w": jnp.ones(2)}, [jnp.zeros(2)], ["w"])
    >>> float(f({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, -1)), float(f({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, 0))
    (2.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._specs.paths import paths_and_leaves


def layer_ids(params, layers: Sequence[str]) -> tuple[list[int | None], object]:
    """For each leaf of ``params`` (in ``jax.tree`` order), its index in ``layers`` or None; and the treedef."""
    flat, treedef = paths_and_leaves(params)
    where = {path: i for i, path in enumerate(layers)}
    missing = sorted(set(layers) - {path for path, _ in flat})
    if missing:
        raise ValueError(f"layer '{missing[0]}' is not a leaf of params; paths look like "
                         f"{[p for p, _ in flat][:5]}")
    return [where.get(path) for path, _ in flat], treedef


def stack_batches(batches) -> object:
    """The calibration batches as one pytree with a leading batch-index axis.

    Raises:
      ValueError: if there are no batches or they differ in structure or shapes.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: give at least one calibration batch, e.g. [(x[:256], y[:256])]")
    structure = jax.tree.structure(batches[0])
    shapes = [np.shape(x) for x in jax.tree.leaves(batches[0])]
    for i, batch in enumerate(batches[1:], 1):
        if jax.tree.structure(batch) != structure or [np.shape(x) for x in jax.tree.leaves(batch)] != shapes:
            raise ValueError(f"batches[{i}] differs in structure or shapes from batches[0] ({shapes}); the "
                             "sweep stacks them. Fix: give equal batches, e.g. drop the last, partial one")
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *batches)


def batched_loss(loss_fn, batches):
    """``params -> mean of loss_fn(params, batch)`` over the stacked batches (checked to be a scalar)."""
    stacked = stack_batches(batches)

    def mean_loss(params):
        losses = jax.lax.map(lambda batch: _scalar(loss_fn(params, batch)), stacked)
        return jnp.mean(losses.astype(jnp.float32))

    return mean_loss


def _scalar(value):
    if jnp.shape(value) != ():
        raise ValueError(f"loss_fn(params, batch) must return a scalar, got shape {jnp.shape(value)}; "
                         "Fix: reduce it, e.g. with .mean()")
    return value


def swapped_loss(loss_fn, params, batches, layers: Sequence[str]):
    """A jitted ``(params, compressed, index) -> mean loss`` with layer ``index`` taken from ``compressed``.

    ``index = -1`` swaps nothing (the reference loss).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: a tree shaped like the ones the function will get.
      batches: the calibration batches (equal shapes).
      layers: paths of the swappable leaves, in index order.

    Returns:
      The jitted function. Traced once for all layers, indices and candidates.
    """
    ids, treedef = layer_ids(params, layers)
    mean_loss = batched_loss(loss_fn, batches)

    @jax.jit
    def loss(params, compressed, index):
        leaves = [p if k is None else jnp.where(index == k, c, p)
                  for p, c, k in zip(jax.tree.leaves(params), jax.tree.leaves(compressed), ids)]
        return mean_loss(jax.tree.unflatten(treedef, leaves))

    return loss
