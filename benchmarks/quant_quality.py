"""Quantization-aware training quality and step time on MNIST-1D, every config in one run.

The 1-D CNN (3 convolutions, 2 Dense layers) is first trained in float32
(``--pretrain`` steps); every config then fine-tunes that same model for ``--steps``
more steps with jaxqp QAT of weights and activations (float32 fine-tunes too, so
all rows saw the same number of steps), once per seed (``--seeds``: batch order),
and reports the mean and spread of test accuracy and NLL measured with the
quantized forward. ``--protocol scratch`` trains every config from the random
init instead (``--pretrain + --steps`` steps). Train steps are timed round-robin
against float:

* ``w8a8``: int8 per-channel weights, int8 dynamic affine inputs of every layer;
* ``w4a8`` / ``w4a4``: 4-bit per-channel weights, 8-bit inputs / 4-bit inputs with one
  range per row (per position of a convolution's input, per example of a Dense input:
  one range per batch gave 4-bit inputs 86% more NLL than float);
* ``w4g32``: 4-bit weights, one absmax scale per group of 32 inputs (weights only);
* ``w4g32-lsq``: the same with LSQ-learned steps, initialised at the groups' absmax
  (the static start) and trained with adam at ``--learned-lr``;
* ``qwix-...``: the same configs with Qwix's QAT (``qwix.quantize_model``), when installed;
* ``aqt-...``: w8a8, w4a8, w4a4 and weights-only per-channel ``aqt-w4`` with AQT v2's
  injected dot_general / conv (``aqtp``), when installed.

    python benchmarks/quant_quality.py --json quant_quality.json
    python benchmarks/quant_quality.py --quick       # a few steps, to check it runs
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from _common import json_file, write_json
from _mnist1d import CNN1D, Run, batches, data, format_row, summary_row, time_configs, title
from _peers import aqt_models, qwix_models

from jaxqp import ActSpec, QuantSpec, Rule


def configs() -> dict[str, list[Rule]]:
    def wa(w: QuantSpec, a: ActSpec | None = None):
        return [Rule(r".*/kernel", quant=w, act=a)]

    return {
        "float32": [],
        "w8a8": wa(QuantSpec(bits=8), ActSpec(bits=8)),
        "w4a8": wa(QuantSpec(bits=4), ActSpec(bits=8)),
        "w4a4": wa(QuantSpec(bits=4), ActSpec(bits=4, per_token=True)),
        "w4g32": wa(QuantSpec(bits=4, group_size=32)),
        "w4g32-lsq": wa(QuantSpec(bits=4, group_size=32, learned="lsq", calibration="percentile", percentile=100)),
    }


def unchanged_kernels(start, params) -> list[str]:
    """Layers whose kernel QAT left exactly as it started (no gradient reached it)."""
    return [name for name in start if np.array_equal(np.asarray(start[name]["kernel"]),
                                                      np.asarray(params[name]["kernel"]))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain", type=int, default=2000, help="float32 steps before QAT")
    parser.add_argument("--steps", type=int, default=1000, help="QAT steps per config and seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--learned-lr", type=float, default=3e-6, help="adam lr of LSQ steps")
    parser.add_argument("--protocol", choices=["finetune", "scratch"], default="finetune")
    parser.add_argument("--quick", action="store_true", help="a few steps, to check the script runs")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain, args.steps, args.seeds = 10, 10, 1
    (x, y), (x_test, y_test) = data(args.quick)
    model = CNN1D()
    params = model.init(jax.random.key(0), x[:1])["params"]
    if args.protocol == "finetune":
        base = Run(model, [], params, 3e-3, args.pretrain)
        base.train(batches(x, y, args.pretrain, args.batch, seed=1000), "float32 pretrain")
        start, lr, steps = base.params, 1e-3, args.steps
    else:
        start, lr, steps = params, 3e-3, args.pretrain + args.steps

    setups = {name: (model, rules) for name, rules in configs().items()}
    setups.update({name: (peer, []) for name, peer in {**qwix_models(model), **aqt_models()}.items()})
    metrics: dict[str, list[dict]] = {name: [] for name in setups}
    failed: dict[str, str] = {}
    for seed in range(args.seeds):
        runs = {}
        for name, (net, rules) in setups.items():
            if name in failed:
                continue
            try:
                runs[name] = run = Run(net, rules, start, lr, steps, learned_lr=args.learned_lr)
                run.train(batches(x, y, steps, args.batch, seed=seed), f"{name} seed {seed}")
                metrics[name].append({**run.evaluate(x_test, y_test), "frozen": unchanged_kernels(start, run.params)})
            except Exception as err:  # a peer that does not compile or run here: report it, go on
                failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                runs.pop(name, None)
    timed = time_configs(runs, x, y, args.batch, args.quick)

    schedule = f"{args.pretrain} float steps, then {steps}" if args.protocol == "finetune" else f"{steps}"
    print(title(len(x), len(x_test), f"{args.protocol}: {schedule}", args.batch, args.seeds))
    print(f"{'config':<11} {'accuracy %':>15} {'test NLL':>17} {'NLL vs float':>13} {'step ratio':>11}")
    rows, base_nll = [], None
    for name, ms in metrics.items():
        if name in failed:
            print(f"{name:<11} failed: {failed[name]}")
            rows.append({"config": name, "error": failed[name]})
            continue
        row = summary_row(name, ms, timed[name], timed["float32"], args.seeds)
        row["untrained_kernels"] = ms[-1]["frozen"]
        base_nll = base_nll or row["nll"]
        rows.append(row)
        frozen = row["untrained_kernels"]
        untrained = f"  kernels never updated: {', '.join(frozen)}" if frozen else ""
        print(f"{format_row(row, 11)} {row['nll'] / base_nll - 1:+12.1%} {row['step_ratio']:10.3f}x{untrained}")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
