"""ONNX export (``jaxqp.deploy.to_onnx``): checked models that ONNX Runtime runs to jaxqp's served numbers.

The integer subgraph is exact: for a model whose quantized layers see the same inputs in
both runtimes (an MLP, a CNN, an NNX model), ONNX Runtime's output equals jaxqp's integer
serving path, run op by op, bit for bit at batch 1, 32 and 256. Jitted, XLA contracts the
output-scale multiply and the bias add into one fused multiply-add (one rounding instead of
two), so the jitted output differs by an ulp there, which the next layer's row scale can
carry (``docs/deploy.md``); the tests give the layers nonzero biases so that this shows. In a
transformer, ORT's float operations (layer norm, softmax, gelu) differ from XLA's by float32
ulps; when such a difference moves an activation across a rounding boundary, one activation
code of that row changes: under 1% of the quantization error (``docs/deploy.md``).
"""

import json
import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import CNN, MLP, NnxNet, with_biases

import jaxqp
from jaxqp.numerics._path_choice import cpu_info

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from serving import Block, TinyLM  # noqa: E402


def _jit_close(out, jitted):
    """Within float32 rounding of the jitted output (the fused multiply-add at each bias)."""
    np.testing.assert_allclose(out, jitted, rtol=1e-5, atol=1e-5)


def _served(params, bits=8, pow2=False, pattern=".*(kernel|embedding)"):
    t = jaxqp.transform([jaxqp.Rule(pattern, quant=jaxqp.QuantSpec(bits=bits))])
    # the integer path pinned: jaxqp's reference for the exported integer subgraph
    return jaxqp.prepare(jaxqp.export(params, t.init(params)), path="int8", pow2_inputs=pow2, dense_general=True)


def _session(model, precise_u8s8=False):
    options = ort.SessionOptions()
    if precise_u8s8:  # ONNX Runtime rewrites int8 weights to uint8 (u8 x u8) on x64 CPUs where u8 x s8 can saturate
        options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session, x):
    return session.run(None, {session.get_inputs()[0].name: np.asarray(x)})[0]


def _ops(model) -> set:
    return {node.op_type for node in model.graph.node}


@pytest.mark.parametrize("bits,int8_matmul", [(8, "split"), (8, "halves"), (8, "u8u8"), (4, "split")])
@pytest.mark.parametrize("pow2", [False, True])
def test_mlp_runs_bit_exact_in_onnxruntime(bits, int8_matmul, pow2):
    model = MLP()
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 32)))["params"])
    served = _served(params, bits, pow2)
    apply = jaxqp.linen_serving_apply(model)
    exported = jaxqp.deploy.to_onnx(apply, served, jnp.ones((1, 32)), int8_matmul=int8_matmul)
    assert "MatMulInteger" in _ops(exported) and not _ops(exported) & {"Gemm", "MatMul"}
    wanted = {"u8u8": onnx.TensorProto.UINT8}.get(int8_matmul, onnx.TensorProto.INT8) if bits == 8 else \
        onnx.TensorProto.INT4
    matrices = [(init.data_type, tuple(init.dims)) for init in exported.graph.initializer if len(init.dims) == 2
                and min(init.dims) > 1]
    assert sorted(matrices) == [(wanted, (32, 128)), (wanted, (128, 64))]  # both kernels as codes, no float copy
    session = _session(exported)
    for batch in (1, 32, 256):
        x = 3 * jax.random.normal(jax.random.key(batch), (batch, 32))
        out = _run(session, x)
        np.testing.assert_array_equal(out, np.asarray(apply(served, x)))
        _jit_close(out, np.asarray(jax.jit(apply)(served, x)))


@pytest.mark.skipif(not {"avx512_vnni", "avx_vnni"} & set(cpu_info()["flags"]),
                    reason="u8 x s8 MatMulInteger is exact only on CPUs with VNNI (int16 pair sums saturate without)")
