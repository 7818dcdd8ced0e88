"""Deployed latency and file bytes: each runtime's float model vs jaxqp's int8/int4 export, in one process.

Runtimes: ``onnxruntime`` (``jaxqp.to_onnx`` of the served model against jax2onnx's export
of the float model, both run by ONNX Runtime's CPU provider, thread spinning off) and
``jax`` (``jaxqp.linen_serving_apply`` against the float model, both jitted). Models: the
2-layer 4096-wide MLP and the transformer block (d_model 512, 8 heads, 16 tokens) of
``benchmarks/serving.py``. Configs: every Dense/DenseGeneral kernel quantized to int8 or
int4; for ONNX Runtime, ``int8`` is the default export (``int8_matmul="split"``, exact on
every CPU), ``int8-u8u8`` and ``int8-u8s8`` the other two forms (``docs/deploy.md``).
Batches 1, 2, 8, 32, 256. Each latency is the median over interleaved repeats, divided by
the float model's median on the *same runtime* in the same run; ``bytes_ratio`` is the
exported file (``.onnx``, or jaxqp's ``.jaxqp`` for ``jax``) over the float file of the
same runtime.

    python benchmarks/deploy.py --json deploy.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import write_json
from serving import MLP, Block

import jaxqp
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


def model_rows(name, model, params, make_input, batches, repeats, calls, tmp):
    apply = jaxqp.linen_serving_apply(model)
    float_apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    serve = jax.jit(apply)
    served, files = {}, {}
    for config, bits in (("int8", 8), ("int4", 4)):
        exported = jaxqp.export(params, jaxqp.transform(_rules(bits)).init(params))
        served[config] = jaxqp.prepare(exported, dense_general=True)
        files[("jax", config)] = os.path.join(tmp, f"{name}-{config}.jaxqp")
        jaxqp.save(files[("jax", config)], exported)
    files[("jax", "float32")] = os.path.join(tmp, f"{name}-float.jaxqp")
    jaxqp.save(files[("jax", "float32")], params)
    example = make_input(1)
    sessions = {"float32": _onnx_session(jaxqp.to_onnx(lambda p, x: model.apply({"params": p}, x), params, example,
                                                       file=os.path.join(tmp, f"{name}-float.onnx")))}
    files[("onnxruntime", "float32")] = os.path.join(tmp, f"{name}-float.onnx")
    exports = {"int8": (served["int8"], "split"), "int8-u8u8": (served["int8"], "u8u8"),
               "int8-u8s8": (served["int8"], "u8s8"), "int4": (served["int4"], "split")}
    for config, (tree, kernel) in exports.items():
        files[("onnxruntime", config)] = os.path.join(tmp, f"{name}-{config}.onnx")
        sessions[config] = _onnx_session(jaxqp.to_onnx(apply, tree, example, file=files[("onnxruntime", config)],
                                                       int8_matmul=kernel))
    size = {key: os.path.getsize(path) for key, path in files.items()}
    rows = []
    for batch in batches:
        x = make_input(batch)
        x_np = np.asarray(x)
        feed = {config: {s.get_inputs()[0].name: x_np} for config, s in sessions.items()}
        fns = {("onnxruntime", c): (lambda s=s, f=feed[c]: s.run(None, f)) for c, s in sessions.items()}
        fns[("jax", "float32")] = lambda: jax.block_until_ready(float_apply(params, x))
        for config, tree in served.items():
            fns[("jax", config)] = lambda tree=tree: jax.block_until_ready(serve(tree, x))
        t = _median_times(fns, repeats, calls)
        cells = []
        for runtime, config in fns:
            if config == "float32":
                continue
            ratio = t[(runtime, config)] / t[(runtime, "float32")]
            rows.append({"runtime": runtime, "model": name, "config": config, "batch": batch,
                         "latency_ratio": round(ratio, 4),
                         "bytes_ratio": round(size[(runtime, config)] / size[(runtime, "float32")], 4),
                         "latency_ms": round(t[(runtime, config)] * 1e3, 3),
                         "float_ms": round(t[(runtime, "float32")] * 1e3, 3)})
            cells.append(f"{runtime} {config} {ratio:.2f}x")
        floats = " ".join(f"{r} {t[(r, 'float32')] * 1e3:.2f} ms" for r in ("onnxruntime", "jax"))
        print(f"{name:<12} batch {batch:>4} (float: {floats}): " + " | ".join(cells), flush=True)
    print(f"{name:<12} file bytes / float: " + " | ".join(
        f"{r} {c} {size[(r, c)] / size[(r, 'float32')]:.3f}x" for r, c in size if c != "float32"), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    width, d_model, batches = 4096, 512, [1, 2, 8, 32, 256]
    if args.quick:
        width, d_model, batches, args.repeats, args.calls = 256, 64, [1, 4], 2, 2
    cpu = cpu_info()
    print(f"{cpu['model']}; {', '.join(cpu['flags'])}; median of {args.repeats} x {args.calls} calls\n")
    rows: list = [{"machine": cpu["model"], "cpu_flags": cpu["flags"]}]
    with tempfile.TemporaryDirectory() as tmp:
        mlp = MLP(width)
        rows += model_rows(f"mlp{width}", mlp, mlp.init(jax.random.key(0), jnp.ones((1, width)))["params"],
                           lambda b: jax.random.normal(jax.random.key(b), (b, width)), batches, args.repeats,
                           args.calls, tmp)
        block = Block(d_model, 8)
        rows += model_rows("transformer", block, block.init(jax.random.key(1), jnp.ones((1, 16, d_model)))["params"],
                           lambda b: jax.random.normal(jax.random.key(b), (b, 16, d_model)), batches, args.repeats,
                           args.calls, tmp)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
