"""Train an int8 model with jaxqp, export it to LiteRT (TFLite) and run it in the LiteRT interpreter.

The same 64-256-10 MLP as ``examples/deploy_onnx.py`` (int8 weights, 80% pruned, trained on
sklearn's digits) is prepared for serving and written as ``model.tflite``
(``jaxqp.deploy.to_litert``: int8 per-channel ``FULLY_CONNECTED`` weights, activations
quantized per row at run time). The ai-edge-litert interpreter then runs the file on the
whole test set, once with its builtin kernels (which quantize activations as jaxqp does)
and once with its default XNNPACK delegate (asymmetric activation codes), and the script
compares both with jaxqp's served logits.

    python -m pip install -e ".[litert]"
    python examples/deploy_litert.py             # 600 steps, writes model.tflite
    python examples/deploy_litert.py --quick     # 60 steps, for CI
"""

import argparse
import os
import sys
import tempfile

import jax
import numpy as np

import jaxqp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deploy_onnx import train  # the same model and training


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="model.tflite", help="where to write the LiteRT model")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(folder):  # refused before training, not after
        parser.error(f"--out {args.out!r}: give a file path in an existing folder")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # the optional extra 'litert'

    model, packed, (x_test, y_test) = train(60 if args.quick else 600)
    served = jaxqp.prepare(packed, path="int8")  # the integer path: what LiteRT's kernels compute
    apply = jaxqp.linen_serving_apply(model)
    out = os.path.join(tempfile.mkdtemp(), "model.tflite") if args.quick else args.out  # CI leaves no file
    x = np.asarray(x_test)
    jaxqp.deploy.to_litert(apply, served, x, file=out)  # a LiteRT model has a fixed batch: the test set's

    jax_logits = np.asarray(jax.jit(apply)(served, x))
    logits = {}
    for name, kind in (("builtin kernels", OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES), ("XNNPACK", None)):
        options = {} if kind is None else {"experimental_op_resolver_type": kind}
        interpreter = Interpreter(model_path=out, **options)
        logits[name] = interpreter.get_signature_runner()(x0=x)["y0"]
    ops = sorted({op["op_name"] for op in interpreter._get_ops_details()})
    float_bytes = sum(a.size * 4 for a in jax.tree_util.tree_leaves(jaxqp.dequantize(packed)))
    print(f"wrote {out}: {os.path.getsize(out)} bytes (float32 weights alone: {float_bytes}); ops {ops}")
    for name, values in logits.items():
        accuracy = float(np.mean(values.argmax(-1) == np.asarray(y_test)))
        print(f"LiteRT {name} on {len(x)} test images: accuracy {100 * accuracy:.2f}%, largest logit difference "
              f"from jaxqp {np.abs(values - jax_logits).max():.1e} (logits up to {np.abs(jax_logits).max():.1f})")
    return logits, jax_logits, np.asarray(y_test)


if __name__ == "__main__":
    main()
