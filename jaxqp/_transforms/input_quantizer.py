"""Fake-quantization of layer inputs from an :class:`ActSpec` (transforms layer, no flax).

The state of one quantized input (keyed by the path of the kernel that
multiplies it) is split in two dicts of the transform state:

* ``ranges[path] = {"lo", "hi", "count"}`` for ``range="static"``: float32
  scalars and the number of batches recorded (0: use the batch's own range);
* ``learned["inputs"][path]``: ``{"alpha"}`` (pact), ``{"step"}`` (lsq) or
  ``{"step", "offset"}`` (lsq+), trainable leaves that :func:`jaxqp.wrap` updates.

:func:`fake_quant_input` returns the fake-quantized input and what it observed:
``{"lo", "hi"}`` of the batch for static ranges (folded into the EMA by
``t.update(params, state, observed)``), or, while calibrating, also
``"absmean"`` (the input passes through unchanged then).

Example:
    >>> import jax.numpy as jnp
    >>> y, seen = fake_quant_input(jnp.array([[0.0, 1.0, 1.4, 3.0]]), ActSpec(bits=2, signed=False), None, None)
    >>> y, seen
    (Array([[0., 1., 1., 3.]], dtype=float32), {})
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .._specs.activation import ActSpec
from ..numerics._formats import pow2_ceil
from ..numerics._learned import lsq, lsq_grad_scale, pact
from ..numerics._linear import SteKind, compute_dtype, fake_quant, int_range
from ..numerics._ranges import calibrated_scale, observe_range, scale_from_range


def bounds(spec: ActSpec) -> tuple[int, int]:
    return int_range(spec.bits, signed=spec.signed, narrow=spec.symmetric)


def init_ranges(spec: ActSpec) -> dict | None:
    if spec.range != "static":
        return None
    zero = jnp.zeros((), jnp.float32)
    return {"lo": zero, "hi": zero, "count": jnp.zeros((), jnp.int32)}


def init_learned(spec: ActSpec, lo: jax.Array | None = None, hi: jax.Array | None = None,
                 absmean: jax.Array | None = None) -> dict | None:
    """Initial learned values: from ``spec.init``, or from calibration statistics (all three given)."""
    qmin, qmax = bounds(spec)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    if lo is None or hi is None or absmean is None:
        lo = hi = absmean = None
    if spec.range == "pact":
        top = spec.init if lo is None or hi is None else (jnp.maximum(-lo, hi) if spec.symmetric else hi)
        return {"alpha": f32(top)}
    if spec.range == "lsq":
        step = spec.init / qmax if absmean is None else 2.0 * absmean / math.sqrt(qmax)
        return {"step": f32(step)}
    if spec.range == "lsq+":
        if lo is None or hi is None:
            return {"step": f32(2 * spec.init / (qmax - qmin)), "offset": f32(0.0)}
        step = jnp.maximum(hi - lo, 1e-8) / (qmax - qmin)
        return {"step": f32(step), "offset": f32(lo - qmin * step)}
    return None


def _all_axes(x) -> tuple[int, ...]:
    return tuple(range(x.ndim))


def _observe(x, spec: ActSpec):
    return observe_range(jax.lax.stop_gradient(x), _all_axes(x), spec.calibration,
                         symmetric=spec.symmetric, percentile=spec.percentile)


def _state(values: dict | None, spec: ActSpec, what: str) -> dict:
    if values is None:  # t.init makes them for every ActSpec that needs them
        raise ValueError(f"{spec!r} needs its {what} in the transform state; build it with t.init(params)")
    return values


def fake_quant_input(x: jax.Array, spec: ActSpec, ranges: dict | None, learned: dict | None,
                   calibrating: bool = False) -> tuple[jax.Array, dict]:
    """``(x_hat, observed)`` for one layer input; see the module docstring.

    ``x_hat`` has ``x``'s dtype when that is a float; an integer input (pixel values, counts)
    gives float ``x_hat``, as the layer would compute with: the quantized values are not
    integers, and casting them back would truncate them.
    """
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else compute_dtype(x.dtype)
    x = jnp.asarray(x, compute_dtype(dtype))
    if calibrating:
        lo, hi = _observe(x, spec)
        return x.astype(dtype), {"lo": lo.reshape(()), "hi": hi.reshape(()), "absmean": jnp.mean(jnp.abs(x))}
    qmin, qmax = bounds(spec)
    observed: dict = {}
    if spec.range == "dynamic":
        axes = (x.ndim - 1,) if spec.per_token else _all_axes(x)
        scale, zp = calibrated_scale(jax.lax.stop_gradient(x), axes, qmin, qmax, symmetric=spec.symmetric,
                                     method=spec.calibration, percentile=spec.percentile)
        scale = pow2_ceil(scale) if spec.scale_pow2 else scale
        ste: SteKind = "identity" if spec.calibration == "max" else "clipped"
        y = fake_quant(x, scale, zp, qmin, qmax, ste)
    elif spec.range == "static":
        lo_b, hi_b = _observe(jax.lax.stop_gradient(x), spec)  # ranges take no gradient (as the dynamic scale)
        observed = {"lo": lo_b.reshape(()), "hi": hi_b.reshape(())}
        ranges = _state(ranges, spec, "static ranges")
        recorded = ranges["count"] > 0
        lo = jnp.where(recorded, ranges["lo"], lo_b)
        hi = jnp.where(recorded, ranges["hi"], hi_b)
        scale, zp = scale_from_range(lo, hi, qmin, qmax, symmetric=spec.symmetric)
        scale = pow2_ceil(scale) if spec.scale_pow2 else scale
        y = fake_quant(x, scale, zp, qmin, qmax, "clipped")
    elif spec.range == "pact":
        y = pact(x, _state(learned, spec, "learned clip")["alpha"], spec.bits, signed=spec.symmetric)
    else:
        features = math.prod(x.shape[1:]) if x.ndim > 1 else x.size
        g = lsq_grad_scale(features, qmax)
        learned = _state(learned, spec, "learned step")
        y = lsq(x, learned["step"], qmin, qmax, g, learned.get("offset"))
    return y.astype(dtype), observed


def update_ranges(spec: ActSpec, ranges: dict, observed: dict) -> dict:
    """The EMA ``decay * old + (1 - decay) * batch``; the first batch is taken as it is."""
    first = ranges["count"] == 0
    d = jnp.float32(spec.decay)
    blend = lambda old, new: jnp.where(first, new, d * old + (1 - d) * new)
    return {"lo": blend(ranges["lo"], observed["lo"]), "hi": blend(ranges["hi"], observed["hi"]),
            "count": ranges["count"] + 1}


def from_calibration(spec: ActSpec, batches: list[dict]) -> tuple[dict | None, dict | None]:
    """Ranges and learned values from the statistics of calibration batches.

    The range is the smallest ``lo`` and largest ``hi`` seen ("max"), or the mean of
    the per-batch percentiles ("percentile"); ``absmean`` is averaged.
    """
    lo = jnp.stack([b["lo"] for b in batches])
    hi = jnp.stack([b["hi"] for b in batches])
    if spec.calibration == "max":
        lo, hi = jnp.min(lo), jnp.max(hi)
    else:
        lo, hi = jnp.mean(lo), jnp.mean(hi)
    absmean = jnp.mean(jnp.stack([b["absmean"] for b in batches]))
    ranges = None
    if spec.range == "static":
        ranges = {"lo": lo, "hi": hi, "count": jnp.ones((), jnp.int32)}
    return ranges, init_learned(spec, lo, hi, absmean)
