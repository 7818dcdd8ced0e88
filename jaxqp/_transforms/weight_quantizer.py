"""From a :class:`QuantSpec` to the numerics: scales, codes, fake-quant (specs layer).

The one place that decides how a spec quantizes a weight, shared by the
training forward and by export, so the two agree bit for bit. Linear formats
(integers of 2-16 bits) and binary/ternary are integer codes times a scale;
``pow2`` and fp8 formats are computed as values.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[0.5, -2.0], [1.0, 0.25]])
    >>> fake_quant_weight(w, QuantSpec(bits=8)).shape
    (2, 2)
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._specs.quant import QuantSpec
from ..numerics import _linear as linear
from ..numerics._formats import (
    binary_codes,
    fp8_cast,
    fp8_scale,
    pow2_ceil,
    pow2_values,
    stochastic_round,
    straight_through,
    ternary_codes,
)
from ..numerics._learned import MIN_STEP, lsq, lsq_grad_scale
from ..numerics._ranges import calibrated_scale, expand_groups, group_view

Learned = dict  # {"step": array} for learned="lsq"


class WeightQuantizer(NamedTuple):
    """Scale and zero point (None if symmetric), per channel or per group, and the range.

    ``group`` is ``(axis, size)`` when the scale holds one entry per block of
    ``size`` along ``axis`` (see :meth:`expanded`), else None.
    """

    scale: jax.Array
    zero_point: jax.Array | None
    qmin: int
    qmax: int
    group: tuple[int, int] | None = None

    def expanded(self, shape) -> tuple[jax.Array, jax.Array | None]:
        """Scale and zero point broadcastable to a weight of ``shape``."""
        if self.group is None:
            return self.scale, self.zero_point
        axis, size = self.group
        zero_point = None if self.zero_point is None else expand_groups(self.zero_point, axis, size, shape[axis])
        return expand_groups(self.scale, axis, size, shape[axis]), zero_point


def _group(spec: QuantSpec, ndim: int) -> tuple[int, int] | None:
    return None if spec.group_size is None else (spec.group_axis % ndim, spec.group_size)


def init_step(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step per channel or group.

    ``calibration="max"`` (default): Esser et al.'s ``2 mean|w| / sqrt(qmax)``;
    ``"mse"`` or ``"percentile"``: the scale that calibration gives (e.g. to start a
    fine-tuning from the MSE-optimal clip).
    """
    if spec.calibration != "max":
        return weight_quantizer(w, dataclasses.replace(spec, learned=None)).scale
    w = jnp.asarray(w, linear.compute_dtype(w.dtype))
    _, qmax = linear.int_range(spec.bits, signed=spec.signed, narrow=True)
    group = _group(spec, w.ndim)
    if group is None:
        x, axes = w, linear.reduce_axes(w.ndim, spec.axis)
        mean = jnp.mean(jnp.abs(x), axis=axes, keepdims=True)
    else:
        x, axes = group_view(jnp.abs(w), spec.axis, *group, pad=jnp.nan)
        mean = jnp.squeeze(jnp.nanmean(x, axis=axes, keepdims=True), group[0] + 1)
    return jnp.maximum(2.0 * mean / math.sqrt(qmax), MIN_STEP)


def weight_quantizer(w: jax.Array, spec: QuantSpec, learned: Learned | None = None) -> WeightQuantizer:
    """Calibrates a linear or binary/ternary ``spec`` on ``w`` (or reads its learned step)."""
    if spec.format == "ternary" or spec.bits == 1:
        _, scale = (ternary_codes if spec.format == "ternary" else binary_codes)(w, spec.axis)
        return WeightQuantizer(scale, None, -1, 1)
    if not spec.linear:
        raise ValueError(f"{spec} has no integer codes; use fake_quant_weight")
    qmin, qmax = linear.int_range(spec.bits, signed=spec.signed, narrow=spec.symmetric)
    group = _group(spec, w.ndim)
    if spec.learned == "lsq":
        if learned is None:
            raise ValueError(f"{spec} learns its step size: pass the state's learned values")
        return WeightQuantizer(jnp.maximum(learned["step"], MIN_STEP), None, qmin, qmax, group)
    # the scale takes no gradient (fake_quant stops it): computed from stopped values, so that
    # differentiating the step traces no tangents of the reductions only to drop them
    w = jax.lax.stop_gradient(w)
    if group is None:
        x, axes = w, linear.reduce_axes(w.ndim, spec.axis)
    else:
        pad = jnp.nan if spec.calibration == "percentile" else 0.0
        x, axes = group_view(w, spec.axis, *group, pad=pad)
    scale, zp = calibrated_scale(x, axes, qmin, qmax, symmetric=spec.symmetric,
                                 method=spec.calibration, percentile=spec.percentile)
    if group is not None:
        scale = jnp.squeeze(scale, group[0] + 1)
        zp = None if zp is None else jnp.squeeze(zp, group[0] + 1)
    if spec.scale_pow2:
        scale = pow2_ceil(scale)
    return WeightQuantizer(scale, zp, qmin, qmax, group)


