"""Serving: int8 matmul exactness, prepare, and the linen adapter."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import bits_equal, counted_jit

import jaxqp
from jaxqp import PruneSpec, QuantSpec, Rule
from jaxqp.numerics._int_dot import MIN_ROWS
from jaxqp.serving import PATHS, ServingKernel

INT_PATHS = ("int8", "int8_t", "bf16")  # the paths that compute the same integers


def reference_int8_matmul(x, kernel):
    """numpy: per-row int8 codes, exact int64 accumulation, the same float32 rescale."""
    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    scale = np.max(np.abs(x), axis=1, keepdims=True) * (np.float32(1) / np.float32(127))
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(x * (np.float32(1) / scale)), -127, 127).astype(np.int64)  # as XLA computes x / s
    acc = codes @ np.asarray(kernel.int8_codes(), np.int64).T
    return (acc.astype(np.float32) * scale * np.asarray(kernel.scale)).astype(np.float32)


def served_kernel(shape=(256, 300), bits=8, seed=0, path="auto", **spec):
    params = {"w": jax.random.normal(jax.random.key(seed), shape)}
    t = jaxqp.transform([Rule("w", quant=QuantSpec(bits=bits, **spec))])
    state = t.init(params)
    packed = jaxqp.export(params, state)
    return params, t, state, packed, jaxqp.prepare(packed, path=path)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("path", INT_PATHS)
@pytest.mark.parametrize("rows", [1, 3, 5, 65, 200])  # padded to MIN_ROWS, and not
def test_int8_matmul_is_exact_integer_arithmetic(rows, path, bits):
    assert MIN_ROWS == 4
    *_, served = served_kernel(bits=bits, path=path)
    kernel = served["w"]
    assert isinstance(kernel, ServingKernel) and kernel.codes_shape == (300, 256) and kernel.path == path
    # codes stay codes in memory: int8, or two 4-bit codes per byte
    assert kernel.codes.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert kernel.codes.shape == ((300, 256) if bits == 8 else (300, 128))
    x = jax.random.normal(jax.random.key(1), (rows, 256))
    got = np.asarray(jax.jit(jaxqp.serving.int8_matmul)(x, kernel))
    np.testing.assert_array_equal(got, reference_int8_matmul(x, kernel))


@pytest.mark.parametrize("path", INT_PATHS)
def test_packed_codes_decoded_in_chunks_give_the_same_bits(monkeypatch, path):
    """Large 4-bit kernels are decoded a chunk of output rows at a time inside ``lax.map``."""
    from jaxqp.serving import _kernels

    monkeypatch.setattr(_kernels, "DECODE_CHUNK_BYTES", 16000)
    assert _kernels.decode_chunks(300, 256) == 4 and _kernels.decode_chunks(64, 64) == 1
    *_, served = served_kernel(bits=4, path=path)
    x = jax.random.normal(jax.random.key(1), (5, 256))
    fresh = lambda x, k: jaxqp.serving.int8_matmul(x, k)  # a new function: no cached trace of another test
    assert "scan" in str(jax.make_jaxpr(fresh)(x, served["w"]))  # the chunked decode ran
    got = np.asarray(jax.jit(fresh)(x, served["w"]))
    np.testing.assert_array_equal(got, reference_int8_matmul(x, served["w"]))


@pytest.mark.parametrize("bits", [8, 4])
def test_float_path_is_the_dequantized_matmul_and_auto_equals_its_choice(bits):
    *_, served = served_kernel(bits=bits, path="float")
    kernel = served["w"]
    x = jax.random.normal(jax.random.key(1), (6, 256))
    want = np.asarray(x, np.float64) @ np.asarray(kernel.dequantize(), np.float64)
    # the same float32 matmul, up to XLA's summation order (the decoded weight may be read transposed)
    got = np.asarray(jax.jit(jaxqp.serving.int8_matmul)(x, kernel))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    auto = dataclasses.replace(kernel, path="auto")
    got = np.asarray(jax.jit(jaxqp.serving.int8_matmul)(x, auto))
    chosen = jaxqp.serving.describe({"w": auto}, rows=[6]).rows[0]["paths"][8]  # 6 rows: bucket 8
    assert chosen in PATHS
    pinned = dataclasses.replace(kernel, path=chosen)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(jaxqp.serving.int8_matmul)(x, pinned)))


def test_keep_float_keeps_the_decoded_weight_for_the_float_path():
    params, t, state, packed, _ = served_kernel()
    kept = jaxqp.prepare(packed, keep_float=True, path="float")["w"]
    assert bits_equal(kept.float_weight, t.apply(params, state)["w"])
    assert jaxqp.serving.describe({"w": kept}).rows[0]["bytes"] == 300 * 256 * (1 + 4) + 300 * 4
    x = jax.random.normal(jax.random.key(1), (6, 256))
    np.testing.assert_array_equal(np.asarray(jaxqp.serving.int8_matmul(x, kept)),
                                  np.asarray(x @ t.apply(params, state)["w"]))
    with pytest.raises(ValueError, match=r"path='fast'; expected one of \('auto', 'int8'"):
        jaxqp.prepare(packed, path="fast")
    with pytest.raises(TypeError, match="keep_float=1 must be True or False"):
        jaxqp.prepare(packed, keep_float=1)


@pytest.mark.parametrize("bits, ratio", [(8, 0.2539), (4, 0.1289)])
def test_served_memory_is_codes_and_scales(bits, ratio):
    *_, served = served_kernel(shape=(256, 256), bits=bits)
    # (256 * 256 codes of bits / 8 bytes + 256 float32 scales) / (256 * 256 * 4 float bytes)
    report = jaxqp.serving.describe(served)
    assert report.served_bytes == 256 * 256 * bits // 8 + 256 * 4
    assert round(report.served_bytes / (256 * 256 * 4), 4) == ratio


def test_int8_matmul_keeps_leading_axes_and_zero_rows():
    *_, served = served_kernel()
    x = jax.random.normal(jax.random.key(2), (2, 3, 256)).at[0, 1].set(0.0)
    y = jaxqp.serving.int8_matmul(x, served["w"])
    assert y.shape == (2, 3, 300) and np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_array_equal(np.asarray(y[0, 1]), 0.0)
    with pytest.raises(ValueError, match="x has 255 features, the kernel expects 256"):
        jaxqp.serving.int8_matmul(jnp.ones((2, 255)), served["w"])


@pytest.mark.parametrize("bits", [4, 8])
def test_prepared_kernel_dequantizes_bit_for_bit(bits):
    params, t, state, packed, served = served_kernel(bits=bits)
    want = np.asarray(t.apply(params, state)["w"])
    assert np.asarray(served["w"].dequantize()).tobytes() == want.tobytes()
    assert np.asarray(jaxqp.dequantize(packed)["w"]).tobytes() == want.tobytes()


def test_int8_matmul_error_is_activation_rounding_only():
    params, t, state, _, served = served_kernel()
    x = jax.random.normal(jax.random.key(3), (16, 256))
    w = t.apply(params, state)["w"]
    y = np.asarray(jaxqp.serving.int8_matmul(x, served["w"]), np.float64)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # |x - x_hat| <= s_x / 2 per input, so |error| <= s_x / 2 * sum|w| per output (plus float32 rounding)
    s_x = np.max(np.abs(np.asarray(x)), axis=1, keepdims=True) / 127
    bound = s_x / 2 * np.sum(np.abs(np.asarray(w, np.float64)), axis=0, keepdims=True)
    assert np.all(np.abs(y - exact) <= bound * 1.001 + 1e-4)


def test_prepare_falls_back_to_float_only_where_codes_cannot_serve():
    params = {"small": jax.random.normal(jax.random.key(4), (8, 8)),
              "affine": jax.random.normal(jax.random.key(5), (256, 256)),
              "conv": jax.random.normal(jax.random.key(6), (3, 3, 64, 64)),
              "pruned": jax.random.normal(jax.random.key(7), (256, 256))}
    t = jaxqp.transform([Rule("small", quant=QuantSpec()), Rule("affine", quant=QuantSpec(symmetric=False)),
                         Rule("conv", quant=QuantSpec()),
                         Rule("pruned", quant=QuantSpec(bits=8), prune=PruneSpec(sparsity=0.9))])
    state = t.init(params)
    served = jaxqp.prepare(jaxqp.export(params, state))
    applied = t.apply(params, state)
    for name in ("affine", "conv"):  # zero points, and N-D kernels without dense_general
        assert isinstance(served[name], jax.Array), name  # decoded once
        assert np.asarray(served[name]).tobytes() == np.asarray(applied[name]).tobytes()
    assert isinstance(served["small"], ServingKernel)  # any size stays codes
    assert bits_equal(served["small"].dequantize(), applied["small"])
    assert isinstance(jaxqp.prepare(jaxqp.export(params, state), min_int_size=65)["small"], jax.Array)
    assert isinstance(served["pruned"], ServingKernel)  # sparse codes are densified for serving
    assert np.asarray(served["pruned"].dequantize()).tobytes() == np.asarray(applied["pruned"]).tobytes()


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(512)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(10)(x)


@pytest.mark.slow  # trains or serves a whole model
def test_linen_serving_matches_float_model_within_activation_rounding():
    model = MLP()
    x = jax.random.normal(jax.random.key(8), (4, 256))
    params = model.init(jax.random.key(9), x)["params"]
    t = jaxqp.transform([Rule(r".*/kernel", quant=QuantSpec(bits=8))])
    state = t.init(params)
    served = jaxqp.prepare(jaxqp.export(params, state), path="int8")
    assert isinstance(served["Dense_0"]["kernel"], ServingKernel)
    serve, traces = counted_jit(jaxqp.linen_serving_apply(model))
    got = np.asarray(serve(served, x))
    want = np.asarray(model.apply({"params": t.apply(params, state)}, x))
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
    assert np.argmax(got, -1).tolist() == np.argmax(want, -1).tolist()
    # the first layer is exactly the integer kernel plus the bias
    hidden = jax.jit(jaxqp.linen_serving_apply(nn.Dense(512)))(served["Dense_0"], x)
    np.testing.assert_array_equal(np.asarray(hidden), reference_int8_matmul(x, served["Dense_0"]["kernel"])
                                  + np.asarray(served["Dense_0"]["bias"]))
    serve(served, x + 1.0)
    assert len(traces) == 1


class Custom(nn.Module):
    """A layer jaxqp has no integer path for: its kernel must be decoded to float."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 300))


