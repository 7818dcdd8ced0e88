"""From a :class:`QuantSpec` to the numerics: scales, ranges, fake-quant (specs layer).

The one place that decides how a spec quantizes a weight, shared by the
training forward and by export, so the two agree bit for bit.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[0.5, -2.0], [1.0, 0.25]])
    >>> fake_quant_weight(w, QuantSpec(bits=8)).shape
    (2, 2)
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from . import _quant
from ._spec import QuantSpec


class WeightQuantizer(NamedTuple):
    """Scale, zero point (None if symmetric) and integer range for one weight."""

    scale: jax.Array
    zero_point: jax.Array | None
    qmin: int
    qmax: int


def weight_quantizer(w: jax.Array, spec: QuantSpec) -> WeightQuantizer:
    """Calibrates ``spec`` on ``w`` (absmax if symmetric, min/max if affine)."""
    if spec.symmetric:
        qmin, qmax = _quant.int_range(spec.bits, narrow=True)
        return WeightQuantizer(_quant.symmetric_scale(w, spec.bits, spec.axis), None, qmin, qmax)
    qmin, qmax = _quant.int_range(spec.bits)
    scale, zero_point = _quant.affine_scale(w, spec.bits, spec.axis)
    return WeightQuantizer(scale, zero_point, qmin, qmax)


def fake_quant_weight(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """``w`` fake-quantized as ``spec`` says, with its straight-through gradient.

    Absmax and min/max calibration put every entry of ``w`` inside the clipping
    range, so the clipped STE is 1 everywhere: it is evaluated as the identity,
    which is exact (the comparison ``|w| / scale <= qmax`` could misfire by one ulp
    at the largest entry) and saves a pass over the weight in the backward pass.
    """
    q = weight_quantizer(w, spec)
    return _quant.fake_quant(w, q.scale, q.zero_point, q.qmin, q.qmax, "identity")
