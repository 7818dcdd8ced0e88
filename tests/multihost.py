"""Pruned + int8 training on a global 4 x 2 mesh, as one process with 8 CPU devices or as two
processes with 4 each (``jax.distributed`` on the loopback address, gloo collectives).

Run by ``tests/test_multihost.py``, which starts every process itself and compares the
results. Process 0 (or the single process) writes the trained params and the packed masks to
``--out`` (npz). Every process also checks that ``jaxqp.export`` refuses the tree while its leaves
are sharded across processes, and that the gathered tree exports to what ``t.apply`` computes.

    python tests/multihost.py --devices 8 --out single.npz
    python tests/multihost.py --devices 4 --processes 2 --process-id 0 --port 12345 --out multi.npz &
    python tests/multihost.py --devices 4 --processes 2 --process-id 1 --port 12345 --out multi.npz
"""

import argparse
import os
import sys


def parse(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True, help="CPU devices of this process")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", help="single process: save with orbax here, restore onto another mesh")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    flag = f" --xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + flag
    import jax

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.processes,
                                   process_id=args.process_id, initialization_timeout=120)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxqp

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {"l1/kernel": P(None, "model"), "l1/bias": P("model"), "l2/kernel": P("model", None), "l2/bias": P()}
    rng = np.random.default_rng(0)
    host = {"l1": {"kernel": rng.normal(size=(64, 256)).astype(np.float32) / 8, "bias": np.zeros(256, np.float32)},
            "l2": {"kernel": rng.normal(size=(256, 32)).astype(np.float32) / 16, "bias": np.zeros(32, np.float32)}}
    x_host, y_host = rng.normal(size=(64, 64)).astype(np.float32), rng.normal(size=(64, 32)).astype(np.float32)

    def global_array(value, spec):  # every process builds only its own shards
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    params = {layer: {name: global_array(v, specs[f"{layer}/{name}"]) for name, v in leaves.items()}
              for layer, leaves in host.items()}
    x, y = global_array(x_host, P("data")), global_array(y_host, P("data"))
    rules = [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8),
                        prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.8, begin=1, end=5, every=1)))]
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(1e-2), t)

    @jax.jit
    def step(params, opt_state, x, y):
        state = jaxqp.state_of(opt_state)

        def loss(p):
            q = t.apply(p, state)
            h = jax.nn.relu(x @ q["l1"]["kernel"] + q["l1"]["bias"])
            return jnp.mean((h @ q["l2"]["kernel"] + q["l2"]["bias"] - y) ** 2)

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(6):
        params, opt_state = step(params, opt_state, x, y)
    state = jaxqp.state_of(opt_state)
    if args.processes > 1:  # export reads each leaf on this host: a leaf with shards elsewhere is refused
        try:
            jaxqp.export(params, state)
            raise AssertionError("export of a tree sharded across processes did not raise")
        except ValueError as err:
            assert "'l1/kernel' is sharded across processes" in str(err) and "process_allgather" in str(err), err
        target = f"{args.out}.{args.process_id}.jaxqp"
        try:  # save too, before writing anything
            jaxqp.save(target, params)
            raise AssertionError("save of a tree sharded across processes did not raise")
        except ValueError as err:
            assert "jaxqp.save: 'l1/bias' is sharded across processes" in str(err), err  # the first leaf
        assert not os.path.exists(target)
        print("export refused the sharded tree by name", flush=True)
    gathered = multihost_utils.process_allgather({"params": params, "state": state}, tiled=True)
    exported = jaxqp.export(gathered["params"], gathered["state"])  # the fix the error names
    applied = t.apply(gathered["params"], gathered["state"])
    for layer in exported:  # the export contract holds on the gathered tree: decodes to t.apply, bit for bit
        assert np.array_equal(np.asarray(jaxqp.dequantize(exported[layer]["kernel"])),
                              np.asarray(applied[layer]["kernel"])), layer
    if args.process_id == 0:
        out = {f"params/{layer}/{name}": np.asarray(v) for layer, d in gathered["params"].items()
               for name, v in d.items()}
        out.update({f"masks/{path}": np.asarray(v) for path, v in gathered["state"].mask_bits.items()})
        np.savez(args.out, **out)
    if args.checkpoint:
        restore_onto_another_mesh(args.checkpoint, params, opt_state, step, x, y)
    print(f"process {args.process_id}: done", flush=True)
    if args.processes > 1:
        jax.distributed.shutdown()
    return 0


def restore_onto_another_mesh(directory, params, opt_state, step, x, y):
    """Saves the sharded (params, opt_state) with orbax, restores it FSDP-style onto an 8-device
    ``data`` mesh, and checks that one more step from either gives the same result."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))

    def target(leaf):
        split = leaf.ndim == 2 and leaf.shape[0] % 8 == 0
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P("data") if split else P()))

    tree = {"params": params, "opt_state": opt_state}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, "state"), tree)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(os.path.join(directory, "state"), jax.tree.map(target, tree))
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "restore changed a value"
    kernel = restored["params"]["l1"]["kernel"]
    assert kernel.sharding.spec == P("data"), kernel.sharding
    masks = restored["opt_state"]
    before = step(params, opt_state, x, y)
    after = step(restored["params"], masks, jax.device_put(x, NamedSharding(mesh, P("data"))), y)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])))
    assert diff <= 1e-6, diff
    print(f"restored onto a {dict(mesh.shape)} mesh; next step differs by {diff:.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
