"""Serving a Flax linen model on a prepared tree (tools layer: flax + serving).

``jaxqp.linen_serving_apply(model)`` returns ``apply(params, *args, **kwargs)``
that runs ``model.apply({"params": params}, ...)`` while every ``nn.Dense`` whose
kernel is a :class:`ServingKernel` computes with :func:`jaxqp.serving.int8_matmul` (and every
``nn.DenseGeneral`` with a :class:`jaxqp.serving.GeneralKernel`, e.g. attention projections,
with :func:`jaxqp.serving.int8_matmul_general`)
(through ``nn.intercept_methods``: the model class is not modified). Jit it.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxqp
    >>> model = nn.Dense(256)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 256)))["params"]
    >>> t = jaxqp.transform([jaxqp.Rule(".*kernel", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    >>> serve = jax.jit(jaxqp.linen_serving_apply(model))
    >>> serve(served, jnp.ones((2, 256))).shape
    (2, 256)
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .._adapters.inputs import as_tuple, trailing_contraction
from ._kernels import GeneralKernel, ServingKernel, int8_matmul, int8_matmul_general


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    if isinstance(kernel, GeneralKernel):
        return _dense_general(module, kernel, args)
    if not isinstance(kernel, ServingKernel):
        return next_fun(*args, **kwargs)
    if type(module) is not nn.Dense:
        raise TypeError(
            f"{type(module).__name__} at '{'/'.join(module.scope.path)}' got an int8 ServingKernel, "
            "but only nn.Dense runs the integer path; prepare it with a larger min_int_size or "
            "leave it float"
        )
    (x,) = args
    y = int8_matmul(x, kernel)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


def _general_ok(module, x) -> bool:
    """An ``nn.DenseGeneral`` that contracts the trailing axes of ``x`` without batch_dims."""
    return type(module) is nn.DenseGeneral and trailing_contraction(module, x) is not None


def _dense_general(module, kernel: GeneralKernel, args):
    (x,) = args
    if not _general_ok(module, x):
        raise TypeError(
            f"{type(module).__name__} at '{'/'.join(module.scope.path)}' got an int8 GeneralKernel, but only "
            "nn.DenseGeneral contracting the trailing input axes without batch_dims runs the integer path"
        )
    y = int8_matmul_general(x, kernel, len(kernel.shape) - len(as_tuple(module.features)))
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


def _is_general(x) -> bool:
    return isinstance(x, GeneralKernel)


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def _general_to_float(model, params, args, kwargs):
    """``params`` with GeneralKernels that no integer-capable DenseGeneral uses decoded to float.

    Conv kernels of 3+ axes (or a DenseGeneral with batch_dims) are prepared as
    GeneralKernels too; an abstract pass records which modules can run them.
    """
    if not any(_is_general(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_general)):
        return params
    capable: set[str] = set()

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and call_args and _general_ok(module, call_args[0]):
            capable.add("/".join(module.path + ("kernel",)))
        return next_fun(*call_args, **call_kwargs)

    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if _is_general(x) else x,
        params,
        is_leaf=_is_general,
    )
    with nn.intercept_methods(_interceptor), nn.intercept_methods(record):
        jax.eval_shape(lambda p: model.apply({"params": p}, *args, **kwargs), abstract)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if not _is_general(x) or "/".join(_key(e) for e in path) in capable else x.dequantize(),
        params, is_leaf=_is_general)


def linen_serving_apply(model: nn.Module) -> Callable:
    """``apply(params, *args, **kwargs)`` running ``model`` on a :func:`jaxqp.prepare`-d tree.

    Args:
      model: the linen model the params were trained for.

    Returns:
      ``apply(served, *args, **kwargs)``: ``nn.Dense`` layers whose kernel is a
      :class:`jaxqp.serving.ServingKernel` run the int8 dot, other layers run as usual.
    """

    def apply(params, *args, **kwargs):
        params = _general_to_float(model, params, args, kwargs)
        with nn.intercept_methods(_interceptor):
            return model.apply({"params": params}, *args, **kwargs)

    return apply
