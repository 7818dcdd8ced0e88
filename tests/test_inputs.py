"""Activation quantization: linen and NNX layers, plain functions, static ranges, PTQ calibration."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import counted_jit

import jaxqp
from jaxqp import ActSpec, QuantSpec, Rule


def dynamic_int8(x):
    """Reference: affine per-tensor 8-bit fake-quant of x (range widened to include 0)."""
    x = np.asarray(x, np.float32)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = np.float32(hi - lo) * (np.float32(1) / np.float32(255))
    zp = np.clip(np.round(-128 - lo / scale), -128, 127)
    q = np.clip(np.round(x / scale) + zp, -128, 127)
    return ((q - zp) * scale).astype(np.float32)


class Layers(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (batch, 12, 4)
        x = nn.Conv(6, (3,), name="conv")(x)
        x = nn.Conv(6, (3,), feature_group_count=6, name="depthwise")(x)
        x = nn.DenseGeneral((2, 3), name="general")(x)
        x = nn.Einsum((2, 3, 5), "btij,ijk->btk", name="einsum")(x)
        return nn.Dense(3, name="dense")(x)


LAYERS = ["conv", "depthwise", "general", "einsum", "dense"]


@pytest.mark.parametrize("layer", LAYERS)
def test_linen_layer_input_is_quantized(layer):
    model = Layers()
    x = jax.random.normal(jax.random.key(0), (2, 12, 4))
    variables = model.init(jax.random.key(1), x)
    t = jaxqp.transform([Rule(f"{layer}/kernel", act=ActSpec(bits=8))])
    state = t.init(variables["params"])

    def reference(next_fun, args, kwargs, context):  # the layer's input replaced by the reference
        if context.method_name == "__call__" and context.module.path == (layer,):
            args = (jnp.asarray(dynamic_int8(args[0])),) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(reference):
        want = model.apply(variables, x)
    out, observed = jaxqp.linen_apply(model, state, variables, x)
    assert observed == {}
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out), np.asarray(model.apply(variables, x)), rtol=1e-5, atol=1e-5)
    jitted, _ = jax.jit(lambda v, x: jaxqp.linen_apply(model, state, v, x))(variables, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_activation_rule_matching_no_layer_is_an_error():
    params = {"w": jnp.ones((4, 3))}
    model = nn.Dense(3)
    variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    t = jaxqp.transform([Rule("bias", act=ActSpec(bits=8))])
    state = t.init(variables["params"])
    with pytest.raises(ValueError, match=r"ActSpec targets \['bias'\].*Fix"):
        jaxqp.linen_apply(model, state, variables, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="no rule gives 'w' an ActSpec"):
        jaxqp.quantize_input(jnp.ones(3), jaxqp.transform([Rule("w", quant=QuantSpec())]).init(params), "w")


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 6, (3,), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(6 * 12, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)])

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


def test_nnx_inputs_quantized_and_model_restored():
    model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    t = jaxqp.transform([Rule("layers/1/kernel", act=ActSpec(bits=8)), Rule("conv/kernel", act=ActSpec(bits=8))])
    state = t.init(params)
    x = jax.random.normal(jax.random.key(2), (5, 12, 4))
    out, _ = jaxqp.nnx_apply(model, state, x)
    assert type(model.layers[1]) is nnx.Linear and type(model.conv) is nnx.Conv  # restored
    h = jax.nn.relu(model.conv(jnp.asarray(dynamic_int8(x)))).reshape(5, -1)
    h = jax.nn.relu(model.layers[0](h))
    want = model.layers[1](jnp.asarray(dynamic_int8(h)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)

    @jax.jit
    def forward(params, state, x):
        return jaxqp.nnx_apply(nnx.merge(graphdef, t.apply(params, state)), state, x)

    np.testing.assert_allclose(np.asarray(forward(params, state, x)[0]), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_plain_function_static_ranges_follow_ema():
    params = {"w": jnp.ones((3, 2))}
    t = jaxqp.transform([Rule("w", act=ActSpec(bits=8, range="static", decay=0.75))])
    state = t.init(params)
    a, b = jnp.array([[-1.0, 0.5, 2.0]]), jnp.array([[-3.0, 0.5, 6.0]])
    xa, seen_a = jaxqp.quantize_input(a, state, "w")
    np.testing.assert_allclose(np.asarray(xa), dynamic_int8(a), atol=1e-6)  # nothing recorded yet: own range
    assert float(seen_a["w"]["lo"]) == -1.0 and float(seen_a["w"]["hi"]) == 2.0
    state = t.update(params, state, seen_a)
    assert (float(state.ranges["w"]["lo"]), float(state.ranges["w"]["hi"])) == (-1.0, 2.0)
    xb, seen_b = jaxqp.quantize_input(b, state, "w")
    assert float(jnp.max(xb)) == pytest.approx(2.0, abs=0.01)  # the recorded range clips 6.0
    state = t.update(params, state, seen_b)
    assert float(state.ranges["w"]["lo"]) == pytest.approx(0.75 * -1.0 + 0.25 * -3.0)
    assert float(state.ranges["w"]["hi"]) == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)
    assert int(state.ranges["w"]["count"]) == 2


def test_per_token_dynamic_ranges():
    params = {"w": jnp.ones((3, 2))}
    t = jaxqp.transform([Rule("w", act=ActSpec(bits=8, per_token=True, symmetric=True))])
    x = jnp.array([[[0.01, -0.02, 0.03], [10.0, 20.0, -30.0]]])
    y, _ = jaxqp.quantize_input(x, t.init(params), "w")
    np.testing.assert_allclose(np.asarray(y[0, 0]), [0.01, -0.02, 0.03], atol=0.03 / 127 / 2 * 1.001)  # own range
    t_all = jaxqp.transform([Rule("w", act=ActSpec(bits=8, symmetric=True))])
    y_all, _ = jaxqp.quantize_input(x, t_all.init(params), "w")
    np.testing.assert_array_equal(np.asarray(y_all[0, 0]), 0.0)  # one range for the tensor rounds them away


def test_calibrate_sets_static_ranges_and_learned_inits():
    params = {"w": jnp.ones((3, 2)), "v": jnp.ones((3, 2)), "u": jnp.ones((3, 2))}
    t = jaxqp.transform([Rule("w", act=ActSpec(range="static")), Rule("v", act=ActSpec(range="pact", signed=False)),
                         Rule("u", act=ActSpec(range="lsq", symmetric=True))])
    state = t.init(params)

    def forward(state, x):
        observed = {}
        for path in ("w", "v", "u"):
            _, seen = jaxqp.quantize_input(x, state, path)
            observed.update(seen)
        return None, observed

    batches = [jnp.array([[-1.0, 0.5, 2.0]]), jnp.array([[-0.5, 0.0, 4.0]])]
    cal = jaxqp.calibrate(state, forward, batches)
    assert (float(cal.ranges["w"]["lo"]), float(cal.ranges["w"]["hi"])) == (-1.0, 4.0)
    assert float(cal.learned["inputs"]["v"]["alpha"]) == 4.0
    absmean = np.mean([np.mean(np.abs(np.asarray(b))) for b in batches])
    assert float(cal.learned["inputs"]["u"]["step"]) == pytest.approx(2 * absmean / np.sqrt(127), rel=1e-6)
    assert not cal.calibrating
    with pytest.raises(ValueError, match=r"no input was observed for \['u', 'v', 'w'\]"):
        jaxqp.calibrate(state, lambda s, x: (None, {}), batches)


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.standard_promotion  # optax.adam
def test_training_with_every_input_kind_compiles_once():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(16), nn.relu, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(3), (32, 8))
    y = jnp.arange(32) % 3
    params = model.init(jax.random.key(4), x)["params"]
    t = jaxqp.transform([
        Rule("layers_0/kernel", quant=QuantSpec(bits=4, learned="lsq"), act=ActSpec(range="static")),
        Rule(
            "layers_2/kernel",
            quant=QuantSpec(bits=4, group_size=8),
            act=ActSpec(bits=4, range="pact", signed=False, init=1.0),
        ),
        Rule("layers_4/kernel", quant=QuantSpec(bits=8), act=ActSpec(range="lsq+")),
    ])
    tx = jaxqp.wrap(optax.adam(1e-2), t)
    opt_state = tx.init(params)

    def loss_fn(p, s):
        out, observed = jaxqp.linen_apply(model, s, {"params": t.apply(p, s)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), observed

    def train(params, opt_state):
        state = jaxqp.state_of(opt_state)
        (loss, observed), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)(
            params, state)
        updates, opt_state = tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state, loss

    step, traces = counted_jit(train)

    first = None
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    assert len(traces) == 1
    assert float(loss) < 0.5 * first
    state = jaxqp.state_of(opt_state)
    assert int(state.ranges["layers_0/kernel"]["count"]) == 30
    assert float(state.learned["inputs"]["layers_2/kernel"]["alpha"]) != 1.0  # PACT clip moved
