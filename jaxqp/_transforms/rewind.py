"""Lottery-ticket rewinding (tools layer).

Frankle & Carbin (2019): train and prune, then restart from *early* weights
keeping only the survivors. Save ``early = params`` at the rewind step, train on,
then ``jaxqp.rewind(early, state)`` gives the early weights with every pruned
entry exactly 0. Keep training from it with the same transform state (its masks
stay; with a constant schedule they never change again).

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))])
    >>> trained = {"w": jnp.array([0.1, -3.0, 2.0, 0.2])}
    >>> state = t.init(trained)
    >>> jaxqp.rewind({"w": jnp.array([1.0, 1.0, 1.0, 1.0])}, state)["w"]
    Array([0., 1., 1., 0.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax

from ..numerics._masks import apply_mask
from .views import leaf_views


def rewind(early_params: Any, state: Any) -> Any:
    """``early_params`` with every entry that ``state`` prunes set to exactly 0.

    ``early_params`` must have the tree structure ``state`` was made for; ``state``
    may be a transform state, a chain's tuple of states or an optimizer state.

    Args:
      early_params: params saved early in training (the rewind point).
      state: the state whose masks to apply.

    Returns:
      ``early_params`` with pruned entries exactly 0.

    Raises:
      ValueError: if ``early_params`` has another tree structure than ``state``'s plan, or
        ``state`` holds no mask (no rule prunes: rewinding would return ``early_params`` as is).
    """
    flat, treedef, views = leaf_views(early_params, state)
    if all(view.mask is None for view in views):
        raise ValueError("jaxqp.rewind: the state holds no pruning mask (no rule prunes), so rewinding would "
                         "return early_params unchanged; pass the state of the pruned run (lottery ticket)")
    out = [leaf if view.mask is None else apply_mask(leaf, view.mask) for (_, leaf), view in zip(flat, views)]
    return jax.tree_util.tree_unflatten(treedef, out)
