"""jaxqp training under SPMD layouts on 8 simulated CPU devices, compared with one device.

Run as a script (``tests/test_sharding.py`` and ``benchmarks/sharding.py`` do, in a
subprocess: the 8 host devices must be requested before JAX starts). For every layout
(dp, tp, fsdp, 2d) and config (w8a8, pruned80+int8, nm2:4, global90, and float as the
reference) it trains a 2-layer MLP a few steps sharded and unsharded, and prints one JSON
line per pair: how far the results are apart, whether every mask and scale follows its
parameter's sharding, the collectives the compiled jaxqp step has beyond the float step's
with the same shardings, and the jaxqp state's bytes per device against the params'.

    python tests/sharded_layouts.py [--time ROUNDS]
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxqp

IN, HIDDEN, OUT, BATCH, STEPS = 64, 256, 32, 64, 6


def configs() -> dict[str, list]:
    kernels = r".*/kernel"
    gradual = jaxqp.polynomial(0.0, 0.8, begin=1, end=5, every=1)
    return {
        "float": [],
        "w8a8": [jaxqp.Rule(kernels, quant=jaxqp.QuantSpec(bits=8), act=jaxqp.ActSpec(bits=8))],
        "pruned80+int8": [jaxqp.Rule(kernels, quant=jaxqp.QuantSpec(bits=8), prune=jaxqp.PruneSpec(sparsity=gradual))],
        "nm2:4": [jaxqp.Rule(kernels, prune=jaxqp.PruneSpec(structure=jaxqp.NM(2, 4)))],
        "global90": [jaxqp.Rule(kernels, prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.9, 1, 5, 1),
                                                                scope="global"))],
    }


def layouts(devices) -> dict[str, tuple[Mesh, dict, P]]:
    """``{name: (mesh, param specs by path, batch spec)}``."""
    line = Mesh(np.array(devices), ("data",))
    model = Mesh(np.array(devices), ("model",))
    grid = Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
    megatron = {"l1/kernel": P(None, "model"), "l1/bias": P("model"), "l2/kernel": P("model", None), "l2/bias": P()}
    return {
        "dp": (line, {}, P("data")),
        "tp": (model, megatron, P()),  # l1 split on its output axis, l2 on its input (reduced) axis
        "fsdp": (line, {"l1/kernel": P("data", None), "l2/kernel": P("data", None)}, P("data")),
        "2d": (grid, megatron, P("data")),
    }


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"l1": {"kernel": jax.random.normal(k1, (IN, HIDDEN)) / 8, "bias": jnp.zeros(HIDDEN)},
            "l2": {"kernel": jax.random.normal(k2, (HIDDEN, OUT)) / 16, "bias": jnp.zeros(OUT)}}


def make_step(rules):
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(1e-2), t)

    def loss_fn(params, state, x, y):
        q = t.apply(params, state)
        observed = {}
        h = x
        for name in ("l1", "l2"):
            if rules and rules[0].act is not None:
                h, seen = jaxqp.quantize_input(h, state, f"{name}/kernel")
                observed.update(seen)
            h = h @ q[name]["kernel"] + q[name]["bias"]
            h = jax.nn.relu(h) if name == "l1" else h
        return jnp.mean((h - y) ** 2), observed

    def step(params, opt_state, x, y):
        state = jaxqp.state_of(opt_state)
        (_, observed), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state

    return tx, jax.jit(step)


def data():
    k1, k2 = jax.random.split(jax.random.key(1))
    return jax.random.normal(k1, (BATCH, IN)), jax.random.normal(k2, (BATCH, OUT))


def place(params, mesh, specs):
    return {layer: {name: jax.device_put(v, NamedSharding(mesh, specs.get(f"{layer}/{name}", P())))
                    for name, v in leaves.items()} for layer, leaves in params.items()}


def train(tx, step, params, x, y):
    opt_state = tx.init(params)
    for _ in range(STEPS):  # one step in flight at a time (see seconds_per_step)
        params, opt_state = jax.block_until_ready(step(params, opt_state, x, y))
    return params, opt_state


COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(")


def collectives(step, *args) -> list[tuple[str, int]]:
    """(kind, elements of the result) of every collective in the compiled step."""
    text = step.lower(*args).compile().as_text()
    out = []
    for dtype, dims, kind in COLLECTIVE.findall(text):
        del dtype
        out.append((kind, int(np.prod([int(d) for d in dims.split(",") if d]))))
    return out


def extra(jaxqp_ops, float_ops, min_elements: int) -> list[tuple[str, int]]:
    """Collectives of the jaxqp step that the float step does not have, of at least ``min_elements``."""
    remaining = list(float_ops)
    out = []
    for op in jaxqp_ops:
        if op in remaining:
            remaining.remove(op)
        elif op[1] >= min_elements:
            out.append(op)
    return out


def per_device_bytes(tree, device) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total


def _spec(sharding) -> tuple:
    spec = tuple(sharding.spec)
    while spec and spec[-1] is None:  # P("model") and P("model", None) shard alike
        spec = spec[:-1]
    return spec


def follows(state, params) -> list[str]:
    """Paths whose mask (packed) or weight scale is not sharded like the parameter's axis it belongs to."""
    wrong = []
    for path, bits in state.mask_bits.items():
        layer, name = path.split("/")
        want, got = _spec(params[layer][name].sharding), _spec(bits.sharding)
        if got != want and not (bits.shape[0] < 8 and want[1:] == got[1:]):
            wrong.append(f"{path} mask {bits.sharding.spec} vs {want}")
    return wrong


