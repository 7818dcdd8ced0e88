"""Quantized inputs for unmodified Flax models: linen and NNX (flax layer).

* :func:`linen_apply` runs ``model.apply`` under ``nn.intercept_methods``: each
  ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` or ``nn.Einsum`` whose
  ``<module path>/kernel`` has an :class:`jaxqp.ActSpec` gets its input
  fake-quantized before its ``__call__`` runs;
* :func:`nnx_apply` does the same for ``nnx.Linear``, ``nnx.LinearGeneral``,
  ``nnx.Conv`` and ``nnx.Einsum`` sub-layers of an NNX model by swapping them for
  a thin wrapper for the duration of the call (the module class is not edited,
  the model is restored afterwards).

Both return ``(output, observed)``; pass ``observed`` to
``tx.update(grads, opt_state, params, observed=observed)`` so static ranges
follow the data. A quantized input no layer consumed is an error naming it.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxqp
    >>> model = nn.Dense(3)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> t = jaxqp.transform([jaxqp.Rule("kernel", quant=jaxqp.QuantSpec(bits=8), act=jaxqp.ActSpec(bits=8))])
    >>> state = t.init(variables["params"])
    >>> y, observed = jaxqp.linen_apply(model, state, {"params": t.apply(variables["params"], state)},
    ...                                 jnp.ones((2, 4)))
    >>> y.shape
    (2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from .._transforms.activations import input_entries, quantize_input
from .._transforms.state_tree import transform_states
from ..numerics._int_dot import int_dense

LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
NNX_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)


def _kernel_path(path) -> str:
    return "/".join([str(p) for p in path] + ["kernel"])


def _check_all_seen(wanted, seen: set, where: str) -> None:
    missing = sorted(set(wanted) - seen)
    if missing:
        raise ValueError(
            f"{where}: an ActSpec targets {missing}, but no Dense/DenseGeneral/Conv/Einsum layer owning "
            "that kernel ran. Fix: make the rule's pattern match the kernels of such layers "
            "(activation quantization needs a layer whose input it can see), or drop act= from it."
        )


def _check_state_fits(state: Any, params: Any, where: str) -> None:
    """``state`` must hold a jaxqp transform state made for ``params``' tree.

    A state made for another tree would quantize only the layers it names and leave the rest
    float without a word; a tree without any transform state would quantize nothing.
    """
    states = transform_states(state)
    if not states:
        raise TypeError(f"{where}: state must be the jaxqp state returned by t.init(params) (inside an "
                        f"optimizer: jaxqp.state_of(opt_state)), got {type(state).__name__}")
    for s in states:
        try:
            s.plan.check(params)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def linen_apply(
    model: nn.Module, state: Any, variables: Any, *args: Any, method: Any = None, **kwargs: Any
) -> tuple[Any, dict]:
    """``(model.apply(variables, *args, ...), observed)`` with matched layer inputs quantized.

    Args:
      model: the unmodified linen model.
      state: the transform state with the ``ActSpec`` rules.
      variables: ``{"params": ...}`` (typically ``t.apply(params, state)``) and other collections.
      *args: the model's inputs.
      method: the module method to call, as in ``model.apply``.
      **kwargs: keyword arguments of the call.

    Returns:
      ``(output, observed)``: the model's output and the statistics of static-range inputs
      (``{}`` if none), for ``tx.update(..., observed=observed)``.

    Raises:
      ValueError: if ``state`` was made for another parameter tree (names the paths).
      TypeError: if ``model`` is not a linen Module, or ``state`` holds no jaxqp transform state.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"linen_apply: model must be the flax.linen Module the params belong to, got "
                        f"{type(model).__name__} (an NNX model goes through jaxqp.nnx_apply)")
    if isinstance(variables, Mapping) and "params" in variables:
        _check_state_fits(state, variables["params"], "linen_apply")
    wanted = input_entries(state)
    observed: dict = {}
    seen: set = set()

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, LINEN_LAYERS):
            return next_fun(*call_args, **call_kwargs)
        path = _kernel_path(module.path)
        if path not in wanted or not call_args:
            return next_fun(*call_args, **call_kwargs)
        spec = wanted[path].spec
        n_contract = _integer_contraction(module, call_args[0], spec)
        if n_contract is not None:
            seen.add(path)
            bias = module.get_variable("params", "bias") if module.use_bias else None
            return _integer_dense(call_args[0], module.get_variable("params", "kernel"), bias, spec, n_contract)
        x, stats = quantize_input(call_args[0], state, path)
        observed.update(stats)
        seen.add(path)
        return next_fun(x, *call_args[1:], **call_kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, *args, method=method, **kwargs)
    _check_all_seen(wanted, seen, "linen_apply")
    return out, observed


