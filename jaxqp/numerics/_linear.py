"""Integer fake-quantization of single arrays (numerics layer: jax only).

Conventions (DESIGN.md §4, pinned in ``tests/test_quant.py``):

* rounding is half-to-even (``jnp.round``), done before the clip;
* ``x_hat = (clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``;
* symmetric scales use the narrow signed range ``[-(2^(b-1)-1), 2^(b-1)-1]`` and
  zero point 0; affine scales use the full range and an integer zero point in it;
* an all-zero tensor or channel gets scale 1.0 (finite), and 0 maps to exactly 0; so
  does a channel with no entries (a zero-size axis reduced: range ``[0, 0]``);
* a scale divides a range by a constant as a product with the float32
  reciprocal, e.g. ``absmax * f32(1 / qmax)``: XLA rewrites division by a
  constant into that product under jit, so writing it so makes jit and eager
  agree bit for bit;
* arithmetic runs in float32 (or float64 for float64 inputs) and the result is
  cast back to the input dtype;
* the clipped straight-through estimator passes the gradient where
  ``qmin <= x / scale + zero_point <= qmax`` (before rounding, as in LSQ) and
  zero elsewhere; the ``"identity"`` variant passes it everywhere. Scales and
  zero points computed from the data are treated as constants (no gradient).

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([0.5, -1.0, 0.26])
    >>> scale = symmetric_scale(x, bits=8, axis=None)
    >>> qmin, qmax = int_range(8, narrow=True)
    >>> y = fake_quant(x, scale, None, qmin, qmax)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Axis = int | Sequence[int] | None
SteKind = Literal["clipped", "identity"]


def int_range(bits: int, *, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """Returns ``(qmin, qmax)`` of a ``bits``-wide integer.

    ``narrow`` drops the most negative signed value so the range is symmetric:
    ``int_range(8, narrow=True) == (-127, 127)``; ``int_range(8) == (-128, 127)``;
    unsigned: ``int_range(8, signed=False) == (0, 255)``.

    Args:
      bits: the width, 1 to 16.
      signed: a signed range.
      narrow: drop the most negative value (symmetric signed range).

    Returns:
      ``(qmin, qmax)``.

    Raises:
      ValueError: if ``bits`` is not an int in [1, 16] (a signed narrow range needs 2).
    """
    check_bits("int_range", bits, 2 if signed and narrow else 1)
    if signed:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if narrow else -qmax - 1
        return qmin, qmax
    return 0, 2**bits - 1


def check_bits(fn: str, bits, smallest: int = 1, largest: int = 16) -> None:
    """Refuses a code width that is not an int in ``[smallest, largest]``, naming ``fn``."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not smallest <= bits <= largest:
        raise ValueError(f"{fn}: bits={bits!r}; expected an int in [{smallest}, {largest}], e.g. bits=8")


