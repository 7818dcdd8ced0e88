"""The integer training matmul equals the fake-quant one bit for bit, with the same gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import bits_equal

import jaxqp
from jaxqp import ActSpec, QuantSpec, Rule
from jaxqp.numerics._int_dot import bf16_int_dot, exact_int_dot, int8_dot_rows, int_dense, uses_bf16

W_SPEC = QuantSpec(bits=8, scale_pow2=True)
A_SPEC = ActSpec(bits=8, symmetric=True, per_token=True, scale_pow2=True)
INT_SPEC = ActSpec(bits=8, symmetric=True, per_token=True, scale_pow2=True, integer=True)


def _fake_quant_dense(x, w, spec):
    params = {"w": w}
    t = jaxqp.transform([Rule("w", act=spec)])
    x_hat, _ = jaxqp.quantize_input(x, t.init(params), "w")
    return x_hat @ w


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("k,tokens", [(64, 3), (1024, 3), (64, 30), (1024, 30)])  # 15 rows: int8 dot; 150: bf16
def test_int_dense_equals_fake_quant_forward_and_gradients(per_token, k, tokens):
    assert uses_bf16(5 * tokens, k, 32) == (tokens == 30)
    kx, kw, kg = jax.random.split(jax.random.key(k), 3)
    x = jax.random.normal(kx, (5, tokens, k)) * jnp.logspace(-2, 1, k)
    w = jaxqp.fake_quant_weight(jax.random.normal(kw, (k, 32)), W_SPEC)
    spec = ActSpec(bits=8, symmetric=True, per_token=per_token, scale_pow2=True)
    want = _fake_quant_dense(x, w, spec)
    got = int_dense(x, w, 8, 8, per_token)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # exact: pow2 scales, K <= 1040
    np.testing.assert_array_equal(np.asarray(jax.jit(int_dense, static_argnums=(2, 3, 4))(x, w, 8, 8, per_token)),
                                  np.asarray(want))
    g = jax.random.normal(kg, want.shape)
    gx, gw = jax.grad(lambda x, w: jnp.sum(int_dense(x, w, 8, 8, per_token) * g), argnums=(0, 1))(x, w)
    fx, fw = jax.grad(lambda x, w: jnp.sum(_fake_quant_dense(x, w, spec) * g), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(fx), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(fw), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [1024, 1500, 2048, 3000])
def test_bf16_int_dot_is_exact_at_the_extremes(k):
    """Largest products everywhere (|sum| up to k * 127^2 > 2^24 for k > 1040): still the int32 result."""
    rng = np.random.default_rng(k)
    codes = np.full((70, k), 127, np.int8)
    codes[1::2] = -127
    codes[2] = rng.integers(-127, 128, k)
    kernel = np.full((40, k), 127, np.int8)
    kernel[3] = rng.integers(-127, 128, k)
    kernel[4, ::3] = -127
    want = codes.astype(np.int64) @ kernel.astype(np.int64).T
    carrier = jnp.asarray(kernel).astype(jnp.bfloat16)
    got = jax.jit(bf16_int_dot)(jnp.asarray(codes), carrier)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(bf16_int_dot(jnp.asarray(codes), carrier.T, carrier_in_axis=0)), want)
    np.testing.assert_array_equal(np.asarray(exact_int_dot(jnp.asarray(codes), jnp.asarray(kernel), carrier)), want)
    np.testing.assert_array_equal(np.asarray(int8_dot_rows(jnp.asarray(codes), jnp.asarray(kernel))), want)


def test_int_dense_one_row():
    x = jax.random.normal(jax.random.key(1), (1, 256))
    w = jaxqp.fake_quant_weight(jax.random.normal(jax.random.key(2), (256, 8)), W_SPEC)
    np.testing.assert_array_equal(np.asarray(int_dense(x, w, 8, 8, True)), np.asarray(_fake_quant_dense(x, w, A_SPEC)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(64)(x)))


def linen_outputs(model, params, x, act_specs):
    """The jitted linen_apply output of ``model`` under each ActSpec (weights: W_SPEC)."""
    outs = []
    for act in act_specs:
        t = jaxqp.transform([Rule(r".*/kernel", quant=W_SPEC, act=act)])
        state = t.init(params)
        out, _ = jax.jit(lambda p, s: jaxqp.linen_apply(model, s, {"params": t.apply(p, s)}, x))(params, state)
        outs.append(np.asarray(out))
    return outs


def nnx_outputs(module, x, act_specs):
    """The nnx_apply output of ``module`` under each ActSpec (weights: W_SPEC)."""
    graphdef, params = nnx.split(module, nnx.Param)
    outs = []
    for act in act_specs:
        t = jaxqp.transform([Rule(r".*/kernel", quant=W_SPEC, act=act)])
        state = t.init(params)
        out, _ = jaxqp.nnx_apply(nnx.merge(graphdef, t.apply(params, state)), state, x)
        outs.append(np.asarray(out))
    return outs


@pytest.mark.slow  # trains or serves a whole model
def test_linen_and_nnx_integer_layers_equal_the_fake_quant_model():
    x = jax.random.normal(jax.random.key(3), (16, 32))
    model = MLP()
    params = model.init(jax.random.key(4), x)["params"]
    fake, integer = linen_outputs(model, params, x, (A_SPEC, INT_SPEC))
    np.testing.assert_array_equal(integer, fake)
    net = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), jax.nn.relu, nnx.Linear(64, 4, rngs=nnx.Rngs(1)))
    fake, integer = nnx_outputs(net, x, (A_SPEC, INT_SPEC))
    np.testing.assert_array_equal(integer, fake)


def test_integer_spec_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"ActSpec\(integer=True\).*scale_pow2=True"):
        ActSpec(bits=8, symmetric=True, integer=True)
    params = {"w": jnp.ones((4, 3))}
    with pytest.raises(ValueError, match=r"rules\[0\] \(pattern 'w'\).*integer=True\) needs a kernel of 2\+ axes.*"
                                         r"QuantSpec\(bits=8, scale_pow2=True\)"):
        jaxqp.transform([Rule("w", quant=QuantSpec(bits=8), act=INT_SPEC)]).init(params)


@pytest.mark.slow  # trains or serves a whole model
def test_model_trained_with_integer_layers_serves_bit_for_bit():
    x = jax.random.normal(jax.random.key(5), (8, 32))
    model = MLP()
    params = model.init(jax.random.key(6), x)["params"]
    t = jaxqp.transform([Rule(r".*/kernel", quant=W_SPEC, act=INT_SPEC)])
    state = t.init(params)
    trained, _ = jax.jit(lambda p, s: jaxqp.linen_apply(model, s, {"params": t.apply(p, s)}, x))(params, state)
    for path in ("int8", "int8_t", "bf16"):  # every integer path; the float path skips the input rounding
        served = jaxqp.prepare(jaxqp.export(params, state), pow2_inputs=True, path=path)
        assert all(served[k]["kernel"].pow2 for k in ("Dense_0", "Dense_1"))
        out = jax.jit(jaxqp.linen_serving_apply(model))(served, x)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(trained))


class Attention(nn.Module):
    """Linen attention: DenseGeneral projections contracting one (q/k/v) and two (out) axes."""

    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=4)(x, x)


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.parametrize("per_token", [True, False])
def test_dense_general_and_linear_general_integer_paths_equal_fake_quant(per_token, monkeypatch):
    import jaxqp._adapters.inputs as flax_inputs
    calls = []
    real = flax_inputs.int_dense
    monkeypatch.setattr(flax_inputs, "int_dense", lambda *a: calls.append(a[1].shape) or real(*a))
    x = jax.random.normal(jax.random.key(7), (3, 10, 32))
    a_spec = ActSpec(bits=8, symmetric=True, per_token=per_token, scale_pow2=True)
    int_spec = ActSpec(bits=8, symmetric=True, per_token=per_token, scale_pow2=True, integer=True)
    model = Attention()
    fake, integer = linen_outputs(model, model.init(jax.random.key(8), x)["params"], x, (a_spec, int_spec))
    np.testing.assert_array_equal(integer, fake)
    # q, k, v (32 -> 4 x 8) run in int8; the output projection (4 x 8 -> 32) too unless per_token
    assert calls == [(32, 32)] * 3 + ([] if per_token else [(32, 32)])

    calls.clear()
    layer = nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0))
    fake, integer = nnx_outputs(layer, x, (a_spec, int_spec))
    np.testing.assert_array_equal(integer, fake)
    assert calls == [(32, 32)] * 3 + ([] if per_token else [(32, 32)])


@pytest.mark.parametrize("k", [96, 1100])  # the float form is exact (and a candidate) only for k <= 1040
def test_every_training_form_gives_the_same_bits(k):
    from jaxqp.numerics._int_dot import INT_FORMS, _forward_form, train_forms

    assert train_forms(k, 8, 8) == ((*INT_FORMS, "float") if k <= 1040 else INT_FORMS)
    x = jax.random.normal(jax.random.key(0), (5, k)) * 3.0
    w = jax.random.normal(jax.random.key(1), (k, 24))
    both = {form: jax.jit(lambda x, w, form=form: _forward_form(x, w, 8, 8, True, form))(x, w)
            for form in (*INT_FORMS, "float")}
    outs = {form: y for form, (y, _) in both.items()}
    for form in train_forms(k, 8, 8):
        assert bits_equal(outs[form], outs["int8"]), form
        assert bits_equal(both[form][1], both["int8"][1]), form  # the saved fq(x) for the backward too
    np.testing.assert_array_equal(np.asarray(int_dense(x, w, 8, 8, True)), np.asarray(outs["int8"]))
