"""What every transform state in a tree does to each leaf, merged (transforms layer).

Export, summary and lottery rewinding read a trained state through
:func:`leaf_views`, whatever wraps it (a chain's tuple, an optimizer state).

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> params = {"w": jnp.array([0.1, -0.4])}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> _, _, views = leaf_views(params, t.init(params))
    >>> views[0].quant
    QuantSpec(bits=8)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from .._specs.rules import LeafPlan
from ..numerics._packing import unpack_mask_rows
from .transform import TransformState


class LeafView(NamedTuple):
    """What every transform in a (possibly chained) state does to one leaf."""

    entry: LeafPlan
    quant: Any  # QuantSpec | None: the first transform's that quantizes the leaf
    mask: jax.Array | np.ndarray | None  # AND of every transform's mask of the leaf (numpy: host_masks)
    learned: dict | None = None  # the quantizing transform's learned values (LSQ step)


def _host_mask(packed, shape: tuple[int, ...]) -> np.ndarray:
    """``unpack_mask_rows`` in numpy: no device op, nothing to compile."""
    rows = np.unpackbits(np.asarray(packed, np.uint8), axis=0, bitorder="little")[: shape[0] if shape else 1]
    return rows.astype(bool).reshape(shape)


def leaf_views(params, state, *, host_masks: bool = False) -> tuple[list, Any, list[LeafView]]:
    """Flattens ``params`` and merges every :class:`TransformState` found in ``state``.

    ``state`` may be a transform state, a tuple of them (``chain``) or an optimizer
    state holding one (``wrap``). Returns ``(flat, treedef, views)`` in leaf order.
    ``host_masks=True`` gives the masks as numpy arrays (unpacked on the host).
    """
    nodes = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, TransformState))
    states = [n for n in nodes if isinstance(n, TransformState)]
    if not states:
        raise ValueError(
            "no jaxqp state found: pass t.init(params)'s result or jaxqp.state_of(opt_state)"
        )
    flat, treedef = states[0].plan.check(params)
    for s in states[1:]:
        s.plan.check(params)
    views = []
    for i, entry in enumerate(states[0].plan.leaves):
        quant, mask, learned = None, None, None
        for s in states:
            leaf = s.plan.leaves[i]
            if quant is None and leaf.quant is not None:
                quant, learned = leaf.quant, s.learned.get("weights", {}).get(leaf.path)
            if leaf.path in s.mask_bits:
                packed = s.mask_bits[leaf.path]
                this = _host_mask(packed, leaf.shape) if host_masks else unpack_mask_rows(packed, leaf.shape)
                mask = this if mask is None else mask & this
        views.append(LeafView(entry, quant, mask, learned))
    return flat, treedef, views
