"""Ranges, scales and groups for integer quantization (numerics layer: jax only).

A quantizer is calibrated in two steps: :func:`observe_range` (or
:func:`mse_range`) finds a float range ``[lo, hi]`` per channel or group, then
:func:`scale_from_range` turns it into a scale and zero point:

* ``"max"``: the min and max (symmetric: ``+-max|x|``), nothing clipped;
* ``"percentile"``: the ``p``-th percentile of ``|x|`` (symmetric) or the
  ``100-p``-th and ``p``-th percentiles (affine), linear interpolation;
* ``"mse"``: the max range shrunk by the ratio in :data:`MSE_RATIOS` (1.0 down to
  0.4 in steps of 0.025) that minimises the squared quantization error; ties go
  to the larger ratio.

Groups: ``group_view`` reshapes an axis of length ``n`` into ``(ceil(n/g), g)``
blocks, padding the last block (zeros, or NaN for percentiles, which ignore
NaN), so a group size that does not divide the axis never fails;
``expand_groups`` repeats a per-group scale back over the axis.

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, -2.0, 4.0, 0.5, 3.0]])
    >>> xg, axes = group_view(x, axis=None, group_axis=-1, group_size=2)
    >>> xg.shape, axes
    ((1, 3, 2), (0, 2))
    >>> lo, hi = observe_range(xg, axes, "max", symmetric=True)
    >>> scale, _ = scale_from_range(lo, hi, -7, 7, symmetric=True)
    >>> expand_groups(scale[..., 0], group_axis=-1, group_size=2, length=5).shape
    (1, 5)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ._linear import (
    Axis,
    _finite_positive,
    check_axes,
    check_size,
    compute_dtype,
    dequantize,
    quantize,
    reciprocal,
    reduce_or_zero,
)

MSE_RATIOS = np.float32(1.0) - np.float32(0.025) * np.arange(25, dtype=np.float32)
CALIBRATIONS = ("max", "percentile", "mse")


def group_view(
    x: jax.Array, axis: Axis, group_axis: int, group_size: int, pad: float = 0.0
) -> tuple[jax.Array, tuple[int, ...]]:
    """``x`` with ``group_axis`` split into ``(groups, group_size)`` and the axes to reduce.

    The reduced axes are every axis except the channel ``axis`` and the group index.

    Args:
      x: the tensor.
      axis: the channel axis (or axes).
      group_axis: the axis split into groups.
      group_size: entries per group (the last group is padded).
      pad: the padding value.

    Returns:
      ``(view, reduce_axes)``.
    """
    ndim = x.ndim
    check_axes("group_view", ndim, group_axis)
    check_size("group_view", "group_size", group_size)
    ga = group_axis % ndim
    n = x.shape[ga]
    groups = -(-n // group_size)
    if groups * group_size != n:
        widths = [(0, 0)] * ndim
        widths[ga] = (0, groups * group_size - n)
        x = jnp.pad(x, widths, constant_values=pad)
    x = x.reshape(x.shape[:ga] + (groups, group_size) + x.shape[ga + 1:])
    kept = {ga} if axis is None else {ga} | {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    shifted = {a if a <= ga else a + 1 for a in kept}
    return x, tuple(a for a in range(ndim + 1) if a not in shifted)


def expand_groups(scale: jax.Array, group_axis: int, group_size: int, length: int) -> jax.Array:
    """A per-group array (``ceil(length/g)`` along ``group_axis``) repeated to ``length``.

    Args:
      scale: the per-group array.
      group_axis: the grouped axis.
      group_size: entries per group.
      length: the axis length to repeat to.

    Returns:
      The repeated array.
    """
    check_axes("expand_groups", scale.ndim, group_axis)
    check_size("expand_groups", "group_size", group_size)
    ga = group_axis % scale.ndim
    full = jnp.repeat(scale, group_size, axis=ga)
    return jax.lax.slice_in_dim(full, 0, length, axis=ga)


def observe_range(x: jax.Array, axes: tuple[int, ...], method: str = "max", *, symmetric: bool = True,
                  percentile: float = 99.99) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` over ``axes`` (kept as size 1), widened to include 0; NaN entries ignored.

    Args:
      x: the tensor.
      axes: the axes reduced.
      method: "max" (min/max) or "percentile".
      symmetric: ``(-m, m)`` with ``m = max|x|`` (or its percentile).
      percentile: the percentile of ``method='percentile'``.

    Returns:
      ``(lo, hi)``.
    """
    x = jnp.asarray(x, compute_dtype(x.dtype))
    if method == "percentile":
        q = jnp.asarray(percentile, x.dtype)
        if symmetric:
            hi = reduce_or_zero(functools.partial(jnp.nanpercentile, q=q, method="higher"), jnp.abs(x), axes)
            lo = -hi
        else:
            lo = reduce_or_zero(functools.partial(jnp.nanpercentile, q=100 - q, method="lower"), x, axes)
            hi = reduce_or_zero(functools.partial(jnp.nanpercentile, q=q, method="higher"), x, axes)
    elif symmetric:
        hi = reduce_or_zero(jnp.max, jnp.abs(x), axes)
        lo = -hi
    else:
        lo = reduce_or_zero(jnp.min, x, axes)
        hi = reduce_or_zero(jnp.max, x, axes)
    return jnp.minimum(lo, 0), jnp.maximum(hi, 0)


