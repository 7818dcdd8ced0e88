"""Train an int8 model with jaxqp, export it to ONNX and run it in ONNX Runtime, next to jaxqp.

A 64-256-10 Flax linen MLP learns sklearn's digits with int8 weights (``--bits`` 2-8;
quantization-aware, 80% pruned), is exported (``jaxqp.export``), prepared for serving (``jaxqp.prepare``) and
written as ``model.onnx`` (``jaxqp.deploy.to_onnx``: ``MatMulInteger`` on int8 codes, symbolic
batch). ONNX Runtime then runs the file on the whole test set and the script compares its
logits with jaxqp's served ones: equal bit for bit to jaxqp run op by op, and within float32
rounding of jitted jaxqp (XLA fuses the rescale and the bias add into one multiply-add).

    python -m pip install -e ".[onnx]"
    python examples/deploy_onnx.py             # 600 steps, writes model.onnx
    python examples/deploy_onnx.py --bits 7    # 7-bit weights: one u8 x s8 matmul per layer, exact on every CPU
    python examples/deploy_onnx.py --quick     # 60 steps, for CI
"""

import argparse
import json
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxqp
from jaxqp.demo import load_digits


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))


def train(steps: int, bits: int = 8):
    (x_train, y_train), test = load_digits()
    model = MLP()
    params = model.init(jax.random.key(0), x_train[:1])["params"]
    sparsity = jaxqp.polynomial(0.0, 0.8, begin=steps // 10, end=steps // 2, every=10)
    t = jaxqp.transform([jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=bits),
                                    prune=jaxqp.PruneSpec(sparsity=sparsity))])
    tx = jaxqp.wrap(optax.adam(3e-3), t)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        state = jaxqp.state_of(opt_state)
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": t.apply(p, state)}, x_train), y_train).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return model, jaxqp.export(params, jaxqp.state_of(opt_state)), test


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="model.onnx", help="where to write the ONNX model")
    parser.add_argument("--bits", type=int, default=8, choices=range(2, 9), metavar="2..8",
                        help="weight bits (7: the export's fast u8 x s8 form is exact on every CPU)")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(folder):  # refused before training, not after
        parser.error(f"--out {args.out!r}: give a file path in an existing folder")
    import onnxruntime as ort  # the optional extra: pip install -e ".[onnx]"

    model, packed, (x_test, y_test) = train(60 if args.quick else 600, args.bits)
    served = jaxqp.prepare(packed, path="int8")  # the integer path: what the ONNX model computes
    apply = jaxqp.linen_serving_apply(model)
    out = args.out
    if args.quick:  # CI: do not leave a file behind
        out = os.path.join(tempfile.mkdtemp(), "model.onnx")
    onnx_model = jaxqp.deploy.to_onnx(apply, served, x_test[:1], file=out)
    integer_ops = sum(node.op_type == "MatMulInteger" for node in onnx_model.graph.node)
    # the form each integer matmul took (7-bit codes: one u8 x s8 matmul; 8-bit: exact halves or split)
    forms = [f["form"] for f in json.loads({p.key: p.value for p in onnx_model.metadata_props}["jaxqp.matmul_forms"])]

    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: np.asarray(x_test)})[0]
    jax_logits = np.asarray(apply(served, x_test))  # op by op; jitted, XLA fuses each bias add (docs/deploy.md)
    jit_logits = np.asarray(jax.jit(apply)(served, x_test))
    accuracy = float(np.mean(onnx_logits.argmax(-1) == np.asarray(y_test)))
    float_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(jaxqp.dequantize(packed)))
    print(f"wrote {args.out if not args.quick else out}: {os.path.getsize(out)} bytes "
          f"(float32 weights alone: {float_bytes}), {integer_ops} MatMulInteger nodes, forms: {', '.join(forms)}")
    print(f"onnxruntime on {len(x_test)} test images: accuracy {100 * accuracy:.2f}%, "
          f"logits equal to jaxqp's bit for bit: {np.array_equal(onnx_logits, jax_logits)} "
          f"(jitted jaxqp: within {np.abs(onnx_logits - jit_logits).max():.1e})")
    return accuracy, onnx_logits, jax_logits, jnp.asarray(y_test)


if __name__ == "__main__":
    main()
