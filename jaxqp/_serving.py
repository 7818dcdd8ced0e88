"""Serving: integer matmuls on exported weights (export & serving layer, no flax).

:func:`prepare` turns an exported (or loaded) tree into the tree a jitted
forward pass uses:

* a 2-D symmetric QArray of at most 8 bits with one scale per output column (or
  per tensor), of at least ``min_int_size`` entries, becomes a
  :class:`ServingKernel`: int8 codes laid out ``(out, in)``, so that XLA's
  integer ``dot_general`` contracts the last axis of both operands (its fast
  layout on CPU), and a float32 scale per output;
* a 2-D :class:`Pow2Array` of at most 4 bits with one exponent per output column
  becomes the same int8 ServingKernel (its values are ``±2^j``, ``j <= 6``, times
  ``2^emin``: int8 codes with a power-of-two scale, decoding to the same floats);
* every other compressed leaf is decoded to its float array once (the float
  path: never slower than float, because it is float);
* other leaves stay as they are.

:func:`int8_matmul` computes ``x @ W`` for a ServingKernel: each row of ``x`` is
quantized to int8 on the fly (symmetric, absmax per row), multiplied in int8 with
int32 accumulation, and rescaled. Fewer than four rows are padded to four, because
XLA's CPU integer dot is slow for one row and fast for several; above 64 rows, layers
at most 2048 wide compute the same integers with an exact bf16 dot, which is faster
there (``jaxqp._intdot.exact_int_dot``). Relative to ``x @
dequantize(W)`` the only error is the activation rounding, at most half an int8
step of each row's absmax per input (see ``docs/design.md``).

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    >>> y = jaxqp.int8_matmul(jnp.ones((4, 256)), served["w"])
    >>> y.shape
    (4, 256)
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from ._intdot import BF16_MAX_WIDTH, bf16_int_dot, exact_int_dot, padded_rows, pow2_codes, uses_bf16
from ._nm_array import NMArray
from ._qarray import Compressed, QArray, SparseArray
from ._quant import reciprocal
from ._value_arrays import Fp8Array, Pow2Array

MIN_INT_SIZE = 256 * 256
MIN_POW2_EXPONENT = -126  # 2^emin stays a normal float32


@dataclasses.dataclass(frozen=True)
class ServingKernel(Compressed):
    """An int8 weight ready for :func:`int8_matmul`.

    Invariants: ``codes`` is int8 of shape ``(out, in)`` with values in
    [-127, 127]; ``scale`` is float32 of shape ``(out,)``, finite and positive;
    ``dequantize()`` returns the ``(in, out)`` weight in ``dtype``, equal bit for
    bit to the QArray it was prepared from. ``pow2`` (static): inputs are quantized
    with power-of-two row scales, as ``ActSpec(scale_pow2=True, per_token=True)`` does
    in training, so a model trained with ``ActSpec(integer=True)`` serves bit for bit.
    ``carrier``: None, or ``codes`` as bfloat16 (exactly), kept for layers of at most
    ``BF16_MAX_WIDTH`` inputs and outputs, where the exact bf16 dot is faster for many
    rows (see :func:`jaxqp._intdot.bf16_int_dot`); it costs 2 more bytes per weight in
    memory, not in files.
    """

    codes: jax.Array
    scale: jax.Array
    dtype: str
    pow2: bool = False
    carrier: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[1], self.codes.shape[0])

    def dequantize(self) -> jax.Array:
        return (self.codes.T.astype(jnp.float32) * self.scale).astype(self.dtype)


jax.tree_util.register_dataclass(ServingKernel, data_fields=["codes", "scale", "carrier"],
                                 meta_fields=["dtype", "pow2"])
jax.export.register_pytree_node_serialization(  # so jax.export can carry prepared trees
    ServingKernel,
    serialized_name="jaxqp.ServingKernel",
    serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
    deserialize_auxdata=lambda raw: tuple(json.loads(raw)),
)


@dataclasses.dataclass(frozen=True)
class GeneralKernel(Compressed):
    """An int8 ``nn.DenseGeneral`` kernel of 3 or more axes, for :func:`int8_matmul_general`.

    Invariants: ``codes`` is int8 in the kernel's own layout ``(*contracted, *features)``
    with values in [-127, 127]; ``scale`` is float32 of the kernel's rank, size 1 on
    every axis but possibly the last, finite and positive; ``dequantize()`` equals the
    QArray it was prepared from bit for bit; ``carrier`` as for :class:`ServingKernel`.
    """

    codes: jax.Array
    scale: jax.Array
    dtype: str
    pow2: bool = False
    carrier: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> jax.Array:
        return (self.codes.astype(jnp.float32) * self.scale).astype(self.dtype)


jax.tree_util.register_dataclass(GeneralKernel, data_fields=["codes", "scale", "carrier"],
                                 meta_fields=["dtype", "pow2"])
jax.export.register_pytree_node_serialization(
    GeneralKernel,
    serialized_name="jaxqp.GeneralKernel",
    serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
    deserialize_auxdata=lambda raw: tuple(json.loads(raw)),
)


def _servable(q: QArray, min_int_size: int) -> bool:
    per_last_axis = all(d == 1 for d in q.scale.shape[:-1])
    return (len(q.shape) >= 2 and q.zero_point is None and q.bits <= 8 and q.qmin >= -127 and q.group is None
            and per_last_axis and math.prod(q.shape) >= min_int_size)


def _pow2_kernel(leaf: Pow2Array, min_int_size: int, pow2_inputs: bool) -> ServingKernel | None:
    """The int8 ServingKernel of a 2-D Pow2Array of at most 4 bits, or None.

    Codes of at most 4 bits are ``sign(c) 2^(|c|-1)`` in [-64, 64] times ``2^emin``:
    exactly an int8 kernel with a power-of-two scale per output column.
    """
    emin = leaf.emin
    if (len(leaf.shape) != 2 or leaf.bits > 4 or any(d != 1 for d in emin.shape[:-1])
            or math.prod(leaf.shape) < min_int_size):
        return None
    if not isinstance(emin, jax.core.Tracer) and int(jnp.min(emin)) < MIN_POW2_EXPONENT:
        return None  # 2^emin would underflow float32: decode to float instead
    c = leaf.int_codes()
    magnitude = jnp.left_shift(jnp.int32(1), jnp.maximum(jnp.abs(c) - 1, 0))
    codes = jnp.where(c == 0, 0, jnp.sign(c) * magnitude).T.astype(jnp.int8)
    scale = jnp.ldexp(jnp.ones(leaf.shape[1], jnp.float32), jnp.broadcast_to(emin.reshape(-1), (leaf.shape[1],)))
    return ServingKernel(codes, scale, leaf.dtype, pow2_inputs, _carrier(codes))


def _carrier(codes: jax.Array) -> jax.Array | None:
    """The bf16 copy of int8 kernel codes for the bf16 dot path, for layers narrow enough to use it."""
    return codes.astype(jnp.bfloat16) if max(codes.shape) <= BF16_MAX_WIDTH else None


def _prepare_leaf(leaf, min_int_size: int, pow2_inputs: bool, dense_general: bool):
    if isinstance(leaf, Pow2Array):
        kernel = _pow2_kernel(leaf, min_int_size, pow2_inputs)
        return leaf.dequantize() if kernel is None else kernel
    if isinstance(leaf, NMArray) and isinstance(leaf.values, QArray):
        leaf = leaf.dense_qarray()  # the int8 kernel needs every code; N:M saves bytes, not time, on CPU
    if isinstance(leaf, QArray):
        if dense_general and _servable(leaf, min_int_size) and len(leaf.shape) > 2:
            codes = leaf.int_codes().astype(jnp.int8)
            return GeneralKernel(codes, leaf.scale, leaf.dtype, pow2_inputs, _carrier(codes))
        if _servable(leaf, min_int_size) and len(leaf.shape) == 2:
            codes = leaf.int_codes().T.astype(jnp.int8)
            scale = jnp.broadcast_to(leaf.scale.reshape(-1), (leaf.shape[1],)).astype(jnp.float32)
            return ServingKernel(codes, scale, leaf.dtype, pow2_inputs, _carrier(codes))
        return leaf.dequantize()
    if isinstance(leaf, (SparseArray, NMArray, Fp8Array)):
        return leaf.dequantize()
    return leaf


def prepare(tree, min_int_size: int = MIN_INT_SIZE, pow2_inputs: bool = False, dense_general: bool = False):
    """The serving tree of an exported tree (see the module docstring).

    ``pow2_inputs=True`` quantizes inputs with power-of-two row scales: use it for
    models trained with ``ActSpec(bits=8, symmetric=True, per_token=True,
    scale_pow2=True)`` (and ``integer=True``), whose served outputs then equal the
    training forward bit for bit. ``dense_general=True`` also prepares kernels of 3+
    axes as :class:`GeneralKernel` for linen ``nn.DenseGeneral`` layers (attention
    projections); :func:`jaxqp.linen_serving_apply` decodes those that no such layer
    uses (e.g. convolutions) to float at each call, so leave it off for CNNs.
    """
    is_leaf = lambda x: isinstance(x, (QArray, SparseArray, NMArray, Pow2Array, Fp8Array))  # noqa: E731
    return jax.tree_util.tree_map(lambda x: _prepare_leaf(x, min_int_size, pow2_inputs, dense_general), tree,
                                  is_leaf=is_leaf)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of each row of 2-D ``x`` and the float32 scale per row."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) * reciprocal(127)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return codes, scale


def int8_matmul(x: jax.Array, kernel: ServingKernel) -> jax.Array:
    """``x @ W`` over the last axis of ``x``, with int8 activations and weights."""
    n_in = kernel.codes.shape[1]
    if x.shape[-1] != n_in:
        raise ValueError(f"int8_matmul: x has {x.shape[-1]} features, the kernel expects {n_in}")
    rows, n = padded_rows(x, n_in)
    codes, row_scale = pow2_codes(rows, 8, 1) if kernel.pow2 else quantize_rows(rows)
    acc = exact_int_dot(codes, kernel.codes, kernel.carrier)
    y = acc.astype(jnp.float32) * row_scale * kernel.scale
    return y[:n].reshape(*x.shape[:-1], kernel.codes.shape[0]).astype(x.dtype)


def int8_matmul_general(x: jax.Array, kernel: GeneralKernel, n_contract: int) -> jax.Array:
    """``x`` contracted over its last ``n_contract`` axes with the kernel's leading ones, in int8.

    The kernel's codes are read as a ``(K, F)`` matrix (a free reshape of its own layout):
    each row of ``x`` is quantized like :func:`int8_matmul`'s, the int32 result rescaled by
    the row scale and the kernel's scale, and reshaped to ``(..., *features)``.
    """
    contracted, features = kernel.shape[:n_contract], kernel.shape[n_contract:]
    if tuple(x.shape[x.ndim - n_contract:]) != contracted:
        raise ValueError(f"int8_matmul_general: x's last axes {x.shape[x.ndim - n_contract:]} do not match "
                         f"the kernel's contracted axes {contracted}")
    k, f = math.prod(contracted), math.prod(features)
    rows, n = padded_rows(x, k)
    codes, row_scale = pow2_codes(rows, 8, 1) if kernel.pow2 else quantize_rows(rows)
    if kernel.carrier is not None and uses_bf16(rows.shape[0], k, f):
        acc = bf16_int_dot(codes, kernel.carrier.reshape(k, f), carrier_in_axis=0)
    else:
        acc = jax.lax.dot_general(codes, kernel.codes.reshape(k, f), (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
    scale = jnp.broadcast_to(kernel.scale, kernel.shape).reshape(k, f)[0]
    y = acc.astype(jnp.float32) * row_scale * scale
    return y[:n].reshape(*x.shape[:x.ndim - n_contract], *features).astype(x.dtype)


def export_serving(apply_fn, *example_args) -> bytes:
    """Serializes ``jax.jit(apply_fn)`` for these argument shapes as StableHLO (``jax.export``).

    ``example_args`` may be arrays, prepared trees or ``jax.ShapeDtypeStruct``s; only
    their shapes and dtypes are recorded. Run the result with :func:`load_serving`.

    >>> import jax, jax.numpy as jnp, jaxqp
    >>> blob = jaxqp.export_serving(lambda x: 2 * x, jnp.ones(3))
    >>> jaxqp.load_serving(blob)(jnp.ones(3))
    Array([2., 2., 2.], dtype=float32)
    """
    specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example_args)
    return bytes(jax.export.export(jax.jit(apply_fn))(*specs).serialize())


def load_serving(blob: bytes):
    """The function serialized by :func:`export_serving`, ready to call (it runs compiled)."""
    return jax.export.deserialize(bytearray(blob)).call
