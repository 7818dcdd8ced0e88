"""Serving latency and stored bytes: float vs jaxqp's exported models, in one process.

Latency: a jitted forward pass of (a) a 2-layer 4096-wide MLP, (b) a small transformer
block (d_model 512, 8 heads, MLP 2048, 16 tokens per sequence; its attention projections
are `DenseGeneral` layers, served from codes with ``prepare(..., dense_general=True)``) and
(c) a byte-level transformer language model (d_model 128, 4 heads, MLP 512, 2 blocks,
vocabulary 256, 64 tokens) and (d) the MLP of (a) as an Equinox model (``eqx_mlp``, int8 and
int4, served with ``jaxqp.serving.equinox_serving_model`` under ``jax.vmap``; when equinox is
installed), at batch 1, 2, 8, 32 and 256, for float32 and for the jaxqp
int8, int4, 2:4 + int8 and 90%-sparse + int8 exports of every Dense, DenseGeneral and Embed
weight (``jaxqp.prepare`` + ``jaxqp.linen_serving_apply``), and, when Qwix is installed,
Qwix's int8 PTQ model (``qwix-ptq-int8``). Each matmul takes the path ``prepare`` measured
fastest on this machine for its shape and row bucket; the ``path`` key counts the matmuls
of each cell by path. For the language model, ``int8+keep_float`` also keeps a float copy
of each weight (the speed objective). Each cell is the median over interleaved repeats,
divided by the float median of the same cell.

Memory: ``served_bytes_ratio``, the bytes of every array in the prepared tree (codes,
scales, kept float copies, float leaves), divided by the bytes of the float32 params.

Bytes: the saved file (``jaxqp.save``) of each export of the MLP, divided by the
saved float32 file.

With ``--pins``, every config is also timed with all its matmuls pinned to each path of
``jaxqp.serving.PATHS`` (int8, kernel-first int8, bf16, float with decoded weights): the keys
``pinned`` (ratio per path) and ``best_pinned`` say what the best single path reaches on this
machine, so a cell above 1.0x can be told apart from a wrong choice.

The first JSON row records the machine: CPU model, flags (avx512_vnni, avx_vnni,
avx512_bf16, amx), backend and jax version.

    python benchmarks/serving.py --json serving.json
    python benchmarks/serving.py --models equinox    # one model (mlp, transformer, lm, equinox)
    python benchmarks/serving.py --models transformer,lm --pins  # also every path pinned, per cell
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _common import json_file, write_json

import jaxqp
from jaxqp.numerics._path_choice import cpu_info, machine_key, record_paths, row_bucket
from jaxqp.serving import PATHS


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width)(nn.relu(nn.Dense(self.width)(x)))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention and a 4x MLP, both residual."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.d_model)(h)
        return x + nn.Dense(self.d_model)(nn.gelu(h))


class TinyLM(nn.Module):
    """Byte-level transformer LM: embedding, ``blocks`` pre-norm blocks, a Dense head."""

    d_model: int = 128
    heads: int = 4
    blocks: int = 2
    vocab: int = 256

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model)(tokens)
        for _ in range(self.blocks):
            x = Block(self.d_model, self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def tree_bytes(tree) -> int:
    """Bytes of every array in ``tree`` (containers' codes, scales and carriers included)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def exports(params):
    """The export configs: name -> rules."""
    kernel = r".*/(kernel|embedding)"  # every Dense, DenseGeneral and Embed weight
    return {
        "int8": [jaxqp.Rule(kernel, quant=jaxqp.QuantSpec(bits=8))],
        "int4": [jaxqp.Rule(kernel, quant=jaxqp.QuantSpec(bits=4))],
        "nm2:4+int8": [
            jaxqp.Rule(kernel, quant=jaxqp.QuantSpec(bits=8), prune=jaxqp.PruneSpec(structure=jaxqp.NM(2, 4)))
        ],
        "sparse90+int8": [jaxqp.Rule(kernel, quant=jaxqp.QuantSpec(bits=8), prune=jaxqp.PruneSpec(sparsity=0.9))],
    }


def export_tree(params, rules):
    t = jaxqp.transform(rules)
    return jaxqp.export(params, t.init(params))


def time_calls(fns: dict, args: dict, repeats: int, calls: int) -> dict:
    """Median seconds per call of each fn, timed round-robin."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # compile
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(*args[name])
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(t)) for name, t in times.items()}


def qwix_ptq(model, params, x):
    """``(apply, params)`` of Qwix's int8 PTQ (weights and dynamic inputs), or None without Qwix."""
    try:
        import qwix
    except ImportError:
        return None
    rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)
    quantized = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(quantized.init, jax.random.key(0), x)["params"]
    return jax.jit(lambda p, x: quantized.apply({"params": p}, x)), qwix.quantize_params(params, abstract)


def path_counts(used) -> dict:
    """How many matmuls of a traced forward pass took each path."""
    counts: dict = {}
    for entry in used:
        counts[entry["path"]] = counts.get(entry["path"], 0) + 1
    return dict(sorted(counts.items()))


