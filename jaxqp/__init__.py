"""jaxqp: quantize and prune JAX/Flax parameter trees with pure, composable transforms.

Example:
    >>> import jaxqp
    >>> rules = [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8),
    ...                     prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, 100, 1000, 50)))]
    >>> t = jaxqp.transform(rules)
"""

from ._export import export
from ._io import load, save
from ._lottery import rewind
from ._mask import apply_mask, channel_mask, global_magnitude_masks, magnitude_mask, nm_mask, threshold_mask
from ._optax import WrapState, state_of, wrap
from ._qarray import QArray, SparseArray, dequantize
from ._quant import affine_scale, fake_quant, int_range, symmetric_scale
from ._quantizer import fake_quant_weight, weight_quantizer
from ._rule import LeafPlan, Plan, Rule, resolve
from ._serve_linen import linen_serving_apply
from ._serve_nnx import Int8Linear, nnx_serving_model
from ._serving import ServingKernel, export_serving, int8_matmul, load_serving, prepare
from ._schedule import Schedule, constant, one_shot, polynomial
from ._spec import NM, Channels, PruneSpec, QuantSpec
from ._summary import Summary, summary
from ._transform import ParamTransform, TransformState, chain, transform

__version__ = "0.1.0"

__all__ = [
    "Channels",
    "Int8Linear",
    "LeafPlan",
    "NM",
    "ParamTransform",
    "Plan",
    "PruneSpec",
    "QArray",
    "QuantSpec",
    "Rule",
    "Schedule",
    "ServingKernel",
    "SparseArray",
    "Summary",
    "TransformState",
    "WrapState",
    "affine_scale",
    "apply_mask",
    "chain",
    "channel_mask",
    "constant",
    "dequantize",
    "export",
    "export_serving",
    "fake_quant",
    "fake_quant_weight",
    "global_magnitude_masks",
    "int8_matmul",
    "int_range",
    "linen_serving_apply",
    "load",
    "load_serving",
    "magnitude_mask",
    "nm_mask",
    "nnx_serving_model",
    "one_shot",
    "polynomial",
    "prepare",
    "resolve",
    "rewind",
    "save",
    "state_of",
    "summary",
    "symmetric_scale",
    "threshold_mask",
    "transform",
    "weight_quantizer",
    "wrap",
]