def seconds_per_step(runs: dict, x, y, rounds: int) -> dict:
    """Median seconds of one step of each run ``{config: [step, params, opt_state]}``, round-robin.

    The configs take turns, one step each per round, so drift on a shared machine hits them
    alike; every step is waited for: with many steps in flight, 8 simulated devices on 2 cores
    deadlocked in an all-reduce's rendezvous (XLA CPU, ``--scale 8``).
    """
    def advance(run):  # one awaited step: the run's params and optimizer state move on
        step, params, opt_state = run
        run[1:] = jax.block_until_ready(step(params, opt_state, x, y))[:2]

    for run in runs.values():
        advance(run)  # compiled and warm
    times: dict = {config: [] for config in runs}
    for _ in range(rounds):
        for config, run in runs.items():
            start = time.perf_counter()
            advance(run)
            times[config].append(time.perf_counter() - start)
    return {config: float(np.median(t)) for config, t in times.items()}


def masks_on_the_same_weights(devices) -> dict:
    """Magnitude, global and channel masks of kernels sharded on either axis (with exact ties), and
    2:4 masks with the N:M axis sharded, vs one device."""
    from jaxqp.numerics._masks import channel_mask, global_magnitude_masks, magnitude_mask, nm_mask

    mesh = Mesh(np.array(devices), ("model",))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 512)).astype(np.float32)
    b = rng.normal(size=(512, 32)).astype(np.float32)
    b[:40] = b[40:80]  # exact ties across shards of the input axis
    a[:, 64:72] = a[:, 0:8]  # whole output channels tied across shards (equal norms)
    sharded = (jax.device_put(a, NamedSharding(mesh, P(None, "model"))),
               jax.device_put(b, NamedSharding(mesh, P("model", None))))
    equal = {}
    for sparsity in (0.5, 0.8, 0.9):
        masks = jax.jit(lambda x, y, s=sparsity: [*global_magnitude_masks([x, y], s), magnitude_mask(y, s),
                                                  channel_mask(x, s, axis=-1), channel_mask(y, s, axis=-1)])
        one, spread = masks(jnp.asarray(a), jnp.asarray(b)), masks(*sharded)
        equal[str(sparsity)] = all(np.array_equal(np.asarray(m), np.asarray(n)) for m, n in zip(one, spread))
    nm = jax.jit(lambda y: nm_mask(y, 2, 4, axis=-2))  # groups along the sharded input axis
    equal["nm2:4"] = bool(np.array_equal(np.asarray(nm(jnp.asarray(b))), np.asarray(nm(sharded[1]))))
    return {"check": "masks_on_the_same_weights", "equal": equal}


