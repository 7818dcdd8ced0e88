"""Quantization-aware training of an unmodified linen 1-D CNN on MNIST-1D: weights and activations.

The model class is plain Flax. jaxqp rules quantize every kernel to 4 bits
(LSQ-learned step sizes for the convolutions) and every layer input to 8 bits
(static ranges kept as an EMA in the transform state); ``jaxqp.linen_apply``
applies the input quantizers through ``nn.intercept_methods``. The training step
is one ``grad`` (w.r.t. params and the jaxqp state, which holds the learned step
sizes) and one ``tx.update``.

    python examples/qat_cnn_mnist1d.py            # 3000 steps
    python examples/qat_cnn_mnist1d.py --quick    # 60 steps, for CI
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxqp
from jaxqp.datasets import QUICK_SAMPLES, load_mnist1d


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x[..., None]  # (batch, 40, 1)
        x = nn.relu(nn.Conv(32, (5,))(x))
        x = nn.relu(nn.Conv(32, (5,), strides=(2,))(x))
        x = nn.relu(nn.Conv(32, (5,), strides=(2,))(x))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


RULES = [
    jaxqp.Rule(r"Conv_.*/kernel", quant=jaxqp.QuantSpec(bits=4, learned="lsq"),
               act=jaxqp.ActSpec(bits=8, range="static")),
    jaxqp.Rule(r"Dense_.*/kernel", quant=jaxqp.QuantSpec(bits=4, group_size=32),
               act=jaxqp.ActSpec(bits=8, range="static")),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args(argv).quick
    steps = 60 if quick else 3000

    (x_train, y_train), (x_test, y_test) = load_mnist1d(QUICK_SAMPLES if quick else 20000)
    model = CNN()
    params = model.init(jax.random.key(0), x_train[:1])["params"]
    t = jaxqp.transform(RULES)
    tx = jaxqp.wrap(optax.adam(optax.cosine_decay_schedule(3e-3, steps)), t, learned_tx=optax.adam(1e-3))
    opt_state = tx.init(params)

    def forward(params, state, x):
        return jaxqp.linen_apply(model, state, {"params": t.apply(params, state)}, x)

    def loss_fn(params, state, x, y):
        logits, observed = forward(params, state, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), observed

    @jax.jit
    def step(params, opt_state, x, y):
        state = jaxqp.state_of(opt_state)
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)
        (loss, observed), grads = grad_fn(params, state, x, y)  # grads: (params part, state part)
        updates, opt_state = tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.integers(0, len(x_train), 128)
        params, opt_state, loss = step(params, opt_state, x_train[batch], y_train[batch])

    state = jaxqp.state_of(opt_state)
    logits, _ = jax.jit(forward)(params, state, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    print(f"{steps} steps, last loss {float(loss):.4f}, w4a8 test accuracy {100 * accuracy:.1f}%")
    for path, r in state.ranges.items():
        print(f"  input of {path:<16} range [{float(r['lo']):7.3f}, {float(r['hi']):7.3f}]")
    print(jaxqp.summary(params, state))
    return accuracy


if __name__ == "__main__":
    main()
