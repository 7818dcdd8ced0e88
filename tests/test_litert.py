"""LiteRT export (``jaxqp.deploy.to_litert``): int8 flatbuffers the ai-edge-litert interpreter runs to jaxqp's numbers.

Two sets of CPU kernels run a LiteRT model. The builtin ones (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``)
quantize each input row of a dynamic-range ``FULLY_CONNECTED`` the way jaxqp does (symmetric
absmax / 127): a layer's output equals jaxqp's integer serving within float32 rounding. Their
row scale differs from jaxqp's by an ulp now and then, so in a deeper model a hidden
activation's code sometimes moves by one: every output stays within one activation step. The XNNPACK
delegate (the interpreter's default) quantizes rows asymmetrically; each output then stays
within one activation quantization step of jaxqp's: ``|dy_j| <= (absmax_row / 127) * sum_k |w_kj|``.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import CNN, MLP, NnxNet, with_biases

import jaxqp

pytest.importorskip("litert_converter")
litert = pytest.importorskip("ai_edge_litert.interpreter")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from serving import Block, TinyLM  # noqa: E402

to_litert = jaxqp.deploy.to_litert


def _served(params, bits=8, pow2=False, pattern=".*(kernel|embedding)"):
    t = jaxqp.transform([jaxqp.Rule(pattern, quant=jaxqp.QuantSpec(bits=bits))])
    return jaxqp.prepare(jaxqp.export(params, t.init(params)), path="int8", pow2_inputs=pow2, dense_general=True)


def _interpreter(flatbuffer, delegate=False):
    if delegate:  # the interpreter's default: XNNPACK
        return litert.Interpreter(model_content=flatbuffer)
    kind = litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return litert.Interpreter(model_content=flatbuffer, experimental_op_resolver_type=kind)


def _run(flatbuffer, x, delegate=False):
    return _interpreter(flatbuffer, delegate).get_signature_runner()(x0=np.asarray(x))["y0"]


def _ops(flatbuffer, delegate=False) -> set:
    interpreter = _interpreter(flatbuffer, delegate)
    interpreter.allocate_tensors()  # applies the delegate
    return {op["op_name"] for op in interpreter._get_ops_details()}


def _tensors(flatbuffer) -> list:
    return [(t["dtype"], tuple(t["shape"])) for t in _interpreter(flatbuffer).get_tensor_details()]


def _close(out, ref):
    """Within float32 rounding (LiteRT adds the bias and scales in another order)."""
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _mostly_close(out, ref, rows=0.9):
    """Most rows within float32 rounding, and no output off by more than 1% of the largest.

    LiteRT's row scale is ``absmax / 127``, jaxqp's ``absmax * f32(1/127)``: they differ by an
    ulp now and then, so a hidden activation differs by an ulp, and once in a while that moves
    the next layer's codes across a rounding boundary (at most one code each, see
    :func:`_one_step_bound`).
    """
    close = np.isclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()).reshape(len(out), -1).all(1)
    assert close.mean() >= rows
    assert np.abs(out - ref).max() <= 0.01 * np.abs(ref).max()


def _one_step_bound(rows, kernel):
    """``(absmax_row / 127) * sum_k |w_kj|``: how far one activation step per input can move each output."""
    weight = np.abs(np.asarray(kernel.dequantize(), np.float32)).sum(0)
    return np.abs(np.asarray(rows)).max(1, keepdims=True) / 127 * weight + 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_mlp_matches_jaxqp_with_int8_fully_connected(bits):
    model = MLP()
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 32)))["params"])
    served = _served(params, bits)
    apply = jaxqp.linen_serving_apply(model)
    for batch in (1, 32, 256):
        x = 3 * jax.random.normal(jax.random.key(batch), (batch, 32))
        flatbuffer = to_litert(apply, served, x)
        assert _ops(flatbuffer) == {"FULLY_CONNECTED"}  # dynamic-range: int8 weights, no dequantized copy
        tensors = _tensors(flatbuffer)
        # int4 weights are stored packed (see the file-size test); the interpreter shows them as int8
        assert (np.int8, (128, 32)) in tensors and (np.int8, (64, 128)) in tensors
        assert not [shape for dtype, shape in tensors if dtype == np.float32 and len(shape) == 2 and min(shape) > 1
                    and shape[0] != batch]
        out, ref = _run(flatbuffer, x), np.asarray(apply(served, x))
        # Dense_1 (created second) is the first layer
        hidden = jax.nn.relu(jaxqp.linen_serving_apply(nn.Dense(128))(served["Dense_1"], x))
        assert np.all(np.abs(out - ref) <= _one_step_bound(hidden, served["Dense_0"]["kernel"]))
        _mostly_close(out, ref)


def test_one_layer_matches_within_float_rounding():
    """With the same input rows, the codes agree: only float32 rounding of the rescale remains."""
    model = nn.Dense(64)
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 256)))["params"])
    served = _served(params)
    apply = jaxqp.linen_serving_apply(model)
    for batch in (1, 32, 256):
        x = 3 * jax.random.normal(jax.random.key(batch), (batch, 256))
        _close(_run(to_litert(apply, served, x), x), np.asarray(apply(served, x)))


def test_xnnpack_stays_within_one_activation_step():
    model = nn.Dense(64)
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 256)))["params"])
    served = _served(params)
    apply = jaxqp.linen_serving_apply(model)
    x = 3 * jax.random.normal(jax.random.key(1), (32, 256))
    flatbuffer = to_litert(apply, served, x)
    assert "DELEGATE" in _ops(flatbuffer, delegate=True)
    ref = np.asarray(apply(served, x))
    out = _run(flatbuffer, x, delegate=True)
    assert np.all(np.abs(out - ref) <= _one_step_bound(x, served["kernel"]))
    assert np.abs(out - ref).max() > 1e-4  # it does quantize its own way: the bound is the claim, not equality


def test_power_of_two_inputs_stay_within_one_and_a_half_steps():
    """LiteRT has no power-of-two row scales: its step is up to 2x finer than jaxqp's pow2 step."""
    model = nn.Dense(64)
    params = model.init(jax.random.key(0), jnp.ones((1, 256)))["params"]
    served = _served(params, pow2=True)
    apply = jaxqp.linen_serving_apply(model)
    x = 3 * jax.random.normal(jax.random.key(1), (32, 256))
    out, ref = _run(to_litert(apply, served, x), x), np.asarray(apply(served, x))
    assert np.all(np.abs(out - ref) <= 1.5 * _one_step_bound(x, served["kernel"]))


