"""Serving exported models jit-compiled: ``prepare``, int8 kernels and matmuls, model adapters.

The training-script names (``prepare``, ``linen_serving_apply``, ``nnx_serving_model``,
``export_serving``, ``load_serving``) are also at the top level of ``jaxqp``; the kernels, the
integer matmuls they run and the Equinox adapter (``equinox_serving_model``) live here.

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.serving.prepare(jaxqp.export(params, t.init(params)))
    >>> jaxqp.serving.int8_matmul(jnp.ones((4, 256)), served["w"]).shape
    (4, 256)
"""

from ._describe import describe
from ._equinox import equinox_serving_model
from ._hooks import PATHS
from ._kernels import GeneralKernel, ServingKernel
from ._linen import linen_serving_apply
from ._matmul import int8_matmul, int8_matmul_general, quantize_rows
from ._model_choice import timed_as_a_whole
from ._nnx import Int8Embed, Int8Linear, nnx_serving_apply, nnx_serving_model
from ._prepare import MIN_INT_SIZE, prepare
from ._stablehlo import export_serving, load_serving

__all__ = [
    "MIN_INT_SIZE",
    "PATHS",
    "GeneralKernel",
    "Int8Embed",
    "Int8Linear",
    "ServingKernel",
    "describe",
    "equinox_serving_model",
    "export_serving",
    "int8_matmul",
    "int8_matmul_general",
    "linen_serving_apply",
    "load_serving",
    "nnx_serving_apply",
    "nnx_serving_model",
    "prepare",
    "quantize_rows",
    "timed_as_a_whole",
]
