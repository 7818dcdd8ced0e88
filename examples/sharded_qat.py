"""Sharded quantization-aware pruning on a 2-D device mesh (data x model), checked against one device.

An MLP learns scikit-learn's digits with int8 weights and 80% gradual magnitude pruning,
on a ``("data", "model")`` mesh: the batch is split over ``data``, the kernels Megatron-style
over ``model`` (the first on its output axis, the second on its input axis). jaxqp needs
nothing sharding-specific: masks and scales follow their parameters' shardings under
``jit``, and mask refreshes count across shards without gathering a kernel. On a machine
with one CPU the script asks XLA for 8 host devices (set before JAX starts). The same
training on one device gives the same masks and the same weights up to float reordering.

    python examples/sharded_qat.py            # 600 steps
    python examples/sharded_qat.py --quick    # 40 steps, for CI
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxqp
from jaxqp.demo import load_digits


def init(key):
    k1, k2 = jax.random.split(key)
    return {"l1": {"kernel": jax.random.normal(k1, (64, 256)) / 8, "bias": jnp.zeros(256)},
            "l2": {"kernel": jax.random.normal(k2, (256, 10)) / 16, "bias": jnp.zeros(10)}}


def forward(params, x):
    h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    steps = 40 if parser.parse_args(argv).quick else 600
    devices = np.array(jax.devices())
    if devices.size < 8:
        raise SystemExit(f"needs 8 devices, found {devices.size}: run it as a script, before anything imports jax")
    mesh = Mesh(devices[:8].reshape(4, 2), ("data", "model"))
    specs = {"l1": {"kernel": P(None, "model"), "bias": P("model")}, "l2": {"kernel": P("model", None), "bias": P()}}
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)

    rules = [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8),
                        prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, steps // 8, steps // 2, 5)))]
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(2e-3), t)

    @jax.jit
    def step(params, opt_state, x, y):
        state = jaxqp.state_of(opt_state)
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(t.apply(p, state), x), y).mean()
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    (x_train, y_train), (x_test, y_test) = load_digits()
    batch_sharding = NamedSharding(mesh, P("data"))

    def train(params, shard: bool):
        opt_state = tx.init(params)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            idx = rng.integers(0, len(x_train), 64)
            x, y = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
            if shard:
                x, y = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
            # waiting for each step: with many steps in flight, XLA's CPU all-reduce deadlocked 8 simulated
            # devices on 2 cores (docs/sharding.md); on real devices, let steps run ahead
            params, opt_state = jax.block_until_ready(step(params, opt_state, x, y))
        return params, jaxqp.state_of(opt_state)

    params = init(jax.random.key(0))
    sharded, sharded_state = train(jax.device_put(params, shardings), shard=True)
    single, single_state = train(params, shard=False)

    logits = forward(t.apply(sharded, sharded_state), x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    same_masks = all(np.array_equal(np.asarray(sharded_state.mask(p)), np.asarray(single_state.mask(p)))
                     for p in ("l1/kernel", "l2/kernel"))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)))
    print(f"{steps} steps on a {dict(mesh.shape)} mesh: test accuracy {100 * accuracy:.1f}% (int8, "
          f"{jaxqp.summary(sharded, sharded_state).rows[1]['sparsity']:.0%} sparse)")
    for path, bits in sharded_state.mask_bits.items():
        print(f"  {path}: kernel {sharded[path.split('/')[0]]['kernel'].sharding.spec}, "
              f"packed mask {bits.sharding.spec}")
    print(f"same masks as on one device: {same_masks}; largest weight difference {diff:.1e}")
    return accuracy, same_masks, diff


if __name__ == "__main__":
    main()
