"""jaxqp: quantize and prune JAX/Flax parameter trees with pure, composable transforms.

Example:
    >>> import jaxqp
    >>> rules = [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8),
    ...                     prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, 100, 1000, 50)))]
    >>> t = jaxqp.transform(rules)
"""

from ._act_spec import ActSpec
from ._calib import expand_groups, group_view, int_bounds, mse_range, observe_range, scale_from_range
from ._export import export
from ._flax_inputs import QuantizedInput, linen_apply, nnx_apply
from ._formats import binary, fp8_round, pow2_ceil, pow2_values, stochastic_round, straight_through
from ._inputs import calibrate, quantize_input
from ._learned import lsq, lsq_grad_scale, pact
from ._io import load, save
from ._lottery import rewind
from ._mask import apply_mask, block_mask, channel_mask, global_magnitude_masks, magnitude_mask, nm_mask, threshold_mask
from ._nm_array import NMArray
from ._value_arrays import Fp8Array, Pow2Array
from ._optax import WrapState, state_of, wrap
from ._qarray import QArray, SparseArray, dequantize
from ._quant import affine_scale, fake_quant, int_range, symmetric_scale
from ._quantizer import fake_quant_weight, init_step, weight_codes, weight_quantizer
from ._rule import LeafPlan, Plan, Rule, resolve
from ._serve_linen import linen_serving_apply
from ._serve_nnx import Int8Linear, nnx_serving_model
from ._serving import GeneralKernel, ServingKernel, export_serving, int8_matmul, int8_matmul_general, load_serving, prepare
from ._schedule import Schedule, constant, iterative, one_shot, polynomial
from ._prune_spec import NM, Blocks, Channels, PruneSpec, RigL
from ._spec import QuantSpec
from ._summary import Summary, summary
from ._transform import ParamTransform, TransformState, chain, freeze_masks, transform

__version__ = "0.1.0"

__all__ = [
    "ActSpec",
    "Blocks",
    "Channels",
    "GeneralKernel",
    "Int8Linear",
    "LeafPlan",
    "NM",
    "ParamTransform",
    "Plan",
    "PruneSpec",
    "QArray",
    "QuantSpec",
    "RigL",
    "NMArray",
    "Pow2Array",
    "Fp8Array",
    "QuantizedInput",
    "Rule",
    "Schedule",
    "ServingKernel",
    "SparseArray",
    "Summary",
    "TransformState",
    "WrapState",
    "affine_scale",
    "apply_mask",
    "binary",
    "block_mask",
    "calibrate",
    "chain",
    "channel_mask",
    "constant",
    "dequantize",
    "expand_groups",
    "export",
    "export_serving",
    "fake_quant",
    "fake_quant_weight",
    "fp8_round",
    "freeze_masks",
    "global_magnitude_masks",
    "group_view",
    "init_step",
    "int8_matmul",
    "int8_matmul_general",
    "int_bounds",
    "int_range",
    "linen_apply",
    "linen_serving_apply",
    "load",
    "load_serving",
    "lsq",
    "lsq_grad_scale",
    "magnitude_mask",
    "mse_range",
    "nm_mask",
    "nnx_apply",
    "nnx_serving_model",
    "observe_range",
    "one_shot",
    "iterative",
    "pact",
    "polynomial",
    "pow2_ceil",
    "pow2_values",
    "prepare",
    "quantize_input",
    "resolve",
    "rewind",
    "save",
    "scale_from_range",
    "state_of",
    "stochastic_round",
    "straight_through",
    "summary",
    "symmetric_scale",
    "threshold_mask",
    "transform",
    "weight_codes",
    "weight_quantizer",
    "wrap",
]