def test_u8s8_int8_matmul_is_exact_on_a_vnni_cpu():
    model = MLP()
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 32)))["params"])
    served = _served(params, 8)
    apply = jaxqp.linen_serving_apply(model)
    exported = jaxqp.deploy.to_onnx(apply, served, jnp.ones((1, 32)), int8_matmul="u8s8")
    matrices = [init.data_type for init in exported.graph.initializer if len(init.dims) == 2 and min(init.dims) > 1]
    assert matrices == [onnx.TensorProto.INT8] * 2
    session = _session(exported)
    for batch in (1, 32, 256):
        x = 3 * jax.random.normal(jax.random.key(batch), (batch, 32))
        np.testing.assert_array_equal(_run(session, x), np.asarray(apply(served, x)))


def _pair_sum_bound(weight: np.ndarray) -> int:
    """The largest int16 pair sum a u8 x s8 kernel without VNNI can form with this weight (activations up to 255):
    ``255 * (|w[2i, j]| + |w[2i+1, j]|)`` over the contraction axis (an odd last row pairs with a zero)."""
    w = np.abs(weight.astype(np.int64))
    w = np.concatenate([w, np.zeros((len(w) % 2, w.shape[1]), np.int64)])
    return int(255 * (w[0::2] + w[1::2]).max())


