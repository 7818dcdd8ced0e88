"""``prepare``: the serving tree of an exported tree (serving layer, no flax).

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

Example:
    >>> import jax, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> type(jaxqp.prepare(jaxqp.export(params, t.init(params)))["w"]).__name__
    'ServingKernel'
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.core
import jax.numpy as jnp

from .._export.nm_array import NMArray
from .._export.qarray import QArray
from .._export.sparse_array import SparseArray
from .._export.value_arrays import Fp8Array, Pow2Array
from ..numerics._int_dot import BF16_MAX_WIDTH
from ._kernels import GeneralKernel, ServingKernel

MIN_INT_SIZE = 256 * 256
MIN_POW2_EXPONENT = -126  # 2^emin stays a normal float32


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


def prepare(tree: Any, min_int_size: int = MIN_INT_SIZE, pow2_inputs: bool = False, dense_general: bool = False) -> Any:
    """The serving tree of an exported tree (see the module docstring).

    ``pow2_inputs=True`` quantizes inputs with power-of-two row scales: use it for
    models trained with ``ActSpec(bits=8, symmetric=True, per_token=True,
    scale_pow2=True)`` (and ``integer=True``), whose served outputs then equal the
    training forward bit for bit. ``dense_general=True`` also prepares kernels of 3+
    axes as :class:`GeneralKernel` for linen ``nn.DenseGeneral`` layers (attention
    projections); :func:`jaxqp.linen_serving_apply` decodes those that no such layer
    uses (e.g. convolutions) to float at each call, so leave it off for CNNs.

    Args:
      tree: an exported tree (``jaxqp.export`` or ``jaxqp.load``).
      min_int_size: kernels with fewer entries are served from dequantized float weights.
      pow2_inputs: quantize inputs with power-of-two row scales.
      dense_general: also prepare kernels of 3+ axes for ``nn.DenseGeneral``.

    Returns:
      The tree with :class:`ServingKernel` (or :class:`GeneralKernel`) leaves for int8
      kernels and float arrays elsewhere.
    """
    is_leaf = lambda x: isinstance(x, (QArray, SparseArray, NMArray, Pow2Array, Fp8Array))
    return jax.tree_util.tree_map(lambda x: _prepare_leaf(x, min_int_size, pow2_inputs, dense_general), tree,
                                  is_leaf=is_leaf)
