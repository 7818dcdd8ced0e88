"""jaxqp: quantize and prune JAX/Flax parameter trees with pure, composable transforms.

The top level holds what a training script types: rules and specs, schedules, transforms,
``wrap`` for optax, the Flax adapters, export, files, serving and ``summary``. Array-level
primitives are in :mod:`jaxqp.numerics`; serving kernels in :mod:`jaxqp.serving`; exporters to
other runtimes in :mod:`jaxqp.deploy`; sensitivity and allocation in :mod:`jaxqp.choose`.

Example:
    >>> import jaxqp
    >>> rules = [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8),
    ...                     prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, 100, 1000, 50)))]
    >>> t = jaxqp.transform(rules)
"""

from . import choose, deploy, numerics, serving
from ._adapters.inputs import linen_apply, nnx_apply
from ._deprecated import moved as _moved
from ._export.compressed import dequantize
from ._export.export import export
from ._export.files import load, save
from ._export.nm_array import NMArray
from ._export.qarray import QArray
from ._export.sparse_array import SparseArray
from ._export.value_arrays import Fp8Array, Pow2Array
from ._specs.activation import ActSpec
from ._specs.prune import NM, Blocks, Channels, PruneSpec, RigL
from ._specs.quant import QuantSpec
from ._specs.rules import LeafPlan, Plan, Rule, resolve
from ._specs.schedules import Schedule, constant, iterative, one_shot, polynomial
from ._tools.summary import Summary, summary
from ._transforms.activations import calibrate, quantize_input
from ._transforms.chain import chain
from ._transforms.rewind import rewind
from ._transforms.state_tree import freeze_masks
from ._transforms.transform import ParamTransform, TransformState, transform
from ._transforms.weight_quantizer import fake_quant_weight
from ._transforms.wrap import WrapState, state_of, wrap
from .serving import export_serving, linen_serving_apply, load_serving, nnx_serving_model, prepare

__version__ = "0.2.0"

__all__ = [
    "NM",
    "ActSpec",
    "Blocks",
    "Channels",
    "Fp8Array",
    "LeafPlan",
    "NMArray",
    "ParamTransform",
    "Plan",
    "Pow2Array",
    "PruneSpec",
    "QArray",
    "QuantSpec",
    "RigL",
    "Rule",
    "Schedule",
    "SparseArray",
    "Summary",
    "TransformState",
    "WrapState",
    "calibrate",
    "chain",
    "choose",
    "constant",
    "deploy",
    "dequantize",
    "export",
    "export_serving",
    "fake_quant_weight",
    "freeze_masks",
    "iterative",
    "linen_apply",
    "linen_serving_apply",
    "load",
    "load_serving",
    "nnx_apply",
    "nnx_serving_model",
    "numerics",
    "one_shot",
    "polynomial",
    "prepare",
    "quantize_input",
    "resolve",
    "rewind",
    "save",
    "serving",
    "state_of",
    "summary",
    "transform",
    "wrap",
]


def __getattr__(name: str):
    """Deprecated 0.1 names (see ``jaxqp._deprecated``) resolve here with a DeprecationWarning."""
    value = _moved(name)
    if value is None:
        raise AttributeError(f"module 'jaxqp' has no attribute {name!r}")
    return value
