"""``SparseArray``: a float tensor stored as a packed bitmask plus its kept values (export layer).

Example:
    >>> import jax.numpy as jnp
    >>> leaf = SparseArray.from_dense(jnp.array([[0.0, 1.5], [0.0, 0.0]]), jnp.array([[False, True], [False, False]]))
    >>> leaf.values, leaf.dequantize()
    (Array([1.5], dtype=float32), Array([[0. , 1.5],
           [0. , 0. ]], dtype=float32))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._packing import pack_mask, unpack_mask
from .compressed import Compressed, scatter, size_of, take_masked


@dataclasses.dataclass(frozen=True)
class SparseArray(Compressed):
    """A float tensor stored as a packed bitmask plus its kept values in row-major order.

    Invariants: ``bitmask`` holds ``shape``'s mask as packed bits (8 per byte);
    ``values`` is 1-D with one entry per set bit; pruned entries are exactly 0.0.

    Attributes:
      values: the kept values, 1-D, in row-major order.
      bitmask: the mask as packed bits (uint8).
      shape: the dense shape.
    """

    values: jax.Array
    bitmask: jax.Array
    shape: tuple[int, ...]

    @classmethod
    def from_dense(cls, x, mask) -> SparseArray:
        mask = np.asarray(mask, bool)
        values = take_masked(x, mask)
        return cls(values, pack_mask(jnp.asarray(mask)), tuple(np.shape(x)))

    def dequantize(self) -> jax.Array:
        mask = unpack_mask(self.bitmask, self.shape)
        fill = jnp.zeros(size_of(self.shape), self.values.dtype)
        return scatter(mask, self.values, fill).reshape(self.shape)

    def validate(self) -> SparseArray:
        if self.bitmask.dtype != jnp.uint8 or self.bitmask.size != -(-size_of(self.shape) // 8):
            raise ValueError(f"SparseArray: bitmask must be uint8 holding {size_of(self.shape)} bits")
        kept = int(np.count_nonzero(np.asarray(unpack_mask(self.bitmask, self.shape))))
        if self.values.ndim != 1 or self.values.size != kept:
            raise ValueError(f"SparseArray: {self.values.size} values stored for {kept} kept entries")
        return self


jax.tree_util.register_dataclass(SparseArray, data_fields=["values", "bitmask"], meta_fields=["shape"])
