"""jaxqp's integer layers as ONNX subgraphs: two JAX primitives and their jax2onnx lowerings (deploy layer).

Importing this module registers the lowerings with jax2onnx (an optional extra); only
:func:`jaxqp.deploy.to_onnx` imports it. While it traces a served model, every prepared kernel
becomes one of two primitives (see :class:`OnnxKernels`):

- ``jaxqp_int_matmul``: ``rows (n, K)`` times a quantized ``(K, F)`` weight, exactly as
  jaxqp's integer serving paths compute it. Each row is quantized to int8 codes (absmax
  times ``f32(1/127)``, or its power-of-two ceiling for ``pow2`` kernels; ``x`` times the
  reciprocal of the scale, rounded half to even by a ``QuantizeLinear`` of scale 1),
  multiplied with the weight codes by ``MatMulInteger`` into int32 and rescaled by the row
  scale (``DequantizeLinear`` along the rows), then the output scale. ONNX Runtime's fast
  integer kernel is u8 x s8, and on a CPU without VNNI it sums pairs of products in int16,
  which saturates when both factors are large (2 * 255 * 127 > 2^15). So the form depends on
  the weight (``kind``):

  - ``"halves"`` (8-bit weights of at most 2^20 codes under ``to_onnx``'s default ``"auto"``):
    codes + 128 as uint8 (zero point 128), concatenated with themselves along the contraction
    axis, times ``[w - h; h]`` with ``h = trunc(w / 2)``: both halves lie in [-64, 64], so no
    pair sum exceeds 2 * 255 * 64 < 2^15 whichever products the kernel pairs. One u8 x s8
    matmul over ``2K``; the halves are computed in the graph from the stored codes (folded
    once when the session starts), so the file holds one int8 matrix.
  - ``"split"`` (larger 8-bit weights under ``"auto"``): the codes' positive and negative parts, both
    in [0, 127] (two ``QuantizeLinear``s of zero point 0), stacked as ``2n`` uint8 rows, one
    u8 x s8 ``MatMulInteger`` with the int8 weight codes, then the difference of the two row blocks. No pair sum exceeds
    2 * 127 * 127 < 2^15: exact on every CPU, and the weight is read once.
  - ``"u8u8"``: codes + 128 as uint8 times uint8 weight codes + 128 (both zero points 128):
    exact everywhere, but slow on CPUs whose fast kernel is u8 x s8.
  - ``"u8s8"``: codes + 128 as uint8 (zero point 128) times int8 weight codes: one matmul,
    exact on CPUs with VNNI, and on every CPU when the weight codes lie in [-64, 64]
    (2 * 255 * 64 < 2^15: what ``to_onnx``'s default ``"auto"`` picks for such weights).
  - ``"int4"``: weights of 4 bits or fewer, stored as ``INT4`` initializers cast to int8
    (folded once when the session starts), times codes + 128 as uint8: u8 x s8 cannot
    saturate (2 * 255 * 8 < 2^15).
- ``jaxqp_dequantize``: a weight decoded from its codes (a convolution's kernel, an
  embedding table), as ``DequantizeLinear`` of int8 or ``INT4`` codes with one float32
  scale per output channel.

Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxqp.deploy._onnx_ops import int_matmul_p
    >>> int_matmul_p.name
    'jaxqp_int_matmul'
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import onnx_ir as ir
from jax.extend.core import Primitive
from jax.interpreters import batching
from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from ..numerics._int_dot import pow2_codes
from ..numerics._linear import reciprocal
from ..serving._matmul import quantize_rows

int_matmul_p = Primitive("jaxqp_int_matmul")
dequantize_p = Primitive("jaxqp_dequantize")
gather_p = Primitive("jaxqp_gather")

_F32 = ir.DataType.FLOAT


def _int_matmul_eval(rows, weight, out_scale, *, pow2: bool, kind: str):
    """The primitive's meaning in JAX (what the ONNX subgraph computes), for eager checks."""
    codes, row_scale = pow2_codes(rows, 8, 1) if pow2 else quantize_rows(rows)
    w = weight.astype(jnp.int32) - (128 if weight.dtype == jnp.uint8 else 0)
    acc = jax.lax.dot(codes.astype(jnp.int32), w, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * row_scale * out_scale


int_matmul_p.def_impl(_int_matmul_eval)
int_matmul_p.def_abstract_eval(
    lambda rows, weight, out_scale, *, pow2, kind: jax.core.ShapedArray((rows.shape[0], weight.shape[1]), jnp.float32)
)


def _int_matmul_batched(args, dims, *, pow2: bool, kind: str):
    """Under ``jax.vmap`` (an Equinox model served per example): the batch axis folds into the rows."""
    rows, weight, out_scale = args
    if dims[1] is not None or dims[2] is not None:
        raise NotImplementedError("jaxqp_int_matmul: a batch of different weights cannot become one ONNX "
                                  "MatMulInteger; export one kernel per layer")
    rows = jnp.moveaxis(rows, dims[0], 0)
    flat = int_matmul_p.bind(rows.reshape(-1, rows.shape[-1]), weight, out_scale, pow2=pow2, kind=kind)
    return flat.reshape(*rows.shape[:-1], flat.shape[-1]), 0


batching.primitive_batchers[int_matmul_p] = _int_matmul_batched
gather_p.def_impl(lambda table, indices: jnp.take(table, indices, axis=0))
gather_p.def_abstract_eval(
    lambda table, indices: jax.core.ShapedArray(tuple(indices.shape) + tuple(table.shape[1:]), table.dtype))


def _gather_batched(args, dims):
    """Rows of one table for a batch of indices: the same gather, the batch axis where the indices had it.

    jax2onnx lowers a vmapped scalar gather (``jax.vmap(lambda i: table[i])``, an Equinox embedding) to
    a graph ONNX Runtime rejects; this primitive never reaches jax2onnx's gather under ``vmap``.
    """
    table, indices = args
    if dims[0] is not None:
        raise NotImplementedError("jaxqp_gather: a batch of different tables cannot become one ONNX Gather")
    return gather_p.bind(table, indices), dims[1]


batching.primitive_batchers[gather_p] = _gather_batched
dequantize_p.def_impl(lambda codes, scale, *, axis, dtype: (codes.astype(jnp.float32) * scale).astype(dtype))
dequantize_p.def_abstract_eval(lambda codes, scale, *, axis, dtype: jax.core.ShapedArray(codes.shape, dtype))


class _Graph:
    """Builds typed, shaped ONNX values inside one jax2onnx lowering."""

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def const(self, name: str, value: Any) -> Any:
        return self.ctx.builder.add_initializer_from_array(self.ctx.fresh_name(name), np.asarray(value))

    def op(self, kind: str, *inputs: Any, shape: tuple, dtype: Any = _F32, **attrs: Any) -> Any:
        value = getattr(self.ctx.builder, kind)(*inputs, _outputs=[self.ctx.fresh_name(kind.lower())], **attrs)
        return self.typed(value, shape, dtype)

    def typed(self, value: Any, shape: tuple, dtype: Any) -> Any:
        value.type = ir.TensorType(dtype)
        _stamp_type_and_shape(value, shape)
        _ensure_value_metadata(self.ctx, value)
        return value


def _pow2_ceil(g: _Graph, scale: Any, shape: tuple) -> Any:
    """The smallest power of two >= ``scale`` (positive, normal), exactly: log2 then two corrections."""
    two = g.const("two", np.float32(2))
    log2 = g.op("Div", g.op("Log", scale, shape=shape), g.const("ln2", np.float32(np.log(2))), shape=shape)
    p = g.op("Pow", two, g.op("Ceil", log2, shape=shape), shape=shape)
    for _ in range(2):  # log2 may be an ulp off at exact powers of two
        p = g.op("Where", g.op("Less", p, scale, shape=shape, dtype=ir.DataType.BOOL),
                 g.op("Mul", p, two, shape=shape), p, shape=shape)
        half = g.op("Mul", p, g.const("half", np.float32(0.5)), shape=shape)
        p = g.op("Where", g.op("GreaterOrEqual", half, scale, shape=shape, dtype=ir.DataType.BOOL), half, p,
                 shape=shape)
    return p


def _inputs(ctx: Any, eqn: Any, *hints: str) -> list:
    """The ONNX values of ``eqn``'s inputs, named after ``hints``."""
    return [ctx.get_value_for_var(var, name_hint=ctx.fresh_name(hint)) for var, hint in zip(eqn.invars, hints)]


def _lowering(primitive: Primitive, onnx_op: str, component: str):
    """Registers a class as jax2onnx's lowering of ``primitive`` (its metadata names the main ONNX op)."""
    return register_primitive(
        jaxpr_primitive=primitive.name, jax_doc="https://github.com/jaxqp", since="jaxqp-0.3",
        onnx=[{"component": onnx_op, "doc": f"https://onnx.ai/onnx/operators/onnx__{onnx_op}.html"}],
        context="primitives.jaxqp", component=component, testcases=[])


@_lowering(int_matmul_p, "MatMulInteger", "int_matmul")
class IntMatmulPlugin(PrimitiveLeafPlugin):
    """Lowers ``jaxqp_int_matmul`` to the exact u8 ``MatMulInteger`` subgraph (module docstring)."""

    def lower(self, ctx: Any, eqn: Any) -> None:
        g = _Graph(ctx)
        rows, weight, out_scale = _inputs(ctx, eqn, "rows", "codes", "out_scale")
        n, k = rows.shape[0], rows.shape[1]
        f = eqn.invars[1].aval.shape[1]
        absmax = g.op("ReduceMax", g.op("Abs", rows, shape=(n, k)), g.const("axes", np.array([1], np.int64)),
                      keepdims=1, shape=(n, 1))
        scale = g.op("Mul", absmax, g.const("inv127", reciprocal(127)), shape=(n, 1))
        # 1.0 for an all-zero row; a NaN or infinite scale is kept (as jaxqp's nonzero_scale does)
        zero = g.op("Equal", scale, g.const("zero", np.float32(0)), shape=(n, 1), dtype=ir.DataType.BOOL)
        scale = g.op("Where", zero, g.const("one", np.float32(1)), scale, shape=(n, 1))
        if eqn.params["pow2"]:
            scale = _pow2_ceil(g, scale, (n, 1))
        scaled = g.op("Mul", rows, g.op("Reciprocal", scale, shape=(n, 1)), shape=(n, k))  # |scaled| <= 127
        kind = eqn.params["kind"]
        if kind == "split":
            acc = _split_product(g, scaled, weight, (n, k, f))
        else:  # codes + 128: QuantizeLinear with scale 1 rounds half to even and adds the zero point
            shifted = _quantize(g, scaled, 128, (n, k))
            zero_points = [g.const("a_zero_point", np.uint8(128))]
            if kind == "u8u8":
                zero_points.append(g.const("b_zero_point", np.uint8(128)))
            elif kind == "int4":
                weight = g.op("Cast", weight, to=int(ir.DataType.INT8.value), shape=(k, f), dtype=ir.DataType.INT8)
            elif kind == "halves":
                shifted, weight = _halves(g, shifted, weight, (n, k, f))
            acc = g.op("MatMulInteger", shifted, weight, *zero_points, shape=(n, f), dtype=ir.DataType.INT32)
        # float(acc) * row scale in one DequantizeLinear (per row: axis 0), then the output scale
        row_scale = g.op("Squeeze", scale, g.const("axis1", np.array([1], np.int64)), shape=(n,))
        y = g.op("DequantizeLinear", acc, row_scale, axis=0, shape=(n, f))
        ctx.bind_value_for_var(eqn.outvars[0], g.op("Mul", y, out_scale, shape=(n, f)))


def _quantize(g: _Graph, scaled: Any, zero_point: int, shape: tuple) -> Any:
    """uint8 ``clip(round_half_even(scaled) + zero_point, 0, 255)`` in one ``QuantizeLinear`` (scale 1: exact).

    The activation codes never leave [-127, 127] (``scaled`` is ``x`` times the reciprocal of
    ``absmax / 127``), so the saturation at 0 and 255 only cuts what the callers want cut.
    """
    return g.op("QuantizeLinear", scaled, g.const("unit_scale", np.float32(1)),
                g.const("zero_point", np.uint8(zero_point)), shape=shape, dtype=ir.DataType.UINT8)


def _halves(g: _Graph, shifted: Any, weight: Any, dims: tuple) -> tuple[Any, Any]:
    """``([a, a], [w - h; h])`` with ``h = trunc(w / 2)``: one u8 x s8 matmul over 2K gives ``codes @ weight``.

    ``shifted`` holds the activation codes + 128 (uint8, zero point 128). Both halves of the
    weight lie in [-64, 64] (``h`` in [-63, 63], ``w - h`` in [-64, 64]), so no two products
    of a uint8 code and a half can sum past 2 * 255 * 64 = 32640 < 2^15, whichever pairs the
    kernel adds in int16: exact on every CPU. The halves are computed in the graph from the
    stored int8 codes (ONNX Runtime folds them into one constant when the session starts), so
    the file keeps one int8 matrix.
    """
    n, k, f = dims
    i8 = ir.DataType.INT8
    half = g.op("Div", weight, g.const("two_i8", np.int8(2)), shape=(k, f), dtype=i8)  # truncates toward 0
    rest = g.op("Sub", weight, half, shape=(k, f), dtype=i8)
    stacked = g.op("Concat", rest, half, axis=0, shape=(2 * k, f), dtype=i8)
    doubled = g.op("Concat", shifted, shifted, axis=1, shape=(n, 2 * k), dtype=ir.DataType.UINT8)
    return doubled, stacked


def _split_product(g: _Graph, scaled: Any, weight: Any, dims: tuple) -> Any:
    """int32 ``codes @ weight`` as ``max(codes, 0) @ w - max(-codes, 0) @ w`` in one u8 x s8 matmul.

    ``QuantizeLinear`` with zero point 0 saturates below at 0: it gives ``max(round(s), 0)``
    and, of ``-s``, ``max(-round(s), 0)`` (rounding half to even is symmetric), both in [0, 127].
    """
    n, k, f = dims
    u8, i32 = ir.DataType.UINT8, ir.DataType.INT32
    positive = _quantize(g, scaled, 0, (n, k))
    negative = _quantize(g, g.op("Neg", scaled, shape=(n, k)), 0, (n, k))
    stacked = g.op("Concat", positive, negative, axis=0, shape=(None, k), dtype=u8)
    both = g.op("MatMulInteger", stacked, weight, shape=(None, f), dtype=i32)
    first, second = g.ctx.builder.Split(both, axis=0, num_outputs=2,
                                        _outputs=[g.ctx.fresh_name("positive"), g.ctx.fresh_name("negative")])
    for half in (first, second):
        g.typed(half, (n, f), i32)
    return g.op("Sub", first, second, shape=(n, f), dtype=i32)


@_lowering(dequantize_p, "DequantizeLinear", "dequantize")
class DequantizePlugin(PrimitiveLeafPlugin):
    """Lowers ``jaxqp_dequantize`` to ``DequantizeLinear`` (per-channel along ``axis``, or per-tensor)."""

    def lower(self, ctx: Any, eqn: Any) -> None:
        g = _Graph(ctx)
        codes_var, scale_var = eqn.invars
        codes, scale = _inputs(ctx, eqn, "codes", "scale")
        shape = tuple(codes_var.aval.shape)
        attrs = {} if scale_var.aval.ndim == 0 else {"axis": eqn.params["axis"]}
        y = g.op("DequantizeLinear", codes, scale, shape=shape, **attrs)
        if np.dtype(eqn.params["dtype"]) != np.float32:
            y = g.op("Cast", y, to=int(ir.DataType.from_numpy(np.dtype(eqn.params["dtype"])).value), shape=shape,
                     dtype=ir.DataType.from_numpy(np.dtype(eqn.params["dtype"])))
        ctx.bind_value_for_var(eqn.outvars[0], y)


@_lowering(gather_p, "Gather", "gather")
class GatherPlugin(PrimitiveLeafPlugin):
    """Lowers ``jaxqp_gather`` to one ``Gather`` along the table's first axis."""

    def lower(self, ctx: Any, eqn: Any) -> None:
        g = _Graph(ctx)
        table, indices = _inputs(ctx, eqn, "table", "indices")
        out = eqn.outvars[0].aval
        dtype = ir.DataType.from_numpy(np.dtype(out.dtype))
        ctx.bind_value_for_var(eqn.outvars[0], g.op("Gather", table, indices, axis=0, shape=tuple(out.shape),
                                                    dtype=dtype))


def int4_array(codes: np.ndarray) -> np.ndarray:
    """int8 codes in [-8, 7] as an ``ml_dtypes.int4`` array (an ONNX ``INT4`` initializer)."""
    return np.asarray(codes).astype(ml_dtypes.int4)