def test_cnn_convolution_weights_are_int8_codes():
    model = CNN()
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))["params"])
    served = _served(params)
    apply = jaxqp.linen_serving_apply(model)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    flatbuffer = to_litert(apply, served, x)
    assert {"CONV_2D", "DEQUANTIZE", "FULLY_CONNECTED"} <= _ops(flatbuffer)
    assert (np.int8, (8, 3, 3, 3)) in _tensors(flatbuffer)  # the conv kernel stored as codes (OHWI)
    _mostly_close(_run(flatbuffer, x), np.asarray(apply(served, x)))


@pytest.mark.parametrize("bits", [8, 4])
def test_transformer_block_matches(bits):
    model = Block(64, 4)
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 16, 64)))["params"])
    served = _served(params, bits)
    apply = jaxqp.linen_serving_apply(model)
    x = jax.random.normal(jax.random.key(1), (4, 16, 64))
    flatbuffer = to_litert(apply, served, x)
    assert {"FULLY_CONNECTED", "SOFTMAX"} <= _ops(flatbuffer)
    _mostly_close(_run(flatbuffer, x), np.asarray(apply(served, x)))


def test_language_model_gathers_int8_embedding_codes():
    model = TinyLM(d_model=32, blocks=1)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 256)
    params = with_biases(model.init(jax.random.key(0), tokens)["params"])
    served = _served(params)
    apply = jaxqp.linen_serving_apply(model)
    flatbuffer = to_litert(apply, served, tokens)
    assert (np.int8, (256, 32)) in _tensors(flatbuffer)  # the table gathered as codes, then scaled
    _mostly_close(_run(flatbuffer, tokens), np.asarray(apply(served, tokens)))


