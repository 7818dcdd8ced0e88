"""Serving kernels and the int8 matmuls that use them (serving layer, no flax).

:func:`int8_matmul` computes ``x @ W`` for a ServingKernel: each row of ``x`` is
quantized to int8 on the fly (symmetric, absmax per row), multiplied in int8 with
int32 accumulation, and rescaled. Fewer than four rows are padded to four, because
XLA's CPU integer dot is slow for one row and fast for several; above 64 rows, layers
at most 2048 wide compute the same integers with an exact bf16 dot, which is faster
there (``jaxqp.numerics.exact_int_dot``). Relative to ``x @
dequantize(W)`` the only error is the activation rounding, at most half an int8
step of each row's absmax per input (see ``docs/design.md``).

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    >>> y = jaxqp.serving.int8_matmul(jnp.ones((4, 256)), served["w"])
    >>> y.shape
    (4, 256)
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp

from .._export.compressed import Compressed
from ..numerics._int_dot import bf16_int_dot, exact_int_dot, padded_rows, pow2_codes, uses_bf16
from ..numerics._linear import reciprocal


@dataclasses.dataclass(frozen=True)
class _Int8Codes(Compressed):
    """The fields both int8 serving kernels hold (a private base: adapters dispatch on the subclasses)."""

    codes: jax.Array
    scale: jax.Array
    dtype: str
    pow2: bool = False
    carrier: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ServingKernel(_Int8Codes):
    """An int8 weight ready for :func:`int8_matmul`.

    Invariants: ``codes`` is int8 of shape ``(out, in)`` with values in
    [-127, 127]; ``scale`` is float32 of shape ``(out,)``, finite and positive;
    ``dequantize()`` returns the ``(in, out)`` weight in ``dtype``, equal bit for
    bit to the QArray it was prepared from. ``pow2`` (static): inputs are quantized
    with power-of-two row scales, as ``ActSpec(scale_pow2=True, per_token=True)`` does
    in training, so a model trained with ``ActSpec(integer=True)`` serves bit for bit.
    ``carrier``: None, or ``codes`` as bfloat16 (exactly), kept for layers of at most
    ``BF16_MAX_WIDTH`` inputs and outputs, where the exact bf16 dot is faster for many
    rows (see :func:`jaxqp.numerics.bf16_int_dot`); it costs 2 more bytes per weight in
    memory, not in files.

    Attributes:
      codes: int8 ``(out, in)`` codes.
      scale: float32 ``(out,)`` scales.
      dtype: the dtype of the served output.
      pow2: power-of-two input row scales (static).
      carrier: ``codes`` as bfloat16, or None.
    """


    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[1], self.codes.shape[0])

    def dequantize(self) -> jax.Array:
        return (self.codes.T.astype(jnp.float32) * self.scale).astype(self.dtype)


jax.tree_util.register_dataclass(ServingKernel, data_fields=["codes", "scale", "carrier"],
                                 meta_fields=["dtype", "pow2"])
jax.export.register_pytree_node_serialization(  # so jax.export can carry prepared trees
    ServingKernel,
    serialized_name="jaxqp.serving.ServingKernel",
    serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
    deserialize_auxdata=lambda raw: tuple(json.loads(raw)),
)


@dataclasses.dataclass(frozen=True)
class GeneralKernel(_Int8Codes):
    """An int8 ``nn.DenseGeneral`` kernel of 3 or more axes, for :func:`int8_matmul_general`.

    Invariants: ``codes`` is int8 in the kernel's own layout ``(*contracted, *features)``
    with values in [-127, 127]; ``scale`` is float32 of the kernel's rank, size 1 on
    every axis but possibly the last, finite and positive; ``dequantize()`` equals the
    QArray it was prepared from bit for bit; ``carrier`` as for :class:`ServingKernel`.

    Attributes:
      codes: int8 codes in the kernel's own layout.
      scale: float32 scale of the kernel's rank.
      dtype: as for :class:`ServingKernel` (so are ``pow2`` and ``carrier``).
    """


    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> jax.Array:
        return (self.codes.astype(jnp.float32) * self.scale).astype(self.dtype)


jax.tree_util.register_dataclass(GeneralKernel, data_fields=["codes", "scale", "carrier"],
                                 meta_fields=["dtype", "pow2"])
jax.export.register_pytree_node_serialization(
    GeneralKernel,
    serialized_name="jaxqp.serving.GeneralKernel",
    serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
    deserialize_auxdata=lambda raw: tuple(json.loads(raw)),
)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of each row of 2-D ``x`` and the float32 scale per row.

    Args:
      x: a 2-D float array.

    Returns:
      ``(codes, scale)``: int8 codes and the float32 ``(rows, 1)`` scale.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) * reciprocal(127)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    codes = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
    return codes, scale


def int8_matmul(x: jax.Array, kernel: ServingKernel) -> jax.Array:
    """``x @ W`` over the last axis of ``x``, with int8 activations and weights.

    Args:
      x: ``(..., in)`` float input.
      kernel: the prepared kernel.

    Returns:
      ``(..., out)`` in ``x``'s dtype.
    """
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

    Args:
      x: the input.
      kernel: the prepared kernel.
      n_contract: how many trailing axes of ``x`` are contracted.

    Returns:
      The output, in ``x``'s dtype.
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