def latency_rows(model_name, model, params, make_input, batches, configs, repeats, calls, keep_float=(),
                 pins=False):
    float_apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    exported = {name: export_tree(params, rules) for name, rules in configs.items()}
    options = {name: {} for name in configs}
    for name in keep_float:  # the speed objective: a float copy of each weight next to its codes
        options[f"{name}+keep_float"] = {"keep_float": True}
    served = {name: jaxqp.prepare(exported[name.split("+keep")[0]], dense_general=True, **opts)
              for name, opts in options.items()}
    # with --pins: every config again with each kernel pinned to one path (what the best one path reaches)
    pinned = {(name, pin): jaxqp.prepare(exported[name.split("+keep")[0]], dense_general=True, path=pin, **opts)
              for name, opts in options.items() for pin in PATHS} if pins else {}
    memory = {name: tree_bytes(tree) / tree_bytes(params) for name, tree in served.items()}
    print(f"{model_name:<12} served bytes / float params: "
          + " | ".join(f"{name} {ratio:.3f}x" for name, ratio in memory.items()), flush=True)
    apply = jaxqp.linen_serving_apply(model)
    serve = jax.jit(apply)
    peer = qwix_ptq(model, params, make_input(batches[0]))
    rows = []
    for batch in batches:
        x = make_input(batch)
        fns = {"float32": float_apply, **{name: serve for name in served}}
        args = {"float32": (params, x), **{name: (tree, x) for name, tree in served.items()}}
        fns.update({key: serve for key in pinned})
        args.update({key: (tree, x) for key, tree in pinned.items()})
        if peer is not None:
            fns["qwix-ptq-int8"], args["qwix-ptq-int8"] = peer[0], (peer[1], x)
        paths = {}
        for name, tree in served.items():  # trace (measuring paths) before timing; jit's cache would hide them
            with record_paths() as used:
                jax.eval_shape(lambda tree, x: apply(tree, x), tree, x)  # a new function: never a cached trace
            paths[name] = path_counts(used)
        t = time_calls(fns, args, repeats, calls)
        cells = []
        for name in [n for n in fns if n != "float32" and not isinstance(n, tuple)]:
            by_pin = {pin: round(t[(name, pin)] / t["float32"], 4) for pin in PATHS if (name, pin) in t}
            best = {"pinned": by_pin, "best_pinned": min(by_pin, key=by_pin.get)} if by_pin else {}
            rows.append({"model": model_name, "batch": batch, "config": name,
                         "latency_ratio": round(t[name] / t["float32"], 4),
                         "served_bytes_ratio": round(memory[name], 4) if name in memory else None,
                         "path": paths.get(name), "latency_ms": round(t[name] * 1e3, 3),
                         "float_ms": round(t["float32"] * 1e3, 3), **best})
            chosen = " [" + ",".join(f"{p}:{c}" for p, c in paths[name].items()) + "]" if name in paths else ""
            pinned_text = f" (best pinned: {best['best_pinned']} {by_pin[best['best_pinned']]:.2f}x)" if best else ""
            cells.append(f"{name} {t[name] / t['float32']:.2f}x{chosen}{pinned_text}")
        head = f"{model_name:<12} batch {batch:>4}: float {t['float32'] * 1e3:8.2f} ms | "
        print(head + " | ".join(cells), flush=True)
    return rows


def equinox_rows(width, batches, repeats, calls):
    """The MLP as an Equinox model, served with ``jaxqp.serving.equinox_serving_model`` (vmapped)."""
    import equinox as eqx

    class EqxMLP(eqx.Module):
        layers: list

        def __init__(self, key):
            keys = jax.random.split(key, 2)
            self.layers = [eqx.nn.Linear(width, width, key=k) for k in keys]

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)))

    net = EqxMLP(jax.random.key(0))
    params = eqx.filter(net, eqx.is_inexact_array)
    served = {}
    for name, bits in (("int8", 8), ("int4", 4)):
        t = jaxqp.transform([jaxqp.Rule(r"layers/\d+/weight", quant=jaxqp.QuantSpec(bits=bits), layout="out_in")])
        served[name] = jaxqp.serving.equinox_serving_model(net, jaxqp.export(params, t.init(params)))
    memory = {name: tree_bytes(eqx.filter(tree, eqx.is_array)) / tree_bytes(params) for name, tree in served.items()}
    batched = lambda model, x: jax.vmap(model)(x)
    run = jax.jit(batched)
    whole_fn = jaxqp.serving.timed_as_a_whole(batched, "eqx_mlp")  # the whole-model path choice too
    whole = jax.jit(whole_fn)
    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, width))
        fns = {"float32": run, **{name: run for name in served}, "int8+whole": whole}
        args = {"float32": (net, x), **{name: (tree, x) for name, tree in served.items()},
                "int8+whole": (served["int8"], x)}
        paths = {}
        for name, tree in served.items():
            with record_paths() as used:  # this MLP also runs on a whole batch: one entry per layer, all rows
                jax.eval_shape(lambda tree, x: tree(x), tree, x)  # (under vmap, custom_vmap traces 1 row too)
            paths[name] = path_counts(used)
        t = time_calls(fns, args, repeats, calls)
        jax.eval_shape(whole_fn, served["int8"], x)  # the whole model is timed here, once per batch
        policy = next(m["policy"] for m in jaxqp.serving.describe(served["int8"]).models
                      if m["model"].startswith("eqx_mlp:") and m["rows"] == row_bucket(batch))
        paths["int8+whole"] = paths["int8"] if policy == "auto" else {policy: sum(paths["int8"].values())}
        cells = []
        for name in [*served, "int8+whole"]:
            rows.append({"model": f"eqx_mlp{width}", "batch": batch, "config": name,
                         "latency_ratio": round(t[name] / t["float32"], 4),
                         "served_bytes_ratio": round(memory[name.split("+")[0]], 4), "path": paths[name],
                         "latency_ms": round(t[name] * 1e3, 3), "float_ms": round(t["float32"] * 1e3, 3)})
            chosen = ",".join(f"{p}:{c}" for p, c in paths[name].items())
            cells.append(f"{name} {t[name] / t['float32']:.2f}x [{chosen}]")
        print(f"eqx_mlp{width:<5} batch {batch:>4}: float {t['float32'] * 1e3:8.2f} ms | " + " | ".join(cells),
              flush=True)
    return rows


