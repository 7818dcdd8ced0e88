"""Non-linear and low-bit value formats of single arrays (numerics layer: jax only).

* binary (1 bit, XNOR-Net): ``sign(x) * a`` with ``a`` the mean ``|x|`` of the
  non-zero entries per channel; an exact zero stays 0 (``sign(0) = 0``), so
  pruned weights stay pruned;
* ternary (TWN, Li & Liu 2016): ``t = 0.7 * mean|x|``; entries with ``|x| > t``
  become ``sign(x) * a`` with ``a`` their mean magnitude, the rest 0;
* power-of-two values: ``sign(x) * 2^k``, ``k = round(log2|x|)`` rounded in the
  log domain (the boundary between ``2^k`` and ``2^(k+1)`` is ``2^(k+0.5)``),
  ``k`` clipped to ``[emin, emax]`` where ``emax`` is the exponent of the channel's
  max ``|x|`` and ``emin = emax - (2^(bits-1) - 2)``; entries with ``k < emin``
  become 0 (so ``bits`` codes: a sign, ``2^(bits-1) - 1`` exponents and zero);
* power-of-two scales: :func:`pow2_ceil` rounds a scale up to a power of two,
  so nothing that fit the float scale is clipped;
* fp8 (e4m3fn, e5m2): ``x / scale`` saturated to the format's largest finite
  value, cast to the float8 dtype (round to nearest even) and back;
* stochastic rounding: ``floor(x + u)``, ``u ~ U[0, 1)`` from an explicit key.

Exponents come from ``jnp.frexp``, never ``log2``: bit-exact under jit and eager.

Example:
    >>> import jax.numpy as jnp
    >>> binary(jnp.array([0.5, -1.5, 0.0]), axis=None)
    Array([ 1., -1.,  0.], dtype=float32)
    >>> pow2_values(jnp.array([3.0, -0.7, 0.01]), bits=4, axis=None)
    Array([ 4. , -0.5,  0. ], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._linear import Axis, _finite_positive, check_bits, compute_dtype, reciprocal, reduce_axes, reduce_or_zero

FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
TERNARY_THRESHOLD = 0.7
_SQRT_HALF = np.float32(np.sqrt(0.5))


@functools.partial(jax.custom_jvp, nondiff_argnums=())
def straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
    """Returns ``y`` exactly, with the gradient of the identity in ``x`` (none in ``y``).

    Args:
      x: the value whose gradient passes.
      y: the value returned.

    Returns:
      ``y``.
    """
    del x
    return y


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, y = primals
    return y, tangents[0]


def _channel_mean(values: jax.Array, count: jax.Array, axes) -> jax.Array:
    total = jnp.sum(values, axis=axes, keepdims=True)
    n = jnp.sum(count, axis=axes, keepdims=True, dtype=total.dtype)
    return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.ones_like(total))


def binary_codes(x: jax.Array, axis: Axis) -> tuple[jax.Array, jax.Array]:
    """``(codes, scale)``: codes ``sign(x)`` in {-1, 0, 1}, scale the mean |x| of non-zeros."""
    x = jnp.asarray(x, compute_dtype(x.dtype))
    axes = reduce_axes(x.ndim, axis)
    scale = _channel_mean(jnp.abs(x), x != 0, axes)
    return jnp.sign(x) + 0.0, scale


def ternary_codes(x: jax.Array, axis: Axis) -> tuple[jax.Array, jax.Array]:
    """``(codes, scale)`` of TWN: codes in {-1, 0, 1}, scale the mean |x| of the kept entries."""
    x = jnp.asarray(x, compute_dtype(x.dtype))
    axes = reduce_axes(x.ndim, axis)
    absx = jnp.abs(x)
    threshold = TERNARY_THRESHOLD * reduce_or_zero(jnp.mean, absx, axes)
    keep = absx > threshold
    scale = _channel_mean(jnp.where(keep, absx, 0), keep, axes)
    return jnp.where(keep, jnp.sign(x), 0.0), scale


def binary(x: jax.Array, axis: Axis = -1) -> jax.Array:
    """``sign(x) * mean|x|`` per channel (no gradient rule; see ``straight_through``).

    Args:
      x: the tensor.
      axis: the channel axis (None: per tensor).

    Returns:
      The binarized values.
    """
    codes, scale = binary_codes(x, axis)
    return (codes * scale).astype(x.dtype)


def log2_round(x: jax.Array) -> jax.Array:
    """``round(log2|x|)`` with the rounding point at ``2^(k+0.5)``, as int32 (x != 0)."""
    mantissa, exponent = jnp.frexp(jnp.abs(x))  # |x| = m * 2^e, m in [0.5, 1)
    return exponent - (mantissa < _SQRT_HALF).astype(exponent.dtype)


def pow2_codes_of(x: jax.Array, bits: int, axis: Axis = -1) -> tuple[jax.Array, jax.Array]:
    """``(codes, emin)`` of power-of-two values: int32 codes in ``[-levels, levels]``.

    ``levels = 2^(bits-1) - 1``; code ``c != 0`` means ``sign(c) * 2^(emin + |c| - 1)``,
    code 0 means 0; ``emin`` (int32, per channel) is the smallest exponent kept.

    Args:
      x: the tensor.
      bits: the code width (``2^(bits-1) - 1`` exponents per channel).
      axis: the channel axis (None: per tensor).

    Returns:
      ``(codes, emin)``.
    """
    check_bits("pow2", bits, 2, 8)  # a sign, 2^(bits-1)-1 exponents and zero
    x = jnp.asarray(x, compute_dtype(x.dtype))
    levels = 2 ** (bits - 1) - 1
    absmax = reduce_or_zero(jnp.max, jnp.abs(x), reduce_axes(x.ndim, axis))
    emax = log2_round(jnp.where(absmax > 0, absmax, jnp.ones_like(absmax)))
    emin = emax - (levels - 1)
    k = log2_round(jnp.where(x != 0, x, jnp.ones_like(x)))
    codes = jnp.sign(x).astype(jnp.int32) * (jnp.clip(k, emin, emax) - emin + 1)
    return jnp.where((x == 0) | (k < emin), 0, codes), emin


def pow2_from_codes(codes: jax.Array, emin: jax.Array, dtype: Any) -> jax.Array:
    """The values of :func:`pow2_codes_of`'s codes, computed in ``dtype``'s compute dtype, cast to it.

    Args:
      codes: codes of :func:`pow2_codes_of`.
      emin: the smallest exponent, per channel.
      dtype: the dtype of the result.

    Returns:
      The values.
    """
    work = compute_dtype(dtype)
    exponent = emin.astype(jnp.int32) + jnp.abs(codes) - 1
    value = jnp.sign(codes).astype(work) * jnp.ldexp(jnp.ones(codes.shape, work), exponent)
    return jnp.where(codes == 0, jnp.zeros((), work), value).astype(dtype)


def pow2_values(x: jax.Array, bits: int, axis: Axis = -1) -> jax.Array:
    """Power-of-two values with ``2^(bits-1) - 1`` exponents per channel; see the module doc.

    Args:
      x: the tensor.
      bits: the code width.
      axis: the channel axis (None: per tensor).

    Returns:
      The power-of-two values, in ``x``'s dtype.
    """
    codes, emin = pow2_codes_of(x, bits, axis)
    return pow2_from_codes(codes, emin, x.dtype)


def pow2_ceil(scale: jax.Array) -> jax.Array:
    """The smallest power of two ``>= scale`` (for positive finite ``scale``), exactly.

    Args:
      scale: positive scales.

    Returns:
      The powers of two.
    """
    mantissa, exponent = jnp.frexp(scale)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    return jnp.ldexp(jnp.ones_like(scale), exponent)


def fp8_max(fmt: str) -> float:
    """The largest finite value of the fp8 format (448 for e4m3, 57344 for e5m2)."""
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fp8: fmt={fmt!r}; expected one of {tuple(FP8_DTYPES)}")
    return float(jnp.finfo(FP8_DTYPES[fmt]).max)


def fp8_cast(x: jax.Array, fmt: str) -> jax.Array:
    """``x`` saturated to the fp8 range and cast to the float8 dtype (round to nearest even)."""
    big = fp8_max(fmt)  # checks fmt
    return jnp.clip(x, -big, big).astype(FP8_DTYPES[fmt])


def fp8_round(x: jax.Array, fmt: str) -> jax.Array:
    """``x`` saturated to the fp8 range, cast to float8 (nearest even) and back.

    Args:
      x: the values.
      fmt: "e4m3" or "e5m2".

    Returns:
      The rounded values, in ``x``'s dtype.
    """
    return fp8_cast(x, fmt).astype(x.dtype)


def fp8_scale(x: jax.Array, fmt: str, axis: Axis = -1) -> jax.Array:
    """Absmax scale mapping the channel's max ``|x|`` to the format's largest value."""
    x = jnp.asarray(x, compute_dtype(x.dtype))
    absmax = reduce_or_zero(jnp.max, jnp.abs(x), reduce_axes(x.ndim, axis))
    return _finite_positive(absmax * reciprocal(fp8_max(fmt)))


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
    """``floor(x + u)`` with ``u ~ U[0, 1)``: unbiased, ``E[result] = x``.

    Args:
      x: the values.
      key: a PRNG key.

    Returns:
      The rounded values.
    """
    u = jax.random.uniform(key, x.shape, x.dtype)
    return jnp.floor(x + u)