def separate_refresh_on_sharded_weights(devices) -> dict:
    """``t.refresh`` of ``transform(..., refresh="separate")`` on tensor-parallel params vs one device:
    the same masks and zeros, and params and masks keep their shardings."""
    import dataclasses

    mesh, specs, _ = layouts(devices)["tp"]
    rules = [jaxqp.Rule(r".*/kernel", prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, 1, 5, 1)))]
    t = jaxqp.transform(rules, refresh="separate")
    results = []
    for params in (init_params(), place(init_params(), mesh, specs)):
        state = dataclasses.replace(t.init(params), step=jnp.asarray(2, jnp.int32))  # due at step 3: 70%
        results.append(t.refresh(params, state))
    (one, one_state), (spread, spread_state) = results
    shardings = {f"{layer}/{name}": (_spec(leaf.sharding), _spec(NamedSharding(mesh, specs.get(f"{layer}/{name}",
                                                                                                 P()))))
                 for layer, leaves in spread.items() for name, leaf in leaves.items()}
    return {"check": "separate_refresh_on_sharded_weights",
            "params_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                                for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(spread))),
            "masks_equal": all(np.array_equal(np.asarray(one_state.mask_bits[p]), np.asarray(spread_state.mask_bits[p]))
                               for p in one_state.mask_bits),
            "kernel_zeros": [int((np.asarray(spread[layer]["kernel"]) == 0).sum()) for layer in ("l1", "l2")],
            "params_resharded": [path for path, (got, want) in shardings.items() if got != want],
            "not_following": follows(spread_state, spread)}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--time", type=int, default=0, help="also time ROUNDS steps per layout and config")
    parser.add_argument("--scale", type=int, default=1, help="multiply every layer width and the batch by this")
    args = parser.parse_args(argv)
    global IN, HIDDEN, OUT, BATCH
    IN, HIDDEN, OUT, BATCH = (n * args.scale for n in (IN, HIDDEN, OUT, BATCH))
    devices = jax.devices()
    assert len(devices) == 8, devices
    print(json.dumps(masks_on_the_same_weights(devices)), flush=True)
    print(json.dumps(separate_refresh_on_sharded_weights(devices)), flush=True)
    params0 = init_params()
    x, y = data()
    kernel_elements = min(IN * HIDDEN, HIDDEN * OUT) // 8  # a shard of the smallest kernel
    steps = {config: make_step(rules) for config, rules in configs().items()}
    reference = {config: train(tx, step, params0, x, y) for config, (tx, step) in steps.items()}
    for layout, (mesh, specs, batch_spec) in layouts(devices).items():
        xs, ys = (jax.device_put(a, NamedSharding(mesh, batch_spec)) for a in (x, y))
        sharded0 = place(params0, mesh, specs)
        float_tx, float_step = steps["float"]
        float_ops = collectives(float_step, sharded0, float_tx.init(sharded0), xs, ys)
        rows, runs = [], {}
        for config, (tx, step) in steps.items():
            ref_params, ref_opt = reference[config]
            sh_params, sh_opt = train(tx, step, sharded0, xs, ys)
            ref_state, sh_state = jaxqp.state_of(ref_opt), jaxqp.state_of(sh_opt)
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref_params),
                                                                       jax.tree.leaves(sh_params)))
            masks_equal = all(np.array_equal(np.asarray(ref_state.mask_bits[p]), np.asarray(sh_state.mask_bits[p]))
                              for p in ref_state.mask_bits)
            ops = collectives(step, sharded0, tx.init(sharded0), xs, ys)
            row = {"layout": layout, "config": config, "max_abs_diff": diff, "masks_equal": masks_equal,
                   "not_following": follows(sh_state, sh_params),
                   "init_not_following": follows(jaxqp.state_of(tx.init(sharded0)), sharded0),
                   "collectives_extra": extra(ops, float_ops, kernel_elements),
                   "collectives_extra_small": len(extra(ops, float_ops, 0)) - len(extra(ops, float_ops,
                                                                                       kernel_elements)),
                   "state_bytes_per_device_ratio": per_device_bytes(sh_state, devices[0])
                   / per_device_bytes(sh_params, devices[0])}
            rows.append(row)
            runs[config] = [step, sh_params, sh_opt]
        seconds = seconds_per_step(runs, xs, ys, args.time) if args.time else {}
        for row in rows:
            if seconds:
                row["step_ms"] = 1e3 * seconds[row["config"]]
                row["step_ratio_vs_float_same_layout"] = seconds[row["config"]] / seconds["float"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
