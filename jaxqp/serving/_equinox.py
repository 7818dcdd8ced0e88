"""Serving an Equinox model from its exported codes (tools layer: equinox + serving).

:func:`equinox_serving_model` puts the exported leaves (``jaxqp.export`` of
``eqx.filter(model, eqx.is_inexact_array)`` with a ``layout="out_in"`` rule) back into the
model and swaps every ``eqx.nn.Linear`` whose weight is a servable :class:`QArray` for an
``EqxInt8Linear``, which multiplies with :func:`jaxqp.serving.int8_matmul` from the
weight's int8 (or packed 4-bit) codes, and every ``eqx.nn.Embedding`` with a quantized table
for an ``EqxInt8Embedding`` (int8 codes in memory, the rows taken decoded at lookup). Every
other compressed leaf is decoded to float once.
The user's classes are not modified; only the returned tree's layers are replaced.

Equinox layers see one example and the model is ``jax.vmap``-ed over the batch. A served
matmul must see the whole batch (its path is chosen per row count, and padding one row to
four per example would quadruple the work), so ``EqxInt8Linear`` carries a
``jax.custom_batching.custom_vmap`` rule: under ``vmap`` (nested or not) it multiplies every
row at once.

Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, jaxqp
    >>> model = eqx.nn.Linear(256, 64, key=jax.random.key(0))
    >>> params = eqx.filter(model, eqx.is_inexact_array)
    >>> t = jaxqp.transform([jaxqp.Rule("weight", quant=jaxqp.QuantSpec(bits=8), layout="out_in")])
    >>> served = jaxqp.serving.equinox_serving_model(model, jaxqp.export(params, t.init(params)))
    >>> type(served).__name__, jax.vmap(served)(jnp.ones((3, 256))).shape
    ('EqxInt8Linear', (3, 64))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._export.compressed import Compressed, is_compressed
from .._export.nm_array import NMArray
from .._export.qarray import QArray
from .._specs.paths import paths_and_leaves
from ..numerics._packing import pack_nibbles
from ._hooks import PINS, current_hook
from ._kernels import ServingKernel
from ._matmul import int8_matmul


def _require_equinox():
    try:
        import equinox
    except ImportError as err:
        raise ImportError("jaxqp.serving.equinox_serving_model needs equinox: pip install 'jaxqp[equinox]'") from err
    return equinox


@jax.custom_batching.custom_vmap
def _served_matmul(x: jax.Array, kernel: ServingKernel) -> jax.Array:
    return int8_matmul(x, kernel)


@_served_matmul.def_vmap
def _served_matmul_batched(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if any(jax.tree_util.tree_leaves(kernel_batched)):  # a stack of kernels: one matmul per kernel
        x = x if x_batched else jnp.broadcast_to(x, (axis_size, *x.shape))
        return jax.lax.map(lambda pair: int8_matmul(*pair), (x, kernel)), True
    return _served_matmul(x, kernel), True  # only x batched, on its first axis: every row in one matmul


def _exporting_matmul(x: jax.Array, kernel: ServingKernel) -> jax.Array:
    """The layer's matmul while an exporter (``jaxqp.deploy``) traces: the kernel stays a constant.

    Passed into ``_served_matmul``, the kernel would arrive traced. ONNX's integer primitive has a
    vmap rule (``hook.batches_products``); jax2onnx cannot lower ``custom_vmap``, so it gets the
    plain product. LiteRT's quantized ops are ``jax.lax.composite``s, which have no vmap rule, so
    its product runs under a ``custom_vmap`` closed over the kernel: the rule multiplies the whole
    batch when ``jax.export`` lowers it, and no composite is ever vmapped.
    """
    if getattr(current_hook(), "batches_products", False):
        return int8_matmul(x, kernel)

    @jax.custom_batching.custom_vmap
    def matmul(x):
        return int8_matmul(x, kernel)

    @matmul.def_vmap
    def _batched(axis_size, in_batched, x):
        return matmul(x), True  # every row at once; an outer vmap comes back here

    return matmul(x)


def _out_in_kernel(weight: QArray, path: str, pow2_inputs: bool, keep_float: bool) -> ServingKernel | None:
    """The :class:`ServingKernel` of an ``(out, in)`` QArray with one scale per output row (or per tensor)."""
    servable = (len(weight.shape) == 2 and weight.zero_point is None and weight.bits <= 8 and weight.qmin >= -127
                and weight.group is None and weight.scale.shape[-1] == 1)
    if not servable:
        return None
    codes = weight.int_codes()  # already (out, in): the layout a ServingKernel stores
    bits = 4 if weight.bits <= 4 and weight.qmin >= -8 else 8
    stored = pack_nibbles(codes) if bits == 4 else codes.astype(jnp.int8)
    scale = jnp.broadcast_to(weight.scale.reshape(-1), (weight.shape[0],)).astype(jnp.float32)
    float_weight = weight.dequantize().T if keep_float else None  # the (in, out) weight the float path uses
    return ServingKernel(stored, scale, weight.dtype, pow2_inputs, path, bits, tuple(codes.shape), float_weight)


def _int8_linear_class():
    eqx = _require_equinox()

    class EqxInt8Linear(eqx.Module):
        """``W x + b`` of an ``eqx.nn.Linear`` from its :class:`ServingKernel` (int8 inputs and weights).

        Called on one example like the layer it replaces (``(in,)`` -> ``(out,)``); under
        ``jax.vmap`` every row of the batch goes through one integer matmul.

        Attributes:
          kernel: the layer's weight as a :class:`ServingKernel`.
          bias: the bias, or None.
        """

        kernel: ServingKernel
        bias: jax.Array | None

        def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
            del key  # a Linear layer draws no randomness
            exporting = current_hook() is not None
            y = _exporting_matmul(x, self.kernel) if exporting else _served_matmul(x, self.kernel)
            return y if self.bias is None else y + self.bias.astype(y.dtype)

    return EqxInt8Linear


def _int8_embedding_class():
    eqx = _require_equinox()

    class EqxInt8Embedding(eqx.Module):
        """An ``eqx.nn.Embedding`` whose table stays int8 codes: a lookup decodes only the rows taken.

        The rows equal the exported table's (``QArray.dequantize``) bit for bit: the same codes
        times the same float32 scales, cast to ``dtype``.

        Attributes:
          codes: the ``(num_embeddings, dim)`` int8 codes.
          scale: float32 scales of shape ``(num_embeddings, 1)``, ``(1, dim)`` or ``(1, 1)``.
          dtype: the dtype of the looked-up rows.
        """

        codes: jax.Array
        scale: jax.Array
        dtype: str = eqx.field(static=True)

        def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
            del key
            hook = current_hook()
            if hasattr(hook, "embedding_rows"):  # the ONNX exporter: the int8 table and a gather vmap can batch
                return hook.embedding_rows(self.codes, self.scale, x, self.dtype)
            scale = self.scale[x] if self.scale.shape[0] > 1 else self.scale[0]
            return (self.codes[x].astype(jnp.float32) * scale).astype(self.dtype)

    return EqxInt8Embedding


_CLASSES: dict = {}


def _module_class(name: str, build):
    if name not in _CLASSES:
        _CLASSES[name] = build()
    return _CLASSES[name]


def int8_linear_class():
    """The ``EqxInt8Linear`` Equinox module class (built on first use: equinox is an optional extra)."""
    return _module_class("EqxInt8Linear", _int8_linear_class)


def int8_embedding_class():
    """The ``EqxInt8Embedding`` Equinox module class (built on first use)."""
    return _module_class("EqxInt8Embedding", _int8_embedding_class)


def _dense_codes(weight):
    """An N:M leaf of kept codes as the dense QArray (N:M saves bytes, not time: serving needs every code)."""
    if isinstance(weight, NMArray) and isinstance(weight.values, QArray):
        return weight.dense_qarray()
    return weight


def _embedding(node, int8_embedding):
    """The ``EqxInt8Embedding`` of an ``eqx.nn.Embedding`` whose table is a symmetric QArray, or None."""
    table = _dense_codes(node.weight)
    if not (isinstance(table, QArray) and len(table.shape) == 2 and table.zero_point is None
            and table.group is None and table.bits <= 8 and table.qmin >= -127):
        return None
    return int8_embedding(table.int_codes().astype(jnp.int8), table.scale.astype(jnp.float32), str(table.dtype))


def _as_module(params: Any, loaded: dict) -> Any:
    """The loaded tree (dicts of module fields, lists/tuples of layers) put back into the structure of
    ``params`` (the model's inexact arrays), leaf by leaf, by path."""
    flat, treedef = paths_and_leaves(params)
    leaves = []
    for path, _ in flat:
        node: Any = loaded
        for key in path.split("/"):
            if isinstance(node, (list, tuple)) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            elif isinstance(node, dict) and key in node:
                node = node[key]
            else:
                raise ValueError(f"equinox_serving_model: the loaded tree has no '{path}'; load a file saved from "
                                 "jaxqp.export(eqx.filter(model, eqx.is_inexact_array), state) of this model")
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def equinox_serving_model(model: Any, exported: Any, *, path: str = "auto", pow2_inputs: bool = False,
                          keep_float: bool = False) -> Any:
    """The Equinox ``model`` with its exported leaves, every quantized ``eqx.nn.Linear`` running from codes.

    Args:
      model: the float Equinox model (its structure and static fields are kept).
      exported: ``jaxqp.export(eqx.filter(model, eqx.is_inexact_array), state)``, quantized with
        ``Rule(..., layout="out_in")``, or ``jaxqp.load`` of its saved file (a nested dict of the
        module's fields, put back into the model's structure by path).
      path: ``"auto"`` (measure each layer's fastest path on this machine) or a pin, as in
        :func:`jaxqp.prepare`.
      pow2_inputs: quantize inputs with power-of-two row scales (models trained with
        ``ActSpec(integer=True)``).
      keep_float: also keep each served weight's float copy, for a faster float path.

    Returns:
      The model with ``EqxInt8Linear`` layers in place of the ``eqx.nn.Linear`` layers whose
      weight is an int8/int4 QArray with one scale per output (or per tensor), and
      ``EqxInt8Embedding`` in place of ``eqx.nn.Embedding`` layers whose table is a symmetric
      QArray (kept as int8 codes, rows decoded at lookup); every other compressed leaf (zero
      points, groups, sparse containers, other layers) decoded to float.

    Raises:
      ImportError: without equinox.
      TypeError: if ``model`` is not an ``eqx.Module``.
      ValueError: for an unknown ``path``, or an ``exported`` tree (or loaded dict) that was not
        exported from this model's inexact arrays (the message names the first missing path).
    """
    eqx = _require_equinox()
    if not isinstance(model, eqx.Module):
        raise TypeError(f"equinox_serving_model: model must be the Equinox model (an eqx.Module) the export was made "
                        f"from, got {type(model).__name__}")
    if path not in PINS:
        raise ValueError(f"equinox_serving_model: path={path!r}; expected one of {PINS}")
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    if isinstance(exported, dict):  # jaxqp.load of a saved export: the module's fields as nested dicts
        exported = _as_module(eqx.filter(model, eqx.is_inexact_array), exported)
    try:
        merged = eqx.combine(exported, static, is_leaf=lambda x: x is None or is_compressed(x))
    except ValueError as err:
        raise ValueError("equinox_serving_model: `exported` does not have the model's structure; export "
                         "eqx.filter(model, eqx.is_inexact_array) of this model (with jaxqp.export)") from err
    int8_linear, int8_embedding = int8_linear_class(), int8_embedding_class()

    def serve(node):
        if isinstance(node, eqx.nn.Embedding):
            embedding = _embedding(node, int8_embedding)
            return node if embedding is None else embedding
        vector = isinstance(node, eqx.nn.Linear) and "scalar" not in (node.in_features, node.out_features)
        weight = _dense_codes(node.weight) if vector else None  # a "scalar" Linear reshapes around its matmul
        if isinstance(weight, QArray):
            kernel = _out_in_kernel(weight, path, pow2_inputs, keep_float)
            if kernel is not None:
                bias = node.bias.dequantize() if isinstance(node.bias, Compressed) else node.bias
                return int8_linear(kernel, bias)
        return node

    served = jax.tree_util.tree_map(serve, merged, is_leaf=lambda x: isinstance(x, (eqx.nn.Linear, eqx.nn.Embedding)))
    decode = lambda x: x.dequantize() if is_compressed(x) and not isinstance(x, ServingKernel) else x
    return jax.tree_util.tree_map(decode, served, is_leaf=is_compressed)

