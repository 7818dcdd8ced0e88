"""Parameter paths: "/"-joined keys of a pytree leaf, as a user reads them (specs layer).

Dict keys, sequence indices and attribute names are joined with "/". A trailing
attribute named ``value`` (the wrapper of an NNX ``Variable``) adds nothing, so
an NNX state reads ``l1/kernel`` just like a linen dict reads ``Dense_0/kernel``.

Example:
    >>> paths_and_leaves({"encoder": {"layers": [{"w": 1.0}]}})[0]
    [('encoder/layers/0/w', 1.0)]
"""

from __future__ import annotations

from typing import Any

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey


def _key_str(key) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath) -> str:
    """The "/"-joined path of a ``jax.tree_util`` key path."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def paths_and_leaves(tree) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, leaf), ...], treedef)`` in ``jax.tree_util`` leaf order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(kp), leaf) for kp, leaf in flat], treedef


def named_children(node) -> dict[str, Any] | None:
    """A pytree node's children by path name (attribute, key or index), or None for a leaf.

    ``jaxqp.save`` saves any pytree node this way: an Equinox module becomes the dict of its
    array fields; a node whose one child adds nothing to the path (an NNX ``Variable``'s
    ``value``) gives ``{"": child}``. None also when two children would share a name.

    Args:
      node: any object.

    Returns:
      ``{name: child}`` in ``jax.tree_util`` order, or None.

    Example:
      >>> named_children({"b": 1, "a": [2]})
      {'a': [2], 'b': 1}
    """
    flat = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    if len(flat) == 1 and flat[0][1] is node:
        return None
    names = [path_str(keypath) for keypath, _ in flat]
    if len(set(names)) != len(names):
        return None
    return dict(zip(names, (child for _, child in flat)))
