"""Learned quantizers: LSQ, LSQ+ and PACT, with the papers' gradients (numerics layer).

With ``v = (x - offset) / step`` and ``q = clip(round(v), qmin, qmax)``:

* LSQ (Esser et al. 2020): ``y = q * step``; ``dy/dx = 1`` inside
  ``[qmin, qmax]``, 0 outside; ``dy/dstep = (q - v)`` inside (``round(v) - v``)
  and ``q`` (``qmin`` or ``qmax``) outside, times the gradient scale ``g``;
  the paper uses ``g = 1 / sqrt(N * qmax)`` with ``N`` the entries per step.
* LSQ+ (Bhalgat et al. 2020): ``y = q * step + offset``; ``dy/dstep`` as LSQ,
  ``dy/doffset = 0`` inside and 1 outside, both times ``g``.
* PACT (Choi et al. 2018): ``y = quant(clip(x, 0, alpha))`` with scale
  ``alpha / qmax``; ``dy/dx = 1`` for ``0 <= x < alpha``; ``dy/dalpha = 1`` for
  ``x >= alpha``, else 0. The signed variant clips to ``[-alpha, alpha]``
  and has ``dy/dalpha = sign(x)`` where ``|x| >= alpha``.

Step sizes and clips below :data:`MIN_STEP` are raised to it, so a step pushed
to zero or below by the optimizer can never divide by zero.

Example:
    >>> import jax, jax.numpy as jnp
    >>> jax.grad(lambda s: lsq(jnp.array([0.3, 9.0]), s, -7, 7, 1.0).sum())(jnp.float32(1.0))
    Array(6.7, dtype=float32)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._linear import check_bits, check_code_range, dequantize, quantize

MIN_STEP = 1e-8


def lsq_grad_scale(count: int, qmax: int) -> float:
    """``1 / sqrt(N * qmax)``: Esser et al.'s step-size gradient scale for ``N`` entries per step.

    Args:
      count: entries that share one step.
      qmax: the largest code.

    Returns:
      The scale.
    """
    return float(1.0 / (max(count, 1) * max(qmax, 1)) ** 0.5)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _lsq(x, step, offset, qmin, qmax, grad_scale):
    return dequantize(quantize(x - offset, step, None, qmin, qmax), step, None) + offset


@_lsq.defjvp
def _lsq_jvp(qmin, qmax, grad_scale, primals, tangents):
    x, step, offset = primals
    x_dot, step_dot, offset_dot = tangents
    y = _lsq(x, step, offset, qmin, qmax, grad_scale)
    v = (x - offset) / step
    inside = (v >= qmin) & (v <= qmax)
    q = jnp.clip(jnp.round(v), qmin, qmax)
    d_step = jnp.where(inside, q - v, q)
    d_offset = jnp.where(inside, 0.0, 1.0).astype(x.dtype)
    y_dot = (jnp.where(inside, x_dot, jnp.zeros_like(x_dot))
             + grad_scale * (d_step * step_dot + d_offset * offset_dot))
    return y, y_dot


def lsq(x: jax.Array, step: jax.Array, qmin: int, qmax: int, grad_scale: float,
        offset: jax.Array | None = None) -> jax.Array:
    """LSQ (``offset`` None) or LSQ+ fake-quant of ``x``; ``step``/``offset`` broadcast to ``x``.

    Args:
      x: the values.
      step: the learned step size.
      qmin: the smallest code.
      qmax: the largest code.
      grad_scale: the step's gradient scale (:func:`lsq_grad_scale`).
      offset: LSQ+'s learned offset, or None.

    Returns:
      The fake-quantized values, with LSQ's gradients for ``step`` and ``offset``.
    """
    check_code_range("lsq", qmin, qmax)
    step = jnp.maximum(jnp.asarray(step, x.dtype), MIN_STEP)
    off = jnp.zeros((), x.dtype) if offset is None else jnp.asarray(offset, x.dtype)
    return _lsq(x, step, off, qmin, qmax, float(grad_scale))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _pact(x, alpha, qmax, signed):
    lo = -alpha if signed else jnp.zeros_like(alpha)
    scale = alpha / qmax
    return dequantize(quantize(jnp.clip(x, lo, alpha), scale, None, -qmax if signed else 0, qmax), scale, None)


@_pact.defjvp
def _pact_jvp(qmax, signed, primals, tangents):
    x, alpha = primals
    x_dot, alpha_dot = tangents
    y = _pact(x, alpha, qmax, signed)
    lo = -alpha if signed else jnp.zeros_like(alpha)
    inside = (x >= lo) & (x < alpha)
    if signed:
        d_alpha = jnp.where(inside, 0.0, jnp.sign(x)).astype(x.dtype)
    else:
        d_alpha = (x >= alpha).astype(x.dtype)
    return y, jnp.where(inside, x_dot, jnp.zeros_like(x_dot)) + d_alpha * alpha_dot


def pact(x: jax.Array, alpha: jax.Array, bits: int, signed: bool = False) -> jax.Array:
    """PACT fake-quant of ``x`` clipped to ``[0, alpha]`` (or ``[-alpha, alpha]`` if signed).

    Args:
      x: the values.
      alpha: the learned clip.
      bits: the code width.
      signed: clip to ``[-alpha, alpha]``.

    Returns:
      The fake-quantized values, with PACT's gradient for ``alpha``.
    """
    check_bits("pact", bits, 2 if signed else 1)
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    alpha = jnp.maximum(jnp.asarray(alpha, x.dtype), MIN_STEP)
    return _pact(x, alpha, qmax, bool(signed))
