"""Serving a Flax NNX model on a prepared state (tools layer: flax + serving).

``jaxqp.nnx_serving_model(graphdef, served, *rest)`` merges the state (whose
kernels may be :class:`ServingKernel`s after :func:`jaxqp.prepare`) and swaps
every ``nnx.Linear`` holding one for an :class:`Int8Linear` that computes with
:func:`jaxqp.serving.int8_matmul`. The user's module classes are not modified; only
the merged instance's sub-layers are replaced.

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> from flax import nnx
    >>> graphdef, params = nnx.split(nnx.Linear(256, 256, rngs=nnx.Rngs(0)), nnx.Param)
    >>> t = jaxqp.transform([jaxqp.Rule("kernel", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    >>> model = jaxqp.nnx_serving_model(graphdef, served)
    >>> type(model).__name__, model(jnp.ones((2, 256))).shape
    ('Int8Linear', (2, 256))
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ._kernels import GeneralKernel, ServingKernel, int8_matmul


class Int8Linear(nnx.Module):
    """``x @ W + b`` with ``W`` a :class:`ServingKernel` (int8 activations and weights).

    Args:
      kernel: the ``nnx.Param`` holding the layer's :class:`ServingKernel`.
      bias: the ``nnx.Param`` of the bias, or None.
    """

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None):
        self.kernel = kernel
        self.bias = bias

    def __call__(self, x):
        y = int8_matmul(x, self.kernel.get_value())
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


def _is_served_linear(module) -> bool:
    return type(module) is nnx.Linear and isinstance(module.kernel.get_value(), ServingKernel)


def _swap(module) -> Int8Linear:
    return Int8Linear(module.kernel, module.bias if module.use_bias else None)


def _decode_general(model) -> None:
    """NNX layers have no integer path for N-D kernels: decode GeneralKernels to float in place."""
    for _, module in nnx.iter_modules(model):
        kernel = getattr(module, "kernel", None)
        if isinstance(kernel, nnx.Variable) and isinstance(kernel.get_value(), GeneralKernel):
            kernel.set_value(kernel.get_value().dequantize())


def nnx_serving_model(graphdef: Any, served: Any, *rest: Any) -> nnx.Module:
    """The merged model with every served ``nnx.Linear`` running the int8 path.

    Args:
      graphdef: the model's graph definition (``nnx.split(model)[0]``).
      served: the prepared params state (``jaxqp.prepare`` of the exported state).
      *rest: other states to merge (e.g. batch statistics).

    Returns:
      The NNX model, with served ``nnx.Linear`` layers replaced by :class:`Int8Linear`.
    """
    model = nnx.merge(graphdef, served, *rest)
    _decode_general(model)
    if _is_served_linear(model):
        return _swap(model)
    for path, module in list(nnx.iter_modules(model)):
        if not path or not _is_served_linear(module):
            continue
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, str(key))
        if isinstance(path[-1], int):
            parent[path[-1]] = _swap(module)
        else:
            setattr(parent, str(path[-1]), _swap(module))
    return model