def check_size(fn: str, name: str, value) -> None:
    """Refuses a ``value`` that is not an int >= 1 (a group size, a block side), naming ``fn``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: {name}={value!r}; expected an int >= 1, e.g. {name}=128")


def check_code_range(fn: str, qmin, qmax) -> None:
    """Refuses a code range that is not two ints with ``qmin < qmax``, naming ``fn``."""
    if not (isinstance(qmin, (int, np.integer)) and isinstance(qmax, (int, np.integer)) and qmin < qmax):
        raise ValueError(f"{fn}: qmin={qmin!r}, qmax={qmax!r}; expected ints with qmin < qmax, "
                         "e.g. int_range(8, narrow=True)")


def check_axes(fn: str, ndim: int, axes) -> None:
    """Refuses an axis outside ``[-ndim, ndim)`` (numpy would raise; a modulo would wrap it silently)."""
    for a in (axes,) if isinstance(axes, (int, np.integer)) else axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{fn}: axis {a} is out of range for an array of {ndim} dimensions; "
                             f"use an axis in [{-ndim}, {ndim - 1}] (None: per tensor)")


def compute_dtype(dtype) -> jnp.dtype:
    """The float dtype quantization arithmetic runs in: float32, or float64 for float64."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def reduce_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """Axes reduced when computing scales: all but the channel ``axis`` (None: all).

    >>> reduce_axes(2, -1)
    (0,)
    """
    if axis is None:
        return tuple(range(ndim))
    kept = (axis,) if isinstance(axis, int) else tuple(axis)
    check_axes("the channel axis", ndim, kept)
    kept = {a % ndim for a in kept}
    return tuple(a for a in range(ndim) if a not in kept)


def reduce_or_zero(reduce, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``reduce(x, axis=axes, keepdims=True)``, or zeros when a reduced axis holds no entries.

    JAX's max and min of nothing have no identity (they raise); jaxqp's ranges always include
    0, so a channel without entries gets the range ``[0, 0]`` and hence scale 1.0, like an
    all-zero channel. The test is on the static shape: no operation is added otherwise.

    Args:
      reduce: a reduction taking ``axis`` and ``keepdims``, e.g. ``jnp.max``.
      x: the tensor.
      axes: the non-negative axes reduced.

    Returns:
      The reduction, with the reduced axes kept as size 1.

    Example:
      >>> reduce_or_zero(jnp.max, jnp.ones((0, 3)), (0,)).shape
      (1, 3)
    """
    if any(x.shape[a] == 0 for a in axes):
        return jnp.zeros(tuple(1 if i in axes else d for i, d in enumerate(x.shape)), x.dtype)
    return reduce(x, axis=axes, keepdims=True)


def reciprocal(n: int | float) -> np.float32:
    """``1 / n`` rounded once to float32: the constant XLA multiplies by for ``x / n``."""
    return np.float32(1.0) / np.float32(n)


def _finite_positive(scale: jax.Array) -> jax.Array:
    # A zero (or underflowed) scale would divide by zero: use 1.0 there, which
    # maps an all-zero channel to exactly zero.
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def nonzero_scale(scale: jax.Array) -> jax.Array:
    """A row scale for integer codes: 1.0 where ``scale`` is 0 (an all-zero row: codes 0), else ``scale``.

    Unlike :func:`_finite_positive`, a NaN or infinite scale (its row holds a NaN or an
    infinity) is kept: an integer path then returns NaN or infinities for that row, as the
    float model does, instead of finite values computed from codes cast from NaN.

    Args:
      scale: the non-negative scales (absmax times a constant).

    Returns:
      The scales to divide by.

    Example:
      >>> nonzero_scale(jnp.array([0.0, 0.5, jnp.nan]))
      Array([1. , 0.5, nan], dtype=float32)
    """
    return jnp.where(scale == 0, jnp.ones_like(scale), scale)


def symmetric_scale(x: jax.Array, bits: int, axis: Axis = -1, *, narrow: bool = True) -> jax.Array:
    """Absmax scale ``max|x| * f32(1 / qmax)`` per channel along ``axis`` (None: per tensor).

    The result keeps reduced dimensions (size 1) so it broadcasts against ``x``.

    Args:
      x: the tensor.
      bits: the code width.
      axis: channel axis (or axes) with their own scale; None: one per tensor.
      narrow: use the narrow range ``qmax = 2^(bits-1) - 1``.

    Returns:
      The scale.
    """
    x = jnp.asarray(x, compute_dtype(x.dtype))
    _, qmax = int_range(bits, narrow=narrow)
    absmax = reduce_or_zero(jnp.max, jnp.abs(x), reduce_axes(x.ndim, axis))
    return _finite_positive(absmax * reciprocal(qmax))


