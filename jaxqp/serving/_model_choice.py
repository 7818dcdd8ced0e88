"""Choosing the paths of a whole served model by timing it (serving layer, no flax).

Each ``"auto"`` kernel's path is measured alone (``kernel_path``): fast to decide, but a
layer timed alone is not the layer inside a model. XLA fuses a kernel's decode with its
neighbours, schedules many layers' temporaries at once, and tiny layers cost more in
per-op overhead than in arithmetic, so a model of per-layer winners can be slower than the
same model on one path (measured: a byte-level LM at int4, 1.06x float with per-layer
choices, 0.78x all on integer paths). :func:`model_policy` therefore times the whole
function the first time it is traced for a shape: with per-layer choices (``"auto"``) and
with every auto kernel on each one path of ``PATHS``, on random codes and zero inputs of
the same shapes, and keeps the fastest. The decision is cached like a layer's (per process,
machine, model, tree shapes and row bucket; on disk with ``JAXQP_PATH_CACHE``).

Example:
    >>> MODEL_POLICIES
    ('auto', 'int8', 'int8_t', 'bf16', 'float')
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._path_choice import decide
from ._hooks import PATHS, current_hook, override_paths
from ._kernels import _Int8Codes
from ._matmul import _random_like

MODEL_POLICIES = ("auto", *PATHS)
# A whole model is timed longer than a layer: its policies can differ by less than a layer's
# paths, and a tiny model's call (~1 ms) varies by 10-40% from one call to the next here.
MODEL_TIMING = {"rounds": 9, "min_round_s": 0.02}


def _is_kernel(x) -> bool:
    return isinstance(x, _Int8Codes)


def _auto_kernels(params) -> bool:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_kernel)
    return any(_is_kernel(x) and x.path == "auto" for x in leaves)


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) if hasattr(x, "shape") else x


def _signature(name: str, params, args, kwargs) -> str:
    """A short, stable digest of what the decision is valid for: the model, its tree's shapes, the inputs'."""
    specs = jax.tree_util.tree_map(_spec, (params, args, kwargs))  # a kernel's static fields are in the treedef
    leaves = jax.tree_util.tree_leaves(specs)
    text = repr(jax.tree_util.tree_structure(specs)) + repr(
        [(getattr(x, "shape", type(x).__name__), str(getattr(x, "dtype", ""))) for x in leaves])
    return f"{name}:{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def _rows(args) -> int | None:
    """The first input's leading size, or None when it is symbolic (``jax.export`` shapes)."""
    for x in jax.tree_util.tree_leaves(args):
        if getattr(x, "ndim", 0) >= 1:
            return x.shape[0] if isinstance(x.shape[0], int) else None
    return 1


def model_policy(fn: Callable, params, args: tuple, kwargs: dict, name: str) -> str:
    """The fastest of ``MODEL_POLICIES`` for ``fn(params, *args, **kwargs)``, measured once per signature.

    Args:
      fn: the served function (it multiplies through ``int8_matmul`` and friends).
      params: the prepared tree (arrays or tracers: only shapes and dtypes are read).
      args: the positional inputs (arrays or tracers; non-arrays are passed as they are).
      kwargs: keyword inputs, passed as they are.
      name: the model's name, part of the cache key.

    Returns:
      ``"auto"`` (per-layer choices) or one path of ``PATHS``; ``"auto"`` when no kernel is
      ``"auto"`` (all pinned), when the batch is symbolic, or while an exporter traces.
    """
    rows = _rows(args)
    if not _auto_kernels(params) or rows is None or current_hook() is not None:
        return "auto"  # nothing to choose, a symbolic batch, or an exporter tracing (it computes no path)

    def build():
        rng = np.random.default_rng(0)
        # array leaves become random arrays passed to the timed function; others (an Equinox
        # model's activation function, say) stay as they are, closed over
        leaves, treedef = jax.tree_util.tree_flatten(params)
        is_array = [hasattr(a, "shape") and hasattr(a, "dtype") for a in leaves]
        synthetic = jax.device_put([_random_like(a, rng) for a, array in zip(leaves, is_array) if array])
        inputs = [jnp.zeros(np.shape(a), jnp.result_type(a)) if hasattr(a, "shape") else a for a in args]
        arrays = [i for i, a in enumerate(args) if hasattr(a, "shape")]

        def run(policy, arrays_of_params, *xs):
            given = iter(arrays_of_params)
            p = jax.tree_util.tree_unflatten(treedef, [next(given) if array else a
                                                       for a, array in zip(leaves, is_array)])
            full = list(inputs)
            for i, x in zip(arrays, xs):
                full[i] = x
            with override_paths(policy):
                return fn(p, *full, **kwargs)

        fns = {policy: functools.partial(jax.jit(functools.partial(run, policy)), synthetic,
                                         *[inputs[i] for i in arrays])
               for policy in MODEL_POLICIES}
        return fns, fns["float"]

    return decide("model", (_signature(name, params, args, kwargs),), rows, build, **MODEL_TIMING).path


def timed_as_a_whole(fn: Callable, name: str) -> Callable:
    """``fn(served, *args, **kwargs)`` with the whole-model path choice made on its first trace per shape.

    What :func:`jaxqp.linen_serving_apply` and :func:`jaxqp.serving.nnx_serving_apply` do, for any
    serving function: an Equinox model from :func:`jaxqp.serving.equinox_serving_model` called
    under ``jax.vmap``, or your own function of prepared kernels. The first time the result is
    traced for a shape, ``fn`` is timed on random codes with per-layer choices and with every
    ``"auto"`` kernel on each one path, and the fastest is kept (cached per process, machine,
    ``name`` and shapes; see :func:`jaxqp.serving.describe`).

    Args:
      fn: ``fn(served, *args, **kwargs)``, the served tree (or model) first.
      name: names the model in the decision's cache key and in ``describe``.

    Returns:
      ``apply(served, *args, **kwargs)``, equal to ``fn`` on the paths it chose.

    Raises:
      TypeError: if ``fn`` is not callable or ``name`` not a string.

    Example:
      >>> import jax, jax.numpy as jnp, jaxqp
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
      >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
      >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)), path="int8")
      >>> apply = jaxqp.serving.timed_as_a_whole(lambda s, x: jaxqp.serving.int8_matmul(x, s["w"]), "one layer")
      >>> jax.jit(apply)(served, jnp.ones((4, 64))).shape
      (4, 32)
    """
    if not callable(fn):
        raise TypeError(f"timed_as_a_whole: fn must be fn(served, *args, **kwargs), got {type(fn).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"timed_as_a_whole: name must be a string naming the model, got {type(name).__name__}")

    def apply(served, *args, **kwargs):
        with override_paths(model_policy(fn, served, args, kwargs, name)):
            return fn(served, *args, **kwargs)

    return apply
