"""Packing small integers several per byte (numerics layer: jax only).

Codes of ``width`` bits (1 to 7) are stored as a little-endian bitstream over the
flattened array: code ``i`` occupies bits ``i * width`` to ``(i + 1) * width - 1``,
bit ``j`` of the stream being bit ``j % 8`` of byte ``j // 8``; the tail is padded
with zeros. For widths 1, 2 and 4 that is ``8 // width`` codes per byte, the first
in the lowest bits; a 3-bit code may straddle two bytes. Widths 8 and 16 are
stored as they are. :func:`container_width` is the storage width of a bit width:
the bit width itself up to 8, then 16.

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

PACKED_WIDTHS = (1, 2, 3, 4, 5, 6, 7)


def container_width(bits: int) -> int:
    """Storage width for ``bits``-bit codes: ``bits`` itself for 1-8 bits, 16 for 9-16."""
    if 1 <= bits <= 8:
        return bits
    if bits <= 16:
        return 16
    raise ValueError(f"bits={bits}: at most 16 bits can be stored")


def packed_size(size: int, width: int) -> int:
    """Number of uint8 bytes that hold ``size`` codes of ``width`` bits."""
    return -(-size * width // 8)


def _check_width(width: int) -> None:
    if width not in PACKED_WIDTHS:
        raise ValueError(f"width={width}: packing handles widths {PACKED_WIDTHS}")


def pack(codes: jax.Array, width: int) -> jax.Array:
    """Packs unsigned ``codes`` (each < 2**width) into a flat uint8 array.

    Args:
      codes: unsigned codes.
      width: bits per code, 1 to 8.

    Returns:
      The packed bytes (little-endian bitstream).
    """
    _check_width(width)
    flat = jnp.ravel(codes).astype(jnp.uint8)
    if 8 % width:  # codes straddle bytes: go through the bitstream
        bits = (flat[:, None] >> jnp.arange(width, dtype=jnp.uint8)) & jnp.uint8(1)
        return jnp.packbits(bits.reshape(-1), bitorder="little")
    per_byte = 8 // width
    flat = jnp.pad(flat, (0, packed_size(flat.size, width) * per_byte - flat.size))
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(width))
    groups = flat.reshape(-1, per_byte) << shifts
    return jnp.sum(groups, axis=1, dtype=jnp.uint8)  # disjoint bits: the sum is the bitwise or


def unpack(packed: jax.Array, width: int, size: int) -> jax.Array:
    """The first ``size`` codes of ``packed``, as a flat uint8 array.

    Args:
      packed: bytes from :func:`pack`.
      width: bits per code.
      size: the number of codes.

    Returns:
      The codes.
    """
    _check_width(width)
    if 8 % width:
        bits = jnp.unpackbits(packed, count=size * width, bitorder="little").reshape(size, width)
        return jnp.sum(bits << jnp.arange(width, dtype=jnp.uint8), axis=1, dtype=jnp.uint8)
    per_byte = 8 // width
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(width)
    codes = (packed[:, None] >> shifts) & jnp.uint8(2**width - 1)
    return codes.reshape(-1)[:size]


def pack_mask(mask: jax.Array) -> jax.Array:
    """A boolean mask as packed bits (8 entries per byte).

    Args:
      mask: a boolean mask.

    Returns:
      The packed bits, uint8.
    """
    return pack(mask.astype(jnp.uint8), 1)


def unpack_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The boolean mask of ``shape`` stored by :func:`pack_mask`.

    Args:
      packed: bytes from :func:`pack_mask`.
      shape: the mask's shape.

    Returns:
      The mask.
    """
    size = 1
    for d in shape:
        size *= d
    return unpack(packed, 1, size).astype(bool).reshape(shape)