def affine_scale(x: jax.Array, bits: int, axis: Axis = -1) -> tuple[jax.Array, jax.Array]:
    """Min/max scale and integer zero point (as a float array) over the full signed range.

    The range is widened to include 0 so that 0 is represented exactly.

    Args:
      x: the tensor.
      bits: the code width.
      axis: channel axis (or axes) with their own scale; None: one per tensor.

    Returns:
      ``(scale, zero_point)``, both with the reduced axes kept as size 1.
    """
    x = jnp.asarray(x, compute_dtype(x.dtype))
    qmin, qmax = int_range(bits)
    axes = reduce_axes(x.ndim, axis)
    lo = jnp.minimum(reduce_or_zero(jnp.min, x, axes), 0)
    hi = jnp.maximum(reduce_or_zero(jnp.max, x, axes), 0)
    scale = _finite_positive((hi - lo) * reciprocal(qmax - qmin))
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def quantize(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None, qmin: int, qmax: int) -> jax.Array:
    """Integer codes ``clip(round(x / scale) + zero_point, qmin, qmax)`` as floats.

    A code of zero is +0.0, never -0.0 (rounding -0.3 gives -0.0), so fake-quantized
    values carry no sign on zero, exactly like values decoded from integer codes.

    Args:
      x: the values.
      scale: positive scale, broadcast against ``x``.
      zero_point: the zero point, or None.
      qmin: the smallest code.
      qmax: the largest code.

    Returns:
      The codes, as floats of ``x``'s compute dtype.
    """
    v = jnp.round(jnp.asarray(x, scale.dtype) / scale)
    if zero_point is not None:
        v = v + zero_point
    v = jnp.clip(v, qmin, qmax)
    return jnp.where(v == 0, jnp.zeros_like(v), v)


def dequantize(q: jax.Array, scale: jax.Array, zero_point: jax.Array | None) -> jax.Array:
    """``(q - zero_point) * scale``: the inverse of :func:`quantize` on its codes.

    Args:
      q: integer codes (any dtype).
      scale: the scale, broadcast against ``q``.
      zero_point: the zero point, or None (symmetric).

    Returns:
      The float values.
    """
    if zero_point is not None:
        q = q - zero_point
    return q * scale


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _fake_quant(x, scale, zero_point, qmin, qmax, ste):
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


@_fake_quant.defjvp
def _fake_quant_jvp(qmin, qmax, ste, primals, tangents):
    x, scale, zero_point = primals
    x_dot = tangents[0]
    y = _fake_quant(x, scale, zero_point, qmin, qmax, ste)
    if ste == "identity":
        return y, x_dot
    v = x / scale
    if zero_point is not None:
        v = v + zero_point
    inside = (v >= qmin) & (v <= qmax)
    return y, jnp.where(inside, x_dot, jnp.zeros_like(x_dot))


def fake_quant(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None,
    qmin: int,
    qmax: int,
    ste: SteKind = "clipped",
) -> jax.Array:
    """Quantize then dequantize ``x``, with a straight-through gradient.

    ``scale`` and ``zero_point`` (None for symmetric) broadcast against ``x`` and
    get no gradient. Returns an array of ``x``'s dtype.

    Args:
      x: the values.
      scale: positive scale, broadcast against ``x``.
      zero_point: integer-valued zero point, or None (symmetric).
      qmin: the smallest code.
      qmax: the largest code.
      ste: "clipped" (gradient 1 inside the range, 0 outside) or "identity".

    Returns:
      ``dequantize(quantize(x))`` in ``x``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> fake_quant(jnp.array([0.3, 2.5, 9.0]), jnp.array(1.0), None, -7, 7)
      Array([0., 2., 7.], dtype=float32)
    """
    check_code_range("fake_quant", qmin, qmax)
    if ste not in ("clipped", "identity"):
        raise ValueError(f"ste={ste!r}: use 'clipped' or 'identity'")
    dtype = compute_dtype(x.dtype)
    scale = jax.lax.stop_gradient(jnp.asarray(scale, dtype))
    if zero_point is not None:
        zero_point = jax.lax.stop_gradient(jnp.asarray(zero_point, dtype))
    y = _fake_quant(jnp.asarray(x, dtype), scale, zero_point, qmin, qmax, ste)
    return y.astype(x.dtype)
