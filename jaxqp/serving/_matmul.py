"""The int8 matmuls of serving kernels and the choice of their path (serving layer, no flax).

:func:`int8_matmul` computes ``x @ W`` for a ServingKernel by one of four paths
(``PATHS``). The integer ones quantize each row of ``x`` to int8 on the fly (symmetric,
absmax per row), multiply with the kernel's int8 codes into int32 and rescale:
``"int8"`` (XLA's int8 dot), ``"int8_t"`` (the same dot kernel-first) and ``"bf16"``
(an exact bf16 dot) give the same bits. Relative to ``x @ dequantize(W)`` their only
error is the activation rounding, at most half an int8 step of each row's absmax per
input (see ``docs/design.md``). ``"float"`` is ``x @ dequantize(W)`` itself, the weight
decoded from the codes inside the jitted function (or kept, ``prepare(keep_float=True)``).
A kernel pinned to a path takes it; an ``"auto"`` kernel takes the path measured fastest
on this machine for its shape and row bucket (``jaxqp.numerics`` ``_path_choice``).

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    >>> y = jaxqp.serving.int8_matmul(jnp.ones((4, 256)), served["w"])
    >>> y.shape
    (4, 256)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._int_dot import padded_rows, pow2_codes
from ..numerics._linear import nonzero_scale, reciprocal
from ..numerics._path_choice import decide, note, row_bucket
from ._hooks import PATHS, current_hook, current_override
from ._kernels import GeneralKernel, ServingKernel, _Int8Codes


def _product(rows: jax.Array, kernel: _Int8Codes, n_contract: int) -> jax.Array:
    hook = current_hook()
    if hook is not None:
        return hook.product(rows, kernel, n_contract)
    return rows_product(rows, kernel, n_contract, kernel_path(kernel, rows.shape[0], n_contract))


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of each row of 2-D ``x`` and the float32 scale per row.

    Args:
      x: a 2-D float array.

    Returns:
      ``(codes, scale)``: int8 codes and the float32 ``(rows, 1)`` scale.
    """
    x = x.astype(jnp.float32)
    scale = nonzero_scale(jnp.max(jnp.abs(x), axis=1, keepdims=True) * reciprocal(127))  # NaN rows stay NaN
    # times the reciprocal, as XLA computes x / scale under jit: eager, jit and ONNX agree
    codes = jnp.clip(jnp.round(x * (1.0 / scale)), -127, 127).astype(jnp.int8)
    return codes, scale


def rows_product(rows: jax.Array, kernel: _Int8Codes, n_contract: int, path: str) -> jax.Array:
    """``rows (n, K)`` times the kernel's ``(K, F)`` weight by ``path``, as float32 ``(n, F)``.

    The integer paths (``"int8"``, ``"int8_t"``, ``"bf16"``) quantize each row to int8
    (symmetric absmax, or power-of-two scales with ``kernel.pow2``), compute the same
    int32 products and rescale: they agree bit for bit. ``"float"`` multiplies the
    unquantized rows with the dequantized weight (kept, or decoded from the codes here).

    Args:
      rows: ``(n, K)`` float rows.
      kernel: the prepared kernel.
      n_contract: how many leading kernel axes are contracted (1 for a ServingKernel).
      path: one of ``PATHS``.

    Returns:
      The float32 ``(n, F)`` product.
    """
    if path == "float":
        return kernel.float_product(rows, n_contract).astype(jnp.float32)
    padded, n = padded_rows(rows, rows.shape[1])
    codes, row_scale = pow2_codes(padded, 8, 1) if kernel.pow2 else quantize_rows(padded)
    acc = kernel.int_product(codes, path, n_contract)
    return (acc.astype(jnp.float32) * row_scale * kernel.out_scale(n_contract))[:n]


