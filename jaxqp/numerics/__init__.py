"""Array-level primitives of jaxqp: rounding, scales, formats, learned quantizers, masks, packing.

Everything here works on single arrays (or lists of arrays) with ``jax`` and ``numpy`` only:
no specs, no parameter trees, no flax. Use it to prototype a new quantizer or pruning
criterion; the parameter-tree API (``jaxqp.Rule``, ``jaxqp.transform``, ...) is built on it.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxqp import numerics
    >>> x = jnp.array([1.0, -0.5, 0.25])
    >>> scale = numerics.symmetric_scale(x, bits=8, axis=None)
    >>> qmin, qmax = numerics.int_range(8, narrow=True)
    >>> (numerics.fake_quant(x, scale, None, qmin, qmax) / scale).tolist()  # codes, half to even
    [127.0, -64.0, 32.0]
    >>> numerics.magnitude_mask(x, 1 / 3).tolist()
    [True, True, False]
"""

from ._formats import (
    binary,
    fp8_round,
    pow2_ceil,
    pow2_codes_of,
    pow2_from_codes,
    pow2_values,
    stochastic_round,
    straight_through,
)
from ._int_dot import bf16_int_dot, exact_int_dot, int_dense
from ._learned import lsq, lsq_grad_scale, pact
from ._linear import affine_scale, dequantize, fake_quant, int_range, quantize, symmetric_scale
from ._masks import (
    apply_mask,
    block_mask,
    channel_mask,
    erk_sparsities,
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    prune_count,
    threshold_mask,
)
from ._packing import pack, pack_mask, pack_mask_rows, unpack, unpack_mask, unpack_mask_rows
from ._ranges import MSE_RATIOS, expand_groups, group_view, mse_range, observe_range, scale_from_range

__all__ = [
    "MSE_RATIOS",
    "affine_scale",
    "apply_mask",
    "bf16_int_dot",
    "binary",
    "block_mask",
    "channel_mask",
    "dequantize",
    "erk_sparsities",
    "exact_int_dot",
    "expand_groups",
    "fake_quant",
    "fp8_round",
    "global_magnitude_masks",
    "group_view",
    "int_dense",
    "int_range",
    "lsq",
    "lsq_grad_scale",
    "magnitude_mask",
    "mse_range",
    "nm_mask",
    "observe_range",
    "pack",
    "pack_mask",
    "pack_mask_rows",
    "pact",
    "pow2_ceil",
    "pow2_codes_of",
    "pow2_from_codes",
    "pow2_values",
    "prune_count",
    "quantize",
    "scale_from_range",
    "stochastic_round",
    "straight_through",
    "symmetric_scale",
    "threshold_mask",
    "unpack",
    "unpack_mask",
    "unpack_mask_rows",
]
