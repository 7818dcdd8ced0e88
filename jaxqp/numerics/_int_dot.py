"""An integer ``x @ W`` for training, equal to the fake-quant matmul (numerics layer: jax only).

:func:`int_dense` quantizes ``x`` (per row or per tensor) and the already
fake-quantized weight ``W`` (per output column) with symmetric *power-of-two*
scales, multiplies the int8 codes with ``lax.dot_general`` into int32 and
rescales. With power-of-two scales every step is exact in float32 as long as
``K * qmax_x * qmax_w < 2**24`` (``K <= 1040`` for 8 x 8 bits): the float
fake-quant matmul ``fq(x) @ fq(W)`` is then exact too, so both give the same
bits. For larger ``K`` the integer result is the exact one and the float matmul
rounds. The gradient is the fake-quant path's straight-through one:
``dx = g W^T`` and ``dW = fq(x)^T g``.

``W`` is re-quantized from its fake-quantized values: its codes times the
recomputed power-of-two scale reproduce it exactly, whichever of the two
decompositions (same scale, or a finer one when the largest code is below
``qmax / 2``) comes out, so no scale needs to travel with the weight.

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.5, -1.0, 0.25]])
    >>> w = jnp.array([[1.0, 0.5], [-0.25, 2.0], [0.75, -1.0]])
    >>> int_dense(x, w, 8, 8, True)
    Array([[ 0.9375, -2.    ]], dtype=float32)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._formats import pow2_ceil
from ._linear import check_bits, nonzero_scale, reciprocal
from ._path_choice import decide, note, row_bucket


def pow2_codes(x: jax.Array, bits: int, axis: int | None) -> tuple[jax.Array, jax.Array]:
    """Symmetric codes (int8) and power-of-two scales of 2-D ``x``, reduced over ``axis`` (None: all)."""
    qmax = 2 ** (bits - 1) - 1
    absmax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = nonzero_scale(absmax * reciprocal(qmax))
    # a row holding NaN or an infinity keeps its non-finite scale (pow2_ceil would make it 1.0),
    # so its outputs are NaN or infinite as in float, not values from codes cast from NaN
    scale = jnp.where(jnp.isfinite(scale), pow2_ceil(scale), scale)
    codes = jnp.clip(jnp.round(x / scale), -qmax, qmax)
    return codes.astype(jnp.int8), scale


MIN_ROWS = 4  # XLA's CPU integer dot is ~10x slower for one row than for four (measured on CPU only)


def min_rows(backend: str | None = None) -> int:
    """Rows an integer matmul's input is zero-padded to: ``MIN_ROWS`` on CPU, where it was measured
    faster; 1 (no padding) on other backends, where nothing was measured.

    Args:
      backend: a backend name; default ``jax.default_backend()``.

    Returns:
      The row count.
    """
    return MIN_ROWS if (backend or jax.default_backend()) == "cpu" else 1
SWAP_MAX_ROWS = 64  # up to this many rows, the kernel-first operand order is faster


def int8_dot_rows(codes: jax.Array, kernel_codes: jax.Array) -> jax.Array:
    """``codes (n, in) . kernel_codes (out, in)`` contracted on ``in``: int32 ``(n, out)``.

    Up to ``SWAP_MAX_ROWS`` rows, the dot is written ``kernel . codes`` (result
    ``(out, n)``) and fenced with an optimization barrier before the transpose: XLA's
    CPU int8 dot is 1.3-2x faster in that operand order for few rows, and without the
    fence its layout pass folds the transpose back into the dot. For more rows the
    plain order is faster (``benchmarks/int8_dot.py``).
    """
    if codes.shape[0] > SWAP_MAX_ROWS:
        return jax.lax.dot_general(codes, kernel_codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    acc = jax.lax.dot_general(kernel_codes, codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return jax.lax.optimization_barrier(acc).T


BF16_CHUNK = 1024  # 1024 * 127 * 127 < 2**24: a chunk's partial sums are exact float32 integers
BF16_MAX_WIDTH = 2048  # wider layers: the int8 dot is faster than the bf16 one (int8_dot.py)
_BF16_EXACT = jax.lax.DotAlgorithmPreset.BF16_BF16_F32


def bf16_int_dot(codes: jax.Array, carrier: jax.Array, carrier_in_axis: int = 1) -> jax.Array:
    """The same int32 product as :func:`int8_dot_rows`, computed with bf16 carriers.

    ``codes (n, in)`` (int8 or integer-valued float) and ``carrier (out, in)`` (bf16,
    integers in [-127, 127]; ``(in, out)`` with ``carrier_in_axis=0``) hold every code
    exactly; the dot multiplies them in bf16 with float32 accumulation
    (``DotAlgorithmPreset.BF16_BF16_F32``, which forbids imprecise accumulation). Products
    are below 2^14 and each chunk of ``BF16_CHUNK`` inputs sums to below 2^24 in
    magnitude, so every partial sum is an exact float32 integer whatever the summation
    order; the chunks are added in int32. On the CPU where this was tuned (AVX-512)
    that is 0.45-0.7x the float32 time for 512- and 2048-wide layers at 128-512 rows,
    where XLA's int8 dot gets 0.6-0.9x (``benchmarks/int8_dot.py``).

    Args:
      codes: ``(n, in)`` integer codes.
      carrier: the kernel codes as bf16, ``(out, in)`` (or ``(in, out)``).
      carrier_in_axis: the input axis of ``carrier``.

    Returns:
      The int32 ``(n, out)`` product.
    """
    lhs = codes.astype(jnp.bfloat16)
    dims = (((1,), (carrier_in_axis,)), ((), ()))
    parts = []
    for start in range(0, codes.shape[1], BF16_CHUNK):
        chunk = jax.lax.slice_in_dim(carrier, start, min(start + BF16_CHUNK, codes.shape[1]), axis=carrier_in_axis)
        part = jax.lax.dot_general(lhs[:, start:start + BF16_CHUNK], chunk, dims,
                                   precision=_BF16_EXACT, preferred_element_type=jnp.float32)
        parts.append(part.astype(jnp.int32))
    return functools.reduce(jnp.add, parts)  # the chunks' sum in int32, no zero start


INT_FORMS = ("int8", "int8_t", "bf16")


def int_dot(codes: jax.Array, kernel_codes: jax.Array, form: str, kernel_in_axis: int = 1) -> jax.Array:
    """int32 ``codes (n, in)`` times int8 ``kernel_codes`` contracted on ``in``, by one exact form.

    Every form returns the same integers; which is fastest depends on the machine
    (``jaxqp.numerics`` measures it, see ``_path_choice``):

    * ``"int8"``: XLA's int8 dot with int32 accumulation, rows first;
    * ``"int8_t"``: the same dot written kernel first and fenced with an optimization
      barrier before the transpose (faster for few rows on some CPUs);
    * ``"bf16"``: :func:`bf16_int_dot` on a bf16 copy of the kernel made inside the
      computation (fast where bf16 is native).

    Args:
      codes: ``(n, in)`` int8 codes.
      kernel_codes: int8 ``(out, in)`` (``kernel_in_axis=1``) or ``(in, out)`` (``0``).
      form: one of ``INT_FORMS``.
      kernel_in_axis: the input axis of ``kernel_codes``.

    Returns:
      The int32 ``(n, out)`` product.
    """
    if form == "int8":
        return jax.lax.dot_general(codes, kernel_codes, (((1,), (kernel_in_axis,)), ((), ())),
                                   preferred_element_type=jnp.int32)
    if form == "int8_t":
        acc = jax.lax.dot_general(kernel_codes, codes, (((kernel_in_axis,), (1,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        return jax.lax.optimization_barrier(acc).T
    if form == "bf16":
        return bf16_int_dot(codes, kernel_codes.astype(jnp.bfloat16), carrier_in_axis=kernel_in_axis)
    raise ValueError(f"form={form!r}: expected one of {INT_FORMS}")


def uses_bf16(rows: int, n_in: int, n_out: int) -> bool:
    """Whether :func:`exact_int_dot` takes the bf16 path for this shape (many rows, width <= 2048)."""
    return rows > SWAP_MAX_ROWS and max(n_in, n_out) <= BF16_MAX_WIDTH


def exact_int_dot(codes: jax.Array, kernel_codes: jax.Array, carrier: jax.Array | None = None) -> jax.Array:
    """int32 ``codes (n, in) . kernel_codes (out, in)``, by the faster exact path for the shape.

    With a bf16 ``carrier`` of the kernel codes and :func:`uses_bf16`, :func:`bf16_int_dot`;
    otherwise :func:`int8_dot_rows`. Both return the same integers.

    Args:
      codes: ``(n, in)`` int8 codes.
      kernel_codes: ``(out, in)`` int8 kernel codes.
      carrier: the kernel codes as bf16, or None.

    Returns:
      The int32 ``(n, out)`` product.
    """
    if carrier is not None and uses_bf16(codes.shape[0], *kernel_codes.shape[::-1]):
        return bf16_int_dot(codes, carrier)
    return int8_dot_rows(codes, kernel_codes)


def padded_rows(x: jax.Array, n_in: int) -> tuple[jax.Array, int]:
    """``x`` as ``(n, n_in)`` rows, zero-padded to at least ``min_rows()``, and the real ``n``."""
    rows = x.reshape(-1, n_in)
    n, least = rows.shape[0], min_rows()
    if n < least:
        rows = jnp.concatenate([rows, jnp.zeros((least - n, n_in), rows.dtype)])
    return rows, n


def train_forms(k: int, x_bits: int, w_bits: int) -> tuple[str, ...]:
    """The forms :func:`int_dense` may take: the exact integer ones, and ``"float"`` where it is exact too.

    The float fake-quant matmul of power-of-two-scaled codes is exact (so equal bit for bit)
    when ``k * qmax_x * qmax_w < 2**24``: every product and partial sum is then an integer
    multiple of ``s_x * s_w`` below ``2**24`` of them.
    """
    exact_float = k * (2 ** (x_bits - 1) - 1) * (2 ** (w_bits - 1) - 1) < 2**24
    return (*INT_FORMS, "float") if exact_float else INT_FORMS


def _forward_form(x, w, x_bits, w_bits, per_token, form):
    k = w.shape[0]
    # Kernel codes in the kernel's own (in, out) layout: (out, in) codes cost a transposed copy of
    # every kernel at every step (measured: w8a8-int step 1.53x float with it, 1.13x without).
    w_codes, w_scale = pow2_codes(w.astype(jnp.float32), w_bits, 0)
    if form == "float":  # the fake-quant matmul: no rows padded for an integer dot
        rows, n = x.astype(jnp.float32).reshape(-1, k), None
    else:
        rows, n = padded_rows(x.astype(jnp.float32), k)
    x_codes, x_scale = pow2_codes(rows, x_bits, 1 if per_token else None)
    x_hat = (x_codes.astype(jnp.float32) * x_scale)[:n]
    if form == "float":
        y = x_hat @ (w_codes.astype(jnp.float32) * w_scale)
    else:
        y = (int_dot(x_codes, w_codes, form, kernel_in_axis=0).astype(jnp.float32) * x_scale * w_scale)[:n]
    return y.reshape(*x.shape[:-1], w.shape[1]).astype(x.dtype), x_hat.reshape(x.shape)


def _train_candidates(rows, k, out, x_bits, w_bits, per_token):
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((row_bucket(rows), k)).astype(np.float32))
    w = jax.device_put(rng.standard_normal((k, out)).astype(np.float32))
    fns = {}
    for form in train_forms(k, x_bits, w_bits):
        fn = jax.jit(functools.partial(_forward_form, x_bits=x_bits, w_bits=w_bits, per_token=per_token, form=form))
        fns[form] = functools.partial(fn, x, w)
    return fns, functools.partial(jax.jit(jnp.matmul), x, w)


def _forward(x, w, x_bits, w_bits, per_token):
    check_bits("int_dense: x_bits", x_bits, 2, 8)  # int8 codes either side
    check_bits("int_dense: w_bits", w_bits, 2, 8)
    k, out = w.shape
    rows = max(math.prod(x.shape[:-1]), min_rows())
    kind = f"int_dense-a{x_bits}w{w_bits}{'-per_token' if per_token else ''}"
    form = decide(kind, (k, out), rows,
                  lambda: _train_candidates(rows, k, out, x_bits, w_bits, per_token)).path
    note(kind, (k, out), rows, form)
    return _forward_form(x, w, x_bits, w_bits, per_token, form)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def int_dense(x: jax.Array, w: jax.Array, x_bits: int, w_bits: int, per_token: bool) -> jax.Array:
    """``fq(x) @ w`` computed in int8 x int8 -> int32; ``w`` is a fake-quantized ``(in, out)`` kernel.

    Args:
      x: ``(..., in)`` float input.
      w: ``(in, out)`` fake-quantized kernel.
      x_bits: the input's code width.
      w_bits: the kernel's code width.
      per_token: one input scale per row (else one per tensor).

    Returns:
      ``fq(x) @ w`` in ``x``'s dtype; its gradient is that of the fake-quant forward.
    """
    return _forward(x, w, x_bits, w_bits, per_token)[0]


def _int_dense_fwd(x, w, x_bits, w_bits, per_token):
    y, x_hat = _forward(x, w, x_bits, w_bits, per_token)
    return y, (x_hat, w, jnp.zeros((), x.dtype))


def _int_dense_bwd(x_bits, w_bits, per_token, residuals, g):
    x_hat, w, x_dtype = residuals
    k, out = w.shape
    g2 = g.reshape(-1, out).astype(jnp.float32)
    dx = (g2 @ w.astype(jnp.float32).T).reshape(x_hat.shape).astype(x_dtype.dtype)
    dw = (x_hat.reshape(-1, k).T @ g2).astype(w.dtype)
    return dx, dw


int_dense.defvjp(_int_dense_fwd, _int_dense_bwd)
