"""Compact containers of non-linear value formats: ``Pow2Array`` and ``Fp8Array`` (export layer).

* :class:`Pow2Array`: power-of-two weights (``QuantSpec(format="pow2")``) as
  ``bits``-bit signed codes (a :class:`QArray` of codes with scale 1, so they are
  packed below 8 bits and may be sparse) plus one int16 exponent ``emin`` per
  channel: code ``c`` decodes to ``sign(c) * 2^(emin + |c| - 1)``, code 0 to 0.
* :class:`Fp8Array`: fp8 weights (``format="e4m3"``/``"e5m2"``) as the float8
  values themselves (a float8 array, or a :class:`SparseArray` of them when
  pruned and smaller) plus the float scale per channel.

Both decode, under jit or not, to exactly what the training forward computes:
they are built from the same functions (``pow2_codes_of``, ``fp8_weight``).

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> params = {"w": jnp.array([[3.0, -0.7], [0.01, 1.0]])}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=4, format="pow2"))])
    >>> packed = jaxqp.export(params, t.init(params))["w"]
    >>> type(packed).__name__, packed.dequantize().tolist()
    ('Pow2Array', [[4.0, -0.5], [0.0, 1.0]])
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._formats import FP8_DTYPES, pow2_codes_of, pow2_from_codes
from .compressed import Compressed
from .qarray import QArray
from .sparse_array import SparseArray

FP8_FORMATS = {str(jnp.dtype(d)): f for f, d in FP8_DTYPES.items()}


def _check_float_dtype(dtype: str, kind: str) -> None:
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{kind}: dtype must be a float dtype name, got {dtype!r}")


@dataclasses.dataclass(frozen=True)
class Pow2Array(Compressed):
    """Power-of-two values: ``codes`` (a QArray of signed codes) and ``emin`` per channel.

    Invariants (checked by :meth:`validate`): ``codes`` is a valid symmetric QArray
    with scale 1, ``qmin = -qmax`` and ``qmax = 2^(bits-1) - 1``; ``emin`` is int16
    of ``codes.shape``'s rank, broadcastable to it; ``dtype`` is the float dtype
    :meth:`dequantize` returns.

    Attributes:
      codes: a :class:`QArray` of signed exponent codes.
      emin: the smallest exponent per channel (int16).
      dtype: the dtype of the decoded weight.
    """

    codes: QArray
    emin: jax.Array
    dtype: str

    @classmethod
    def from_codes(cls, codes, emin, bits: int, dtype, mask=None) -> Pow2Array:
        """Stores :func:`pow2_codes_of`'s ``(codes, emin)``; with ``mask``, only the kept codes."""
        levels = 2 ** (bits - 1) - 1
        ones = jnp.ones((1,) * codes.ndim, jnp.float32)
        q = QArray.from_codes(codes, ones, None, bits, -levels, levels, "float32", mask=mask)
        return cls(q, jnp.asarray(emin).astype(jnp.int16), str(jnp.dtype(dtype)))

    @classmethod
    def from_weight(cls, w: jax.Array, bits: int, axis=-1, mask=None) -> Pow2Array:
        """Encodes ``w`` as ``QuantSpec(bits=bits, format="pow2", axis=axis)`` does."""
        codes, emin = pow2_codes_of(w, bits, axis)
        return cls.from_codes(codes, emin, bits, w.dtype, mask)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def bits(self) -> int:
        return self.codes.bits

    def int_codes(self) -> jax.Array:
        return self.codes.int_codes()

    def dequantize(self) -> jax.Array:
        return pow2_from_codes(self.int_codes(), self.emin, self.dtype)

    def validate(self) -> Pow2Array:
        _check_float_dtype(self.dtype, "Pow2Array")
        q = self.codes.validate()
        levels = 2 ** (q.bits - 1) - 1
        if q.zero_point is not None or q.group is not None or (q.qmin, q.qmax) != (-levels, levels) or q.bits < 2:
            raise ValueError(f"Pow2Array: codes must be symmetric {q.bits}-bit codes in [-{levels}, {levels}]")
        if not np.all(np.asarray(q.scale) == 1):
            raise ValueError("Pow2Array: the codes' scale must be 1")
        if self.emin.dtype != jnp.int16 or self.emin.ndim != len(q.shape) or any(
                e not in (1, d) for e, d in zip(self.emin.shape, q.shape)):
            raise ValueError(f"Pow2Array: emin must be int16 broadcastable to {q.shape}, "
                             f"got {self.emin.dtype}{self.emin.shape}")
        return self


@dataclasses.dataclass(frozen=True)
class Fp8Array(Compressed):
    """fp8 values times a scale: ``dequantize = (values * scale).astype(dtype)``.

    Invariants (checked by :meth:`validate`): ``values`` is a float8 (e4m3fn or
    e5m2) array of the weight's shape, or a :class:`SparseArray` of float8 values;
    ``scale`` is float32 (float64 for float64 weights), finite, positive and
    broadcastable to the shape.

    Attributes:
      values: float8 values (or a :class:`SparseArray` of them).
      scale: the float scale per channel.
      dtype: the dtype of the decoded weight.
    """

    values: jax.Array | SparseArray
    scale: jax.Array
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def format(self) -> str:
        values = self.values.values if isinstance(self.values, SparseArray) else self.values
        return FP8_FORMATS[str(values.dtype)]

    def dequantize(self) -> jax.Array:
        values = self.values.dequantize() if isinstance(self.values, SparseArray) else self.values
        return (values.astype(self.scale.dtype) * self.scale).astype(self.dtype)

    def validate(self) -> Fp8Array:
        _check_float_dtype(self.dtype, "Fp8Array")
        values = self.values.validate().values if isinstance(self.values, SparseArray) else self.values
        if str(values.dtype) not in FP8_FORMATS:
            raise ValueError(f"Fp8Array: values must be float8_e4m3fn or float8_e5m2, got {values.dtype}")
        if self.scale.dtype not in (jnp.float32, jnp.float64) or self.scale.ndim != len(self.shape) or any(
                s not in (1, d) for s, d in zip(self.scale.shape, self.shape)):
            raise ValueError(f"Fp8Array: scale must be float32 broadcastable to {self.shape}, "
                             f"got {self.scale.dtype}{self.scale.shape}")
        scale = np.asarray(self.scale)
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("Fp8Array: scale must be finite and positive")
        return self


jax.tree_util.register_dataclass(Pow2Array, data_fields=["codes", "emin"], meta_fields=["dtype"])
jax.tree_util.register_dataclass(Fp8Array, data_fields=["values", "scale"], meta_fields=["dtype"])
