"""w8a8 quantization-aware training of an unmodified NNX transformer on text that ships with Python.

A character-level language model (2 pre-norm blocks of ``nnx.MultiHeadAttention``
and an MLP) learns to continue the source code of Python's own ``textwrap`` and
``json`` modules. jaxqp quantizes every kernel to int8 and every Linear /
LinearGeneral input to int8 (dynamic per-token ranges); ``jaxqp.nnx_apply``
swaps the matched sub-layers for input-quantizing wrappers during the call,
without editing the model's classes. The last 10% of the text is held out.

    python examples/nnx_transformer_text.py            # 1500 steps
    python examples/nnx_transformer_text.py --quick    # 30 steps, for CI
    python examples/nnx_transformer_text.py --time     # also: train-step time vs float
"""

import argparse
import inspect
import json
import math
import textwrap
import time

import jax
import numpy as np
import optax
from flax import nnx

import jaxqp

SEQ, BATCH, WIDTH, HEADS = 64, 32, 64, 4


def load_text():
    text = inspect.getsource(textwrap) + inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) for c in text], np.int32)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(vocab)


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.up = nnx.Linear(WIDTH, 4 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(4 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CharLM(nnx.Module):
    def __init__(self, vocab: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, WIDTH, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, WIDTH)))
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position[...]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


RULES = [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8), act=jaxqp.ActSpec(bits=8, per_token=True))]

# The same with power-of-two scales, and the MLP and head Linear layers multiplying in int8.
# The attention projections (LinearGeneral) could too, but at this width (64) that made the
# step slower (0.934x float against 0.899x, one process), so they stay fake-quant.
POW2_W = jaxqp.QuantSpec(bits=8, scale_pow2=True)
POW2_A = dict(bits=8, symmetric=True, per_token=True, scale_pow2=True)
INTEGER_RULES = [
    jaxqp.Rule(r".*/(up|down)/kernel|head/kernel", quant=POW2_W, act=jaxqp.ActSpec(**POW2_A, integer=True)),
    jaxqp.Rule(r".*/kernel", quant=POW2_W, act=jaxqp.ActSpec(**POW2_A)),
]


def windows(ids, rng, count):
    starts = rng.integers(0, len(ids) - SEQ - 1, count)
    tokens = np.stack([ids[s:s + SEQ + 1] for s in starts])
    return tokens[:, :-1], tokens[:, 1:]


def make_training(rules, vocab: int, steps: int):
    """``(params, opt_state, step, loss_fn)`` for the CharLM under ``rules``."""
    graphdef, params, rest = nnx.split(CharLM(vocab, nnx.Rngs(0)), nnx.Param, ...)
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adamw(optax.cosine_decay_schedule(3e-3, steps)), t)

    def forward(params, state, tokens):
        model = nnx.merge(graphdef, t.apply(params, state), rest)
        return jaxqp.nnx_apply(model, state, tokens)

    def loss_fn(params, state, x, y):
        logits, _ = forward(params, state, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, jaxqp.state_of(opt_state), x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, tx.init(params), step, loss_fn


def time_steps(vocab: int, train_ids, rounds: int, steps: int) -> dict[str, float]:
    """Median train-step seconds of float32, w8a8 and w8a8 with integer Linear layers, round-robin."""
    runs = {name: list(make_training(rules, vocab, 1000)[:3]) + [[]]
            for name, rules in (("float32", []), ("w8a8", RULES), ("w8a8-int", INTEGER_RULES))}
    x, y = windows(train_ids, np.random.default_rng(2), BATCH)
    for _ in range(rounds + 1):  # the first round compiles and is dropped
        for run in runs.values():
            params, opt_state, step, times = run
            start = time.perf_counter()
            for _ in range(steps):
                params, opt_state, _ = step(params, opt_state, x, y)
            jax.block_until_ready(params)
            times.append((time.perf_counter() - start) / steps)
    return {name: float(np.median(run[3][1:])) for name, run in runs.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--time", action="store_true", help="also time float/w8a8/w8a8-int train steps")
    args = parser.parse_args(argv)
    steps = 30 if args.quick else 1500

    train_ids, test_ids, vocab = load_text()
    params, opt_state, step, loss_fn = make_training(RULES, vocab, steps)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, *windows(train_ids, rng, BATCH))

    x, y = windows(test_ids, np.random.default_rng(1), 256)
    test_loss = float(jax.jit(loss_fn)(params, jaxqp.state_of(opt_state), x, y))
    print(f"{steps} steps, train loss {float(loss):.3f}; held-out w8a8 loss {test_loss:.3f} nats "
          f"= {test_loss / math.log(2):.3f} bits/char (uniform: {math.log2(vocab):.2f})")
    if args.time:
        times = time_steps(vocab, train_ids, rounds=2 if args.quick else 10, steps=3 if args.quick else 20)
        print("train step vs float32: " + ", ".join(f"{k} {v / times['float32']:.3f}x" for k, v in times.items()))
    return test_loss


if __name__ == "__main__":
    main()
