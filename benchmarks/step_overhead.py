"""Train-step overhead of jaxqp's weight transforms vs the float step, in one process.

Runs a jitted train step (forward, backward, adam update through ``jaxqp.wrap``)
of a Dense-heavy MLP for: float32 (no rules), int8 weight fake-quant, w8a8 (int8
weights and dynamic int8 inputs of every layer, fake-quant), w8a8-int (the same with
power-of-two scales through the integer matmul, ``ActSpec(integer=True)``), pruning
(80% on a polynomial schedule refreshing every 100 steps, refreshes included in
the timing), both, global pruning to 90%, 2:4, movement pruning and RigL. Configs are
timed round-robin; the median step time of each is divided by the float step's median.
A second, identical float run ("float32 again") shows how much of a ratio is timing
noise on this machine. Configs ending in `` sep`` are the same pruning with
``refresh="separate"``: ``t.refresh(params, opt_state)`` runs before each step (timed with it) and
the refresh compiles apart from the step (``refresh_compile_s``: the first ``t.refresh`` of a due
step less a later one, paid once per process). Per
config also: ``compile_ratio``, the time to trace, lower and compile the step over the float
step's (medians of ``--builds`` fresh builds each, built round-robin over the configs, since
one compile moves by 10-30% and compiles slow down as the process ages; ``first_compile_s`` is
the first build's, which includes timing the integer dot forms);
``refresh_ratio``, one step that refreshes the masks over one that does not (the median of
``--repeats`` calls each, same inputs);
``state_bytes_ratio``, the bytes of the transform state (masks, scores, ranges) over the
params' bytes; and ``cached_rebuild_s`` / ``cached_rebuild_ratio``, the seconds to rebuild the
same step with jax's persistent compilation cache on (trace, lower, load the executable an
identical earlier build wrote; measured in a child process) and their ratio to the float
step's cold ``compile_s``: what a loop that rebuilds identical steps pays.

    python benchmarks/step_overhead.py --json step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import json_file, median_seconds, write_json

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


def make_step(model, rules, refresh="in_update"):
    t = jaxqp.transform(rules, refresh=refresh)
    tx = jaxqp.wrap(optax.adam(1e-3), t)
    if not any(rule.act is not None for rule in rules):
        return t, tx, make_train_step(model, t, tx)

    @jax.jit
    def step(params, opt_state, x, y):  # inputs quantized too: through jaxqp.linen_apply
        state = jaxqp.state_of(opt_state)

        def loss_fn(p):
            logits, observed = jaxqp.linen_apply(model, state, {"params": t.apply(p, state)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), observed

        (loss, observed), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state, loss

    return t, tx, step


EVERY = 100  # steps between mask refreshes of the pruning configs (fewer in a run shorter than two of them)
SEPARATE = " sep"  # a config name ending so: refresh="separate", t.refresh before each step


def with_refresh(t, step):
    """The step preceded by ``t.refresh`` (a separately compiled refresh, run when due)."""
    def refreshed_step(params, opt_state, x, y):
        return step(*t.refresh(params, opt_state), x, y)
    return refreshed_step


def refresh_every(total_steps: int) -> int:
    """Steps between refreshes: ``EVERY``, or half the run when it is shorter (``--quick``), so a refresh is timed."""
    return min(EVERY, max(total_steps // 2, 1))


def configs(total_steps: int):
    every = refresh_every(total_steps)
    schedule = jaxqp.polynomial(0.0, 0.8, begin=0, end=total_steps, every=every)
    prune = jaxqp.PruneSpec(sparsity=schedule)
    int8 = jaxqp.QuantSpec(bits=8)
    table = {
        "float32": [],
        "float32 again": [],  # a second float baseline: its ratio shows the timing noise
        "int8": [jaxqp.Rule(r".*/kernel", quant=int8)],
        "w8a8": [jaxqp.Rule(r".*/kernel", quant=int8, act=jaxqp.ActSpec(bits=8))],
        "w8a8-int": [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8, scale_pow2=True),
                                act=jaxqp.ActSpec(bits=8, symmetric=True, per_token=True, scale_pow2=True,
                                                  integer=True))],
        "pruned": [jaxqp.Rule(r".*/kernel", prune=prune)],
        "pruned+int8": [jaxqp.Rule(r".*/kernel", quant=int8, prune=prune)],
        "global90": [jaxqp.Rule(r".*/kernel", prune=jaxqp.PruneSpec(
            sparsity=jaxqp.polynomial(0.0, 0.9, begin=0, end=total_steps, every=every), scope="global"))],
        "nm2:4": [jaxqp.Rule(r".*/kernel", prune=jaxqp.PruneSpec(structure=jaxqp.NM(2, 4)))],
        "movement": [jaxqp.Rule(r".*/kernel", prune=jaxqp.PruneSpec(sparsity=schedule, criterion="movement"))],
        "rigl": [jaxqp.Rule(r".*/kernel", prune=jaxqp.PruneSpec(
            sparsity=0.8, regrow=jaxqp.RigL(every=every, drop_fraction=0.3, end=total_steps)))],
    }
    for name in ("pruned", "pruned+int8", "global90"):  # the same, refreshed apart from the step
        table[name + SEPARATE] = table[name]
    return table


def tree_bytes(tree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree))


def at_step(opt_state, step: int):
    """``opt_state`` with the transform's step counter set to ``step`` (masks and the rest unchanged)."""
    import dataclasses

    from jaxqp._transforms.state_tree import map_states

    return opt_state._replace(transform=map_states(
        opt_state.transform, lambda s: dataclasses.replace(s, step=jnp.asarray(step, jnp.int32))))


