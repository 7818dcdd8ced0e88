"""Serving a Flax linen model on a prepared tree (tools layer: flax + serving).

``jaxqp.linen_serving_apply(model)`` returns ``apply(params, *args, **kwargs)``
that runs ``model.apply({"params": params}, ...)`` while every ``nn.Dense`` whose
kernel is a :class:`ServingKernel` computes with :func:`jaxqp.serving.int8_matmul` (every
``nn.DenseGeneral`` with a :class:`jaxqp.serving.GeneralKernel`, e.g. attention projections,
with :func:`jaxqp.serving.int8_matmul_general`, and every ``nn.Embed`` looks up rows of its
codes) through ``nn.intercept_methods``: the model class is not modified. Jit it.

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
from ._kernels import GeneralKernel, ServingKernel, require_prepared
from ._matmul import int8_matmul, int8_matmul_general
from ._model_choice import timed_as_a_whole


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if type(module) is nn.Embed and module.has_variable("params", "embedding"):
        table = module.get_variable("params", "embedding")
        if isinstance(table, ServingKernel):
            return _embed(module, table, context.method_name, args, kwargs, next_fun)
        return next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    if isinstance(kernel, GeneralKernel):
        return _dense_general(module, kernel, args)
    if not isinstance(kernel, ServingKernel):
        return next_fun(*args, **kwargs)
    (x,) = args
    y = int8_matmul(x, kernel)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


def _embed(module, table: ServingKernel, method: str, args, kwargs, next_fun):
    """``nn.Embed`` on codes: a lookup decodes only the rows it takes; ``attend`` decodes the table."""
    dtype = module.dtype or table.dtype
    if method == "__call__":
        (tokens,) = args
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"nn.Embed at '{'/'.join(module.scope.path)}': input type must be an integer, "
                             f"got {tokens.dtype}")
        return table.lookup(tokens).astype(dtype)
    if method == "attend":
        (query,) = args
        return jnp.dot(query.astype(dtype), table.dequantize().astype(dtype).T)
    if method == "setup":  # its self.param would check the table's shape against the codes' leaves
        return None
    return next_fun(*args, **kwargs)


def _general_ok(module, x) -> bool:
    """An ``nn.DenseGeneral`` that contracts the trailing axes of ``x`` without batch_dims."""
    return type(module) is nn.DenseGeneral and trailing_contraction(module, x) is not None


def _dense_general(module, kernel: GeneralKernel, args):
    (x,) = args
    y = int8_matmul_general(x, kernel, len(kernel.shape) - len(as_tuple(module.features)))
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


def _is_kernel(x) -> bool:
    return isinstance(x, (ServingKernel, GeneralKernel))


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def _capable(module, args) -> str | None:
    """The param a module runs from codes (its "kernel" or "embedding"), or None."""
    if type(module) is nn.Dense:
        return "kernel"
    if type(module) is nn.Embed:
        return "embedding"
    if args and _general_ok(module, args[0]):
        return "kernel"
    return None


def _unused_to_float(model, params, args, kwargs):
    """``params`` with the prepared kernels that no integer-capable layer uses decoded to float.

    ``nn.Dense`` runs a ServingKernel, ``nn.Embed`` looks up rows of one, and an
    ``nn.DenseGeneral`` contracting trailing axes runs a GeneralKernel; any other layer
    (a convolution, an ``nn.Einsum``, a custom module) gets its weight decoded to float
    inside the jitted function. An abstract pass records which layers are capable.
    """
    if not any(_is_kernel(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_kernel)):
        return params
    capable: set[str] = set()

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        name = _capable(module, call_args) if context.method_name in ("__call__", "attend") else None
        if name is not None:
            capable.add("/".join(module.path + (name,)))
        return next_fun(*call_args, **call_kwargs)

    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if _is_kernel(x) else x,
        params,
        is_leaf=_is_kernel,
    )
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: model.apply({"params": p}, *args, **kwargs), abstract)

    def decode(path, x):
        used = "/".join(_key(e) for e in path) in capable
        return x.dequantize() if _is_kernel(x) and not used else x

    return jax.tree_util.tree_map_with_path(decode, params, is_leaf=_is_kernel)


def linen_serving_apply(model: nn.Module, *, measure_model: bool = True) -> Callable:
    """``apply(params, *args, **kwargs)`` running ``model`` on a :func:`jaxqp.prepare`-d tree.

    Args:
      model: the linen model the params were trained for.
      measure_model: the first time the function is traced for a shape, time the whole
        model with per-layer path choices and with every ``"auto"`` kernel on each one path,
        and keep the fastest (``serving/_model_choice.py``; cached like the per-layer
        choices). False: per-layer choices only (faster first trace).

    Returns:
      ``apply(served, *args, **kwargs)``: ``nn.Dense`` layers whose kernel is a
      :class:`jaxqp.serving.ServingKernel` multiply from its codes, ``nn.Embed`` layers
      look up rows of one, ``nn.DenseGeneral`` layers run a
      :class:`jaxqp.serving.GeneralKernel`; any other layer gets its weight decoded to
      float inside the function; other layers run as usual.
    """

    def run(params, *args, **kwargs):
        require_prepared("linen_serving_apply", params, "serve jaxqp.prepare(exported), not the export itself")
        params = _unused_to_float(model, params, args, kwargs)
        with nn.intercept_methods(_interceptor):
            return model.apply({"params": params}, *args, **kwargs)

    return timed_as_a_whole(run, type(model).__name__) if measure_model else run
