"""``prepare``: the serving tree of an exported tree (serving layer, no flax).

:func:`prepare` turns an exported (or loaded) tree into the tree a jitted
forward pass uses:

* a 2-D symmetric QArray of at most 8 bits with one scale per output column (or
  per tensor) becomes a :class:`ServingKernel`: its codes laid out ``(out, in)`` (the
  layout XLA's integer ``dot_general`` is fast in on CPU), int8 for 5-8 bits and two
  per byte for 4 bits and fewer, and a float32 scale per output. It stays codes in
  memory whatever path computes with it;
* with ``dense_general=True`` the same holds for kernels of 3+ axes
  (:class:`GeneralKernel`, in the kernel's own layout);
* a 2-D :class:`Pow2Array` of at most 4 bits with one exponent per output column
  becomes an int8 ServingKernel (its values are ``±2^j``, ``j <= 6``, times
  ``2^emin``: int8 codes with a power-of-two scale, decoding to the same floats);
* every other compressed leaf (zero points, per-group scales, float formats) is
  decoded to its float array once;
* other leaves stay as they are.

Example:
    >>> import jax, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> type(jaxqp.prepare(jaxqp.export(params, t.init(params)))["w"]).__name__
    'ServingKernel'
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from .._export.nm_array import NMArray
from .._export.qarray import QArray
from .._export.sparse_array import SparseArray
from .._export.value_arrays import Fp8Array, Pow2Array
from ..numerics._packing import pack_nibbles
from ._hooks import PINS
from ._kernels import GeneralKernel, ServingKernel, _Int8Codes

MIN_INT_SIZE = 1  # every servable kernel keeps its codes (0.2 decoded kernels under 65536 entries)
MIN_POW2_EXPONENT = -126  # 2^emin stays a normal float32


def _servable(q: QArray, min_int_size: int) -> bool:
    per_last_axis = all(d == 1 for d in q.scale.shape[:-1])
    return (len(q.shape) >= 2 and q.zero_point is None and q.bits <= 8 and q.qmin >= -127 and q.group is None
            and per_last_axis and math.prod(q.shape) >= min_int_size)


def _pow2_kernel(leaf: Pow2Array, options: _Options) -> ServingKernel | None:
    """The int8 ServingKernel of a 2-D Pow2Array of at most 4 bits, or None.

    Codes of at most 4 bits are ``sign(c) 2^(|c|-1)`` in [-64, 64] times ``2^emin``:
    exactly an int8 kernel with a power-of-two scale per output column.
    """
    emin = leaf.emin
    if (len(leaf.shape) != 2 or leaf.bits > 4 or any(d != 1 for d in emin.shape[:-1])
            or math.prod(leaf.shape) < options.min_int_size):
        return None
    if not isinstance(emin, jax.core.Tracer) and int(jnp.min(emin)) < MIN_POW2_EXPONENT:
        return None  # 2^emin would underflow float32: decode to float instead
    c = leaf.int_codes()
    magnitude = jnp.left_shift(jnp.int32(1), jnp.maximum(jnp.abs(c) - 1, 0))
    codes = jnp.where(c == 0, 0, jnp.sign(c) * magnitude).T.astype(jnp.int8)
    scale = jnp.ldexp(jnp.ones(leaf.shape[1], jnp.float32), jnp.broadcast_to(emin.reshape(-1), (leaf.shape[1],)))
    return options.kernel(ServingKernel, codes, scale, leaf, bits=8)


@dataclasses.dataclass(frozen=True)
class _Options:
    min_int_size: int
    pow2_inputs: bool
    dense_general: bool
    path: str
    keep_float: bool

    def kernel(self, cls, codes, scale, leaf, bits):
        """A kernel of ``cls`` holding ``codes`` (int8, packed to 4 bits when ``bits == 4``)."""
        stored = pack_nibbles(codes) if bits == 4 else codes.astype(jnp.int8)
        float_weight = leaf.dequantize() if self.keep_float else None
        return cls(stored, scale, leaf.dtype, self.pow2_inputs, self.path, bits, tuple(codes.shape), float_weight)


def _prepare_leaf(leaf, options: _Options):
    if isinstance(leaf, Pow2Array):
        kernel = _pow2_kernel(leaf, options)
        return leaf.dequantize() if kernel is None else kernel
    if isinstance(leaf, NMArray) and isinstance(leaf.values, QArray):
        leaf = leaf.dense_qarray()  # the int8 kernel needs every code; N:M saves bytes, not time, on CPU
    if isinstance(leaf, QArray):
        bits = 4 if leaf.bits <= 4 and leaf.qmin >= -8 else 8
        if options.dense_general and _servable(leaf, options.min_int_size) and len(leaf.shape) > 2:
            return options.kernel(GeneralKernel, leaf.int_codes(), leaf.scale, leaf, bits)
        if _servable(leaf, options.min_int_size) and len(leaf.shape) == 2:
            scale = jnp.broadcast_to(leaf.scale.reshape(-1), (leaf.shape[1],)).astype(jnp.float32)
            return options.kernel(ServingKernel, leaf.int_codes().T, scale, leaf, bits)
        return leaf.dequantize()
    if isinstance(leaf, (SparseArray, NMArray, Fp8Array)):
        return leaf.dequantize()
    return leaf


def prepare(tree: Any, min_int_size: int = MIN_INT_SIZE, pow2_inputs: bool = False, dense_general: bool = False,
            *, path: str = "auto", keep_float: bool = False) -> Any:
    """The serving tree of an exported tree (see the module docstring).

    Every servable kernel stays integer codes in memory (int8, or two 4-bit codes per
    byte for 4 bits and fewer) plus a float32 scale per output. How it is multiplied is
    chosen per layer shape and row bucket when the served function is traced: with
    ``path="auto"`` by timing every path on this machine (see :func:`jaxqp.serving.describe`),
    or as pinned. ``pow2_inputs=True`` quantizes inputs with power-of-two row scales: use
    it for models trained with ``ActSpec(bits=8, symmetric=True, per_token=True,
    scale_pow2=True)`` (and ``integer=True``), whose served outputs then equal the
    training forward bit for bit on the integer paths. ``dense_general=True`` also
    prepares kernels of 3+ axes as :class:`GeneralKernel` for linen ``nn.DenseGeneral``
    layers (attention projections); :func:`jaxqp.linen_serving_apply` decodes those that
    no such layer uses (e.g. convolutions) to float at each call, so leave it off for CNNs.

    Args:
      tree: an exported tree (``jaxqp.export`` or ``jaxqp.load``).
      min_int_size: kernels with fewer entries are decoded to float once, here.
      pow2_inputs: quantize inputs with power-of-two row scales.
      dense_general: also prepare kernels of 3+ axes for ``nn.DenseGeneral``.
      path: ``"auto"`` (measure), or pin every kernel to ``"int8"``, ``"int8_t"``
        (kernel-first int8), ``"bf16"`` or ``"float"``.
      keep_float: also keep each kernel's dequantized float weight in memory, for a
        faster float path where it wins, at 4 more bytes per float32 weight.

    Returns:
      The tree with :class:`ServingKernel` (or :class:`GeneralKernel`) leaves for integer
      kernels and float arrays elsewhere.

    Raises:
      ValueError: for an unknown ``path``, a negative ``min_int_size``, or an integer ``path``
        pinned on an exported tree with no kernel served from codes (the pin would do nothing).
      TypeError: for a ``keep_float`` that is not a bool or a ``min_int_size`` that is not an int.
    """
    if path not in PINS:
        raise ValueError(f"prepare: path={path!r}; expected one of {PINS}")
    if not isinstance(keep_float, bool):
        raise TypeError(f"prepare: keep_float={keep_float!r} must be True or False")
    if isinstance(min_int_size, bool) or not isinstance(min_int_size, (int, np.integer)):
        raise TypeError(f"prepare: min_int_size={min_int_size!r} must be an int (kernels with fewer entries are "
                        f"decoded to float), e.g. {MIN_INT_SIZE}")
    if min_int_size < 0:
        raise ValueError(f"prepare: min_int_size={min_int_size} must be >= 0 (0 or 1: every kernel from codes)")
    options = _Options(int(min_int_size), bool(pow2_inputs), bool(dense_general), path, keep_float)
    is_leaf = lambda x: isinstance(x, (QArray, SparseArray, NMArray, Pow2Array, Fp8Array))
    served = jax.tree_util.tree_map(lambda x: _prepare_leaf(x, options), tree, is_leaf=is_leaf)
    kernels = [x for x in jax.tree_util.tree_leaves(served, is_leaf=lambda x: isinstance(x, _Int8Codes))
               if isinstance(x, _Int8Codes)]
    compressed = any(is_leaf(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_leaf))
    if path not in ("auto", "float") and compressed and not kernels:
        raise ValueError(f"prepare: path={path!r} pins the kernels served from codes, but this tree has none "
                         "(zero-point, per-group, 5-8-bit pow2 and fp8 kernels, and kernels under min_int_size, "
                         "decode to float here): the pin would change nothing. Use path='auto', or a symmetric "
                         "per-channel QuantSpec")
    return served