def _kernel_weights(model) -> list[tuple[str, np.ndarray]]:
    """Each ``MatMulInteger``'s weight as ONNX Runtime's kernel receives it: the model after ONNX Runtime's
    basic optimizations (constant folding: the ``"halves"`` computed from the stored codes, ``INT4`` cast), and
    the matmul's form read from the graph (u8 x s8 with one zero point, or the split's stacked rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        folded = onnx.load(options.optimized_model_filepath)
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in folded.graph.initializer}
    producers = {out: node for node in folded.graph.node for out in node.output}
    weights = []
    for node in folded.graph.node:
        if node.op_type == "MatMulInteger":
            rows = producers[node.input[0]].op_type
            form = "split" if len(node.input) == 2 else "halves" if rows == "Concat" else "u8s8"
            weights.append((form, initializers[node.input[1]]))
    return weights


def test_auto_form_takes_one_u8s8_matmul_only_where_it_cannot_saturate():
    """The default ``int8_matmul="auto"``: a 7-bit weight (codes within +-63) multiplies in one u8 x s8
    matmul, whose int16 pair sums stay below 2^15 on any CPU; an 8-bit one takes the halves (up to 2^20
    codes) or the split form, where the weight the kernel gets cannot saturate either."""
    model = MLP()
    params = with_biases(model.init(jax.random.key(0), jnp.ones((1, 32)))["params"])
    t = jaxqp.transform([jaxqp.Rule("Dense_1/kernel", quant=jaxqp.QuantSpec(bits=7)),  # the first layer, 32 x 128
                         jaxqp.Rule("Dense_0/kernel", quant=jaxqp.QuantSpec(bits=8))])
    served = jaxqp.prepare(jaxqp.export(params, t.init(params)), path="int8")
    apply = jaxqp.linen_serving_apply(model)
    exported = jaxqp.deploy.to_onnx(apply, served, jnp.ones((1, 32)))
    codes = [onnx.numpy_helper.to_array(init) for init in exported.graph.initializer if len(init.dims) == 2
             and min(init.dims) > 1]
    assert sorted((w.dtype, w.shape) for w in codes) == [(np.int8, (32, 128)), (np.int8, (128, 64))]  # codes once
    assert max(_pair_sum_bound(w) for w in codes if w.shape == (128, 64)) >= 2**15  # 8 bits as u8s8 could saturate
    forms = {(form, w.shape): _pair_sum_bound(w) for form, w in _kernel_weights(exported)}
    assert set(forms) == {("u8s8", (32, 128)), ("halves", (256, 64))}  # the 8-bit weight as [w - h; h]: 2K rows
    assert max(forms.values()) < 2**15
    assert "Split" not in _ops(exported)
    recorded = {prop.key: prop.value for prop in exported.metadata_props}["jaxqp.matmul_forms"]
    assert sorted(json.loads(recorded), key=lambda f: f["shape"]) == [{"shape": [32, 128], "form": "u8s8"},
                                                                       {"shape": [128, 64], "form": "halves"}]
    session = _session(exported)
    for batch in (1, 32, 256):
        x = 3 * jax.random.normal(jax.random.key(batch), (batch, 32))
        np.testing.assert_array_equal(_run(session, x), np.asarray(apply(served, x)))


def test_auto_form_splits_the_rows_of_weights_above_a_mebibyte_of_codes():
    """Above 2^20 codes ``"auto"`` keeps the weight once and stacks the activations' positive and
    negative parts as rows (the halves would read a weight that leaves a core's cache twice)."""
    params = {"dense": {"kernel": 0.02 * jax.random.normal(jax.random.key(0), (1024, 1025))}}
    served = _served(params, pattern=".*kernel")
    fn = lambda p, x: jaxqp.serving.int8_matmul(x, p["dense"]["kernel"])
    exported = jaxqp.deploy.to_onnx(fn, served, jnp.ones((1, 1024)))
    [(form, weight)] = _kernel_weights(exported)
    assert form == "split" and weight.shape == (1024, 1025) and np.abs(weight).max() == 127
    assert "Split" in _ops(exported)
    x = jax.random.normal(jax.random.key(1), (8, 1024))
    np.testing.assert_array_equal(_run(_session(exported), x), np.asarray(fn(served, x)))


def test_batch_axis_is_symbolic_and_opset_21():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    exported = jaxqp.deploy.to_onnx(jaxqp.linen_serving_apply(model), _served(params), jnp.ones((5, 32)))
    dims = exported.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", 32]
    assert {op.domain: op.version for op in exported.opset_import}[""] >= 21
    onnx.checker.check_model(exported, full_check=True)


@pytest.mark.parametrize("int8_matmul", ["auto", "split", "halves", "u8u8", "u8s8+x64quantprecision"])
def test_extreme_codes_do_not_saturate(int8_matmul):
    """Weight codes +-127 and activation codes +-127 over 512 inputs: one u8 x s8 matmul of codes + 128
    (uint8 1 and 255) would sum pairs past int16 on a CPU without VNNI (2 * 255 * 127 > 2^15); the
    portable forms stay exact ("auto" takes the halves for them), and so does "u8s8" in a session with
    ``session.x64quantprecision=1``."""
    int8_matmul, _, option = int8_matmul.partition("+")
    k = 512
    signs = np.where(np.random.default_rng(0).random((k, 16)) < 0.5, -1.0, 1.0).astype(np.float32)
    params = {"dense": {"kernel": jnp.asarray(signs * 0.5)}}
    served = _served(params, pattern=".*kernel")
    assert np.array_equal(np.abs(np.asarray(served["dense"]["kernel"].codes)), np.full((16, k), 127))
    x = jnp.asarray(np.where(np.random.default_rng(1).random((32, k)) < 0.5, -2.0, 2.0).astype(np.float32))
    fn = lambda p, x: jaxqp.serving.int8_matmul(x, p["dense"]["kernel"])
    exported = jaxqp.deploy.to_onnx(fn, served, x, int8_matmul=int8_matmul)
    assert ("Split" in _ops(exported)) == (int8_matmul == "split")
    if int8_matmul in ("auto", "halves"):  # the weight the kernel gets: both halves within +-64, cannot saturate
        [(form, weight)] = _kernel_weights(exported)
        assert form == "halves" and weight.shape == (2 * k, 16) and np.abs(weight).max() == 64
        assert _pair_sum_bound(weight) < 2**15
    out = _run(_session(exported, bool(option)), x)
    exact = (np.sign(np.asarray(x)).astype(np.int64) * 127) @ (signs.astype(np.int64) * 127)
    row_scale = np.float32(2.0) * np.float32(1 / 127)
    np.testing.assert_array_equal(out, np.asarray(jax.jit(fn)(served, x)))
    np.testing.assert_allclose(out, exact * row_scale * np.asarray(served["dense"]["kernel"].scale), rtol=1e-6)
    assert np.abs(exact).max() > 2**15  # the case the test is about


def test_profile_shows_the_integer_kernel_ran(tmp_path):
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    exported = jaxqp.deploy.to_onnx(jaxqp.linen_serving_apply(model), _served(params), jnp.ones((1, 32)))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(exported.SerializeToString(), options, providers=["CPUExecutionProvider"])
    _run(session, np.ones((8, 32), np.float32))
    with open(session.end_profiling()) as f:
        events = json.load(f)
    ran = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})]
    assert ran.count("MatMulInteger") >= 2, sorted(set(ran))
    assert not {"Gemm", "MatMul", "MatMulIntegerToFloat", "MatMulNBits"} & set(ran)


