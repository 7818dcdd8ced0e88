"""Quantization-aware pruning of an Equinox model: int8 weights and inputs, 80% gradual pruning.

The parameters are the model's inexact arrays (``eqx.partition(model, eqx.is_inexact_array)``),
with paths such as ``layers/0/weight``. Equinox stores weights as ``(out, in)``, so the rule
says ``layout="out_in"``: the specs keep their Flax meaning (one scale per output channel,
N:M groups along the input axis) and jaxqp maps them onto Equinox's axes. Equinox has no
method interceptor and jaxqp does not monkey-patch, so the model quantizes its layers' inputs
itself with ``jaxqp.quantize_input``: one line per layer.

At the end the exported model is served from its int8 codes with
``jaxqp.serving.equinox_serving_model`` and, with the extra ``onnx`` installed, exported to ONNX
and run by ONNX Runtime.

    python examples/equinox_qat.py            # 1500 steps
    python examples/equinox_qat.py --quick    # 60 steps, for CI
"""

import argparse
import importlib.util

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxqp
from jaxqp.demo import load_digits


class MLP(eqx.Module):
    layers: list

    def __init__(self, key):
        keys = jax.random.split(key, 3)
        sizes = [64, 256, 128, 10]
        self.layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]

    def __call__(self, x, state):
        """Logits of a batch, and the activation statistics jaxqp observed (static ranges)."""
        observed = {}
        for i, layer in enumerate(self.layers):
            x, seen = jaxqp.quantize_input(x, state, f"layers/{i}/weight")  # the layer's input, as int8 sees it
            observed.update(seen)
            x = jax.vmap(layer)(x)
            x = jax.nn.relu(x) if i < len(self.layers) - 1 else x
        return x, observed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    steps = 60 if parser.parse_args(argv).quick else 1500
    params, static = eqx.partition(MLP(jax.random.key(0)), eqx.is_inexact_array)
    rules = [jaxqp.Rule(r"layers/\d+/weight", quant=jaxqp.QuantSpec(bits=8), act=jaxqp.ActSpec(bits=8),
                        prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, steps // 6, 2 * steps // 3, 10)),
                        layout="out_in")]
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(2e-3), t)
    opt_state = tx.init(params)

    def forward(params, state, x):
        return eqx.combine(t.apply(params, state), static)(x, state)

    @jax.jit
    def step(params, opt_state, x, y):
        state = jaxqp.state_of(opt_state)

        def loss(p):
            logits, observed = forward(p, state, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), observed

        (value, observed), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state, value

    (x_train, y_train), (x_test, y_test) = load_digits()
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(x_train), 64)
        params, opt_state, value = step(params, opt_state, x_train[idx], y_train[idx])
    state = jaxqp.state_of(opt_state)
    logits, _ = jax.jit(forward)(params, state, jnp.asarray(x_test))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    packed = jaxqp.export(params, state)
    print(f"{steps} steps, loss {float(value):.4f}; w8a8, 80% sparse Equinox MLP: test accuracy {100 * accuracy:.1f}%")
    print(jaxqp.summary(params, state))
    # serve from the int8 codes: every eqx.nn.Linear becomes an integer matmul (int8 inputs too)
    served = jaxqp.serving.equinox_serving_model(eqx.combine(params, static), packed)
    served_logits, _ = jax.jit(lambda model, x: model(x, state))(served, jnp.asarray(x_test))
    served_accuracy = float(jnp.mean(jnp.argmax(served_logits, -1) == y_test))
    print(f"served from int8 codes: test accuracy {100 * served_accuracy:.1f}%")
    if importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime"):  # extra 'onnx'
        # the ONNX graph multiplies in integers; jaxqp's integer path pinned computes the same numbers
        pinned = jaxqp.serving.equinox_serving_model(eqx.combine(params, static), packed, path="int8")
        apply = lambda model, x: model(x, state)[0]
        onnx_logits = run_in_onnxruntime(apply, pinned, np.asarray(x_test))
        difference = float(np.abs(onnx_logits - np.asarray(apply(pinned, jnp.asarray(x_test)))).max())
        onnx_accuracy = float(np.mean(np.argmax(onnx_logits, -1) == y_test))
        print(f"ONNX Runtime (MatMulInteger on the int8 codes): test accuracy {100 * onnx_accuracy:.1f}%, "
              f"largest difference from jaxqp's integer path {difference:.2g}")
    return accuracy, params, state, packed, served_accuracy


def run_in_onnxruntime(apply, served, x):
    """``apply(served, x)`` exported with ``jaxqp.deploy.to_onnx`` and run by ONNX Runtime."""
    import onnxruntime as ort

    model = jaxqp.deploy.to_onnx(apply, served, x[:1])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


if __name__ == "__main__":
    main()