def weight_codes(w: jax.Array, spec: QuantSpec, learned: Learned | None = None) -> tuple[jax.Array, WeightQuantizer]:
    """Integer codes (as floats, round to nearest) of ``w`` and their quantizer."""
    q = weight_quantizer(w, spec, learned)
    if spec.format == "ternary" or spec.bits == 1:
        codes, _ = (ternary_codes if spec.format == "ternary" else binary_codes)(w, spec.axis)
        return codes, q
    scale, zp = q.expanded(w.shape)
    return linear.quantize(w, scale, zp, q.qmin, q.qmax), q


def fp8_weight(w: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(values, scale)`` of an fp8 ``spec``: float8 values and the absmax scale per channel.

    ``values.astype(scale.dtype) * scale`` is the fake-quantized weight (before the
    cast to ``w.dtype``), so export and training decode the same numbers.
    """
    x = jnp.asarray(w, linear.compute_dtype(w.dtype))
    scale = fp8_scale(x, spec.format, spec.axis)
    scale = pow2_ceil(scale) if spec.scale_pow2 else scale
    return fp8_cast(x / scale, spec.format), scale


def fake_quant_weight(w: jax.Array, spec: QuantSpec, learned: Learned | None = None,
                      key: jax.Array | None = None) -> jax.Array:
    """``w`` fake-quantized as ``spec`` says, with its straight-through gradient.

    Where the calibration cannot clip (absmax, min/max, binary, ternary, pow2,
    fp8) the clipped STE is 1 everywhere and is evaluated as the identity, which
    is exact (the comparison ``|w| / scale <= qmax`` could misfire by one ulp at
    the largest entry). ``learned`` holds LSQ's step; ``key`` drives stochastic
    rounding.

    Args:
      w: the weight.
      spec: how to quantize it.
      learned: the learned values of ``spec.learned="lsq"`` (``{"step": ...}``).
      key: the PRNG key of ``rounding="stochastic"``.

    Returns:
      The fake-quantized weight, of ``w``'s dtype.

    Raises:
      TypeError: if ``spec`` is not a QuantSpec or ``w`` is not a float array (the
        transform leaves integer leaves alone too).
      ValueError: if ``spec`` needs ``learned`` or ``key`` and it is not given.

    A ``w`` with no entries (a zero-size axis) comes back as it is: its channels get scale 1.0.

    Example:
      >>> import jax.numpy as jnp
      >>> fake_quant_weight(jnp.array([[0.5, -2.0], [1.0, 0.26]]), QuantSpec(bits=4))
      Array([[ 0.42857146, -2.        ],
             [ 1.        ,  0.2857143 ]], dtype=float32)
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"fake_quant_weight: spec must be a jaxqp.QuantSpec, e.g. QuantSpec(bits=8); got "
                        f"{type(spec).__name__}")
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise TypeError(f"fake_quant_weight: w must be an array, got {type(w).__name__}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"fake_quant_weight: w must be a float array, got dtype {w.dtype}: integer tensors "
                        "hold no weights to quantize (cast first, e.g. w.astype(jnp.float32))")
    if spec.format == "pow2":
        return straight_through(w, pow2_values(w, spec.bits, spec.axis))
    if spec.format in ("e4m3", "e5m2"):
        values, scale = fp8_weight(w, spec)
        return straight_through(w, (values.astype(scale.dtype) * scale).astype(w.dtype))
    if spec.format == "ternary" or spec.bits == 1:
        codes, q = weight_codes(w, spec)
        return straight_through(w, (codes * q.scale).astype(w.dtype))
    q = weight_quantizer(w, spec, learned)
    scale, zp = q.expanded(w.shape)
    if spec.learned == "lsq":
        count = math.prod(w.shape) // max(math.prod(q.scale.shape), 1)  # entries per learned step
        x = jnp.asarray(w, linear.compute_dtype(w.dtype))
        return lsq(x, scale, q.qmin, q.qmax, lsq_grad_scale(count, q.qmax)).astype(w.dtype)
    ste = "identity" if spec.calibration == "max" else spec.ste
    if spec.rounding == "stochastic":
        if key is None:
            raise ValueError(f"{spec}: stochastic rounding needs a key; build the transform with "
                             "jaxqp.transform(rules, seed=0)")
        return _stochastic(w, scale, zp, q.qmin, q.qmax, key, ste)
    return linear.fake_quant(w, scale, zp, q.qmin, q.qmax, ste)


def _stochastic(w, scale, zp, qmin, qmax, key, ste):
    x = jnp.asarray(w, linear.compute_dtype(w.dtype))
    scale = jax.lax.stop_gradient(scale)
    v = x / scale + (0.0 if zp is None else zp)
    codes = jnp.clip(stochastic_round(jax.lax.stop_gradient(v), key), qmin, qmax)
    y = linear.dequantize(codes, scale, zp).astype(w.dtype)
    through = straight_through(w, y)
    if ste == "identity":
        return through
    inside = (v >= qmin) & (v <= qmax)
    return jnp.where(inside, through, jax.lax.stop_gradient(y))