def pack_mask_rows(mask: jax.Array) -> jax.Array:
    """A boolean mask packed 8 entries per byte along its first axis: ``(ceil(d0 / 8), *rest)`` uint8.

    Bit ``j`` of byte ``i`` is row ``8 i + j``. Packing along the first axis keeps the other
    axes as they are, so a mask packed this way can be sharded like its parameter (along
    either axis of a kernel). A scalar mask becomes one byte.

    Args:
      mask: a boolean array.

    Returns:
      The packed uint8 array.

    Example:
      >>> import jax.numpy as jnp
      >>> pack_mask_rows(jnp.array([True, False, True]))
      Array([5], dtype=uint8)
    """
    mask = jnp.reshape(mask, (1,)) if mask.ndim == 0 else mask
    rows = mask.shape[0]
    padded = jnp.pad(mask, [(0, -rows % 8)] + [(0, 0)] * (mask.ndim - 1))
    groups = padded.reshape(-1, 8, *mask.shape[1:]).astype(jnp.uint8)
    shifts = jnp.arange(8, dtype=jnp.uint8).reshape(1, 8, *([1] * (mask.ndim - 1)))
    return jnp.sum(groups << shifts, axis=1, dtype=jnp.uint8)  # disjoint bits: the sum is the bitwise or


def unpack_mask_rows(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The boolean mask of ``shape`` that :func:`pack_mask_rows` packed.

    Args:
      packed: the uint8 array.
      shape: the mask's shape.

    Returns:
      The boolean mask.
    """
    shifts = jnp.arange(8, dtype=jnp.uint8).reshape(1, 8, *([1] * (packed.ndim - 1)))
    bits = (packed[:, None] >> shifts) & jnp.uint8(1)
    rows = bits.reshape(-1, *packed.shape[1:])[: shape[0] if shape else 1]
    return rows.astype(bool).reshape(shape)


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Signed 4-bit ``codes`` (in [-8, 7]) two per byte along the last axis, in two halves.

    Unlike :func:`pack` (one bitstream over the flattened array) every row along the last
    axis is packed on its own, so a matrix stays a matrix: ``(..., n)`` becomes
    ``(..., m)`` uint8 with ``m = ceil(n / 2)``; byte ``j`` holds code ``j`` in its low
    bits and code ``m + j`` in its high bits. Halves, not neighbours, share a byte so that
    :func:`unpack_nibbles` is two shifts and a concatenation, which XLA runs at memory
    speed (an interleaved layout unpacks 3x slower on CPU).

    Args:
      codes: integer codes in [-8, 7].

    Returns:
      The packed uint8 array.
    """
    codes = jnp.asarray(codes).astype(jnp.int8)
    m = -(-codes.shape[-1] // 2)
    if codes.shape[-1] % 2:
        codes = jnp.concatenate([codes, jnp.zeros((*codes.shape[:-1], 1), jnp.int8)], axis=-1)
    low = codes[..., :m].astype(jnp.uint8) & jnp.uint8(15)
    high = codes[..., m:].astype(jnp.uint8) << jnp.uint8(4)
    return low | high


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """The int8 codes of :func:`pack_nibbles`: ``(..., n)`` from ``(..., ceil(n / 2))`` bytes.

    Args:
      packed: bytes from :func:`pack_nibbles`.
      n: the length of the last axis.

    Returns:
      int8 codes in [-8, 7].
    """
    signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
    low = jnp.left_shift(signed, jnp.int8(4)) >> jnp.int8(4)  # arithmetic shifts keep the sign
    high = signed >> jnp.int8(4)
    return jnp.concatenate([low, high], axis=-1)[..., :n]


def nibble_parts(packed: jax.Array, n: int) -> list[tuple[slice, jax.Array]]:
    """The two int8 parts of 4-bit codes packed in halves along the last axis (``n`` codes).

    Args:
      packed: uint8 codes, two per byte (``jaxqp.numerics.pack_nibbles``).
      n: the number of codes along the last axis.

    Returns:
      ``[(slice(0, m), low nibbles), (slice(m, n), high nibbles)]`` with ``m = ceil(n / 2)``.
    """
    m = -(-n // 2)
    signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
    low = jnp.left_shift(signed, jnp.int8(4)) >> jnp.int8(4)
    high = (signed >> jnp.int8(4))[..., :n - m]
    return [(slice(0, m), low), (slice(m, n), high)]
