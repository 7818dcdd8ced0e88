"""Helpers shared by the benchmark scripts."""

import json
import time

import jax
import numpy as np


def write_json(path, rows) -> None:
    """Writes ``rows`` to ``path`` as indented JSON (nothing if ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {path}")


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` (results blocked on), after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))
