"""Quantize and prune a Flax NNX model with jaxqp, on sklearn's digits.

The NNX pattern: split the model into a graph definition and its ``nnx.Param``
state, let jaxqp transform that state (paths read ``l1/kernel``: the Variable
wrapper adds nothing), and merge it back for the forward pass. At the end the model is
served from its int8 codes with ``jaxqp.serving.nnx_serving_apply``, which picks each matmul's
compute path by timing the whole model on this machine.

    python examples/nnx_quickstart.py            # 600 steps
    python examples/nnx_quickstart.py --quick    # 60 steps, for CI
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxqp
from jaxqp.demo import load_digits


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 200, rngs=rngs)
        self.l2 = nnx.Linear(200, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    steps = 60 if parser.parse_args(argv).quick else 600

    (x_train, y_train), (x_test, y_test) = load_digits()  # 80/20 split, fixed permutation

    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    rules = [
        jaxqp.Rule(r"l2/kernel", quant=jaxqp.QuantSpec(bits=8)),  # keep the small head dense
        jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8),
                   prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.9, begin=steps // 10,
                                                                   end=steps // 2, every=10))),
    ]
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(3e-3), t)
    opt_state = tx.init(params)

    def loss_fn(params, state, x, y):
        logits = nnx.merge(graphdef, t.apply(params, state))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, jaxqp.state_of(opt_state), x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.integers(0, len(x_train), 64)
        params, opt_state, loss = step(params, opt_state, x_train[batch], y_train[batch])

    state = jaxqp.state_of(opt_state)
    model = nnx.merge(graphdef, t.apply(params, state))
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
    print(f"{steps} steps, last loss {float(loss):.4f}, test accuracy {100 * accuracy:.1f}%")
    print(jaxqp.summary(params, state))
    served = jaxqp.prepare(jaxqp.export(params, state))  # int8 codes in memory, a float32 scale per output
    logits = jax.jit(jaxqp.serving.nnx_serving_apply(graphdef))(served, x_test)
    served_accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    print(f"served from int8 codes: test accuracy {100 * served_accuracy:.1f}%")
    return accuracy, params, state, served_accuracy


if __name__ == "__main__":
    main()