def scale_from_range(
    lo: jax.Array, hi: jax.Array, qmin: int, qmax: int, *, symmetric: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Scale (finite, positive) and zero point (None if symmetric) for the range ``[lo, hi]``.

    Symmetric: ``max(|lo|, hi) * f32(1/qmax)`` (unsigned: ``hi * f32(1/qmax)``).
    Affine: ``(hi - lo) * f32(1/(qmax - qmin))`` and ``clip(round(qmin - lo/scale))``.

    Args:
      lo: the range's low end (<= 0).
      hi: the range's high end (>= 0).
      qmin: the smallest code.
      qmax: the largest code.
      symmetric: zero point 0.

    Returns:
      ``(scale, zero_point)``.
    """
    if symmetric:
        top = hi if qmin == 0 else jnp.maximum(-lo, hi)
        return _finite_positive(top * reciprocal(qmax)), None
    scale = _finite_positive((hi - lo) * reciprocal(qmax - qmin))
    return scale, jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)


def mse_range(
    x: jax.Array, axes: tuple[int, ...], qmin: int, qmax: int, *, symmetric: bool
) -> tuple[jax.Array, jax.Array]:
    """The range (max range times a ratio of :data:`MSE_RATIOS`) with the least squared error.

    Args:
      x: the tensor.
      axes: the axes reduced.
      qmin: the smallest code.
      qmax: the largest code.
      symmetric: a symmetric range.

    Returns:
      ``(lo, hi)``.
    """
    x = jnp.asarray(x, compute_dtype(x.dtype))
    lo0, hi0 = observe_range(x, axes, "max", symmetric=symmetric)

    def error(ratio):
        scale, zp = scale_from_range(lo0 * ratio, hi0 * ratio, qmin, qmax, symmetric=symmetric)
        y = dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)
        return jnp.sum(jnp.square(y - x), axis=axes, keepdims=True)

    def body(carry, ratio):
        best_err, best_ratio = carry
        err = error(ratio)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)), None

    start = (error(jnp.ones((), x.dtype)), jnp.ones_like(lo0))
    (_, ratio), _ = jax.lax.scan(body, start, jnp.asarray(MSE_RATIOS[1:], x.dtype))
    return lo0 * ratio, hi0 * ratio


def calibrated_scale(x, axes, qmin: int, qmax: int, *, symmetric: bool, method: str = "max",
                     percentile: float = 99.99):
    """Scale and zero point of ``x`` reduced over ``axes`` by calibration ``method``."""
    if method == "mse":
        lo, hi = mse_range(x, axes, qmin, qmax, symmetric=symmetric)
    else:
        lo, hi = observe_range(x, axes, method, symmetric=symmetric, percentile=percentile)
    return scale_from_range(lo, hi, qmin, qmax, symmetric=symmetric)