def test_cnn_convolution_through_dequantize_linear_is_exact():
    model = CNN()
    params = with_biases(model.init(jax.random.key(2), jnp.ones((1, 8, 8, 1)))["params"])
    for bits in (8, 4):
        served = _served(params, bits)
        apply = jaxqp.linen_serving_apply(model)
        exported = jaxqp.deploy.to_onnx(apply, served, jnp.ones((1, 8, 8, 1)))
        assert {"Conv", "DequantizeLinear", "MatMulInteger"} <= _ops(exported)
        session = _session(exported)
        for batch in (1, 32):
            x = jax.random.normal(jax.random.key(batch), (batch, 8, 8, 1))
            out = _run(session, x)
            np.testing.assert_array_equal(out, np.asarray(apply(served, x)))
            _jit_close(out, np.asarray(jax.jit(apply)(served, x)))


def test_nnx_model_is_exact():
    graphdef, params = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param)
    params = jax.tree_util.tree_map(lambda a: a + 0.1 if a.ndim == 1 else a, params)  # nonzero biases
    served = jaxqp.nnx_serving_model(graphdef, _served(params, pattern=".*kernel"))
    exported = jaxqp.deploy.to_onnx(lambda m, x: m(x), served, jnp.ones((1, 32)))
    assert "MatMulInteger" in _ops(exported)
    x = jax.random.normal(jax.random.key(0), (32, 32))
    np.testing.assert_array_equal(_run(_session(exported), x), np.asarray(served(x)))
    # the functional form exports the same graph's numbers from the prepared state itself
    state = _served(params, pattern=".*kernel")
    functional = jaxqp.deploy.to_onnx(jaxqp.serving.nnx_serving_apply(graphdef), state, jnp.ones((1, 32)))
    np.testing.assert_array_equal(_run(_session(functional), x), np.asarray(served(x)))


@pytest.mark.parametrize("bits", [8, 4])
def test_transformer_block_matches_up_to_float_ulps_and_rare_code_flips(bits):
    block = Block(64, 4)
    params = block.init(jax.random.key(1), jnp.ones((1, 16, 64)))["params"]
    served = _served(params, bits)
    apply = jaxqp.linen_serving_apply(block)
    exported = jaxqp.deploy.to_onnx(apply, served, jnp.ones((1, 16, 64)))
    assert sum(n.op_type == "MatMulInteger" for n in exported.graph.node) == 6  # q, k, v, out, 2 MLP
    session = _session(exported)
    for batch in (1, 32):
        x = jax.random.normal(jax.random.key(batch), (batch, 16, 64))
        out, ref = _run(session, x), np.asarray(jax.jit(apply)(served, x))
        quant_error = np.abs(ref - np.asarray(block.apply({"params": params}, x))).max()
        # ORT's float ops differ from XLA's by ulps (1e-6 here); where that moves an activation
        # across a rounding boundary one code flips (in a few tokens): under 1% of the quantization error
        token_error = np.abs(out - ref).max(axis=-1)
        assert np.mean(token_error < 2e-6) > 0.9, np.mean(token_error < 2e-6)
        assert np.abs(out - ref).max() < 0.01 * quant_error


