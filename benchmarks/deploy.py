"""Deployed latency and file bytes: each runtime's float model vs jaxqp's int8/int4 export, in one process.

Runtimes: ``onnxruntime`` (``jaxqp.deploy.to_onnx`` of the served model against jax2onnx's export
of the float model, both run by ONNX Runtime's CPU provider, thread spinning off), ``litert``
(``jaxqp.deploy.to_litert`` of the served and of the float model, one export per batch, run by
the ai-edge-litert interpreter with its default XNNPACK delegate; configs ``*-builtin``: both
on the builtin kernels, whose int8 numbers match jaxqp's) and ``jax``
(``jaxqp.linen_serving_apply`` against the float model, both jitted). Models: the
2-layer 4096-wide MLP and the transformer block (d_model 512, 8 heads, 16 tokens) of
``benchmarks/serving.py``. Configs: every Dense/DenseGeneral kernel quantized to int8, int7
(7-bit codes stored as int8) or int4; for ONNX Runtime, ``int8`` is the default export
(``int8_matmul="auto"``, which takes the halves form for 8-bit weights of up to 2^20 codes
and the split form for larger ones: both exact on every CPU), ``int8-split``, ``int8-u8u8`` and
``int8-u8s8`` the other forms, and ``int7`` the default export too, which
for codes within +-64 is one u8 x s8 matmul, exact on every CPU (``docs/deploy.md``). LiteRT runs
int8 and int4.
Batches 1, 2, 8, 32, 256. Each latency is the median over interleaved repeats, divided by
the float model's median on the *same runtime* in the same run; ``bytes_ratio`` is the
exported file (``.onnx``, ``.tflite``, or jaxqp's ``.jaxqp`` for ``jax``) over the float file of the
same runtime.

    python benchmarks/deploy.py --json deploy.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import json_file, write_json
from serving import MLP, Block

import jaxqp
from jaxqp.deploy import to_litert
from jaxqp.numerics._path_choice import cpu_info


def _median_times(fns: dict, repeats: int, calls: int) -> dict:
    for fn in fns.values():
        fn()  # warm up (compile / first run)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(t)) for name, t in times.items()}


def _rules(bits: int):
    return [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=bits))]


def _onnx_session(model_proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT's worker threads spin after each run by default, stealing the cores from whatever runs
    # next (another session, or JAX) in this interleaved timing: off for every session alike
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _litert_fns(apply, trees: dict, x: np.ndarray) -> dict:
    """LiteRT interpreters of each tree's export at ``x``'s batch: the default (XNNPACK) and builtin kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    fns = {}
    for config, tree in trees.items():
        flatbuffer = to_litert(apply, tree, x)
        for suffix, kind in (("", {}), ("-builtin", {"experimental_op_resolver_type": builtin})):
            if config == "int4" and suffix:
                continue
            runner = Interpreter(model_content=flatbuffer, num_threads=os.cpu_count(), **kind).get_signature_runner()
            fns[("litert", config + suffix)] = lambda runner=runner: runner(x0=x)
    return fns


