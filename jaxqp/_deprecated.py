"""Top-level names of jaxqp 0.1 that moved in 0.2: they still work, with a DeprecationWarning.

They will be removed in jaxqp 0.3. Array-level primitives moved to :mod:`jaxqp.numerics`,
serving kernels to :mod:`jaxqp.serving`; helpers that users never needed have no public home.

Example:
    >>> import warnings, jaxqp
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     f = jaxqp.magnitude_mask
    >>> f is jaxqp.numerics.magnitude_mask, caught[0].category.__name__
    (True, 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import warnings

_NUMERICS = (
    "affine_scale", "apply_mask", "binary", "block_mask", "channel_mask", "expand_groups", "fake_quant",
    "fp8_round", "global_magnitude_masks", "group_view", "int_range", "lsq", "lsq_grad_scale",
    "magnitude_mask", "mse_range", "nm_mask", "observe_range", "pact", "pow2_ceil", "pow2_values",
    "scale_from_range", "stochastic_round", "straight_through", "symmetric_scale", "threshold_mask",
)
_SERVING = ("GeneralKernel", "Int8Linear", "ServingKernel", "int8_matmul", "int8_matmul_general")
_INTERNAL = {  # name: (module, attribute, what to use instead)
    "QuantizedInput": ("jaxqp._adapters.inputs", "QuantizedInput",
                       "it is an implementation detail of jaxqp.nnx_apply; call jaxqp.nnx_apply instead"),
    "init_step": ("jaxqp._transforms.weight_quantizer", "init_step",
                  "LSQ steps are initialised by t.init(params); read them from state.learned"),
    "weight_codes": ("jaxqp._transforms.weight_quantizer", "weight_codes",
                     "use jaxqp.export(params, state) and read QArray.int_codes()"),
    "weight_quantizer": ("jaxqp._transforms.weight_quantizer", "weight_quantizer",
                         "use jaxqp.fake_quant_weight(w, spec) or jaxqp.export"),
}


_MOVED_IN_0_3 = {  # name: (module, what to use instead); removed in 0.4
    "to_onnx": ("jaxqp.deploy", "use jaxqp.deploy.to_onnx: exporters to other runtimes live in jaxqp.deploy, "
                "next to to_litert"),
}


def int_bounds(bits: int, *, signed: bool = True, symmetric: bool = True) -> tuple[int, int]:
    """jaxqp 0.1's ``int_bounds``: ``jaxqp.numerics.int_range(bits, signed=signed, narrow=symmetric)``."""
    from .numerics import int_range

    return int_range(bits, signed=signed, narrow=symmetric)


def moved(name: str):
    """The object a deprecated top-level ``name`` stands for, after a DeprecationWarning.

    Args:
      name: an attribute looked up on ``jaxqp`` that it does not define.

    Returns:
      The object, or None when ``name`` is no deprecated name.
    """
    if name in _NUMERICS:
        module, attr, hint = "jaxqp.numerics", name, f"use jaxqp.numerics.{name}"
    elif name in _SERVING:
        module, attr, hint = "jaxqp.serving", name, f"use jaxqp.serving.{name}"
    elif name == "int_bounds":
        module, attr = __name__, name
        hint = "use jaxqp.numerics.int_range(bits, signed=..., narrow=symmetric)"
    elif name in _INTERNAL:
        module, attr, hint = _INTERNAL[name]
    elif name in _MOVED_IN_0_3:
        (module, hint), attr = _MOVED_IN_0_3[name], name
        warnings.warn(f"jaxqp.{name} is deprecated since jaxqp 0.3 and will be removed in 0.4: {hint}.",
                      DeprecationWarning, stacklevel=3)
        return getattr(importlib.import_module(module), attr)
    else:
        return None
    warnings.warn(f"jaxqp.{name} is deprecated since jaxqp 0.2 and will be removed in 0.3: {hint}.",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(module), attr)


NAMES = tuple(sorted(_NUMERICS + _SERVING + tuple(_INTERNAL) + ("int_bounds",)))
