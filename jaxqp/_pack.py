"""Packing small integers several per byte (numerics layer: jax only).

Codes of ``width`` bits (1, 2 or 4) are stored ``8 // width`` per uint8, the first
code in the lowest bits, over the flattened array; the tail is padded with
zeros. Widths 8 and 16 are stored as they are. :func:`container_width` picks the
smallest storage width for a bit width: 3-bit codes use 4-bit slots.

Example:
    >>> import jax.numpy as jnp
    >>> packed = pack(jnp.array([1, 2, 3, 0, 1], jnp.uint8), width=2)
    >>> packed
    Array([57,  1], dtype=uint8)
    >>> unpack(packed, width=2, size=5)
    Array([1, 2, 3, 0, 1], dtype=uint8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PACKED_WIDTHS = (1, 2, 4)


def container_width(bits: int) -> int:
    """Storage width for ``bits``-bit codes: 1, 2, 4, 8 or 16."""
    for width in (1, 2, 4, 8, 16):
        if bits <= width:
            return width
    raise ValueError(f"bits={bits}: at most 16 bits can be stored")


def packed_size(size: int, width: int) -> int:
    """Number of uint8 bytes that hold ``size`` codes of ``width`` bits."""
    per_byte = 8 // width
    return -(-size // per_byte)


def pack(codes: jax.Array, width: int) -> jax.Array:
    """Packs unsigned ``codes`` (each < 2**width) into a flat uint8 array."""
    if width not in PACKED_WIDTHS:
        raise ValueError(f"width={width}: pack handles widths {PACKED_WIDTHS}")
    per_byte = 8 // width
    flat = jnp.ravel(codes).astype(jnp.uint8)
    flat = jnp.pad(flat, (0, packed_size(flat.size, width) * per_byte - flat.size))
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(width))
    groups = flat.reshape(-1, per_byte) << shifts
    return jnp.sum(groups, axis=1, dtype=jnp.uint8)  # disjoint bits: the sum is the bitwise or


def unpack(packed: jax.Array, width: int, size: int) -> jax.Array:
    """The first ``size`` codes of ``packed``, as a flat uint8 array."""
    if width not in PACKED_WIDTHS:
        raise ValueError(f"width={width}: unpack handles widths {PACKED_WIDTHS}")
    per_byte = 8 // width
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(width)
    codes = (packed[:, None] >> shifts) & jnp.uint8(2**width - 1)
    return codes.reshape(-1)[:size]


def pack_mask(mask: jax.Array) -> jax.Array:
    """A boolean mask as packed bits (8 entries per byte)."""
    return pack(mask.astype(jnp.uint8), 1)


def unpack_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The boolean mask of ``shape`` stored by :func:`pack_mask`."""
    size = 1
    for d in shape:
        size *= d
    return unpack(packed, 1, size).astype(bool).reshape(shape)
