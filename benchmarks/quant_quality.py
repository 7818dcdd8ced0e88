"""Quantization-aware training quality and step time on MNIST-1D, every config in one run.

Trains the same 1-D CNN (3 convolutions, 2 Dense layers; same init, same batches)
float and with jaxqp QAT of weights and activations, then evaluates test
accuracy and NLL with the quantized forward, and times the train steps
round-robin against float:

* ``w8a8``: int8 per-channel weights, int8 dynamic affine inputs of every layer;
* ``w4a8`` / ``w4a4``: 4-bit weights, 8- or 4-bit inputs;
* ``w4g32``: 4-bit weights, one scale per group of 32 inputs (weights only);
* ``w4g32-lsq``: the same with LSQ-learned step sizes.

    python benchmarks/quant_quality.py --json quant_quality.json
    python benchmarks/quant_quality.py --quick       # a few steps, to check it runs
"""

from __future__ import annotations

import argparse
import platform

import jax

import jaxqp
from jaxqp import ActSpec, QuantSpec, Rule

from _common import write_json
from _mnist1d import CNN1D, Run, batches, data, time_steps


def configs() -> dict[str, list[Rule]]:
    def wa(w: QuantSpec, a: ActSpec | None = None):
        return [Rule(r".*/kernel", quant=w, act=a)]

    return {
        "float32": [],
        "w8a8": wa(QuantSpec(bits=8), ActSpec(bits=8)),
        "w4a8": wa(QuantSpec(bits=4), ActSpec(bits=8)),
        "w4a4": wa(QuantSpec(bits=4), ActSpec(bits=4)),
        "w4g32": wa(QuantSpec(bits=4, group_size=32)),
        "w4g32-lsq": wa(QuantSpec(bits=4, group_size=32, learned="lsq")),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check the script runs")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 20
    (x, y), (x_test, y_test) = data()
    model = CNN1D()
    params = model.init(jax.random.key(0), x[:1])["params"]

    runs = {}
    for name, rules in configs().items():
        runs[name] = run = Run(model, rules, params, args.lr, args.steps, learned_lr=1e-3)
        run.train(batches(x, y, args.steps, args.batch))
    xb, yb = next(batches(x, y, 1, args.batch, seed=1))
    timed = time_steps(runs, xb, yb, steps=5 if args.quick else 50, repeats=2 if args.quick else 15)

    print(f"1-D CNN on MNIST-1D, {args.steps} adam steps of {args.batch}, {jax.default_backend()} "
          f"({platform.processor() or platform.machine()}); jaxqp {jaxqp.__version__}")
    print(f"{'config':<11} {'accuracy':>9} {'test NLL':>9} {'NLL vs float':>13} {'step ratio':>11}")
    rows, base = [], None
    for name, run in runs.items():
        metrics = run.evaluate(x_test, y_test)
        base = base or metrics
        ratio = timed[name] / timed["float32"]
        rows.append({"config": name, **{k: round(v, 4) for k, v in metrics.items()},
                     "step_ratio": round(ratio, 4), "step_ms": round(timed[name] * 1e3, 3)})
        print(f"{name:<11} {100 * metrics['accuracy']:8.2f}% {metrics['nll']:9.4f} "
              f"{metrics['nll'] / base['nll'] - 1:+12.1%} {ratio:10.3f}x")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
