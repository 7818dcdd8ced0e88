"""The int8 matmul alone: float32 vs the two operand orders of XLA's integer dot, in one process.

For each weight shape and row count, times (median of interleaved repeats) a
jitted ``x @ W`` in float32 and the whole int8 path of :func:`jaxqp.serving.int8_matmul`
(quantize rows, int8 x int8 -> int32 dot, rescale) with the dot written
``codes . kernel`` (``rows-first``) and ``kernel . codes`` with an optimization
barrier before the transpose (``kernel-first``), and prints each as a ratio of
float. ``jaxqp.serving.int8_matmul`` picks kernel-first up to ``SWAP_MAX_ROWS`` rows; this
script is the measurement behind that choice (see docs/design.md).

    python benchmarks/int8_dot.py --json int8_dot.json
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from _common import json_file, write_json
from serving import time_calls

from jaxqp.numerics import bf16_int_dot
from jaxqp.serving import quantize_rows

DIMS = (((1,), (1,)), ((), ()))


def rows_first(x, codes, scale):
    q, s = quantize_rows(x)
    acc = jax.lax.dot_general(q, codes, DIMS, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * s * scale


def kernel_first(x, codes, scale):
    q, s = quantize_rows(x)
    acc = jax.lax.dot_general(codes, q, DIMS, preferred_element_type=jnp.int32)
    return jax.lax.optimization_barrier(acc).T.astype(jnp.float32) * s * scale


def bf16_exact(x, carrier, scale):
    q, s = quantize_rows(x)
    return bf16_int_dot(q, carrier).astype(jnp.float32) * s * scale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--json", metavar="FILE", type=json_file)
    args = parser.parse_args(argv)
    shapes = [(4096, 4096), (512, 2048), (2048, 512), (512, 512)]
    row_counts = [4, 8, 32, 64, 128, 512, 4096]
    if args.quick:
        shapes, row_counts, args.repeats, args.calls = [(256, 256)], [4, 64], 2, 2
    fns = {"float32": jax.jit(lambda x, w, codes, carrier, scale: x @ w),
           "rows-first": jax.jit(lambda x, w, codes, carrier, scale: rows_first(x, codes, scale)),
           "kernel-first": jax.jit(lambda x, w, codes, carrier, scale: kernel_first(x, codes, scale)),
           "bf16": jax.jit(lambda x, w, codes, carrier, scale: bf16_exact(x, carrier, scale))}
    rows = []
    for n_in, n_out in shapes:
        w = jax.random.normal(jax.random.key(0), (n_in, n_out))
        codes = jnp.clip(jnp.round(w * 40), -127, 127).astype(jnp.int8).T  # (out, in)
        carrier = codes.astype(jnp.bfloat16)
        scale = jnp.full((n_out,), 1 / 40, jnp.float32)
        for n in row_counts:
            if n * n_in * n_out > 2**34:  # 4096 rows of the 4096x4096 layer: minutes, and no new information
                continue
            x = jax.random.normal(jax.random.key(n), (n, n_in))
            t = time_calls(fns, {name: (x, w, codes, carrier, scale) for name in fns}, args.repeats, args.calls)
            row = {"shape": [n_in, n_out], "rows": n, "float_ms": round(t["float32"] * 1e3, 3),
                   "rows_first_ratio": round(t["rows-first"] / t["float32"], 3),
                   "kernel_first_ratio": round(t["kernel-first"] / t["float32"], 3),
                   "bf16_ratio": round(t["bf16"] / t["float32"], 3)}
            rows.append(row)
            print(f"{n_in:>5}x{n_out:<5} rows {n:>4}: float {row['float_ms']:8.3f} ms | rows-first "
                  f"{row['rows_first_ratio']:.2f}x | kernel-first {row['kernel_first_ratio']:.2f}x | bf16 "
                  f"{row['bf16_ratio']:.2f}x", flush=True)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
