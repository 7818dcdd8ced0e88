"""Post-training quantization: int8 weights and calibrated static int8 inputs of a trained float model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxqp
from jaxqp import ActSpec, QuantSpec, Rule
from jaxqp.demo import MLP, load_digits, train


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.standard_promotion  # optax.adam in the float training
def test_int8_ptq_keeps_accuracy_within_half_a_point():
    data = load_digits()
    (x_train, _), (x_test, y_test) = data
    params, _, _ = train([], data, steps=600)
    model = MLP()

    def accuracy(logits):
        return float(jnp.mean(jnp.argmax(logits, -1) == y_test))

    float_acc = accuracy(model.apply({"params": params}, x_test))
    t = jaxqp.transform([Rule(r".*/kernel", quant=QuantSpec(bits=8), act=ActSpec(bits=8, range="static"))])

    def forward(state, x):
        return jaxqp.linen_apply(model, state, {"params": t.apply(params, state)}, x)

    state = jaxqp.calibrate(t.init(params), forward, [x_train[i:i + 256] for i in range(0, 1024, 256)])
    for path in ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"):
        assert int(state.ranges[path]["count"]) == 1
    assert float(state.ranges["Dense_0/kernel"]["hi"]) == pytest.approx(float(np.max(x_train[:1024])))
    logits, _ = jax.jit(forward)(state, x_test)
    ptq_acc = accuracy(logits)
    print(f"float {100 * float_acc:.2f}%, int8 PTQ {100 * ptq_acc:.2f}%")
    assert float_acc > 0.95
    assert abs(ptq_acc - float_acc) <= 0.005
    # the calibrated ranges really quantize: the served inputs sit on an int8 grid of the range
    x_hat, _ = jaxqp.quantize_input(x_test, state, "Dense_0/kernel")
    lo, hi = float(state.ranges["Dense_0/kernel"]["lo"]), float(state.ranges["Dense_0/kernel"]["hi"])
    codes = np.asarray(x_hat) / ((hi - lo) / 255)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