def as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def trailing_contraction(layer, x) -> int | None:
    """How many trailing axes of ``x`` an ``nn.DenseGeneral`` / ``nnx.LinearGeneral`` contracts.

    None if it contracts other axes or has batch axes (those have no integer path).
    """
    linen_general = type(layer) is nn.DenseGeneral and not as_tuple(layer.batch_dims)
    if linen_general or (type(layer) is nnx.LinearGeneral and not layer.batch_axis):
        axis = layer.axis
    else:
        return None
    axes = sorted(a % x.ndim for a in as_tuple(axis))
    return len(axes) if axes == list(range(x.ndim - len(axes), x.ndim)) else None


def _integer_contraction(layer, x, spec) -> int | None:
    """How many trailing axes of ``x`` the layer contracts, if ``spec`` runs it in int8 (else None).

    ``nn.Dense``/``nnx.Linear`` contract the last axis; ``nn.DenseGeneral`` and
    ``nnx.LinearGeneral`` qualify through :func:`trailing_contraction` (attention
    projections), and, with ``per_token`` (one scale per last-axis row), only when
    they contract one axis. Other layers keep the fake-quant matmul, which computes
    the same numbers.
    """
    if spec is None or not spec.integer:
        return None
    if type(layer) in (nn.Dense, nnx.Linear):
        return 1
    n_contract = trailing_contraction(layer, x)
    return None if n_contract is None or (spec.per_token and n_contract > 1) else n_contract


def _integer_dense(x: jax.Array, kernel: jax.Array, bias, spec, n_contract: int = 1):
    """The layer's ``x . kernel (+ bias)`` with :func:`int_dense`, the kernel read as a ``(K, F)`` matrix."""
    contracted, features = kernel.shape[:n_contract], kernel.shape[n_contract:]
    k = math.prod(contracted)
    y = jnp.asarray(int_dense(x.reshape(*x.shape[:x.ndim - n_contract], k), kernel.reshape(k, -1), spec.bits,
                              spec.bits, spec.per_token))  # asarray: a typed Array out of the custom_vjp
    y = y.reshape(*y.shape[:-1], *features)
    return y if bias is None else y + bias.reshape(features).astype(y.dtype)


class QuantizedInput(nnx.Module):
    """Calls ``layer`` on its input fake-quantized by ``quantize`` (used by :func:`nnx_apply`).

    With ``integer`` (an :class:`ActSpec` with ``integer=True``) an ``nnx.Linear`` (or an
    ``nnx.LinearGeneral`` contracting trailing axes) runs the int8 matmul of
    :func:`jaxqp.numerics.int_dense` instead.
    """

    def __init__(self, layer, quantize, integer=None):
        self.layer = layer
        self.quantize = quantize
        self.integer = integer

    def __call__(self, x, *args, **kwargs):
        plain = not args and all(k == "out_sharding" and v is None for k, v in kwargs.items())
        n_contract = _integer_contraction(self.layer, x, self.integer) if plain else None
        if n_contract is not None:
            self.quantize(None)  # records that the layer ran
            bias = self.layer.bias[...] if self.layer.bias is not None else None
            return _integer_dense(x, self.layer.kernel[...], bias, self.integer, n_contract)
        return self.layer(self.quantize(x), *args, **kwargs)


def _set_child(model, path, value) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def nnx_apply(model: nnx.Module, state: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
    """``(model(*args, **kwargs), observed)`` with matched NNX layer inputs quantized.

    Args:
      model: the unmodified NNX model (its ``Linear``/``Conv``/``Einsum`` layers are
        swapped for quantizing wrappers during the call, then restored).
      state: the transform state with the ``ActSpec`` rules.
      *args: the model's inputs.
      **kwargs: keyword arguments of the call.

    Returns:
      ``(output, observed)`` as for :func:`linen_apply`.

    Raises:
      ValueError: if ``state`` was made for another model's parameters (names the paths).
      TypeError: if ``state`` holds no jaxqp transform state.
    """
    _check_state_fits(state, nnx.state(model, nnx.Param), "nnx_apply")
    wanted = input_entries(state)
    observed: dict = {}
    seen: set = set()

    def quantizer(path):
        def quantize(x):
            seen.add(path)
            if x is None:
                return None
            y, stats = quantize_input(x, state, path)
            observed.update(stats)
            return y
        return quantize

    def integer(path):
        spec = wanted[path].spec
        return spec if spec is not None and spec.integer else None

    targets = [(p, m) for p, m in nnx.iter_modules(model)
               if isinstance(m, NNX_LAYERS) and _kernel_path(p) in wanted]
    if any(not p for p, _ in targets):  # the model itself is the layer
        (p, m), = targets
        out = QuantizedInput(m, quantizer(_kernel_path(p)), integer(_kernel_path(p)))(*args, **kwargs)
    else:
        for p, m in targets:
            _set_child(model, p, QuantizedInput(m, quantizer(_kernel_path(p)), integer(_kernel_path(p))))
        try:
            out = model(*args, **kwargs)
        finally:
            for p, m in targets:
                _set_child(model, p, m)
    _check_all_seen(wanted, seen, "nnx_apply")
    return out, observed
