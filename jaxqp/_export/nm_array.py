"""``NMArray``: N:M-sparse tensors stored as kept values plus their positions (export layer).

In every group of ``m`` consecutive entries along ``axis``, only ``n`` values are
stored, with the position (``0 .. m-1``) of each inside its group packed in
``ceil(log2 m)``-bit slots. The values form a dense tensor whose ``axis`` is
``ceil(length / m) * n`` long, so they can be a plain array or a :class:`QArray`
(a 2:4 int8 kernel stores half its int8 codes, its scales and 2 bits per kept
code). For 1:4 or 2:8 the positions take fewer bytes than a bitmask would.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[0.0, 3.0], [2.0, 0.0], [0.0, -1.0], [5.0, 0.0]])  # 2:4 along axis 0
    >>> s = NMArray.from_dense(w, w != 0, n=2, m=4, axis=0)
    >>> s.values
    Array([[ 2.,  3.],
           [ 5., -1.]], dtype=float32)
    >>> bool((s.dequantize() == w).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._packing import container_width, pack, packed_size, unpack
from .compressed import Compressed, array_module
from .qarray import QArray

MAX_M = 256  # positions must fit a uint8 slot


def index_bits(m: int) -> int:
    """Bits a position in a group of ``m`` needs: ``ceil(log2 m)``, at least 1."""
    return max(1, math.ceil(math.log2(m)))


def index_width(m: int) -> int:
    """Bits of storage per kept position in groups of ``m``: ``index_bits(m)``, 1 to 8."""
    return container_width(index_bits(m))


def _grouped(a, m: int, axis: int, fill) -> Any:
    """``a`` with ``axis`` moved last, padded with ``fill`` to groups of ``m``: shape (..., G, m)."""
    xp = array_module(a)
    a = xp.moveaxis(a if xp is jnp else np.asarray(a), axis, -1)
    groups = -(-a.shape[-1] // m)
    pad = [(0, 0)] * (a.ndim - 1) + [(0, groups * m - a.shape[-1])]
    return xp.pad(a, pad, constant_values=fill).reshape(*a.shape[:-1], groups, m)


def nm_positions(mask, n: int, m: int, axis: int) -> np.ndarray | None:
    """Positions ``(..., G, n)`` of the kept entries of each group, or None if a group keeps more than ``n``.

    Groups keeping fewer than ``n`` (e.g. a short last group) are completed with
    pruned positions, whose stored value is then zero.
    """
    grouped = _grouped(np.asarray(mask, bool), m, axis, False)
    if grouped.sum(axis=-1).max(initial=0) > n:
        return None
    # kept positions first (in order), then pruned ones: a stable sort on "not kept"
    order = np.argsort(~grouped, axis=-1, kind="stable")[..., :n]
    return np.sort(order, axis=-1).astype(np.uint8)


def _gather(a, positions: np.ndarray, m: int, axis: int):
    xp = array_module(a)
    grouped = _grouped(a, m, axis, 0)
    kept: Any = xp.take_along_axis(grouped, positions.astype(np.int64), axis=-1)
    return xp.moveaxis(kept.reshape(*kept.shape[:-2], -1), -1, axis)


@dataclasses.dataclass(frozen=True)
class NMArray(Compressed):
    """An N:M-sparse tensor: kept ``values`` and the packed ``index`` of their positions.

    Invariants (checked by :meth:`validate`):

    * ``axis`` is non-negative; ``G = ceil(shape[axis] / m)`` groups lie along it;
    * ``values`` (an array, or a :class:`QArray` whose own invariants hold) has
      ``shape`` with ``shape[axis]`` replaced by ``G * n``: along ``axis``, the
      ``n`` kept entries of group 0, then of group 1, ...;
    * ``index`` is uint8 holding, packed in :func:`index_width` ``(m)``-bit slots
      in the row-major order of the values moved to ``axis`` last, each value's
      position in its group, strictly increasing within a group and below ``m``;
    * entries at positions not stored are exactly 0.0 (stored slots past the end
      of a short last group are ignored).

    Attributes:
      values: the kept values (an array or a :class:`QArray`).
      index: the packed positions of the kept values in their groups (uint8).
      shape: the dense shape.
      n: entries kept per group.
      m: the group length.
      axis: the axis groups run along (non-negative).
    """

    values: jax.Array | QArray
    index: jax.Array
    shape: tuple[int, ...]
    n: int
    m: int
    axis: int

    @classmethod
    def from_dense(cls, x, mask, n: int, m: int, axis: int) -> NMArray | None:
        """Stores float ``x`` under an N:M ``mask``; None if some group keeps more than ``n``."""
        axis = axis % np.ndim(x)
        positions = nm_positions(mask, n, m, axis) if m <= MAX_M else None
        if positions is None:
            return None
        xp = array_module(x)
        x = xp.where(np.asarray(mask, bool), x if xp is jnp else np.asarray(x), 0)
        values = jnp.asarray(_gather(x, positions, m, axis))
        return cls(values, cls._pack(positions, m), tuple(np.shape(x)), int(n), int(m), int(axis))

    @classmethod
    def from_codes(cls, codes, mask, n: int, m: int, axis: int, build) -> NMArray | None:
        """N:M storage of integer ``codes`` (pruned ones: the zero point) as the QArray ``build(kept_codes)``."""
        axis = axis % np.ndim(codes)
        positions = nm_positions(mask, n, m, axis) if m <= MAX_M else None
        if positions is None:
            return None
        xp = array_module(codes)
        values = build(jnp.asarray(_gather(codes if xp is jnp else np.asarray(codes), positions, m, axis)))
        return cls(values, cls._pack(positions, m), tuple(np.shape(codes)), int(n), int(m), int(axis))

    @staticmethod
    def _pack(positions: np.ndarray, m: int) -> jax.Array:
        width = index_width(m)
        flat = jnp.asarray(positions.reshape(-1))
        return flat.astype(jnp.uint8) if width == 8 else pack(flat, width)

    def positions(self) -> jax.Array:
        """Each kept value's position in its group, int32 ``(..., G, n)`` with ``axis`` moved last."""
        groups = -(-self.shape[self.axis] // self.m)
        lead = tuple(d for i, d in enumerate(self.shape) if i != self.axis)
        count = math.prod(lead) * groups * self.n
        width = index_width(self.m)
        flat = self.index.reshape(-1)[:count] if width == 8 else unpack(self.index, width, count)
        return flat.astype(jnp.int32).reshape(*lead, groups, self.n)

    def _scatter(self, compact: jax.Array, fill) -> jax.Array:
        """The dense tensor of ``shape``: ``compact``'s entries at their positions, ``fill`` elsewhere."""
        positions = self.positions()
        kept = jnp.moveaxis(compact, self.axis, -1).reshape(positions.shape)
        hit = positions[..., None, :] == jnp.arange(self.m)[:, None]  # (..., G, m, n)
        slot = jnp.argmax(hit, axis=-1)
        dense = jnp.where(jnp.any(hit, axis=-1), jnp.take_along_axis(kept, slot, axis=-1), fill)
        dense = dense.reshape(*dense.shape[:-2], -1)[..., :self.shape[self.axis]]
        return jnp.moveaxis(dense, -1, self.axis)

    def dequantize(self) -> jax.Array:
        values = self.values.dequantize() if isinstance(self.values, QArray) else self.values
        return self._scatter(values, jnp.zeros((), values.dtype))

    def dense_qarray(self) -> QArray:
        """The dense :class:`QArray` of a quantized NMArray (pruned entries hold the zero point)."""
        v = self.values
        if not isinstance(v, QArray):
            raise TypeError("NMArray.dense_qarray: the values are not quantized")
        codes = self._scatter(v.int_codes(), 0)
        build = lambda c: QArray.from_codes(
            c, v.scale, v.zero_point, v.bits, v.qmin, v.qmax, v.dtype, group=self._dense_group())
        dense = build(codes)
        if v.zero_point is None:
            return dense
        kept = self._scatter(jnp.ones(v.shape, bool), False)
        return build(jnp.where(kept, codes, jnp.broadcast_to(dense._expanded(v.zero_point), self.shape)))

    def _dense_group(self):
        if not isinstance(self.values, QArray):
            return None
        group = self.values.group
        if group is None or group[0] != self.axis:
            return group
        return (group[0], group[1] * self.m // self.n)

    def validate(self) -> NMArray:
        """Checks the invariants above; raises ValueError naming the broken one."""
        if not (0 <= self.axis < len(self.shape)) or not (1 <= self.n < self.m <= MAX_M):
            raise ValueError(f"NMArray: bad static fields n={self.n}, m={self.m}, axis={self.axis} for {self.shape}")
        groups = -(-self.shape[self.axis] // self.m)
        want = tuple(groups * self.n if i == self.axis else d for i, d in enumerate(self.shape))
        if tuple(self.values.shape) != want:
            raise ValueError(f"NMArray: values have shape {tuple(self.values.shape)}, expected {want}")
        if isinstance(self.values, QArray):
            self.values.validate()
        count = math.prod(want)
        width = index_width(self.m)
        if self.index.dtype != jnp.uint8 or self.index.size != (count if width == 8 else packed_size(count, width)):
            raise ValueError(f"NMArray: index must be uint8 holding {count} positions of {width} bits")
        positions = np.asarray(self.positions())
        if positions.size and (positions.max() >= self.m or np.any(np.diff(positions, axis=-1) <= 0)):
            raise ValueError(f"NMArray: positions must be below m={self.m} and increasing within a group")
        return self


jax.tree_util.register_dataclass(NMArray, data_fields=["values", "index"], meta_fields=["shape", "n", "m", "axis"])