def bytes_rows(params, configs):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jaxqp.save(os.path.join(tmp, "float.jaxqp"), params)
        base = os.path.getsize(os.path.join(tmp, "float.jaxqp"))
        print(f"\nstored bytes of the MLP (float32 file: {base} bytes)")
        for name, rules in configs.items():
            path = os.path.join(tmp, f"{name}.jaxqp")
            jaxqp.save(path, export_tree(params, rules))
            size = os.path.getsize(path)
            rows.append({"config": name, "bytes_ratio": round(size / base, 4), "bytes": size})
            print(f"  {name:<14} {size:>10} bytes  {size / base:.3f}x")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    parser.add_argument("--pins", action="store_true",
                        help="also time every config with all its matmuls on each one path (JSON: pinned, best_pinned)")
    parser.add_argument("--models", default="mlp,transformer,lm,equinox",
                        help="comma-separated subset of mlp, transformer, lm, equinox (equinox: when installed)")
    args = parser.parse_args(argv)
    models = set(args.models.split(","))
    if models - {"mlp", "transformer", "lm", "equinox"}:
        parser.error(f"--models: unknown {sorted(models - {'mlp', 'transformer', 'lm', 'equinox'})}")
    width, d_model, batches = args.width, 512, [1, 2, 8, 32, 256]
    if args.quick:
        width, d_model, batches, args.repeats, args.calls = 256, 64, [1, 4], 2, 2

    cpu = cpu_info()
    print(f"backend {jax.default_backend()} ({cpu['model']}; {', '.join(cpu['flags'])}), "
          f"median of {args.repeats} x {args.calls} calls\n")
    machine = [{"machine": machine_key(), "cpu": cpu["model"], "cpu_flags": cpu["flags"],
                "processor": platform.processor() or platform.machine()}]
    mlp = MLP(width)
    mlp_params = mlp.init(jax.random.key(0), jnp.ones((1, width)))["params"]
    configs = exports(mlp_params)
    rows = list(machine)
    if "mlp" in models:
        rows += latency_rows(f"mlp{width}", mlp, mlp_params, lambda b: jax.random.normal(jax.random.key(b), (b, width)),
                             batches, configs, args.repeats, args.calls, pins=args.pins)
    if "equinox" in models and importlib.util.find_spec("equinox") is not None:
        rows += equinox_rows(width, batches, args.repeats, args.calls)
    if "transformer" in models:
        rows += transformer_rows(d_model, batches, args)
    if "lm" in models:
        rows += lm_rows(batches, args)
    if "mlp" in models:
        rows += bytes_rows(mlp_params, configs)
    write_json(args.json, rows)
    return rows


def transformer_rows(d_model, batches, args):
    block = Block(d_model, 8)
    block_params = block.init(jax.random.key(1), jnp.ones((1, 16, d_model)))["params"]
    block_configs = exports(block_params)
    if args.quick:  # exporting is eager and compiles per leaf shape: one config keeps the check short
        block_configs = {"int8": block_configs["int8"]}
    return latency_rows("transformer", block, block_params,
                        lambda b: jax.random.normal(jax.random.key(b), (b, 16, d_model)),
                        batches, block_configs, args.repeats, args.calls, pins=args.pins)


def lm_rows(batches, args):
    lm = TinyLM(d_model=32, blocks=1) if args.quick else TinyLM()
    seq = 8 if args.quick else 64
    lm_params = lm.init(jax.random.key(2), jnp.ones((1, seq), jnp.int32))["params"]
    lm_configs = exports(lm_params)
    if args.quick:
        lm_configs = {"int8": lm_configs["int8"]}
    return latency_rows("tiny_lm", lm, lm_params,
                        lambda b: jax.random.randint(jax.random.key(b), (b, seq), 0, 256),
                        batches, lm_configs, args.repeats, args.calls, keep_float=("int8",), pins=args.pins)


if __name__ == "__main__":
    main()