def test_language_model_with_embedding_codes():
    lm = TinyLM(d_model=32, blocks=1)
    params = lm.init(jax.random.key(3), jnp.ones((1, 8), jnp.int32))["params"]
    served = _served(params)
    apply = jaxqp.linen_serving_apply(lm)
    exported = jaxqp.deploy.to_onnx(apply, served, jnp.ones((1, 8), jnp.int32))
    assert {"DequantizeLinear", "Gather", "MatMulInteger"} <= _ops(exported)
    tokens = jax.random.randint(jax.random.key(4), (4, 8), 0, 256)
    np.testing.assert_allclose(_run(_session(exported), tokens), np.asarray(jax.jit(apply)(served, tokens)),
                               atol=2e-2)


def test_file_is_written_atomically_and_small(tmp_path):
    model = MLP(width=512)
    params = model.init(jax.random.key(0), jnp.ones((1, 512)))["params"]
    sizes = {}
    for name, tree in (("float", params), ("int8", _served(params, 8)), ("int4", _served(params, 4))):
        path = tmp_path / f"{name}.onnx"
        jaxqp.deploy.to_onnx(jaxqp.linen_serving_apply(model), tree, jnp.ones((1, 512)), file=str(path))
        onnx.checker.check_model(str(path), full_check=True)
        sizes[name] = path.stat().st_size
    assert sorted(os.listdir(tmp_path)) == ["float.onnx", "int4.onnx", "int8.onnx"]  # no temporary left
    assert sizes["int8"] / sizes["float"] < 0.27
    assert sizes["int4"] / sizes["float"] < 0.15


def test_exported_but_not_prepared_tree_is_refused():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
    t = jaxqp.transform([jaxqp.Rule(".*kernel", quant=jaxqp.QuantSpec(bits=8))])
    with pytest.raises(ValueError, match=r"Dense_0/kernel' is a QArray.*jaxqp.prepare"):
        jaxqp.deploy.to_onnx(jaxqp.linen_serving_apply(model), jaxqp.export(params, t.init(params)), jnp.ones((1, 32)))


def test_bad_arguments_are_refused():
    fn = lambda p, x: x @ p["w"]
    with pytest.raises(ValueError, match="opset >= 21"):
        jaxqp.deploy.to_onnx(fn, {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)), opset=20)
    with pytest.raises(ValueError, match="int8_matmul='s8s8'"):
        jaxqp.deploy.to_onnx(fn, {"w": jnp.ones((4, 2))}, jnp.ones((3, 4)), int8_matmul="s8s8")
    with pytest.raises(ValueError, match="at least one example input"):
        jaxqp.deploy.to_onnx(fn, {"w": jnp.ones((4, 2))})


def test_an_operation_onnx_cannot_express_names_the_layer():
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, h):
            return jnp.linalg.eigh(h.T @ h)[0]

    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Inner(name="inner")(nn.Dense(8, name="proj")(x))

    model = Odd()
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    with pytest.raises(ValueError, match=r"'eigh' in layer 'Odd/inner'"):
        jaxqp.deploy.to_onnx(jaxqp.linen_serving_apply(model), params, jnp.ones((1, 8)))


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxqp\[onnx\]'"):
        jaxqp.deploy.to_onnx(lambda p, x: x, {}, jnp.ones((1, 2)))


@pytest.mark.parametrize("bits,int8_matmul", [(8, "split"), (8, "halves"), (8, "u8u8"), (8, "u8s8"), (8, "auto"),
                                             (4, "split")])
def test_primitives_mean_in_jax_what_serving_computes(bits, int8_matmul):
    """The two primitives' JAX meaning (their impl) equals the integer path and the decode, bit for bit."""
    from jaxqp.deploy import _onnx_ops
    from jaxqp.deploy._onnx import OnnxKernels
    from jaxqp.serving._matmul import rows_product

    params = {"w": jax.random.normal(jax.random.key(0), (48, 40))}
    kernel = _served(params, bits, pattern="w")["w"]
    hook = OnnxKernels(_onnx_ops, int8_matmul)
    rows = 2 * jax.random.normal(jax.random.key(1), (6, 48))
    np.testing.assert_array_equal(np.asarray(hook.product(rows, kernel, 1)),
                                  np.asarray(rows_product(rows, kernel, 1, "int8")))
    np.testing.assert_array_equal(np.asarray(hook.decode(kernel)), np.asarray(kernel.dequantize()))
