"""The base of compressed leaves and tree-level helpers: ``dequantize``, ``nbytes`` (export layer).

Every compressed leaf (``QArray``, ``SparseArray``, ``NMArray``, ``Pow2Array``, ``Fp8Array``
and the serving kernels) derives from :class:`Compressed`, has ``dequantize()`` and counts its
stored bytes in ``nbytes``.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxqp._export.sparse_array import SparseArray
    >>> leaf = SparseArray.from_dense(jnp.array([0.0, 2.0, 0.0, 3.0]), jnp.array([False, True, False, True]))
    >>> dequantize({"w": leaf})["w"]
    Array([0., 2., 0., 3.], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer


def size_of(shape) -> int:
    return math.prod(shape)


def scatter(mask: jax.Array, kept: jax.Array, fill: jax.Array) -> jax.Array:
    """Dense flat array: ``kept`` (in row-major order) where ``mask``, ``fill`` elsewhere."""
    flat_mask = mask.reshape(-1)
    if kept.size == 0:
        return fill
    index = jnp.clip(jnp.cumsum(flat_mask, dtype=jnp.int32) - 1, 0, kept.size - 1)
    return jnp.where(flat_mask, kept[index], fill)


def array_module(x):
    """``jax.numpy`` for a tracer, ``numpy`` otherwise: export builds containers on the host, and
    ``stored_nbytes`` traces the same code abstractly (``jax.eval_shape``) to count bytes."""
    return jnp if isinstance(x, Tracer) else np


def take_masked(x, mask: np.ndarray) -> jax.Array:
    """The entries of ``x`` where the host ``mask`` is True, in row-major order (1-D)."""
    if isinstance(x, Tracer):
        return jnp.reshape(x, -1)[np.flatnonzero(mask)]
    return jnp.asarray(np.asarray(x).reshape(-1)[mask.reshape(-1)])


def require_on_this_host(who: str, path: str, array: Any, why: str) -> None:
    """Refuses, by name, an array with shards in another process (``jax.distributed``): it cannot be
    read on this host. Called before any work, so nothing is half built or half written.

    Args:
      who: the public function, for the message (``"jaxqp.export"``).
      path: the leaf's path in the user's tree.
      array: any leaf; only a ``jax.Array`` that is not fully addressable is refused.
      why: why ``who`` reads the leaf on this host.
    """
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        raise ValueError(
            f"{who}: '{path}' is sharded across processes (some shards live in another process), and {why}. "
            "Gather the tree first, in every process: params, state = jax.experimental.multihost_utils."
            "process_allgather((params, jaxqp.state_of(opt_state)), tiled=True)")


class Compressed:
    """Base of compressed leaves: each has ``dequantize()`` and ``nbytes``."""

    def dequantize(self) -> jax.Array:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(self))


def is_compressed(x: Any) -> bool:
    return isinstance(x, Compressed)


def dequantize(tree: Any) -> Any:
    """Replaces every compressed leaf in ``tree`` by its float array.

    Args:
      tree: any pytree; its ``QArray``, ``SparseArray``, ``NMArray``, ``Pow2Array``,
        ``Fp8Array`` and serving-kernel leaves are decoded, other leaves pass through.

    Returns:
      The tree with float arrays in place of compressed leaves (works under ``jit``).
    """
    return jax.tree_util.tree_map(lambda x: x.dequantize() if is_compressed(x) else x, tree, is_leaf=is_compressed)


def nbytes(leaf) -> int:
    """Bytes a leaf stores: compressed containers count what they hold."""
    if is_compressed(leaf):
        return leaf.nbytes
    return int(np.asarray(leaf).nbytes) if hasattr(leaf, "dtype") else 0
