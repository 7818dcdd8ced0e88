"""Deploying served models out of JAX: ONNX (optional extra ``onnx``) and LiteRT (extra ``litert``).

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> m = jaxqp.deploy.to_onnx(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)))
    >>> m.opset_import[0].version >= 21
    True
"""

from ._litert import to_litert
from ._onnx import INT8_MATMULS, OPSET, to_onnx

__all__ = ["INT8_MATMULS", "OPSET", "to_litert", "to_onnx"]