@pytest.mark.parametrize("model", [nn.DenseGeneral(300), Custom()], ids=["dense_general_2d", "custom"])
def test_a_kernel_in_other_modules_serves_from_codes_or_decodes(model):
    params = model.init(jax.random.key(0), jnp.ones((1, 256)))["params"]
    t = jaxqp.transform([Rule("kernel", quant=QuantSpec(bits=8))])
    state = t.init(params)
    served = jaxqp.prepare(jaxqp.export(params, state), path="int8")
    x = jax.random.normal(jax.random.key(1), (2, 256))
    got = np.asarray(jax.jit(jaxqp.linen_serving_apply(model))(served, x))
    if isinstance(model, Custom):  # decoded inside the jitted function: the float model's numbers
        want = model.apply({"params": t.apply(params, state)}, x)
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)  # XLA may fuse the decode
    else:  # a DenseGeneral over the last axis is a Dense: the integer path
        bias = np.asarray(served["bias"])
        np.testing.assert_array_equal(got, reference_int8_matmul(x, served["kernel"]) + bias)


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(64, 32)
        return embed.attend(nn.Dense(32)(embed(tokens)))


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_lookup_decodes_only_rows_from_codes(bits):
    model = TinyLM()
    tokens = jnp.array([[1, 5, 63], [0, 0, 7]])
    params = model.init(jax.random.key(0), tokens)["params"]
    t = jaxqp.transform([Rule(r".*/(kernel|embedding)", quant=QuantSpec(bits=bits))])
    state = t.init(params)
    served = jaxqp.prepare(jaxqp.export(params, state), path="float")
    table = served["Embed_0"]["embedding"]
    assert isinstance(table, ServingKernel) and table.bits == bits
    applied = t.apply(params, state)
    np.testing.assert_array_equal(np.asarray(table.lookup(tokens)),
                                  np.asarray(applied["Embed_0"]["embedding"])[np.asarray(tokens)])
    got = jax.jit(jaxqp.linen_serving_apply(model))(served, tokens)
    want = model.apply({"params": applied}, tokens)  # the float path everywhere: the float model's numbers
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # trains or serves a whole model
def test_jax_export_round_trip_of_the_serving_function():
    model = MLP()
    x = jax.random.normal(jax.random.key(10), (3, 256))
    params = model.init(jax.random.key(11), x)["params"]
    t = jaxqp.transform([Rule(r".*/kernel", quant=QuantSpec(bits=8))])
    served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    apply = jaxqp.linen_serving_apply(model)
    blob = jaxqp.export_serving(apply, served, x)
    assert isinstance(blob, bytes) and len(blob) > 0
    restored = jaxqp.load_serving(blob)
    np.testing.assert_array_equal(np.asarray(restored(served, x)), np.asarray(jax.jit(apply)(served, x)))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(256, 300, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(300, 300, rngs=rngs), nnx.Linear(300, 10, use_bias=False, rngs=rngs)])
        self.norm = nnx.LayerNorm(300, rngs=rngs)

    def __call__(self, x):
        x = self.norm(jax.nn.relu(self.l1(x)))
        return self.blocks[1](jax.nn.relu(self.blocks[0](x)))


