"""Prune conv filters and dense neurons of a linen CNN on sklearn's digits.

Half of the convolution filters and 60% of the hidden neurons are removed on a
polynomial schedule (whole channels, with their bias entries), the rest is
quantized to int8, and the per-layer summary shows what is left.

    python examples/prune_cnn.py                      # 800 steps
    python examples/prune_cnn.py --refresh separate   # the mask refresh compiled apart from the step
    python examples/prune_cnn.py --quick              # 80 steps, for CI

With ``--refresh separate`` the train step holds no refresh code (it compiles like a
fixed-mask step) and ``t.refresh(params, opt_state)`` refreshes the masks between steps.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxqp
from jaxqp.demo import load_digits, make_train_step


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(100)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--refresh", choices=("in_update", "separate"), default="in_update",
                        help="where masks are refreshed: inside tx.update (default) or by t.refresh between steps")
    args = parser.parse_args(argv)
    steps = 80 if args.quick else 800

    (x_train, y_train), (x_test, y_test) = load_digits()  # 80/20 split, fixed permutation
    x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)

    model = CNN()
    params = model.init(jax.random.key(0), x_train[:1])["params"]
    schedule = lambda final: jaxqp.polynomial(0.0, final, begin=steps // 8, end=steps // 2, every=max(steps // 40, 1))
    int8 = jaxqp.QuantSpec(bits=8)
    rules = [
        jaxqp.Rule(r"Conv_0/kernel", quant=int8,
                   prune=jaxqp.PruneSpec(sparsity=schedule(0.5), structure=jaxqp.Channels())),  # filters
        jaxqp.Rule(r"Dense_0/kernel", quant=int8,
                   prune=jaxqp.PruneSpec(sparsity=schedule(0.6), structure=jaxqp.Channels())),  # neurons
        jaxqp.Rule(r"Dense_1/kernel", quant=int8),
    ]
    t = jaxqp.transform(rules, refresh=args.refresh)
    tx = jaxqp.wrap(optax.adam(2e-3), t)
    opt_state = tx.init(params)
    step = make_train_step(model, t, tx)
    start = time.perf_counter()
    step = step.lower(params, opt_state, x_train[:64], y_train[:64]).compile()
    compile_s = time.perf_counter() - start

    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = rng.integers(0, len(x_train), 64)
        if args.refresh == "separate":  # outside jit; returns its arguments unless a refresh is due
            params, opt_state = t.refresh(params, opt_state)
        params, opt_state, loss = step(params, opt_state, x_train[batch], y_train[batch])

    state = jaxqp.state_of(opt_state)
    logits = model.apply({"params": t.apply(params, state)}, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    filters = int(np.asarray(state.masks["Conv_0/kernel"]).any(axis=(0, 1, 2)).sum())
    neurons = int(np.asarray(state.masks["Dense_0/kernel"]).any(axis=0).sum())
    print(f"{steps} steps (refresh {args.refresh}, step compiled in {compile_s:.2f} s), loss {float(loss):.4f}, "
          f"test accuracy {100 * accuracy:.1f}%, {filters}/32 filters and {neurons}/100 neurons left")
    print(jaxqp.summary(params, state))
    return accuracy, params, state


if __name__ == "__main__":
    main()
