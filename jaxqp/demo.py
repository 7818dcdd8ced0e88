"""The main job: train one small Flax model four ways and compare (tools layer).

``python -m jaxqp.demo`` trains an MLP on scikit-learn's digits (shipped with
the package, no download) as float32, with int8 per-channel weights, 80%
magnitude-pruned on a polynomial schedule, and pruned + int8; then prints
accuracy, test NLL, achieved sparsity and bytes. Finally it exports the
pruned + int8 model, saves it, loads it back and serves it jit-compiled,
printing the file size, the served memory and the serving latency next to float's. ``--json
FILE`` writes the table as a list of rows; ``--quick`` trains briefly (for CI). ``--plots DIR``
also measures each layer's sensitivity (``jaxqp.choose``) on the float model and writes a
heatmap of it and a chart of test NLL against stored bytes, uniform against allocated, as PNGs.

Example:
    $ python -m jaxqp.demo --json demo.json --plots plots
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxqp
from jaxqp._export.atomic import check_writable, replaced_atomically

HIDDEN = (320, 160)  # kernel sizes 64*320, 320*160, 160*10 are multiples of 5: 80% is exact
BATCH = 64
SPARSITY = 0.8


class MLP(nn.Module):
    """64 -> 320 -> 160 -> 10 with ReLU."""

    @nn.compact
    def __call__(self, x):
        for width in HIDDEN:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


def load_digits(seed: int = 0):
    """scikit-learn's 8x8 digits, scaled to [0, 1], split 80/20 with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:  # pragma: no cover - exercised only without the extra
        sys.exit("the demo needs scikit-learn: pip install 'jaxqp[examples]'")
    images, labels = sk_load_digits(return_X_y=True)
    x = (np.asarray(images) / 16.0).astype(np.float32)
    y = np.asarray(labels).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return (x[train], y[train]), (x[test], y[test])


