"""Serving a Flax linen model on a prepared tree (tools layer: flax + serving).

``jaxqp.linen_serving_apply(model)`` returns ``apply(params, *args, **kwargs)``
that runs ``model.apply({"params": params}, ...)`` while every ``nn.Dense`` whose
kernel is a :class:`ServingKernel` computes with :func:`jaxqp.int8_matmul`
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

import flax.linen as nn

from ._serving import ServingKernel, int8_matmul


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
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


def linen_serving_apply(model: nn.Module):
    """``apply(params, *args, **kwargs)`` running ``model`` on a :func:`jaxqp.prepare`-d tree."""

    def apply(params, *args, **kwargs):
        with nn.intercept_methods(_interceptor):
            return model.apply({"params": params}, *args, **kwargs)

    return apply