def cached_rebuilds(argv) -> dict:
    """Seconds to rebuild each config's step with jax's persistent compilation cache on: trace, lower, and load
    the executable an identical earlier build compiled (median of ``--builds`` rebuilds, in a child process
    started with ``JAX_COMPILATION_CACHE_DIR`` set to a temporary folder)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        child = subprocess.run([sys.executable, __file__, *argv, "--rebuilds-only"], env=env, capture_output=True,
                               text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=20, help="timed blocks per config")
    parser.add_argument("--builds", type=int, default=7, help="fresh builds of each step; compile_s is their median")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    parser.add_argument("--rebuilds-only", action="store_true", help=argparse.SUPPRESS)  # the child of cached_rebuilds
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.batch, args.steps, args.repeats, args.builds = 64, 2, 16, 5, 2, 1
    if not args.rebuilds_only:  # cold compiles: a persistent cache set in the environment would serve the rebuilds
        jax.config.update("jax_enable_compilation_cache", False)

    model = MLP(args.width, args.depth)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.width)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=args.batch).astype(np.int32))
    params0 = model.init(jax.random.key(0), x[:1])["params"]

    runs, paths, compile_s, extra = {}, {}, {}, {}
    param_bytes = tree_bytes(params0)
    table = configs(args.steps * args.repeats)
    every = refresh_every(args.steps * args.repeats)

    def build(name):
        """A fresh step of config ``name`` (nothing cached but dot-form choices), compiled and timed."""
        t, tx, step = make_step(model, table[name], "separate" if name.endswith(SEPARATE) else "in_update")
        opt_state = tx.init(params0)
        start = time.perf_counter()
        with record_paths() as used:  # integer layers pick their dot form when first traced
            step = step.lower(params0, opt_state, x, y).compile()  # trace, lower and compile, timed
        return time.perf_counter() - start, t, step, opt_state, used

    if args.rebuilds_only:  # in a process with jax's persistent compilation cache on (see cached_rebuilds)
        rebuilt = {}
        for name in table:
            build(name)  # the first build compiles and fills the cache
            rebuilt[name] = float(np.median([build(name)[0] for _ in range(max(args.builds, 1))]))
        print(json.dumps(rebuilt))
        return rebuilt

    builds, first_used = {name: [] for name in table}, {}
    for _ in range(args.builds - 1):  # extra builds round-robin, so drift over the process hits every config
        for name in table:
            seconds, *_, used = build(name)
            builds[name].append(seconds)
            first_used.setdefault(name, used)
    for name, rules in table.items():
        separate = name.endswith(SEPARATE)
        seconds, t, step, opt_state, used = build(name)
        params = params0
        paths[name] = sorted({entry["path"] for entry in first_used.get(name, used)})
        compile_s[name] = float(np.median([seconds, *builds[name]]))
        extra[name] = {"first_compile_s": round(builds[name][0] if builds[name] else seconds, 3)}
        if separate:  # the refresh's own trace and compile, paid once per process (steps rebuilt around it reuse it)
            due = at_step(opt_state, every - 1)  # the coming step refreshes
            start = time.perf_counter()
            jax.block_until_ready(t.refresh(params, due))  # the first refresh: trace, compile and run
            first = time.perf_counter() - start
            extra[name]["refresh_compile_s"] = round(first - median_seconds(lambda: t.refresh(params, due), 3), 3)
            step = with_refresh(t, step)
        params, opt_state, _ = jax.block_until_ready(step(params, opt_state, x, y))
        runs[name] = [step, params, opt_state, []]
        extra[name]["state_bytes_ratio"] = round(tree_bytes(jaxqp.state_of(opt_state)) / param_bytes, 4)
        if rules and any(rule.prune is not None for rule in rules):
            # one step that refreshes the masks (the new step is a multiple of `every`) against one that does not
            refreshing, plain_state = at_step(opt_state, every - 1), at_step(opt_state, every)
            refresh = median_seconds(lambda: step(params, refreshing, x, y), args.repeats)
            plain = median_seconds(lambda: step(params, plain_state, x, y), args.repeats)
            extra[name]["refresh_ratio"] = round(refresh / plain, 4)

    for _ in range(args.repeats):  # round-robin, so drift hits every config alike
        for run in runs.values():
            step, params, opt_state, times = run
            start = time.perf_counter()
            for _ in range(args.steps):
                params, opt_state, _ = step(params, opt_state, x, y)
            jax.block_until_ready(params)
            times.append((time.perf_counter() - start) / args.steps)
            run[1], run[2] = params, opt_state

    rebuilt = cached_rebuilds(argv)
    for name in runs:
        extra[name]["cached_rebuild_s"] = round(rebuilt[name], 3)
        extra[name]["cached_rebuild_ratio"] = round(rebuilt[name] / compile_s["float32"], 4)
    base = float(np.median(runs["float32"][3]))
    rows = []
    cpu = cpu_info()
    print(f"MLP {args.depth}x{args.width}, batch {args.batch}, {jax.default_backend()} "
          f"({cpu['model']}; {', '.join(cpu['flags'])}), median of {args.repeats} x {args.steps} steps")
    print(f"{'config':<16} {'step ms':>8} {'ratio':>7} {'compile s':>10} {'ratio':>7} {'rebuilt s':>10} {'ratio':>7} "
          f"{'refresh':>8} {'state':>7}")
    for name, run in runs.items():
        ms = float(np.median(run[3]))
        dots = f"  dot: {', '.join(paths[name])}" if paths[name] else ""
        compile_ratio = compile_s[name] / compile_s["float32"]
        refresh = extra[name].get("refresh_ratio")
        print(f"{name:<16} {ms * 1e3:8.2f} {ms / base:7.3f}x {compile_s[name]:10.2f} {compile_ratio:6.2f}x "
              f"{rebuilt[name]:10.2f} {extra[name]['cached_rebuild_ratio']:6.2f}x "
              f"{'' if refresh is None else f'{refresh:7.2f}x'!s:>8} {extra[name]['state_bytes_ratio']:7.3f}{dots}")
        if not name.startswith("float32"):
            rows.append({"config": name, "step_ratio": round(ms / base, 4), "step_ms": round(ms * 1e3, 3),
                         "compile_ratio": round(compile_ratio, 4), "compile_s": round(compile_s[name], 3),
                         **extra[name], "path": paths[name] or None})
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
