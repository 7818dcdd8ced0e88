"""Train-step overhead of jaxqp's weight transforms vs the float step, in one process.

Runs a jitted train step (forward, backward, adam update through ``jaxqp.wrap``)
of a Dense-heavy MLP for: float32 (no rules), int8 weight fake-quant, w8a8 (int8
weights and dynamic int8 inputs of every layer, fake-quant), w8a8-int (the same with
power-of-two scales through the integer matmul, ``ActSpec(integer=True)``), pruning
(80% on a polynomial schedule refreshing every 100 steps, refreshes included in
the timing) and both. Configs are timed round-robin; the median step time of
each is divided by the float step's median. A second, identical float run
("float32 again") shows how much of a ratio is timing noise on this machine.

    python benchmarks/step_overhead.py --json step_overhead.json
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import write_json

import jaxqp
from jaxqp.demo import make_train_step
from jaxqp.numerics._path_choice import cpu_info, record_paths


class MLP(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def make_step(model, rules):
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(1e-3), t)
    if not any(rule.act is not None for rule in rules):
        return tx, make_train_step(model, t, tx)

    @jax.jit
    def step(params, opt_state, x, y):  # inputs quantized too: through jaxqp.linen_apply
        state = jaxqp.state_of(opt_state)

        def loss_fn(p):
            logits, observed = jaxqp.linen_apply(model, state, {"params": t.apply(p, state)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), observed

        (loss, observed), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, step


def configs(total_steps: int):
    prune = jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, begin=0, end=total_steps, every=100))
    int8 = jaxqp.QuantSpec(bits=8)
    return {
        "float32": [],
        "float32 again": [],  # a second float baseline: its ratio shows the timing noise
        "int8": [jaxqp.Rule(r".*/kernel", quant=int8)],
        "w8a8": [jaxqp.Rule(r".*/kernel", quant=int8, act=jaxqp.ActSpec(bits=8))],
        "w8a8-int": [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8, scale_pow2=True),
                                act=jaxqp.ActSpec(bits=8, symmetric=True, per_token=True, scale_pow2=True,
                                                  integer=True))],
        "pruned": [jaxqp.Rule(r".*/kernel", prune=prune)],
        "pruned+int8": [jaxqp.Rule(r".*/kernel", quant=int8, prune=prune)],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=20, help="timed blocks per config")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.batch, args.steps, args.repeats = 64, 2, 16, 5, 2

    model = MLP(args.width, args.depth)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.width)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=args.batch).astype(np.int32))
    params0 = model.init(jax.random.key(0), x[:1])["params"]

    runs, paths = {}, {}
    for name, rules in configs(args.steps * args.repeats).items():
        tx, step = make_step(model, rules)
        params, opt_state = params0, tx.init(params0)
        with record_paths() as used:  # integer layers pick their dot form when traced
            params, opt_state, _ = jax.block_until_ready(step(params, opt_state, x, y))  # compile
        paths[name] = sorted({entry["path"] for entry in used})
        runs[name] = [step, params, opt_state, []]

    for _ in range(args.repeats):  # round-robin, so drift hits every config alike
        for run in runs.values():
            step, params, opt_state, times = run
            start = time.perf_counter()
            for _ in range(args.steps):
                params, opt_state, _ = step(params, opt_state, x, y)
            jax.block_until_ready(params)
            times.append((time.perf_counter() - start) / args.steps)
            run[1], run[2] = params, opt_state

    base = float(np.median(runs["float32"][3]))
    rows = []
    cpu = cpu_info()
    print(f"MLP {args.depth}x{args.width}, batch {args.batch}, {jax.default_backend()} "
          f"({cpu['model']}; {', '.join(cpu['flags'])}), median of {args.repeats} x {args.steps} steps")
    print(f"{'config':<12} {'step ms':>8} {'ratio':>7}")
    for name, run in runs.items():
        ms = float(np.median(run[3]))
        dots = f"  dot: {', '.join(paths[name])}" if paths[name] else ""
        print(f"{name:<12} {ms * 1e3:8.2f} {ms / base:7.3f}x{dots}")
        if not name.startswith("float32"):
            rows.append({"config": name, "step_ratio": round(ms / base, 4), "step_ms": round(ms * 1e3, 3),
                         "path": paths[name] or None})
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
