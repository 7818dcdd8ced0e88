"""Pruning quality, realised sparsity and step time on MNIST-1D, every config in one run.

The 1-D CNN of ``quant_quality.py`` is trained in float32 (``--pretrain`` steps);
every config then continues from it for ``--steps`` steps (float32 too), once per
seed, pruning ``conv2``, ``conv3`` and ``fc`` (the first convolution and the head
stay dense):

* ``gmp90``: gradual magnitude pruning to 90%, cubic schedule over the first 60%;
* ``nm2:4``: 2 of every 4 input weights, from the first step;
* ``filters50``: half of the convolution filters (L2 norm, with their biases),
  gradually;
* ``rigl90``: 90% from the first step, RigL drop/grow every 100 steps;
* ``pruned80+int8``: gradual 80% and int8 weights.

Sparsity is counted on the final params (exact zeros over the pruned kernels).
Step ratios are round-robin medians against float32; ``static`` is the 2:4 step
timed with masks that no longer change (the overhead of a fixed mask).

    python benchmarks/prune_quality.py --json prune_quality.json
    python benchmarks/prune_quality.py --quick
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from _common import json_file, write_json
from _mnist1d import CNN1D, Run, batches, data, format_row, summary_row, time_configs, title

import jaxqp
from jaxqp import NM, Channels, PruneSpec, QuantSpec, RigL, Rule

PRUNED = ("conv2/kernel", "conv3/kernel", "fc/kernel")


def configs(steps: int) -> dict[str, list[Rule]]:
    every = max(steps // 50, 1)

    def gradual(final: float):
        return jaxqp.polynomial(0.0, final, begin=0, end=int(0.6 * steps), every=every)

    def pruned(prune: PruneSpec, pattern=r"(conv[23]|fc)/kernel", quant=None):
        return [Rule(pattern, prune=prune, quant=quant)]

    return {
        "float32": [],
        "gmp90": pruned(PruneSpec(sparsity=gradual(0.9))),
        "nm2:4": pruned(PruneSpec(structure=NM(2, 4))),
        "filters50": pruned(PruneSpec(sparsity=gradual(0.5), structure=Channels()), pattern=r"conv[23]/kernel"),
        "rigl90": pruned(PruneSpec(sparsity=0.9, regrow=RigL(every=100, drop_fraction=0.3, end=int(0.75 * steps)))),
        "pruned80+int8": pruned(PruneSpec(sparsity=gradual(0.8)), quant=QuantSpec(bits=8)),
    }


def sparsity(params, paths) -> float:
    """Fraction of exact zeros over the kernels at ``paths``."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    arrays = [np.asarray(flat[p]) for p in paths]
    return float(sum((a == 0).sum() for a in arrays) / sum(a.size for a in arrays))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain, args.steps, args.seeds = 10, 20, 1
    (x, y), (x_test, y_test) = data(args.quick)
    model = CNN1D()
    base = Run(model, [], model.init(jax.random.key(0), x[:1])["params"], 3e-3, args.pretrain)
    base.train(batches(x, y, args.pretrain, args.batch, seed=1000), "float32 pretrain")

    results: dict[str, list[dict]] = {name: [] for name in configs(args.steps)}
    for seed in range(args.seeds):
        runs = {}
        for name, rules in configs(args.steps).items():
            runs[name] = run = Run(model, rules, base.params, 1e-3, args.steps)
            run.train(batches(x, y, args.steps, args.batch, seed=seed), f"{name} seed {seed}")
            pruned = [p for p in PRUNED if any(rule.matches(p) for rule in rules)] or list(PRUNED)
            results[name].append({**run.evaluate(x_test, y_test), "sparsity": sparsity(run.params, pruned)})
    timed = time_configs(runs, x, y, args.batch, args.quick)

    print(title(len(x), len(x_test), f"{args.pretrain} float steps, then {args.steps}", args.batch, args.seeds))
    print(f"{'config':<14} {'accuracy %':>15} {'test NLL':>17} {'sparsity':>9} {'step ratio':>11}")
    rows = []
    for name, ms in results.items():
        row = summary_row(name, ms, timed[name], timed["float32"], args.seeds)
        row["sparsity"] = round(ms[-1]["sparsity"], 4)
        rows.append(row)
        print(f"{format_row(row, 14)} {row['sparsity']:9.4f} {row['step_ratio']:10.3f}x")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