@pytest.mark.slow  # trains or serves a whole model
def test_nnx_serving_swaps_linears_and_matches_within_activation_rounding():
    model = NnxNet(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    t = jaxqp.transform([Rule(r".*/kernel", quant=QuantSpec(bits=8))])
    state = t.init(params)
    served = jaxqp.prepare(jaxqp.export(params, state), path="int8")
    serving = jaxqp.nnx_serving_model(graphdef, served, rest)
    assert isinstance(serving.l1, jaxqp.serving.Int8Linear) and isinstance(serving.blocks[1], jaxqp.serving.Int8Linear)
    assert serving.blocks[1].bias is None and isinstance(serving.norm, nnx.LayerNorm)
    assert type(model.l1) is nnx.Linear  # the user's model is untouched
    x = jax.random.normal(jax.random.key(12), (5, 256))
    s_graphdef, s_state = nnx.split(serving)
    serve = jax.jit(lambda s, x: nnx.merge(s_graphdef, s)(x))
    got = np.asarray(serve(s_state, x))
    want = np.asarray(nnx.merge(graphdef, t.apply(params, state), rest)(x))
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
    first = np.asarray(jax.jit(lambda s, x: nnx.merge(s_graphdef, s).l1(x))(s_state, x))
    np.testing.assert_array_equal(first, reference_int8_matmul(x, served["l1"]["kernel"].get_value())
                                  + np.asarray(served["l1"]["bias"].get_value()))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (3,))(x)
        return nn.MultiHeadDotProductAttention(num_heads=4)(x, x)


