"""The jaxqp transform states inside any tree: find, map and freeze them (transforms layer).

A state may sit alone, in a chain's tuple, or inside an optimizer state (``jaxqp.wrap``);
these helpers walk whatever holds it.

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> len(transform_states((t.init({"w": jnp.ones(3)}), {"other": 1})))
    1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .transform import TransformState


def _is_state(x) -> bool:
    return isinstance(x, TransformState)


def transform_states(tree) -> list[TransformState]:
    """Every :class:`TransformState` in ``tree`` (a state, a chain's tuple, gradients of one), in order."""
    return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=_is_state) if _is_state(n)]


def needs_grads(state) -> bool:
    """True if some transform state in ``state`` prunes by gradients (saliency, movement, RigL)."""
    return any(e.prune is not None and e.prune.needs_grads for s in transform_states(state) for e in s.plan.leaves)


def learned_of(tree) -> tuple[dict, ...]:
    """The ``learned`` dicts of every transform state in ``tree``, in order."""
    return tuple(s.learned for s in transform_states(tree))


def map_states(tree, fn):
    """``tree`` with every :class:`TransformState` ``s`` in it replaced by ``fn(s)``, in order."""
    return jax.tree_util.tree_map(lambda n: fn(n) if _is_state(n) else n, tree, is_leaf=_is_state)


def with_learned(tree, values: Sequence[dict]):
    """``tree`` with the ``learned`` dicts of its transform states replaced, in order."""
    remaining = iter(values)
    return map_states(tree, lambda s: dataclasses.replace(s, learned=next(remaining)))


def freeze_masks(tree: Any, frozen: bool = True) -> Any:
    """``tree`` (a transform state, a chain's states or an optimizer state) with masks frozen.

    From then on ``update`` (and :func:`jaxqp.wrap`) keeps every mask as it is: no
    schedule refresh, no RigL regrowth; quantizers, ranges and learned values go on.
    Use it to switch from pruning to a quantization-aware fine-tuning phase. The flag is
    a bool leaf of the state: the training step does not recompile, and a checkpoint keeps it.

    Args:
      tree: a transform state, a chain's states or an optimizer state holding them.
      frozen: True to freeze, False to let masks refresh again.

    Returns:
      ``tree`` with every transform state's ``frozen`` flag set.

    Raises:
      ValueError: if ``tree`` holds no transform state, or none of its rules prunes (nothing
        would be frozen).
      TypeError: if ``frozen`` is not a bool.

    Example:
      >>> import jax.numpy as jnp, jaxqp
      >>> t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.5, 0, 2)))])
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0, 0.5])}
      >>> state = jaxqp.freeze_masks(t.init(params))
      >>> bool(t.update(params, state).masks["w"].all())
      True
    """
    if not transform_states(tree):
        raise ValueError("jaxqp.freeze_masks: no jaxqp state found in the tree, so there is no mask to freeze; pass "
                         "t.init(params)'s result, or the optimizer state of jaxqp.wrap(optax_tx, t)")
    if not any(leaf.prune is not None for s in transform_states(tree) for leaf in s.plan.leaves):
        raise ValueError("jaxqp.freeze_masks: no rule of this state prunes, so there is no mask to freeze (the "
                         "quantizers go on either way); call it only for a transform with a PruneSpec")
    dtype = getattr(frozen, "dtype", None)
    is_bool_array = dtype is not None and jnp.issubdtype(dtype, jnp.bool_) and jnp.ndim(frozen) == 0
    if not (isinstance(frozen, (bool, np.bool_)) or is_bool_array):
        raise TypeError(f"jaxqp.freeze_masks: frozen must be a bool (True freezes, False lets masks refresh "
                        f"again), got {frozen!r}")
    return map_states(tree, lambda s: dataclasses.replace(s, frozen=jnp.asarray(frozen, bool)))