def test_nnx_model_matches():
    graphdef, params = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param)
    params = with_biases(params)
    served = jaxqp.nnx_serving_model(graphdef, _served(params, pattern=".*kernel"))
    x = 3 * jax.random.normal(jax.random.key(1), (8, 32))
    flatbuffer = to_litert(lambda m, x: m(x), served, x)
    assert _ops(flatbuffer) == {"FULLY_CONNECTED"}
    _mostly_close(_run(flatbuffer, x), np.asarray(served(x)))


def test_file_is_written_atomically_and_small(tmp_path):
    model = MLP(width=512)
    params = model.init(jax.random.key(0), jnp.ones((1, 512)))["params"]
    sizes = {}
    for name, tree in [("float", params), ("int8", _served(params)), ("int4", _served(params, 4))]:
        path = tmp_path / f"{name}.tflite"
        flatbuffer = to_litert(jaxqp.linen_serving_apply(model), tree, jnp.ones((1, 512)), file=str(path))
        assert path.read_bytes() == flatbuffer
        sizes[name] = path.stat().st_size
    assert sorted(os.listdir(tmp_path)) == ["float.tflite", "int4.tflite", "int8.tflite"]  # no temporary left
    assert sizes["int8"] <= 0.26 * sizes["float"] and sizes["int4"] <= 0.14 * sizes["float"]


def test_exported_but_not_prepared_tree_is_refused():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    t = jaxqp.transform([jaxqp.Rule(".*kernel", quant=jaxqp.QuantSpec(bits=8))])
    with pytest.raises(ValueError, match=r"'Dense_0/kernel' is a QArray, not a served kernel.*jaxqp\.prepare"):
        to_litert(jaxqp.linen_serving_apply(model), jaxqp.export(params, t.init(params)), jnp.ones((1, 32)))


def test_bad_arguments_are_refused():
    fn = lambda p, x: x @ p["w"]
    with pytest.raises(ValueError, match="at least one example input"):
        to_litert(fn, {"w": jnp.ones((4, 2))})
    with pytest.raises(ValueError, match=r"input_names=\['a', 'b'\]; give 1 distinct names"):
        to_litert(fn, {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)), input_names=["a", "b"])


def test_a_flax_model_vmapped_by_hand_is_refused_with_the_fix():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    t = jaxqp.transform([jaxqp.Rule(".*kernel", quant=jaxqp.QuantSpec(bits=8))])
    served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    apply = jaxqp.linen_serving_apply(model)
    by_hand = lambda p, x: jax.vmap(lambda row: apply(p, row[None])[0])(x)  # LiteRT's composites cannot vmap
    with pytest.raises(ValueError, match=r"to_litert: a served Flax layer runs under jax\.vmap.*Call the model on "
                                         r"the whole batch"):
        to_litert(by_hand, served, jnp.ones((4, 32)))


def test_an_operation_litert_cannot_express_names_it_and_where():
    fn = lambda p, x: jnp.linalg.eigh(x.T @ x)[0]
    with pytest.raises(ValueError, match=r"cannot convert this model.*test_litert\.py:\d+.*custom_call"):
        to_litert(fn, {}, jnp.ones((3, 8)))


def test_input_names_name_the_signature():
    flatbuffer = to_litert(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)), input_names=["img"])
    assert _interpreter(flatbuffer).get_signature_list() == {"serving_default": {"inputs": ["img"], "outputs": ["y0"]}}


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_converter.converter_api_ext", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxqp\[litert\]'"):
        to_litert(lambda p, x: x, {}, jnp.ones((1, 2)))