@pytest.mark.slow  # trains or serves a whole model
def test_dense_general_kernels_serve_in_int8_and_convs_fall_back():
    model = Attention()
    x = jax.random.normal(jax.random.key(10), (2, 16, 64))
    params = model.init(jax.random.key(11), x)["params"]
    t = jaxqp.transform([Rule(r".*/kernel", quant=QuantSpec(bits=8))])
    state = t.init(params)
    exported = jaxqp.export(params, state)
    served = jaxqp.prepare(exported, dense_general=True, path="int8")
    attention = served["MultiHeadDotProductAttention_0"]
    kernels = [attention[k]["kernel"] for k in ("query", "key", "value", "out")]
    assert all(isinstance(k, jaxqp.serving.GeneralKernel) for k in kernels)
    for k in ("query", "out"):  # decodes to the exported weight bit for bit
        assert (np.asarray(attention[k]["kernel"].dequantize()).tobytes()
                == np.asarray(t.apply(params, state)["MultiHeadDotProductAttention_0"][k]["kernel"]).tobytes())
    got = np.asarray(jax.jit(jaxqp.linen_serving_apply(model))(served, x))
    want = np.asarray(model.apply({"params": t.apply(params, state)}, x))
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)  # activation rounding only
    assert not np.array_equal(got, want)  # the int8 path really ran
    plain = jaxqp.prepare(exported)  # default: N-D kernels decoded once, float path
    assert isinstance(plain["MultiHeadDotProductAttention_0"]["query"]["kernel"], jax.Array)
    # the projection alone equals the integer reference on every integer path
    for path, xs in zip(INT_PATHS, (x, jax.random.normal(jax.random.key(12), (8, 16, 64)), x), strict=True):
        kernel = dataclasses.replace(attention["query"]["kernel"], path=path)
        q = jaxqp.serving.int8_matmul_general(xs, kernel, 1)
        codes = np.asarray(kernel.int8_codes(), np.int64).reshape(64, -1)
        rows = np.asarray(xs).reshape(-1, 64)
        scale = np.max(np.abs(rows), axis=1, keepdims=True) * (np.float32(1) / np.float32(127))
        xc = np.clip(np.round(rows / scale), -127, 127).astype(np.int64)
        w_scale = np.broadcast_to(np.asarray(kernel.scale), (64, 4, 16)).reshape(64, -1)[0]
        ref = ((xc @ codes).astype(np.float32) * scale.astype(np.float32) * w_scale).reshape(*xs.shape[:2], 4, 16)
        np.testing.assert_array_equal(np.asarray(q), ref)


class NnxLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(64, 32, rngs=rngs)
        self.proj = nnx.Linear(32, 32, rngs=rngs)
        self.conv = nnx.Conv(32, 32, (3,), rngs=rngs)  # no integer path: decoded in place

    def __call__(self, tokens):
        return self.embed.attend(self.conv(self.proj(self.embed(tokens))))


def test_nnx_serving_swaps_embeddings_and_decodes_other_kernels():
    model = NnxLM(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    t = jaxqp.transform([Rule(r".*/(kernel|embedding)", quant=QuantSpec(bits=4))])
    state = t.init(params)
    served = jaxqp.prepare(jaxqp.export(params, state), path="float", dense_general=True)
    assert isinstance(served["conv"]["kernel"].get_value(), jaxqp.serving.GeneralKernel)
    serving = jaxqp.nnx_serving_model(graphdef, served)
    assert isinstance(serving.embed, jaxqp.serving.Int8Embed) and isinstance(serving.proj, jaxqp.serving.Int8Linear)
    assert isinstance(serving.conv.kernel.get_value(), jax.Array)
    tokens = jnp.array([[3, 1, 63, 0]])
    want = nnx.merge(graphdef, t.apply(params, state))(tokens)
    np.testing.assert_allclose(np.asarray(serving(tokens)), np.asarray(want), rtol=1e-5, atol=1e-5)


class _TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="out")(nn.relu(nn.Dense(32, name="h")(x)))


@pytest.mark.parametrize("pow2", [False, True], ids=["absmax", "pow2"])
@pytest.mark.parametrize("path", ["int8", "int8_t", "bf16"])
def test_integer_paths_keep_a_nan_or_infinite_row_non_finite(path, pow2):
    # before: the row's scale became 1.0 and its codes were cast from NaN, so the row came out finite
    model = _TwoDense()
    x = jax.random.normal(jax.random.key(1), (8, 24))
    params = model.init(jax.random.key(0), x)["params"]
    t = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8, scale_pow2=pow2))])
    served = jaxqp.prepare(jaxqp.export(params, t.init(params)), path=path, pow2_inputs=pow2)
    bad = x.at[0, 3].set(jnp.nan).at[1, 5].set(jnp.inf)
    apply = jax.jit(jaxqp.linen_serving_apply(model))
    y, clean = np.asarray(apply(served, bad)), np.asarray(apply(served, x))
    assert np.isnan(y[0]).all() and not np.isfinite(y[1]).any()  # as the float model's rows
    assert bits_equal(y[2:], clean[2:])  # the other rows untouched, bit for bit


def test_the_integer_training_forward_keeps_a_nan_row_nan():
    model = _TwoDense()
    x = jax.random.normal(jax.random.key(1), (8, 24))
    params = model.init(jax.random.key(0), x)["params"]
    t = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8, scale_pow2=True),
                              act=jaxqp.ActSpec(bits=8, symmetric=True, per_token=True, scale_pow2=True,
                                                integer=True))])
    state = t.init(params)
    y, _ = jaxqp.linen_apply(model, state, {"params": t.apply(params, state)}, x.at[0, 3].set(jnp.nan))
    assert np.isnan(np.asarray(y[0])).all() and np.isfinite(np.asarray(y[1:])).all()
