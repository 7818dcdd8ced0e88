"""Fit a model into a byte budget: measure each layer's sensitivity, allocate bits and sparsity, fine-tune.

An unmodified linen 1-D CNN is trained on MNIST-1D in float32. ``jaxqp.choose.sensitivity``
then measures, on a few training batches, how much the loss rises when one layer alone
is quantized or pruned, for every candidate (one jitted sweep), and
``jaxqp.choose.allocate`` picks one candidate per layer with the least summed rise
whose exported bytes fit the budget: here, the bytes of uniform 3-bit weights. The
allocated rules and the uniform ones are fine-tuned alike; the exported file of the
allocated model is written and its size checked against the budget.

    python examples/choose_bits.py                  # 2000 + 500 steps
    python examples/choose_bits.py --quick          # a few steps, for CI
    python examples/choose_bits.py --plots plots    # also sensitivity.png and pareto.png (pip install matplotlib)
"""

import argparse
import os
import tempfile

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
        x = x[..., None]
        x = nn.relu(nn.Conv(32, (5,))(x))
        x = nn.relu(nn.Conv(32, (5,), strides=(2,))(x))
        x = nn.relu(nn.Conv(32, (5,), strides=(2,))(x))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


Q, P = jaxqp.QuantSpec, jaxqp.PruneSpec
CANDIDATES = [Q(bits=8), Q(bits=4), Q(bits=3), Q(bits=2), Q(bits=2, group_size=32),
              (Q(bits=8), P(sparsity=0.8)), (Q(bits=4), P(sparsity=0.75)), (Q(bits=4), P(structure=jaxqp.NM(2, 4)))]


def loss_of(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(CNN().apply({"params": params}, x), y).mean()


def train(params, rules, x, y, steps: int, lr: float, seed: int = 0):
    """``steps`` adam steps under ``rules``; returns params and the jaxqp state."""
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(optax.cosine_decay_schedule(lr, steps)), t)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        state = jaxqp.state_of(opt_state)
        grads = jax.grad(lambda p: loss_of(t.apply(p, state), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        params, opt_state = step(params, opt_state, (x[idx], y[idx]))
    return params, jaxqp.state_of(opt_state), t


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plots", metavar="DIR")
    args = parser.parse_args(argv)
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):  # before the sweep
        parser.error(f"--plots {args.plots!r} is a file; give a folder for sensitivity.png and pareto.png")
    pretrain, finetune = (30, 10) if args.quick else (2000, 500)
    (x, y), (x_test, y_test) = load_mnist1d(QUICK_SAMPLES if args.quick else 20000)
    params = CNN().init(jax.random.key(0), x[:1])["params"]
    params, _, _ = train(params, [], x, y, pretrain, 3e-3)

    calib = [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1024, 256)]
    s = jaxqp.choose.sensitivity(loss_of, params, calib, CANDIDATES)
    print(s)
    budget, _ = s.uniform("w3")
    chosen = jaxqp.choose.allocate(s, budget)
    print(f"\nbudget: {budget} bytes (uniform 3-bit weights)\n{chosen}")

    results = {}
    uniform = [s.candidates[s.names.index("w3")].rule(path) for path in s.layers]
    for name, rules in (("uniform w3", uniform), ("allocated", list(chosen.rules))):
        tuned, state, t = train(params, rules, x, y, finetune, 1e-3)
        logits = CNN().apply({"params": t.apply(tuned, state)}, x_test)
        accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.jaxqp")
            jaxqp.save(path, jaxqp.export(tuned, state))
            file_bytes = os.path.getsize(path)
        stored = jaxqp.summary(tuned, state).bytes_compressed
        results[name] = {"accuracy": accuracy, "stored": stored, "file": file_bytes}
        print(f"{name:<11} test accuracy {100 * accuracy:.1f}%, {stored} bytes stored "
              f"({file_bytes} bytes on disk with the file's header and metadata)")
    if results["allocated"]["stored"] > budget:
        raise AssertionError("the allocated model stores more bytes than the budget")
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        print("wrote", jaxqp.choose.plot_sensitivity(s, os.path.join(args.plots, "sensitivity.png")))
    return s, chosen, results


if __name__ == "__main__":
    main()
