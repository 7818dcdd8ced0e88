"""``QArray``: integer codes (packed at their bit width) plus scales (export layer).

It is a pytree (registered dataclasses): their arrays are leaves, its shape,
dtype and bit width are static, so a jitted function taking them compiles once
per layout. ``dequantize`` turns it (or a whole tree of them) back into float
arrays, under jit or not.

Example:
    >>> import jax.numpy as jnp
    >>> q = QArray.from_codes(jnp.array([[-127, 0], [64, 127]], jnp.int32),
    ...                       scale=jnp.array([[0.5, 0.25]]), zero_point=None,
    ...                       bits=8, qmin=-127, qmax=127, dtype="float32")
    >>> q.dequantize()
    Array([[-63.5 ,   0.  ],
           [ 32.  ,  31.75]], dtype=float32)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._packing import container_width, pack, pack_mask, packed_size, unpack, unpack_mask
from .compressed import Compressed, scatter, size_of, take_masked


def _store_codes(codes: jax.Array, bits: int, qmin: int) -> jax.Array:
    """Flat or shaped integer codes in the container of ``bits``."""
    width = container_width(bits)
    if width < 8:
        return pack((codes - qmin).astype(jnp.uint8), width)
    return codes.astype(jnp.int8 if width == 8 else jnp.int16)


def _load_codes(stored: jax.Array, bits: int, qmin: int, count: int) -> jax.Array:
    """The first ``count`` codes as a flat int32 array."""
    width = container_width(bits)
    if width < 8:
        return unpack(stored, width, count).astype(jnp.int32) + qmin
    return stored.reshape(-1).astype(jnp.int32)


def _stored_codes_in_range(stored: np.ndarray, width: int, count: int, qmin: int, qmax: int) -> bool:
    """Whether the first ``count`` stored codes lie in ``[qmin, qmax]``, checked on the stored bytes in numpy.

    Packed codes are ``code - qmin`` in ``width``-bit slots; where every slot pattern is a
    valid code there is nothing to check. Equivalent to checking ``int_codes()``, without
    unpacking millions of codes through JAX (what made loading a 4096-wide int4 layer slow).
    """
    if width >= 8:
        flat = stored.reshape(-1)[:count]
        return flat.size == 0 or (int(flat.min()) >= qmin and int(flat.max()) <= qmax)
    top, slot = qmax - qmin, (1 << width) - 1
    if top >= slot:
        return True
    if 8 % width == 0:  # whole slots per byte; padding slots hold 0, a valid code
        return all(int(((stored >> (k * width)) & slot).max(initial=0)) <= top for k in range(8 // width))
    bits = np.unpackbits(stored, bitorder="little")[: count * width].reshape(count, width)
    return int((bits.astype(np.int32) @ (1 << np.arange(width, dtype=np.int32))).max(initial=0)) <= top


@dataclasses.dataclass(frozen=True)
class QArray(Compressed):
    """An integer-quantized tensor: ``dequantize(q) = (codes - zero_point) * scale``.

    Invariants (checked by :meth:`validate`):

    * every code lies in ``[qmin, qmax]``;
    * ``codes`` is stored in the container of ``bits`` (see ``jaxqp.numerics.pack``):
      int8 for 8 bits, int16 for 9-16 bits, and for 1-7 bits ``code - qmin``
      packed at ``bits`` bits each (a little-endian bitstream over the flattened
      tensor, see ``jaxqp.numerics.pack``);
    * if ``bitmask`` is not None (sparse storage), it holds ``shape``'s mask as
      packed bits and ``codes`` holds only the kept entries, in row-major order;
      pruned entries decode to ``zero_point``, i.e. to exactly 0.0;
    * ``scale`` is float32, finite and positive, with ``shape``'s rank and size 1
      on every axis that shares a scale; with ``group = (axis, size)`` it holds
      ``ceil(shape[axis] / size)`` entries along ``axis``, one per block of ``size``
      (the last block may be shorter), repeated over the block to dequantize;
    * ``zero_point`` is None (symmetric) or int32 of ``scale``'s shape, in range;
    * ``kept`` (static) is the number of stored codes: the size, unless sparse;
    * ``dtype`` is the float dtype :func:`dequantize` returns.

    Attributes:
      codes: the stored codes (int8, int16, or packed uint8 for 1-7 bits).
      scale: float32 scale, of the tensor's rank (per channel or per group).
      zero_point: int32 zero point like ``scale``, or None (symmetric).
      bitmask: packed mask of kept entries when only they are stored, else None.
      shape: the dense shape.
      dtype: the dtype of the decoded weight.
      bits: the code width.
      qmin: the smallest code.
      qmax: the largest code.
      kept: the number of stored codes.
      group: ``(axis, size)`` for per-group scales, else None.
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    bitmask: jax.Array | None
    shape: tuple[int, ...]
    dtype: str
    bits: int
    qmin: int
    qmax: int
    kept: int
    group: tuple[int, int] | None = None

    @classmethod
    def from_codes(cls, codes, scale, zero_point, bits, qmin, qmax, dtype, mask=None, group=None) -> QArray:
        """Builds a QArray from dense integer ``codes``; with ``mask``, stores only kept codes."""
        codes = jnp.asarray(codes)
        shape = tuple(codes.shape)
        bitmask, kept = None, size_of(shape)
        if mask is not None:
            mask = np.asarray(mask, bool)
            codes = take_masked(codes, mask)
            bitmask, kept = pack_mask(jnp.asarray(mask)), int(mask.sum())
        zp = None if zero_point is None else jnp.asarray(zero_point).astype(jnp.int32)
        group = None if group is None else (int(group[0]), int(group[1]))
        return cls(_store_codes(codes, bits, qmin), jnp.asarray(scale, jnp.float32), zp, bitmask,
                   shape, str(jnp.dtype(dtype)), int(bits), int(qmin), int(qmax), kept, group)

    def _expanded(self, a: jax.Array) -> jax.Array:
        """A per-group ``a`` (scale or zero point) repeated to one entry per weight along the group axis."""
        if self.group is None:
            return a
        axis, size = self.group
        return jax.lax.slice_in_dim(jnp.repeat(a, size, axis=axis), 0, self.shape[axis], axis=axis)

    def int_codes(self) -> jax.Array:
        """The dense integer codes, int32 of ``shape``."""
        if self.bitmask is None:
            return _load_codes(self.codes, self.bits, self.qmin, size_of(self.shape)).reshape(self.shape)
        mask = unpack_mask(self.bitmask, self.shape)
        kept = _load_codes(self.codes, self.bits, self.qmin, self.kept)
        zp = jnp.zeros(self.shape, jnp.int32) if self.zero_point is None else jnp.broadcast_to(
            self._expanded(self.zero_point), self.shape)
        return scatter(mask, kept, zp.reshape(-1)).reshape(self.shape)

    def dequantize(self) -> jax.Array:
        """``(codes - zero_point) * scale`` in float32, cast to ``dtype``."""
        q = self.int_codes().astype(jnp.float32)
        if self.zero_point is not None:
            q = q - self._expanded(self.zero_point).astype(jnp.float32)
        return (q * self._expanded(self.scale)).astype(self.dtype)

    def validate(self) -> QArray:
        """Checks the invariants above; raises ValueError naming the broken one."""
        width = container_width(self.bits)
        want = jnp.uint8 if width < 8 else (jnp.int8 if width == 8 else jnp.int16)
        if self.codes.dtype != want:
            raise ValueError(
                f"QArray: {self.bits}-bit codes must be stored as {jnp.dtype(want)}, got {self.codes.dtype}"
            )
        if self.scale.dtype != jnp.float32 or self.scale.ndim != len(self.shape):
            raise ValueError(
                f"QArray: scale must be float32 of rank {len(self.shape)}, got {self.scale.dtype}{self.scale.shape}"
            )
        for axis, (s, d) in enumerate(zip(self.scale.shape, self.shape)):
            if self.group is not None and axis == self.group[0]:
                d = -(-d // self.group[1])
            if s not in (1, d):
                raise ValueError(f"QArray: scale shape {self.scale.shape} does not broadcast to {self.shape}")
        scale = np.asarray(self.scale)
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("QArray: scale must be finite and positive")
        if self.bitmask is not None and self.bitmask.size != -(-size_of(self.shape) // 8):
            raise ValueError(f"QArray: bitmask must hold {size_of(self.shape)} bits")
        want_size = self.kept if width >= 8 else packed_size(self.kept, width)
        if self.codes.size != want_size:
            raise ValueError(f"QArray: {self.codes.size} stored codes do not hold {self.kept} entries")
        if self.bitmask is not None:
            in_mask = int(np.count_nonzero(np.asarray(unpack_mask(self.bitmask, self.shape))))
            if in_mask != self.kept:
                raise ValueError(f"QArray: bitmask keeps {in_mask} entries but {self.kept} codes are stored")
        if not _stored_codes_in_range(np.asarray(self.codes), width, self.kept, self.qmin, self.qmax):
            raise ValueError(f"QArray: codes outside [{self.qmin}, {self.qmax}]")
        if self.zero_point is not None:
            zp = np.asarray(self.zero_point)
            if zp.dtype != np.int32 or zp.shape != self.scale.shape or zp.min() < self.qmin or zp.max() > self.qmax:
                raise ValueError("QArray: zero_point must be int32 of scale's shape, inside [qmin, qmax]")
        return self


jax.tree_util.register_dataclass(
    QArray, data_fields=["codes", "scale", "zero_point", "bitmask"],
    meta_fields=["shape", "dtype", "bits", "qmin", "qmax", "kept", "group"])