def _random_like(a, rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(a.dtype)
    if dtype == np.int8:
        return rng.integers(-127, 128, a.shape).astype(np.int8)
    if dtype == np.uint8:
        return rng.integers(0, 256, a.shape).astype(np.uint8)
    return (rng.random(a.shape) + 0.5).astype(dtype)  # positive: a valid scale or weight


def _candidates(kernel: _Int8Codes, rows: int, n_contract: int):
    """Each path (and the float matmul) on random data of the kernel's shape and ``row_bucket(rows)`` rows."""
    rng = np.random.default_rng(0)
    synthetic = jax.device_put(jax.tree_util.tree_map(lambda a: _random_like(a, rng), kernel))
    k, f = kernel.matrix_shape(n_contract)
    x = jax.device_put(rng.standard_normal((row_bucket(rows), k)).astype(np.float32))
    fns = {}
    for path in PATHS:
        fn = jax.jit(functools.partial(rows_product, n_contract=n_contract, path=path))
        fns[path] = functools.partial(fn, x, synthetic)
    weight = jax.device_put(rng.standard_normal((k, f)).astype(np.float32))
    reference = functools.partial(jax.jit(jnp.matmul), x, weight)
    return fns, reference


def kernel_path(kernel: _Int8Codes, rows: int, n_contract: int = 1) -> str:
    """The path a kernel takes for ``rows`` input rows: its pin, else the measured choice.

    Args:
      kernel: the prepared kernel.
      rows: the input's row count.
      n_contract: how many leading kernel axes are contracted.

    Returns:
      One of ``PATHS``.
    """
    shape = kernel.matrix_shape(n_contract)
    path = kernel.path if kernel.path != "auto" else current_override()
    if path == "auto":
        path = decide(kernel.kind, shape, rows, lambda: _candidates(kernel, rows, n_contract)).path
    note(kernel.kind, shape, rows, path)
    return path


def _require_kernel(where: str, kernel, kind: type) -> None:
    if not isinstance(kernel, kind):
        raise TypeError(f"{where}: kernel must be a {kind.__name__} from jaxqp.prepare(jaxqp.export(params, state)), "
                        f"got {type(kernel).__name__}; a float weight multiplies with x @ w")


def int8_matmul(x: jax.Array, kernel: ServingKernel) -> jax.Array:
    """``x @ W`` over the last axis of ``x``, by the kernel's path (see :func:`rows_product`).

    Args:
      x: ``(..., in)`` float input.
      kernel: the prepared kernel.

    Returns:
      ``(..., out)`` in ``x``'s dtype.
    """
    _require_kernel("int8_matmul", kernel, ServingKernel)
    n_in = kernel.shape[0]
    if x.shape[-1] != n_in:
        raise ValueError(f"int8_matmul: x has {x.shape[-1]} features, the kernel expects {n_in}")
    rows = x.reshape(-1, n_in)
    y = _product(rows, kernel, 1)
    return y.reshape(*x.shape[:-1], kernel.shape[1]).astype(x.dtype)


def int8_matmul_general(x: jax.Array, kernel: GeneralKernel, n_contract: int) -> jax.Array:
    """``x`` contracted over its last ``n_contract`` axes with the kernel's leading ones.

    The kernel is read as a ``(K, F)`` matrix (a free reshape of its own layout) and
    multiplied like :func:`int8_matmul`, by the kernel's path; the result is reshaped to
    ``(..., *features)``.

    Args:
      x: the input.
      kernel: the prepared kernel.
      n_contract: how many trailing axes of ``x`` are contracted.

    Returns:
      The output, in ``x``'s dtype.
    """
    _require_kernel("int8_matmul_general", kernel, GeneralKernel)
    contracted, features = kernel.shape[:n_contract], kernel.shape[n_contract:]
    if tuple(x.shape[x.ndim - n_contract:]) != contracted:
        raise ValueError(f"int8_matmul_general: x's last axes {x.shape[x.ndim - n_contract:]} do not match "
                         f"the kernel's contracted axes {contracted}")
    rows = x.reshape(-1, math.prod(contracted))
    y = _product(rows, kernel, n_contract)
    return y.reshape(*x.shape[:x.ndim - n_contract], *features).astype(x.dtype)
