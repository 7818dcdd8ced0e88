"""Serving kernels: integer codes in memory, ready to multiply (serving layer, no flax).

A :class:`ServingKernel` (a Dense kernel, ``(out, in)`` codes) or :class:`GeneralKernel`
(an N-D DenseGeneral kernel in its own layout) holds int8 codes, or two 4-bit codes per
byte, plus a float32 scale per output. Each computes its int32 product with int8 codes
(``int_product``, large packed kernels decoded in chunks) and its float product with
float rows; ``_matmul.py`` chooses between them.

Example:
    >>> import jax, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=4))])
    >>> kernel = jaxqp.prepare(jaxqp.export(params, t.init(params)))["w"]
    >>> kernel.codes.dtype, kernel.codes.shape, kernel.dequantize().shape
    (dtype('uint8'), (256, 128), (256, 256))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp

from .._export.compressed import Compressed
from .._specs.paths import path_str
from ..numerics._int_dot import int_dot
from ..numerics._packing import nibble_parts, unpack_nibbles
from ._hooks import current_hook


@dataclasses.dataclass(frozen=True)
class _Int8Codes(Compressed):
    """The fields both int8 serving kernels hold (a private base: adapters dispatch on the subclasses)."""

    codes: jax.Array
    scale: jax.Array
    dtype: str
    pow2: bool = False
    path: str = "auto"
    bits: int = 8
    codes_shape: tuple[int, ...] = ()
    float_weight: jax.Array | None = None

    def int8_codes(self) -> jax.Array:
        """The codes as int8 of ``codes_shape`` (4-bit codes are unpacked, inside jit when traced)."""
        if self.bits == 8:
            return self.codes
        return unpack_nibbles(self.codes, self.codes_shape[-1])

    def parts(self) -> list[tuple[slice, jax.Array]]:
        """The int8 codes in parts along their last axis: ``[(columns, codes)]``.

        One part for int8 codes; two for packed 4-bit codes (the low and the high nibbles,
        columns ``[0, m)`` and ``[m, n)``), each decoded with shifts alone. Multiplying the
        parts separately keeps XLA from fusing the unpacking into the dot, which would
        leave its fast integer GEMM (5-7x slower measured on a 4096-wide layer).
        """
        if self.bits == 8:
            return [(slice(0, self.codes_shape[-1]), self.codes)]
        return nibble_parts(self.codes, self.codes_shape[-1])

    def int_product(self, codes: jax.Array, path: str, n_contract: int = 1) -> jax.Array:
        """int32 ``codes (n, K)`` times the kernel's int8 codes as a ``(K, F)`` matrix, by an integer path."""
        raise NotImplementedError

    def float_product(self, rows: jax.Array, n_contract: int = 1) -> jax.Array:
        """``rows (n, K)`` times the weight decoded from the codes (or the kept float copy)."""
        raise NotImplementedError

    def dequantize(self) -> jax.Array:
        """The weight in its own layout and ``dtype``, decoded from the codes."""
        hook = current_hook()
        return self._decode() if hook is None else hook.decode(self)

    def _decode(self) -> jax.Array:
        raise NotImplementedError

    def matrix_codes(self, n_contract: int = 1) -> jax.Array:
        """The int8 codes as the ``(K, F)`` matrix of the 2-D view (unpacked from 4 bits)."""
        raise NotImplementedError

    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the weight ``dequantize()`` returns."""
        raise NotImplementedError

    def out_scale(self, n_contract: int = 1) -> jax.Array:
        """The float32 scale of each output of the 2-D view."""
        k, f = self.matrix_shape(n_contract)
        return jnp.broadcast_to(self.scale, self.kernel_shape()).reshape(k, f)[0]

    def matrix_shape(self, n_contract: int = 1) -> tuple[int, int]:
        """``(K, F)``: the contracted and the output size of the 2-D view."""
        shape = self.kernel_shape()
        return math.prod(shape[:n_contract]), math.prod(shape[n_contract:])

    @property
    def kind(self) -> str:
        """What a path decision is keyed by besides the shape: storage and a kept float copy."""
        kept = "+float" if self.float_weight is not None else ""
        return f"{type(self).__name__}-int{self.bits}{kept}"


DECODE_CHUNK_BYTES = 2 << 20  # decode packed codes at most this many int8 bytes at a time


def decode_chunks(out: int, n_in: int) -> int:
    """How many chunks of output rows a packed ``(out, n_in)`` kernel is decoded in for a product.

    XLA's CPU scheduler keeps every decoded weight of a jitted model live at once (no buffer
    reuse between concurrently schedulable ops); above ~32 MB the temporary buffer is mapped
    fresh on every call, and its page faults cost more than the matmuls (two 4096-wide int4
    layers at batch 1: 19 ms decoded whole, 4 ms in chunks of 2 MB inside ``lax.map``, whose
    body buffers are allocated once). The chunk count divides ``out`` and keeps a chunk's
    decoded bytes near ``DECODE_CHUNK_BYTES``, with at least 64 rows per chunk.
    """
    wanted = -(-out * n_in // DECODE_CHUNK_BYTES)
    if wanted <= 1:
        return 1
    divisors = [c for c in range(1, out + 1) if out % c == 0 and out // c >= 64] or [1]
    return min(divisors, key=lambda c: (abs(c - wanted), c))


def _register(cls, name: str) -> None:
    jax.tree_util.register_dataclass(cls, data_fields=["codes", "scale", "float_weight"],
                                     meta_fields=["dtype", "pow2", "path", "bits", "codes_shape"])
    jax.export.register_pytree_node_serialization(  # so jax.export can carry prepared trees
        cls,
        serialized_name=name,
        serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
        deserialize_auxdata=lambda raw: tuple(tuple(a) if isinstance(a, list) else a for a in json.loads(raw)),
    )


@dataclasses.dataclass(frozen=True)
class ServingKernel(_Int8Codes):
    """An integer weight in memory, ready for :func:`int8_matmul`.

    Invariants: ``codes`` holds the ``(out, in)`` codes (``codes_shape``) in [-127, 127]:
    int8 when ``bits == 8``, or two 4-bit codes per byte along ``in``
    (``jaxqp.numerics.pack_nibbles``, uint8 ``(out, ceil(in / 2))``) when ``bits == 4``;
    ``scale`` is float32 of shape ``(out,)``, finite and positive; ``dequantize()``
    returns the ``(in, out)`` weight in ``dtype``, equal bit for bit to the QArray it was
    prepared from. ``pow2`` (static): inputs are quantized with power-of-two row scales, as
    ``ActSpec(scale_pow2=True, per_token=True)`` does in training, so a model trained with
    ``ActSpec(integer=True)`` serves bit for bit. ``path`` (static): ``"auto"`` (measure
    the fastest path per row bucket on this machine) or one of ``PATHS`` (pinned).
    ``float_weight``: None, or the dequantized ``(in, out)`` weight kept in memory
    (``prepare(..., keep_float=True)``) for the float path.

    Attributes:
      codes: the ``(out, in)`` codes (int8, or packed 4-bit).
      scale: float32 ``(out,)`` scales.
      dtype: the dtype of the served output.
      pow2: power-of-two input row scales (static).
      path: ``"auto"`` or a pinned path (static).
      bits: 8, or 4 for packed codes (static).
      codes_shape: the ``(out, in)`` shape of the codes (static).
      float_weight: the dequantized weight, or None.
    """

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes_shape[1], self.codes_shape[0])

    def kernel_shape(self) -> tuple[int, ...]:
        return self.shape

    def int_product(self, codes: jax.Array, path: str, n_contract: int = 1) -> jax.Array:
        chunks = decode_chunks(*self.codes_shape) if self.bits == 4 else 1
        if chunks == 1:
            return _parts_product(codes, self.parts(), path)
        out, n_in = self.codes_shape
        packed = self.codes.reshape(chunks, out // chunks, -1)
        ys = jax.lax.map(lambda block: _parts_product(codes, nibble_parts(block, n_in), path), packed)
        return jnp.moveaxis(ys, 0, 1).reshape(codes.shape[0], out)  # (chunks, n, out / chunks) -> (n, out)

    def float_product(self, rows: jax.Array, n_contract: int = 1) -> jax.Array:
        if self.float_weight is not None:
            return rows @ self.float_weight.astype(rows.dtype)
        return rows @ self._decode().astype(rows.dtype)  # one decode fusion, one dot

    def out_scale(self, n_contract: int = 1) -> jax.Array:
        return self.scale

    def _decode(self) -> jax.Array:
        return (self.int8_codes().T.astype(jnp.float32) * self.scale).astype(self.dtype)

    def matrix_codes(self, n_contract: int = 1) -> jax.Array:
        return self.int8_codes().T

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Rows ``indices`` of the ``(in, out)`` weight, decoded: an embedding lookup from codes.

        Args:
          indices: integer indices into the first axis.

        Returns:
          ``(*indices.shape, out)`` in ``dtype``.
        """
        if self.float_weight is not None:
            return jnp.take(self.float_weight, indices, axis=0)
        hook = current_hook()
        if hook is not None:
            return hook.lookup(self, indices)
        rows = jnp.take(self.int8_codes(), indices, axis=1)  # (out, *indices.shape)
        return (jnp.moveaxis(rows, 0, -1).astype(jnp.float32) * self.scale).astype(self.dtype)