def model_rows(name, model, params, make_input, batches, repeats, calls, tmp, litert):
    apply = jaxqp.linen_serving_apply(model)
    float_apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    serve = jax.jit(apply)
    served, files = {}, {}
    for config, bits in (("int8", 8), ("int7", 7), ("int4", 4)):
        exported = jaxqp.export(params, jaxqp.transform(_rules(bits)).init(params))
        served[config] = jaxqp.prepare(exported, dense_general=True)
        files[("jax", config)] = os.path.join(tmp, f"{name}-{config}.jaxqp")
        jaxqp.save(files[("jax", config)], exported)
    files[("jax", "float32")] = os.path.join(tmp, f"{name}-float.jaxqp")
    jaxqp.save(files[("jax", "float32")], params)
    example = make_input(1)
    float_onnx = jaxqp.deploy.to_onnx(lambda p, x: model.apply({"params": p}, x), params, example,
                                      file=os.path.join(tmp, f"{name}-float.onnx"))
    sessions = {"float32": _onnx_session(float_onnx)}
    files[("onnxruntime", "float32")] = os.path.join(tmp, f"{name}-float.onnx")
    exports = {"int8": (served["int8"], "auto"), "int8-split": (served["int8"], "split"),
               "int8-u8u8": (served["int8"], "u8u8"),
               "int8-u8s8": (served["int8"], "u8s8"), "int7": (served["int7"], "auto"),
               "int4": (served["int4"], "auto")}
    for config, (tree, kernel) in exports.items():
        files[("onnxruntime", config)] = os.path.join(tmp, f"{name}-{config}.onnx")
        sessions[config] = _onnx_session(jaxqp.deploy.to_onnx(apply, tree, example, file=files[("onnxruntime", config)],
                                                       int8_matmul=kernel))
    litert_trees = {"float32": params, "int8": served["int8"], "int4": served["int4"]}
    if litert:
        for config, tree in litert_trees.items():
            files[("litert", config)] = os.path.join(tmp, f"{name}-{config}.tflite")
            to_litert(apply, tree, example, file=files[("litert", config)])
    size = {key: os.path.getsize(path) for key, path in files.items()}
    rows = []
    for batch in batches:
        x = make_input(batch)
        x_np = np.asarray(x)
        feed = {config: {s.get_inputs()[0].name: x_np} for config, s in sessions.items()}
        fns = {("onnxruntime", c): (lambda s=s, f=feed[c]: s.run(None, f)) for c, s in sessions.items()}
        if litert:  # a LiteRT model has a fixed batch: one export per batch
            fns.update(_litert_fns(apply, litert_trees, x_np))
        fns[("jax", "float32")] = lambda: jax.block_until_ready(float_apply(params, x))
        for config, tree in served.items():
            fns[("jax", config)] = lambda tree=tree: jax.block_until_ready(serve(tree, x))
        t = _median_times(fns, repeats, calls)
        cells = []
        for runtime, config in fns:
            if config.startswith("float32"):
                continue
            base = "float32-builtin" if config.endswith("-builtin") else "float32"  # the same kernels' float
            ratio = t[(runtime, config)] / t[(runtime, base)]
            stored = size[(runtime, config.removesuffix("-builtin"))]
            rows.append({"runtime": runtime, "model": name, "config": config, "batch": batch,
                         "latency_ratio": round(ratio, 4),
                         "bytes_ratio": round(stored / size[(runtime, "float32")], 4),
                         "latency_ms": round(t[(runtime, config)] * 1e3, 3),
                         "float_ms": round(t[(runtime, base)] * 1e3, 3)})
            cells.append(f"{runtime} {config} {ratio:.2f}x")
        floats = " ".join(f"{r} {c.removeprefix('float32')} {t[(r, c)] * 1e3:.2f} ms".replace('  ', ' ')
                           for r, c in fns if c.startswith("float32"))
        print(f"{name:<12} batch {batch:>4} (float: {floats}): " + " | ".join(cells), flush=True)
    print(f"{name:<12} file bytes / float: " + " | ".join(
        f"{r} {c} {size[(r, c)] / size[(r, 'float32')]:.3f}x" for r, c in size if c != "float32"), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    parser.add_argument("--no-litert", action="store_true", help="skip LiteRT even where the extra is installed")
    args = parser.parse_args(argv)
    width, d_model, batches = 4096, 512, [1, 2, 8, 32, 256]
    if args.quick:
        width, d_model, batches, args.repeats, args.calls = 256, 64, [1, 4], 2, 2
    litert = importlib.util.find_spec("litert_converter") is not None and not args.no_litert
    cpu = cpu_info()
    print(f"{cpu['model']}; {', '.join(cpu['flags'])}; median of {args.repeats} x {args.calls} calls\n")
    rows: list = [{"machine": cpu["model"], "cpu_flags": cpu["flags"]}]
    with tempfile.TemporaryDirectory() as tmp:
        mlp = MLP(width)
        rows += model_rows(f"mlp{width}", mlp, mlp.init(jax.random.key(0), jnp.ones((1, width)))["params"],
                           lambda b: jax.random.normal(jax.random.key(b), (b, width)), batches, args.repeats,
                           args.calls, tmp, litert)
        block = Block(d_model, 8)
        rows += model_rows("transformer", block, block.init(jax.random.key(1), jnp.ones((1, 16, d_model)))["params"],
                           lambda b: jax.random.normal(jax.random.key(b), (b, 16, d_model)), batches, args.repeats,
                           args.calls, tmp, litert)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
