"""Allocated bits and sparsity against uniform settings at the same stored bytes, after the same fine-tuning.

Two models: the 1-D CNN on MNIST-1D of ``quant_quality.py`` and the character-level
NNX transformer of ``examples/nnx_transformer_text.py`` (on the source of 15 standard-library
modules, 560k characters, instead of the example's 43k, which it memorises). Each is trained in float32
(``--pretrain`` steps), then ``jaxqp.choose.sensitivity`` sweeps every kernel with every
candidate on calibration batches from a validation split held out of the training data
(timed, compiles included; with the HAWQ-v2 proxy and its Spearman rank correlation). Both
models fit their training data closely, so deltas measured on training batches miss what
compression costs on unseen data; a validation split is what a researcher would use. The budgets are the stored
bytes of four uniform settings: w4 per channel, w3, w2g32 and 80% sparse + int8.
At each budget, the uniform setting and ``jaxqp.choose.allocate``'s choice (never more
bytes) are fine-tuned with the same protocol as ``quant_quality.py`` (``--steps`` adam
steps, cosine from 1e-3, one seed per batch order) and evaluated on held-out data
with the compressed weights. Rows: ``{model, budget, method, bytes, nll,
accuracy_or_bpb, seed_std, ...}``.

    python benchmarks/allocate.py --json allocate.json
    python benchmarks/allocate.py --quick       # a few steps, to check it runs
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import json_file, write_json
from _mnist1d import CNN1D, batches, data
from tqdm.auto import tqdm

import jaxqp
from jaxqp.choose import allocate, sensitivity

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import nnx_transformer_text as lm

Q, P = jaxqp.QuantSpec, jaxqp.PruneSpec
CANDIDATES = {
    "w8": Q(bits=8), "w4": Q(bits=4), "w3": Q(bits=3), "w2": Q(bits=2),
    "w4g32": Q(bits=4, group_size=32), "w3g32": Q(bits=3, group_size=32), "w2g32": Q(bits=2, group_size=32),
    "w8+s50": (Q(bits=8), P(sparsity=0.5)), "w8+s80": (Q(bits=8), P(sparsity=0.8)),
    "w8+s90": (Q(bits=8), P(sparsity=0.9)), "w4+s50": (Q(bits=4), P(sparsity=0.5)),
    "w4+s75": (Q(bits=4), P(sparsity=0.75)), "w4+nm2:4": (Q(bits=4), P(structure=jaxqp.NM(2, 4))),
}
BUDGETS = ("w4", "w3", "w2g32", "w8+s80")  # uniform settings whose bytes are the budgets


class Task:
    """A model, its data, its loss and its held-out evaluation."""

    name: str
    params: object

    def loss(self, params, batch):
        raise NotImplementedError

    def train_batches(self, steps: int, seed: int):
        raise NotImplementedError

    def calibration(self, count: int) -> list:
        raise NotImplementedError

    def evaluate(self, params) -> tuple[float, float]:
        raise NotImplementedError


class CNNTask(Task):
    name, metric = "cnn-mnist1d", "accuracy"

    def __init__(self, quick: bool, batch: int):
        (x, y), (self.x_test, self.y_test) = data(quick)
        held = len(x) // 10  # the validation split: calibration only, never trained on
        self.x, self.y, self.x_val, self.y_val = x[:-held], y[:-held], x[-held:], y[-held:]
        self.model, self.batch = CNN1D(), batch
        self.params = self.model.init(jax.random.key(0), self.x[:1])["params"]

    def logits(self, params, x):
        return self.model.apply({"params": params}, x)

    def loss(self, params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self.logits(params, x), y).mean()

    def train_batches(self, steps, seed):
        return batches(self.x, self.y, steps, self.batch, seed=seed)

    def calibration(self, count):
        return list(batches(self.x_val, self.y_val, count, self.batch, seed=2000))

    def evaluate(self, params):
        logits = jax.jit(self.logits)(params, self.x_test)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, self.y_test).mean()
        return float(nll), 100 * float(jnp.mean(jnp.argmax(logits, -1) == self.y_test))


class LMTask(Task):
    name, metric = "transformer-text", "bpb"

    def __init__(self, quick: bool, batch: int):
        from flax import nnx

        ids, vocab = source_text()
        tenth = len(ids) // 10  # 80% training, 10% validation (the sweep's calibration), 10% test
        self.train_ids, self.val_ids, self.test_ids = ids[:-2 * tenth], ids[-2 * tenth:-tenth], ids[-tenth:]
        self.graphdef, self.params, self.rest = nnx.split(lm.CharLM(vocab, nnx.Rngs(0)), nnx.Param, ...)
        self.batch, self.merge = batch, nnx.merge
        self.test = lm.windows(self.test_ids, np.random.default_rng(1), 64 if quick else 256)

    def logits(self, params, tokens):
        return self.merge(self.graphdef, params, self.rest)(tokens)

    def loss(self, params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self.logits(params, x), y).mean()

    def train_batches(self, steps, seed):
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            yield lm.windows(self.train_ids, rng, self.batch)

    def calibration(self, count):
        rng = np.random.default_rng(2000)
        return [lm.windows(self.val_ids, rng, self.batch) for _ in range(count)]

    def evaluate(self, params):
        nll = float(jax.jit(self.loss)(params, self.test))
        return nll, nll / math.log(2)


SOURCES = ("textwrap", "json.decoder", "json.encoder", "string", "difflib", "heapq", "bisect", "fractions",
           "statistics", "calendar", "shlex", "argparse", "dataclasses", "functools", "enum")


def source_text():
    """The ASCII source of some standard-library modules as character ids (560k characters), and the vocab size.

    The example's three modules (43k characters) are memorised after a few thousand steps: then
    held-out NLL measures how much compression regularises, not what it costs.
    """
    import importlib
    import inspect

    text = "".join(inspect.getsource(importlib.import_module(m)) for m in SOURCES)
    text = "".join(c for c in text if ord(c) < 128)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.array([index[c] for c in text], np.int32), len(vocab)


def train(task: Task, params, rules, steps: int, lr: float, seed: int, label: str):
    """``steps`` adam steps (cosine from ``lr``) under ``rules``; returns the params and the jaxqp state."""
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(optax.cosine_decay_schedule(lr, steps)), t)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        state = jaxqp.state_of(opt_state)
        grads = jax.grad(lambda p: task.loss(t.apply(p, state), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for batch in tqdm(task.train_batches(steps, seed), total=steps, desc=label, disable=None, leave=False):
        params, opt_state = step(params, opt_state, batch)
    state = jaxqp.state_of(opt_state)
    return params, state, t


def run_task(task: Task, args) -> tuple[list[dict], dict]:
    params, _, _ = train(task, task.params, [], args.pretrain, 3e-3, 1000, f"{task.name} float pretrain")
    calib = task.calibration(args.calib)
    jax.block_until_ready(params)
    start = time.perf_counter()
    sens = sensitivity(task.loss, params, calib, CANDIDATES, proxy_samples=8)
    sweep_s = time.perf_counter() - start
    print(sens)
    print(f"{task.name}: sweep {sens.seconds:.1f} s + proxy {sens.proxy_seconds:.1f} s "
          f"= {sweep_s:.1f} s with compiles and byte counts")

    setups = {"float32": ("none", [], None)}
    choices = {}
    for budget in BUDGETS:
        size, _ = sens.uniform(budget)
        chosen = allocate(sens, size)
        choices[budget] = chosen.choice
        setups[f"uniform {budget}"] = (budget, [sens.candidates[sens.names.index(budget)].rule(p)
                                                for p in sens.layers], size)
        setups[f"allocated {budget}"] = (budget, list(chosen.rules), size)
    rows = []
    for label, (budget, rules, size) in setups.items():
        per_seed = []
        for seed in range(args.seeds):
            tuned, state, t = train(task, params, rules, args.steps, 1e-3, seed, f"{task.name} {label} seed {seed}")
            nll, metric = task.evaluate(t.apply(tuned, state))
            stored = jaxqp.summary(tuned, state).bytes_compressed
            per_seed.append((nll, metric, stored))
        nlls = np.array([r[0] for r in per_seed])
        stored = per_seed[-1][2]
        if size is not None and stored > size:
            raise AssertionError(f"{label}: {stored} bytes exceed the budget {size}")
        rows.append({"model": task.name, "budget": budget, "method": label.split()[0], "bytes": stored,
                     "budget_bytes": size, "nll": round(float(nlls.mean()), 5),
                     "accuracy_or_bpb": round(float(np.mean([r[1] for r in per_seed])), 4),
                     "metric": task.metric, "seed_std": round(float(nlls.std()), 5),
                     "nll_per_seed": [round(float(v), 5) for v in nlls]})
    info = {"model": task.name, "sweep_seconds": round(sweep_s, 2), "measure_seconds": round(sens.seconds, 2),
            "proxy_seconds": round(sens.proxy_seconds, 2), "spearman": sens.spearman(),
            "layers": len(sens.layers), "candidates": len(sens.names), "choices": choices}
    return rows, info


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<17} {'budget':<8} {'method':<10} {'kB':>8} {'NLL (std)':>18} {'acc % / bpb':>12}")
    for r in rows:
        print(f"{r['model']:<17} {r['budget']:<8} {r['method']:<10} {r['bytes'] / 1e3:8.2f} "
              f"{r['nll']:9.4f} ({r['seed_std']:.4f}) {r['accuracy_or_bpb']:12.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain", type=int, default=2000, help="float32 steps before the sweep")
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps per setting and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--calib", type=int, default=8, help="calibration batches of the sweep")
    parser.add_argument("--models", default="cnn,transformer")
    parser.add_argument("--quick", action="store_true", help="a few steps, to check the script runs")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain, args.steps, args.seeds, args.calib = 20, 5, 1, 2
    tasks = {"cnn": lambda: CNNTask(args.quick, 128), "transformer": lambda: LMTask(args.quick, lm.BATCH)}
    rows, infos = [], []
    for name in args.models.split(","):
        task_rows, info = run_task(tasks[name](), args)
        rows += task_rows
        infos.append(info)
    print(f"{args.pretrain} float steps, then {args.steps} fine-tuning steps per setting, {args.seeds} seeds; "
          f"{jax.default_backend()} ({platform.processor() or platform.machine()}), jaxqp {jaxqp.__version__}")
    print_table(rows)
    for info in infos:
        rho = info["spearman"].get("all", float("nan"))
        print(f"{info['model']}: sweep of {info['layers']} layers x {info['candidates']} candidates "
              f"{info['sweep_seconds']:.1f} s; proxy Spearman (all cells) {rho:.2f}")
    write_json(args.json, {"rows": rows, "sweeps": infos})
    return rows, infos


if __name__ == "__main__":
    main()
