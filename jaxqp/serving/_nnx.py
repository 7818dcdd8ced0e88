"""Serving a Flax NNX model on a prepared state (tools layer: flax + serving).

``jaxqp.nnx_serving_model(graphdef, served, *rest)`` merges the state (whose
kernels may be :class:`ServingKernel`s after :func:`jaxqp.prepare`) and swaps
every ``nnx.Linear`` holding one for an :class:`Int8Linear` that computes with
:func:`jaxqp.serving.int8_matmul` (and every ``nnx.Embed`` for an :class:`Int8Embed`).
The user's module classes are not modified; only the merged instance's sub-layers are
replaced.

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

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ._kernels import GeneralKernel, ServingKernel, require_prepared
from ._matmul import int8_matmul
from ._model_choice import timed_as_a_whole


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


class Int8Embed(nnx.Module):
    """An embedding lookup from a :class:`ServingKernel` table: only the rows taken are decoded.

    Args:
      embedding: the ``nnx.Param`` holding the table's :class:`ServingKernel` (``(vocab, features)``).
      dtype: the output dtype, or None for the table's.
    """

    def __init__(self, embedding: nnx.Param, dtype: Any = None):
        self.embedding = embedding
        self.dtype = dtype

    def __call__(self, tokens):
        table = self.embedding.get_value()
        return table.lookup(tokens).astype(self.dtype or table.dtype)

    def attend(self, query):
        table = self.embedding.get_value()
        dtype = self.dtype or table.dtype
        return jnp.dot(query.astype(dtype), table.dequantize().astype(dtype).T)


def _value(module, name: str):
    variable = getattr(module, name, None)
    return variable.get_value() if isinstance(variable, nnx.Variable) else None


def _swap(module) -> nnx.Module | None:
    """The integer replacement of a served ``nnx.Linear`` or ``nnx.Embed``, or None."""
    if type(module) is nnx.Linear and isinstance(_value(module, "kernel"), ServingKernel):
        return Int8Linear(module.kernel, module.bias if module.use_bias else None)
    if type(module) is nnx.Embed and isinstance(_value(module, "embedding"), ServingKernel):
        return Int8Embed(module.embedding, module.dtype)
    return None


def _decode_others(model) -> None:
    """Layers without an integer path get their prepared kernels decoded to float in place."""
    for _, module in nnx.iter_modules(model):
        if _swap(module) is not None:
            continue
        for name in ("kernel", "embedding"):
            variable = getattr(module, name, None)
            if isinstance(variable, nnx.Variable) and isinstance(variable.get_value(), (ServingKernel, GeneralKernel)):
                variable.set_value(variable.get_value().dequantize())


def _check_graphdef(where: str, graphdef: Any) -> None:
    if not isinstance(graphdef, nnx.GraphDef):
        raise TypeError(f"{where}: graphdef must be the model's nnx.GraphDef (graphdef, state = "
                        f"nnx.split(model)), got {type(graphdef).__name__}")


def nnx_serving_model(graphdef: Any, served: Any, *rest: Any) -> nnx.Module:
    """The merged model with every served ``nnx.Linear`` and ``nnx.Embed`` running from codes.

    Args:
      graphdef: the model's graph definition (``nnx.split(model)[0]``).
      served: the prepared params state (``jaxqp.prepare`` of the exported state).
      *rest: other states to merge (e.g. batch statistics).

    Returns:
      The NNX model, with served ``nnx.Linear`` layers replaced by :class:`Int8Linear`
      and ``nnx.Embed`` layers by :class:`Int8Embed`; other layers' prepared kernels
      decoded to float.
    """
    _check_graphdef("nnx_serving_model", graphdef)
    require_prepared("nnx_serving_model", served, "serve jaxqp.prepare(exported), not the export itself")
    model = nnx.merge(graphdef, served, *rest)
    _decode_others(model)
    swapped = _swap(model)
    if swapped is not None:
        return swapped
    for path, module in list(nnx.iter_modules(model)):
        swapped = _swap(module) if path else None
        if swapped is None:
            continue
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, str(key))
        if isinstance(path[-1], int):
            parent[path[-1]] = swapped
        else:
            setattr(parent, str(path[-1]), swapped)
    return model


def nnx_serving_apply(graphdef: Any, *, measure_model: bool = True) -> Callable:
    """``apply(served, *args, **kwargs)``: the NNX model of ``graphdef`` on a prepared state, timed as a whole.

    The functional form of :func:`nnx_serving_model`, with what :func:`jaxqp.linen_serving_apply`
    does for linen: the first time ``apply`` is traced for a shape, the whole model is timed with
    per-layer path choices and with every ``"auto"`` kernel on each one path, and the fastest
    is kept (cached per process, machine, model and shapes; ``serving/_model_choice.py``). Layers
    timed alone can choose a slower model than one path for all: measured on a byte-level LM at
    256 x 64 tokens (linen, int8, AMD EPYC), per-layer choices 0.90x float, the whole model's
    choice 0.74x (docs/benchmarks.md).

    Args:
      graphdef: the model's graph definition (``graphdef, state = nnx.split(model)``).
      measure_model: False: per-layer choices only (a faster first trace).

    Returns:
      ``apply(served, *args, **kwargs)``, where ``served`` is the prepared state, or a tuple of
      states merged in order (e.g. ``(served, batch_stats)``); it returns ``model(*args, **kwargs)``.

    Raises:
      TypeError: if ``graphdef`` is not an ``nnx.GraphDef``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxqp
      >>> from flax import nnx
      >>> graphdef, params = nnx.split(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), nnx.Param)
      >>> t = jaxqp.transform([jaxqp.Rule("kernel", quant=jaxqp.QuantSpec(bits=8))])
      >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)), path="int8")
      >>> jax.jit(jaxqp.serving.nnx_serving_apply(graphdef))(served, jnp.ones((2, 64))).shape
      (2, 8)
    """
    _check_graphdef("nnx_serving_apply", graphdef)
    root = getattr(graphdef.nodes[0], "type", None) if getattr(graphdef, "nodes", None) else None
    name = f"nnx:{getattr(root, '__name__', 'model')}"  # part of the decision's cache key, with the shapes

    def run(served, *args, **kwargs):
        states = served if isinstance(served, (tuple, list)) else (served,)
        return nnx_serving_model(graphdef, *states)(*args, **kwargs)

    return timed_as_a_whole(run, name) if measure_model else run