_register(ServingKernel, "jaxqp.serving.ServingKernel")


@dataclasses.dataclass(frozen=True)
class GeneralKernel(_Int8Codes):
    """An integer ``nn.DenseGeneral`` kernel of 3 or more axes, for :func:`int8_matmul_general`.

    Invariants: ``codes`` holds the codes in the kernel's own layout
    ``(*contracted, *features)`` (``codes_shape``), int8 or packed 4-bit along the last
    axis as for :class:`ServingKernel`; ``scale`` is float32 of the kernel's rank, size 1
    on every axis but possibly the last, finite and positive; ``dequantize()`` equals the
    QArray it was prepared from bit for bit; ``pow2``, ``path`` and ``float_weight`` as
    for :class:`ServingKernel`.

    Attributes:
      codes: the codes in the kernel's own layout (int8, or packed 4-bit).
      scale: float32 scale of the kernel's rank.
      dtype: as for :class:`ServingKernel` (so are ``pow2``, ``path``, ``bits`` and ``float_weight``).
      codes_shape: the kernel's shape (static).
    """

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes_shape)

    def kernel_shape(self) -> tuple[int, ...]:
        return self.shape

    def _by_parts(self, lhs: jax.Array, n_contract: int, product) -> jax.Array:
        """``product(lhs, part as (K, f), columns)`` for each part, joined along the last feature axis."""
        k, f = self.matrix_shape(n_contract)
        features = self.shape[n_contract:]
        outs = [product(lhs, part.reshape(k, -1), columns).reshape(lhs.shape[0], *features[:-1], -1)
                for columns, part in self.parts()]
        return jnp.concatenate(outs, axis=-1).reshape(lhs.shape[0], f)

    def int_product(self, codes: jax.Array, path: str, n_contract: int = 1) -> jax.Array:
        return self._by_parts(codes, n_contract, lambda lhs, part, _: int_dot(lhs, part, path, 0))

    def float_product(self, rows: jax.Array, n_contract: int = 1) -> jax.Array:
        if self.float_weight is not None:
            return rows @ self.float_weight.reshape(self.matrix_shape(n_contract)).astype(rows.dtype)
        k, _ = self.matrix_shape(n_contract)
        scale = self.scale

        def product(lhs, part, columns):
            part_scale = scale if scale.shape[-1] == 1 else scale[..., columns]
            shape = (*self.shape[:-1], columns.stop - columns.start)
            weight = part.reshape(shape).astype(jnp.float32) * part_scale
            return lhs @ weight.reshape(k, -1).astype(lhs.dtype)

        return self._by_parts(rows, n_contract, product)

    def _decode(self) -> jax.Array:
        return (self.int8_codes().astype(jnp.float32) * self.scale).astype(self.dtype)

    def matrix_codes(self, n_contract: int = 1) -> jax.Array:
        return self.int8_codes().reshape(self.matrix_shape(n_contract))


_register(GeneralKernel, "jaxqp.serving.GeneralKernel")


def _parts_product(codes: jax.Array, parts: list, path: str) -> jax.Array:
    """int32 ``codes (n, K)`` times ``(out, K)`` int8 codes given in column parts."""
    return functools.reduce(jnp.add, [int_dot(codes[:, columns], part, path, 1) for columns, part in parts])


def require_prepared(where: str, tree: Any, fix: str) -> None:
    """Refuses a tree holding a compressed leaf that only :func:`jaxqp.prepare` makes servable.

    An exported but unprepared tree otherwise fails deep inside flax or the model ("Could not
    convert QArray", "'QArray' object is not subscriptable"). The walk reads the tree's
    structure only, so it adds nothing to a traced function.

    Args:
      where: the public function, for the message.
      tree: the tree about to be served or exported.
      fix: what to do instead, for the message.

    Raises:
      ValueError: naming the first such leaf's path and type.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, Compressed))
    for keypath, leaf in leaves:
        if isinstance(leaf, Compressed) and not isinstance(leaf, _Int8Codes):
            raise ValueError(f"{where}: '{path_str(keypath)}' is a {type(leaf).__name__}, not a served kernel; "
                             f"{fix}")
