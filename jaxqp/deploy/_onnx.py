"""ONNX export of a served model: float parts through jax2onnx, quantized layers as exact integer subgraphs.

:func:`to_onnx` traces ``apply_fn(served, *inputs)`` to a jaxpr with a symbolic batch
dimension while every prepared kernel (``jaxqp.prepare``) becomes a jaxqp primitive
(``deploy/_onnx_ops.py``), then hands the jaxpr to jax2onnx, the well-kept converter, which
lowers the float operations and, through the lowerings jaxqp registers with it, the
quantized ones (``MatMulInteger`` on uint8 / ``INT4`` codes, ``DequantizeLinear``). The
model is checked with ``onnx.checker`` (full check) before it is returned or written.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxqp
    >>> model = nn.Dense(64)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    >>> t = jaxqp.transform([jaxqp.Rule(".*kernel", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    >>> onnx_model = jaxqp.deploy.to_onnx(jaxqp.linen_serving_apply(model), served, jnp.ones((1, 32)))
    >>> sorted({n.op_type for n in onnx_model.graph.node} & {"MatMulInteger", "Gemm", "MatMul"})
    ['MatMulInteger']
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params

from ..serving._hooks import kernel_hook
from ..serving._kernels import GeneralKernel, ServingKernel, _Int8Codes
from ._common import check_request, input_specs, require_constant, write_atomic

if TYPE_CHECKING:
    import onnx

OPSET = 21  # MatMulInteger, DequantizeLinear with INT4 and per-axis scales
INT8_MATMULS = ("auto", "split", "halves", "u8u8", "u8s8")
# Weight codes within +-64 cannot saturate a u8 x s8 kernel's int16 pair sums (2 * 255 * 64 = 32640 < 2^15):
# for them the one-matmul "u8s8" form is exact on every CPU, VNNI or not.
U8S8_EXACT_CODE = 64
# "auto" multiplies larger codes in halves (weight read twice) up to this many codes (1 MiB of int8, 2 MiB
# doubled: the size of a core's L2 cache), above it in the split form (weight read once, for twice the rows).
HALVES_MAX_CODES = 2**20


def _require_extra():
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as err:
        raise ImportError(f"jaxqp.deploy.to_onnx needs the optional extra 'onnx' ({err.name} is missing): "
                          "pip install 'jaxqp[onnx]'") from err
    from . import _onnx_ops

    return _onnx_ops


class OnnxKernels:
    """The kernel hook used while tracing: products and decodes become the ONNX-lowered primitives.

    Args:
      ops: the ``_onnx_ops`` module (imported only with the extra installed).
      int8_matmul: one of ``INT8_MATMULS`` (see :func:`to_onnx`).
    """

    batches_products = True  # the integer primitive has a vmap rule (the batch folds into its rows)

    def __init__(self, ops, int8_matmul: str):
        self.ops = ops
        self.int8_matmul = int8_matmul
        self.forms: list[dict] = []  # per integer matmul traced: its weight's shape and form

    def _codes(self, codes: np.ndarray, bits: int) -> jax.Array:
        if bits == 8:
            return jnp.asarray(codes)
        return jnp.asarray(self.ops.int4_array(codes))

    def product(self, rows: jax.Array, kernel: _Int8Codes, n_contract: int) -> jax.Array:
        require_constant("jaxqp.deploy.to_onnx", kernel)
        with jax.ensure_compile_time_eval():  # the codes are constants: computed now, not traced
            codes = np.asarray(kernel.matrix_codes(n_contract))
            out_scale = jnp.asarray(np.asarray(kernel.out_scale(n_contract), np.float32))
        form = self.int8_matmul
        if form == "auto":  # the fast single matmul where it is exact everywhere, else halves or split
            if np.abs(codes.astype(np.int16)).max(initial=0) <= U8S8_EXACT_CODE:
                form = "u8s8"
            else:  # both exact everywhere: the halves read the weight twice, the split passes over twice the rows
                form = "halves" if codes.size <= HALVES_MAX_CODES else "split"
        if kernel.bits < 8:
            kind, weight = "int4", self._codes(codes, kernel.bits)
        elif form == "u8u8":  # codes + 128 with b_zero_point 128
            kind, weight = "u8u8", jnp.asarray((codes.astype(np.int16) + 128).astype(np.uint8))
        else:
            kind, weight = form, jnp.asarray(codes)
        self.forms.append({"shape": list(codes.shape), "form": kind})
        return self.ops.int_matmul_p.bind(rows.astype(jnp.float32), weight, out_scale, pow2=kernel.pow2, kind=kind)

    def decode(self, kernel: _Int8Codes) -> jax.Array:
        require_constant("jaxqp.deploy.to_onnx", kernel)
        with jax.ensure_compile_time_eval():
            codes, scale = np.asarray(kernel.int8_codes()), np.asarray(kernel.scale)
        if isinstance(kernel, ServingKernel):
            codes, axis = codes.T, 1
        elif isinstance(kernel, GeneralKernel):
            axis = codes.ndim - 1
            scale = scale.reshape(()) if scale.size == 1 else scale.reshape(-1)
        else:
            raise TypeError(f"jaxqp.deploy.to_onnx: cannot decode a {type(kernel).__name__}")
        return self.ops.dequantize_p.bind(self._codes(codes, kernel.bits), jnp.asarray(scale, jnp.float32),
                                          axis=axis, dtype=np.dtype(kernel.dtype).name)


    def embedding_rows(self, codes: jax.Array, scale: jax.Array, indices: jax.Array, dtype: str) -> jax.Array:
        """Rows of an int8 table with per-row, per-column or per-tensor scales (an Equinox embedding):
        ``DequantizeLinear`` of the int8 codes, then one ``Gather`` that ``vmap`` batches."""
        if isinstance(codes, jax.core.Tracer):
            raise ValueError(f"jaxqp.deploy.to_onnx: an embedding table {tuple(codes.shape)} reached the exporter as "
                             "a traced value (stacked tables mapped over with vmap/scan?), but export writes codes as "
                             "constants. Give each embedding its own table")
        with jax.ensure_compile_time_eval():
            int8_codes, scales = np.asarray(codes, np.int8), np.asarray(scale, np.float32)
        axis = 0 if scales.shape[0] > 1 else 1  # per row, else per column (or per tensor: one scale)
        scales = scales.reshape(()) if scales.size == 1 else scales.reshape(-1)
        table = self.ops.dequantize_p.bind(jnp.asarray(int8_codes), jnp.asarray(scales), axis=axis, dtype=dtype)
        return self.ops.gather_p.bind(table, indices)

    def lookup(self, kernel: ServingKernel, indices: jax.Array) -> jax.Array:
        require_constant("jaxqp.deploy.to_onnx", kernel)
        return jnp.take(self.decode(kernel), indices, axis=0)


def _equations(jaxpr, scope: str = ""):
    """Every equation of ``jaxpr`` and its sub-jaxprs, with the module path that traced it."""
    for eqn in jaxpr.eqns:
        here = "/".join(p for p in (scope, str(eqn.source_info.name_stack)) if p)
        yield eqn, here
        for sub in jaxprs_in_params(eqn.params):
            yield from _equations(sub, here)


def _culprit(jaxpr, message: str) -> str:
    """The operation an error message names, and the layer (module path) that traced it."""
    head = message.split(":")[0]
    for eqn, layer in _equations(jaxpr):
        name = eqn.primitive.name
        if name in head.split() or f"'{name}'" in message:
            return f"'{name}' in layer '{layer or 'the top-level function'}'"
    return "an operation of this model"


@contextlib.contextmanager
def _quiet_shape_warnings():
    """onnx_ir warns once per untyped int64 shape tensor that jax2onnx builds for a symbolic
    reshape (dozens per transformer); the model is complete and passes the full check."""
    logger = logging.getLogger("onnx_ir.serde")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def to_onnx(apply_fn: Callable, served: Any, *example_inputs: Any, file: str | None = None, opset: int = OPSET,
            dynamic_batch: bool = True, int8_matmul: str = "auto", model_name: str = "jaxqp_model",
            ) -> onnx.ModelProto:
    """The served model ``apply_fn(served, *inputs)`` as an ONNX model (and file).

    Every quantized matmul (``nn.Dense``, ``nn.DenseGeneral`` incl. attention projections,
    ``nnx.Linear``) becomes an exact integer subgraph around ``MatMulInteger``: it computes
    what jaxqp's integer serving paths compute, bit for bit up to ONNX Runtime's float32
    operations (see ``docs/deploy.md``). Any other quantized weight (a convolution's kernel,
    an embedding table) is stored as int8 or ``INT4`` codes and decoded by
    ``DequantizeLinear``. The float parts (norms, attention, activations, biases) go through
    jax2onnx. A kernel's path pin or kept float copy (``prepare(path=..., keep_float=...)``)
    does not change the export: it always carries the codes.

    Args:
      apply_fn: the serving function, e.g. ``jaxqp.linen_serving_apply(model)``, or
        ``lambda m, x: m(x)`` for an NNX model from ``jaxqp.nnx_serving_model``.
      served: the prepared tree (``jaxqp.prepare``) or served NNX model; a float tree
        exports the float model.
      *example_inputs: arrays (or ``jax.ShapeDtypeStruct``) giving each input's shape and dtype.
      file: when given, the model is also written there (atomically).
      opset: the ONNX opset (>= 21).
      dynamic_batch: make the first axis of every input a symbolic dimension ``B``.
      int8_matmul: how 8-bit weights multiply in ``MatMulInteger`` (``docs/deploy.md``).
        ``"auto"`` (default): per layer, ``"u8s8"`` where every weight code lies in
        [-64, 64] (a ``QuantSpec(bits=7)`` weight: no int16 pair sum can saturate, so exact on
        every CPU), else ``"halves"`` for weights of at most 2^20 codes and ``"split"`` for
        larger ones. ``"halves"``: the activation codes + 128 as uint8, repeated along the
        contraction axis, times the weight codes cut into two halves within [-64, 64]
        (computed in the graph from the stored codes; ONNX Runtime folds them when the
        session starts), one u8 x s8 matmul over twice the contraction: exact on every CPU,
        the weight read twice. ``"split"``: the activation codes' positive and negative
        parts stacked as uint8 rows times the int8 weight codes, one u8 x s8 matmul: exact on
        every CPU and on ONNX Runtime's fast kernel, at twice the rows. ``"u8u8"``: uint8
        codes + 128 on both sides, exact everywhere, slow where the fast kernel is u8 x s8.
        ``"u8s8"``: one u8 x s8 matmul of codes + 128; fastest, but for codes beyond +-64
        exact only on CPUs with VNNI (without it, int16 pair sums saturate for extreme
        codes), or in a session with ONNX Runtime's ``session.x64quantprecision=1``, which
        rewrites the weights to u8 x u8 (on the tested AVX-512 VNNI CPU too, so at
        ``"u8u8"``'s speed). Weights of 4 bits or fewer always take one u8 x s8 matmul,
        exact everywhere.
      model_name: the graph's name.

    Returns:
      The ``onnx.ModelProto``, checked with ``onnx.checker.check_model(full_check=True)``.
      Its metadata ``"jaxqp.matmul_forms"`` lists, as JSON in trace order, each integer
      matmul's weight shape ``(K, F)`` and form (``"split"``, ``"halves"``, ``"u8s8"``, ``"u8u8"``,
      ``"int4"``).

    Raises:
      ImportError: without the ``onnx`` extra.
      TypeError: if ``apply_fn`` is not callable.
      ValueError: for a tree that was exported but not prepared, an opset below 21, a ``file``
        that cannot be written (a folder, a missing folder: refused before any tracing), or a
        layer jax2onnx cannot express (the message names the operation and where it was traced).

    Example:
      >>> import jax.numpy as jnp, jaxqp
      >>> m = jaxqp.deploy.to_onnx(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)))
      >>> batch, features = m.graph.input[0].type.tensor_type.shape.dim
      >>> batch.dim_param, features.dim_value
      ('B', 4)
    """
    if opset < OPSET:
        raise ValueError(f"jaxqp.deploy.to_onnx: opset={opset}; MatMulInteger with INT4 codes needs opset >= {OPSET}")
    if int8_matmul not in INT8_MATMULS:
        raise ValueError(f"jaxqp.deploy.to_onnx: int8_matmul={int8_matmul!r}; expected one of {INT8_MATMULS}")
    ops = _require_extra()
    import jax2onnx
    import onnx
    from jax.extend.core import jaxpr_as_fun

    check_request("jaxqp.deploy.to_onnx", apply_fn, served, file, ".onnx")
    specs = input_specs("jaxqp.deploy.to_onnx", example_inputs, dynamic_batch)
    kernels = OnnxKernels(ops, int8_matmul)
    with kernel_hook(kernels):
        closed = jax.make_jaxpr(lambda *xs: apply_fn(served, *xs))(*specs)
    try:
        with _quiet_shape_warnings():
            model = jax2onnx.to_onnx(jaxpr_as_fun(closed), specs, opset=opset, model_name=model_name)
        onnx.checker.check_model(model, full_check=True)
    except (NotImplementedError, ValueError, TypeError, onnx.checker.ValidationError,
            onnx.shape_inference.InferenceError) as err:
        raise ValueError(f"jaxqp.deploy.to_onnx: jax2onnx cannot express {_culprit(closed.jaxpr, str(err))} as ONNX "
                         f"({type(err).__name__}: {err}). Compute it outside the exported function, or "
                         "replace it by operations jax2onnx lowers") from err
    # the form each integer matmul took, in trace order: what "auto" decided, readable from the file
    onnx.helper.set_model_props(model, {"jaxqp.matmul_forms": json.dumps(kernels.forms)})
    if file is not None:
        write_atomic(file, model.SerializeToString())
    return model
