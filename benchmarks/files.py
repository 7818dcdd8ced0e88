"""Save and load time of an exported model file: ``jaxqp.save`` / ``jaxqp.load`` against plain safetensors.

The 2-layer 4096-wide MLP of ``benchmarks/serving.py`` is exported with int8 and with int4
kernels (``jaxqp.export``). Each export is saved and loaded ``--repeats`` times; the median
is printed next to the same tensors written and read by ``safetensors.numpy`` alone (no tree,
no checksums: the container's own cost) and the float params saved by jaxqp. Loading includes
the checksum of every tensor and the validation of every compressed leaf.

    python benchmarks/files.py --json files.json
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from _common import json_file, median_seconds, write_json
from serving import MLP

import jaxqp
from jaxqp.numerics._path_choice import cpu_info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--json", metavar="FILE", type=json_file)
    args = parser.parse_args(argv)
    cpu = cpu_info()
    print(f"{cpu['model']}; median of {args.repeats}")
    model = MLP(args.width)
    params = model.init(jax.random.key(0), jnp.ones((1, args.width)))["params"]
    trees = {"float32": params}
    for bits in (8, 4):
        t = jaxqp.transform([jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=bits))])
        trees[f"int{bits}"] = jaxqp.export(params, t.init(params))
    rows: list = [{"machine": cpu["model"], "cpu_flags": cpu["flags"]}]
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in trees.items():
            path = os.path.join(tmp, f"{name}.jaxqp")
            save_s = median_seconds(lambda: jaxqp.save(path, tree), args.repeats)
            load_s = median_seconds(lambda: jaxqp.load(path), args.repeats)
            row = {"model": f"mlp{args.width}", "config": name, "bytes": os.path.getsize(path),
                   "save_ms": round(save_s * 1e3, 2), "load_ms": round(load_s * 1e3, 2)}
            try:
                from safetensors.numpy import load_file, save_file
            except ImportError:
                pass
            else:  # the container alone: the same tensors, flat, no checksums or tree
                flat = {str(i): np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(tree))}
                plain = os.path.join(tmp, f"{name}.safetensors")
                ms = lambda fn: round(median_seconds(fn, args.repeats) * 1e3, 2)
                row["safetensors_save_ms"] = ms(lambda: save_file(flat, plain))
                row["safetensors_load_ms"] = ms(lambda: load_file(plain))
            rows.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
