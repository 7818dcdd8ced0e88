"""LiteRT (TFLite) export of a served model: ``jax.export`` to StableHLO, then litert-converter.

:func:`to_litert` traces ``apply_fn(served, *inputs)`` with ``jax.export`` while every
prepared kernel (``jaxqp.prepare``) is written as the quantization annotations LiteRT's
converter understands: ``quant.fake_quant`` composites (``jax.lax.composite``). A weight is
annotated with its int8 (or int4) codes' scales (one per output channel, ``narrow_range``),
a matmul's input with an empty scale: quantize it per row when the model runs. The converter
(strict QDQ mode) then stores the weights as int8 / int4 tensors and turns each quantized
matmul into a dynamic-range ``FULLY_CONNECTED`` (int8 weights, activations quantized to int8
row by row at run time, int32 accumulation), the same arithmetic as jaxqp's integer serving.
A convolution's kernel and an embedding table are stored as codes and decoded by
``DEQUANTIZE``, as jaxqp serves them (float arithmetic on the decoded weight).

Where LiteRT's numbers differ from jaxqp's (measured in ``docs/deploy.md``): its reference
kernels quantize a row as jaxqp does (absmax / 127, symmetric), but round half away from zero
and multiply by ``127 / absmax`` rather than by ``1 / (absmax * f32(1/127))``: a code differs by
one now and then. The XNNPACK delegate (the interpreter's default on CPU) quantizes each row
asymmetrically (min/max, a zero point), so its activation codes are a finer grid: each output
stays within one activation quantization step of jaxqp's, summed over the row
(``|dy_j| <= step_row * sum_k |w_kj|``).

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxqp
    >>> model = nn.Dense(64)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    >>> t = jaxqp.transform([jaxqp.Rule(".*kernel", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    >>> flatbuffer = jaxqp.deploy.to_litert(jaxqp.linen_serving_apply(model), served, jnp.ones((1, 32)))
    >>> flatbuffer[4:8]
    b'TFL3'
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..serving._hooks import kernel_hook
from ..serving._kernels import GeneralKernel, ServingKernel, _Int8Codes
from ..serving._matmul import quantize_rows
from ._common import check_request, input_specs, require_constant, write_atomic

SIGNATURE = "serving_default"


def _require_extra():
    try:  # a compiled module without type stubs: imported by name
        converter_api_ext = importlib.import_module("litert_converter.converter_api_ext")
        from litert_converter.mlir import ir, passmanager
    except ImportError as err:
        raise ImportError(f"jaxqp.deploy.to_litert needs the optional extra 'litert' ({err.name} is missing): "
                          "pip install 'jaxqp[litert]'") from err
    return converter_api_ext, ir, passmanager


def _weight(weight: np.ndarray, scale: np.ndarray, axis: int | None, bits: int) -> jax.Array:
    """``weight`` (the codes times their scales, exact in float32) annotated as quantized weight codes.

    The converter recomputes the codes as ``round(weight / scale)``: exact, since each value
    is a code times its scale. ``axis``: the output-channel axis of a per-channel ``scale``.
    """
    attributes: dict[str, Any] = {"scale": np.asarray(scale, np.float32).reshape(-1),
                                  "dtype": "i8" if bits == 8 else "i4", "narrow_range": True}
    if axis is not None:
        attributes["quantization_dimension"] = axis

    @functools.partial(jax.lax.composite, name="quant.fake_quant")
    def fake_quant(w, **attrs):
        del attrs  # read by the converter only
        return w  # already the decoded weight

    return fake_quant(jnp.asarray(weight), **attributes)


def _rows(rows: jax.Array) -> jax.Array:
    """``rows`` annotated for dynamic int8 quantization per row (an empty scale: decided at run time)."""

    @functools.partial(jax.lax.composite, name="quant.fake_quant")
    def fake_quant(x, **attrs):
        del attrs
        codes, scale = quantize_rows(x)  # what the model computes in JAX: jaxqp's own row quantization
        return codes.astype(jnp.float32) * scale

    return fake_quant(rows, scale=np.zeros((0,), np.float32), dtype="i8", narrow_range=False)


class LiteRTKernels:
    """The kernel hook used while tracing: products and decodes become ``quant.fake_quant`` composites."""

    def product(self, rows: jax.Array, kernel: _Int8Codes, n_contract: int) -> jax.Array:
        require_constant("jaxqp.deploy.to_litert", kernel)
        with jax.ensure_compile_time_eval():  # the codes are constants: computed now, not traced
            codes = np.asarray(kernel.matrix_codes(n_contract)).astype(np.float32)
            scale = np.asarray(kernel.out_scale(n_contract), np.float32)
        weight = _weight(codes * scale, scale, 1, kernel.bits)
        return jnp.dot(_rows(rows.astype(jnp.float32)), weight, preferred_element_type=jnp.float32)

    def decode(self, kernel: _Int8Codes) -> jax.Array:
        require_constant("jaxqp.deploy.to_litert", kernel)
        with jax.ensure_compile_time_eval():
            codes, scale = np.asarray(kernel.int8_codes()).astype(np.float32), np.asarray(kernel.scale, np.float32)
        if isinstance(kernel, ServingKernel):  # codes (out, in), scale (out,): the weight is (in, out)
            codes, axis = codes.T, 1
        elif isinstance(kernel, GeneralKernel):  # scale broadcasts against the kernel's last axis
            axis = codes.ndim - 1
            scale = scale.reshape(()) if scale.size == 1 else scale.reshape(-1)
        else:
            raise TypeError(f"jaxqp.deploy.to_litert: cannot decode a {type(kernel).__name__}")
        per_channel = scale.ndim == 1 and scale.size > 1
        weight = _weight(codes * scale, scale, axis if per_channel else None, kernel.bits)
        return weight.astype(kernel.dtype)


    def lookup(self, kernel: ServingKernel, indices: jax.Array) -> jax.Array:
        require_constant("jaxqp.deploy.to_litert", kernel)
        # gathers the int8 codes, then scales the rows taken: the table stays int8 in the file
        # (a quantized weight feeding a gather crashes litert-converter 0.5)
        with jax.ensure_compile_time_eval():
            codes, scale = np.asarray(kernel.int8_codes()), np.asarray(kernel.scale, np.float32)
        rows = jnp.take(jnp.asarray(codes.T), indices, axis=0)
        return (rows.astype(jnp.float32) * scale).astype(kernel.dtype)


def _convert(mlir_text: str, input_names: Sequence[str], output_names: Sequence[str]) -> bytes:
    converter, ir, passmanager = _require_extra()
    context = ir.Context()
    converter.prepare_mlir_context(context)
    with context, ir.Location.unknown():
        module = ir.Module.parse(mlir_text)
        converter.set_signature(module.operation, SIGNATURE, list(input_names), list(output_names))
        config = converter.ConvertToTFLConfig()
        config.qdq_conversion_mode = "DYNAMIC"  # matmul inputs: quantized per row when the model runs
        config.strict_qdq_mode = True  # quantize exactly what the composites say, nothing else
        converter.run_convert_to_tfl_passes(module, passmanager.PassManager(), config)
        return converter.export_flatbuffer_to_bytes(module.operation)


def to_litert(apply_fn: Callable, served: Any, *example_inputs: Any, file: str | None = None,
              input_names: Sequence[str] | None = None) -> bytes:
    """The served model ``apply_fn(served, *inputs)`` as a LiteRT (TFLite) flatbuffer (and file).

    Every quantized matmul (``nn.Dense``, ``nn.DenseGeneral`` incl. attention projections,
    ``nnx.Linear``) becomes a dynamic-range ``FULLY_CONNECTED`` with int8 (or int4) per-channel
    weights; any other quantized weight (a convolution's kernel, an embedding table) is stored
    as codes and decoded by ``DEQUANTIZE``. The float parts are converted by litert-converter
    from StableHLO (``jax.export``). The model has one signature, ``serving_default``, with
    inputs ``x0, x1, ...`` (or ``input_names``) and outputs ``y0, y1, ...``. How LiteRT's
    numbers differ from jaxqp's: see this module's docstring and ``docs/deploy.md``.

    The model has the example inputs' shapes, batch included: export one model per batch size.
    (A symbolic batch needs jax to lower ``lax.composite`` under shape polymorphism, which
    jax 0.10 cannot: jax-ml/jax#40486.)

    Args:
      apply_fn: the serving function, e.g. ``jaxqp.linen_serving_apply(model)``, or
        ``lambda m, x: m(x)`` for an NNX model from ``jaxqp.nnx_serving_model``.
      served: the prepared tree (``jaxqp.prepare``) or served NNX model; a float tree
        exports the float model.
      *example_inputs: arrays (or ``jax.ShapeDtypeStruct``) giving each input's shape and dtype.
      file: when given, the flatbuffer is also written there (atomically).
      input_names: the signature's input names (default ``x0, x1, ...``).

    Returns:
      The flatbuffer bytes (load with ``ai_edge_litert.interpreter.Interpreter(model_content=...)``).

    Raises:
      ImportError: without the ``litert`` extra.
      TypeError: if ``apply_fn`` is not callable.
      ValueError: for a tree that was exported but not prepared, a ``file`` that cannot be
        written (a folder, a missing folder: refused before any tracing), or a model the
        converter cannot express (the converter's message names the operation).

    Example:
      >>> import jax.numpy as jnp, jaxqp
      >>> fb = jaxqp.deploy.to_litert(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)))
      >>> len(fb) > 0
      True
    """
    _require_extra()
    check_request("jaxqp.deploy.to_litert", apply_fn, served, file, ".tflite")
    specs = input_specs("jaxqp.deploy.to_litert", example_inputs, dynamic_batch=False)
    names = list(input_names) if input_names is not None else [f"x{i}" for i in range(len(specs))]
    if len(names) != len(specs) or len(set(names)) != len(names):
        raise ValueError(f"jaxqp.deploy.to_litert: input_names={input_names!r}; give {len(specs)} distinct names, "
                         "one per example input")
    with kernel_hook(LiteRTKernels()):
        try:
            exported = jax.export.export(jax.jit(lambda *xs: apply_fn(served, *xs)))(*specs)
        except NotImplementedError as err:
            if "composite" not in str(err):
                raise
            raise ValueError("jaxqp.deploy.to_litert: a served Flax layer runs under jax.vmap, but LiteRT's int8 "
                             "operations come from jax.lax.composite, which has no vmap rule. Call the model on the "
                             "whole batch (Flax layers take a batch), or export it with jaxqp.deploy.to_onnx") from err
    outputs = [f"y{i}" for i in range(len(exported.out_avals))]
    try:
        flatbuffer = _convert(exported.mlir_module(), names, outputs)
    except ValueError as err:
        raise ValueError(f"jaxqp.deploy.to_litert: litert-converter cannot convert this model ({err}). Compute the "
                         "named operation outside the exported function, or replace it by one LiteRT has") from err
    if file is not None:
        write_atomic(file, flatbuffer)
    return flatbuffer