def configs(steps: int) -> dict[str, list[jaxqp.Rule]]:
    """The four rule sets the demo compares."""
    schedule = jaxqp.polynomial(0.0, SPARSITY, begin=steps // 6, end=2 * steps // 3, every=max(steps // 30, 1))
    int8 = jaxqp.QuantSpec(bits=8)
    prune = jaxqp.PruneSpec(sparsity=schedule)
    return {
        "float32": [],
        "int8": [jaxqp.Rule(r".*/kernel", quant=int8)],
        "pruned": [jaxqp.Rule(r".*/kernel", prune=prune)],
        "pruned+int8": [jaxqp.Rule(r".*/kernel", quant=int8, prune=prune)],
    }


def progress_bar(total: int, name: str):
    """A tqdm bar on stderr, drawn only on a terminal (``disable=None``): logs stay clean."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - exercised only without the extra
        sys.exit("the demo needs tqdm: pip install 'jaxqp[examples]'")
    return tqdm(total=total, desc=f"{name:>12}", unit="step", disable=None, leave=True, file=sys.stderr)


def make_train_step(model: nn.Module, t: jaxqp.ParamTransform, tx):
    """The jitted classification step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    One ``grad`` through ``t.apply`` and one ``tx.update`` (``tx = jaxqp.wrap(...)``).
    """

    @jax.jit
    def step(params, opt_state, x, y):
        state = jaxqp.state_of(opt_state)

        def loss_fn(p):
            logits = jnp.asarray(model.apply({"params": t.apply(p, state)}, x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train(rules, data, steps: int, seed: int = 0, name: str = ""):
    """Trains the MLP under ``rules``; returns ``(params, transform, transform_state)``."""
    (x_train, y_train), _ = data
    model = MLP()
    params = model.init(jax.random.key(seed), x_train[:1])["params"]
    t = jaxqp.transform(rules)  # no rules: the float baseline, same code path
    tx = jaxqp.wrap(optax.adam(2e-3), t)
    opt_state = tx.init(params)

    step = make_train_step(model, t, tx)

    rng = np.random.default_rng(seed)
    start = time.time()
    order = np.array([], np.int64)
    every = max(steps // 50, 1)
    with progress_bar(steps, name) as bar:
        for i in range(steps):
            if len(order) < BATCH:
                order = np.concatenate([order, rng.permutation(len(x_train))])
            batch, order = order[:BATCH], order[BATCH:]
            params, opt_state, loss = step(params, opt_state, x_train[batch], y_train[batch])
            if (i + 1) % every == 0 or i + 1 == steps:
                bar.update(i + 1 - bar.n)
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        if bar.disable:  # not a terminal: a log file gets the final line only
            print(f"{name:>12} {steps}/{steps} steps, loss {float(loss):.4f}, {time.time() - start:.1f}s",
                  file=sys.stderr)
    return params, t, jaxqp.state_of(opt_state)


def evaluate(params, t, state, data) -> tuple[float, float]:
    """Test accuracy (percent) and mean negative log-likelihood of the served weights."""
    _, (x_test, y_test) = data
    logits = jnp.asarray(MLP().apply({"params": t.apply(params, state)}, x_test))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
    accuracy = 100.0 * jnp.mean(jnp.argmax(logits, -1) == y_test)
    return float(accuracy), float(nll)


def pruned_entries_exactly_zero(params, t, state) -> bool:
    """True if every masked entry is exactly 0.0 in ``params`` and in ``t.apply(params, state)``."""
    masks = t.masks(state)
    applied = t.apply(params, state)
    for path, mask in masks.items():
        layer, name = path.split("/")
        off = ~np.asarray(mask)
        if not (np.all(np.asarray(params[layer][name])[off] == 0.0)
                and np.all(np.asarray(applied[layer][name])[off] == 0.0)):
            return False
    return True


def kernel_sparsity(params) -> float:
    """Fraction of exactly-zero entries over all kernels, measured on the params."""
    kernels = [np.asarray(v["kernel"]) for v in params.values()]
    return float(sum(int(np.sum(k == 0.0)) for k in kernels) / sum(k.size for k in kernels))


def _median_ms(calls: dict, rounds: int = 500) -> dict:
    """Median milliseconds per call of each ``name: (fn, args)``, timed alternately."""
    times = {name: [] for name in calls}
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def deploy(params, t, state, data) -> dict:
    """Export, save, load and serve the trained model; returns what it measured."""
    _, (x_test, y_test) = data
    with tempfile.TemporaryDirectory() as tmp:
        float_path, path = os.path.join(tmp, "float.jaxqp"), os.path.join(tmp, "model.jaxqp")
        jaxqp.save(float_path, params)
        jaxqp.save(path, jaxqp.export(params, state))
        loaded = jaxqp.load(path)
        sizes = os.path.getsize(float_path), os.path.getsize(path)
    if not bool(jnp.all(jaxqp.dequantize(loaded)["Dense_1"]["kernel"] == t.apply(params, state)["Dense_1"]["kernel"])):
        raise AssertionError("the loaded export does not decode to the trained forward's weights")
    served = jaxqp.prepare(loaded)
    serve = jax.jit(jaxqp.linen_serving_apply(MLP()))
    float_apply = jax.jit(lambda p, x: MLP().apply({"params": p}, x))
    logits = serve(served, x_test)
    x1 = x_test[:1]
    speed = jaxqp.prepare(loaded, keep_float=True)  # the speed objective: a float copy next to the codes
    serve(served, x1)  # traces one image: each layer's path is measured and chosen here
    ms = _median_ms({"float": (float_apply, (params, x1)), "served": (serve, (served, x1)),
                     "keep_float": (serve, (speed, x1))})
    report = jaxqp.serving.describe(served)
    paths = sorted({path for row in report.rows for bucket, path in row["paths"].items() if bucket == 1})
    return {
        "file_bytes_float": sizes[0], "file_bytes": sizes[1],
        "accuracy": float(100.0 * jnp.mean(jnp.argmax(logits, -1) == y_test)),
        "ms_float": ms["float"], "ms_served": ms["served"], "ms_keep_float": ms["keep_float"],
        "keep_float_bytes": jaxqp.serving.describe(speed).served_bytes,
        "served_bytes": report.served_bytes, "served_bytes_float": _tree_bytes(params),
        "paths": paths,
    }


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def run(steps: int, seed: int = 0, data=None) -> tuple[list[dict], dict, Any]:
    """Trains every config; returns the table rows, what :func:`deploy` measured for pruned+int8 and the
    float32 params."""
    data = load_digits(seed) if data is None else data
    rows, deployed, float_params = [], {}, {}
    for name, rules in configs(steps).items():
        params, t, state = train(rules, data, steps, seed, name)
        float_params = params if name == "float32" else float_params
        accuracy, nll = evaluate(params, t, state, data)
        if not pruned_entries_exactly_zero(params, t, state):
            raise AssertionError(f"{name}: a pruned weight is not exactly 0.0")
        table = jaxqp.summary(params, state)
        rows.append({
            "config": name,
            "accuracy": round(accuracy, 2),
            "nll": round(nll, 4),
            "sparsity": round(kernel_sparsity(params), 4),
            "bytes_float": table.bytes_float,
            "bytes_compressed": table.bytes_compressed,
        })
        if name == "pruned+int8":
            print(f"\nper-layer summary of {name}:\n{table}\n")
            deployed = deploy(params, t, state, data)
    return rows, deployed, float_params


PLOT_CANDIDATES = {  # what the demo's sensitivity sweep tries on each layer
    "w8": jaxqp.QuantSpec(bits=8), "w4": jaxqp.QuantSpec(bits=4), "w3": jaxqp.QuantSpec(bits=3),
    "w2": jaxqp.QuantSpec(bits=2), "w2g32": jaxqp.QuantSpec(bits=2, group_size=32),
    "w8+s80": (jaxqp.QuantSpec(bits=8), jaxqp.PruneSpec(sparsity=0.8)),
    "w8+s90": (jaxqp.QuantSpec(bits=8), jaxqp.PruneSpec(sparsity=0.9)),
    "w4+s90": (jaxqp.QuantSpec(bits=4), jaxqp.PruneSpec(sparsity=0.9)),
    "w4+s75": (jaxqp.QuantSpec(bits=4), jaxqp.PruneSpec(sparsity=0.75)),
    "w4+nm2:4": (jaxqp.QuantSpec(bits=4), jaxqp.PruneSpec(structure=jaxqp.NM(2, 4))),
}


def plots(params, data, out_dir: str) -> dict:
    """Sensitivity of the float model, and test NLL against bytes for uniform and allocated settings.

    No fine-tuning here (``benchmarks/allocate.py`` fine-tunes): each setting compresses the trained
    float weights once. Writes ``sensitivity.png`` and ``pareto.png`` to ``out_dir``; returns the points.
    """
    (x_train, y_train), (x_test, y_test) = data
    def loss(p, batch):
        logits = jnp.asarray(MLP().apply({"params": p}, batch[0]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    calib = [(x_train[i:i + 256], y_train[i:i + 256]) for i in range(0, 1024, 256)]
    s = jaxqp.choose.sensitivity(loss, params, calib, PLOT_CANDIDATES)
    test_nll = jax.jit(lambda p: loss(p, (x_test, y_test)))

    def nll_of(rules) -> float:
        t = jaxqp.transform(rules)
        return float(test_nll(t.apply(params, t.init(params))))

    points: dict[str, list] = {"uniform": [], "allocated": []}
    budgets = ["w4", "w3", "w2g32", "w8+s80", "w4+s75", "w8+s90"]
    front = None
    for name in budgets:
        size, _ = s.uniform(name)
        points["uniform"].append((size, nll_of([s.candidates[s.names.index(name)].rule(p) for p in s.layers])))
        chosen = jaxqp.choose.allocate(s, size)
        points["allocated"].append((chosen.bytes, nll_of(list(chosen.rules))))
        front = chosen.front
    os.makedirs(out_dir, exist_ok=True)
    heat = jaxqp.choose.plot_sensitivity(s, os.path.join(out_dir, "sensitivity.png"))
    pareto = jaxqp.choose.plot_pareto(points, os.path.join(out_dir, "pareto.png"), ylabel="test NLL",
                                      base=float(test_nll(params)), front=front,
                                      labels={"uniform": budgets})
    return {"files": [heat, pareto], "points": points, "spearman": s.spearman().get("all")}


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    head = ["config", "accuracy %", "test NLL", "sparsity", "float bytes", "compressed bytes", "ratio"]
    cells = [[r["config"], f"{r['accuracy']:.2f}", f"{r['nll']:.4f}", f"{r['sparsity']:.4f}",
              str(r["bytes_float"]), str(r["bytes_compressed"]), f"{r['bytes_compressed'] / r['bytes_float']:.3f}x"]
             for r in rows]
    widths = [max(len(c[i]) for c in [head] + cells) for i in range(len(head))]
    fmt = lambda c: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(c) for c in cells])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxqp.demo", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps per config (default 1500)")
    parser.add_argument("--quick", action="store_true", help="train 150 steps per config (for CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the table to FILE as JSON")
    parser.add_argument("--plots", metavar="DIR", help="also write sensitivity.png and pareto.png to DIR")
    args = parser.parse_args(argv)
    steps = 150 if args.quick else args.steps
    if steps < 30:
        parser.error("--steps must be at least 30")
    if args.json:  # refused before training, not after
        try:
            check_writable("--json", args.json, ".json")
        except ValueError as err:
            parser.error(str(err))
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        parser.error(f"--plots: {args.plots!r} is a file; give a folder for sensitivity.png and pareto.png")
    backend = jax.default_backend()
    print(f"jaxqp {jaxqp.__version__} demo: MLP on sklearn digits, {steps} steps per config, backend {backend}")
    data = load_digits(args.seed)
    rows, deployed, float_params = run(steps, args.seed, data)
    print(format_table(rows))
    print("pruned weights exactly 0.0 in params and in t.apply(params, state): yes")
    d = deployed
    print("\ndeployed pruned+int8: export -> save -> load -> jit serve")
    print(f"  file size      {d['file_bytes']} bytes vs float32 {d['file_bytes_float']} "
          f"({d['file_bytes'] / d['file_bytes_float']:.3f}x)")
    print(f"  test accuracy  {d['accuracy']:.2f}% served from the loaded file")
    print(f"  served memory  {d['served_bytes']} bytes vs float32 {d['served_bytes_float']} "
          f"({d['served_bytes'] / d['served_bytes_float']:.3f}x: int8 codes and scales, biases in float)")
    print(f"  latency        {d['ms_served']:.3f} ms vs float32 {d['ms_float']:.3f} ms for one image "
          f"({d['ms_served'] / d['ms_float']:.2f}x; paths measured fastest here: {', '.join(d['paths'])})")
    keep = d["ms_keep_float"] / d["ms_float"]
    verdict = ("keeping a float copy reaches float speed here" if keep <= 1.0 else
               "slower than float too: layers this small cost more in per-op overhead than in arithmetic")
    print(f"  keep_float     {d['ms_keep_float']:.3f} ms ({keep:.2f}x) in {d['keep_float_bytes']} bytes "
          f"({d['keep_float_bytes'] / d['served_bytes_float']:.3f}x): {verdict}")
    if args.plots:
        drawn = plots(float_params, data, args.plots)
        print(f"\nbits and sparsity per layer (jaxqp.choose), test NLL without fine-tuning; proxy Spearman "
              f"{drawn['spearman']:.2f}")
        for (size, uniform), (chosen, allocated) in zip(drawn["points"]["uniform"], drawn["points"]["allocated"]):
            print(f"  budget {size:6d} bytes: uniform NLL {uniform:.4f}, allocated ({chosen} bytes) {allocated:.4f}")
        print(f"wrote {', '.join(drawn['files'])}")
    if args.json:
        with replaced_atomically(args.json) as tmp, open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
