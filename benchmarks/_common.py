"""Helpers shared by the benchmark scripts."""

import argparse
import json
import time

import jax
import numpy as np

from jaxqp._export.atomic import check_writable, replaced_atomically


def json_file(path: str) -> str:
    """The argparse type of ``--json FILE``: refuses, before the run, a path no file can be written to."""
    try:
        check_writable("--json", path, ".json")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--json: ")) from err
    return path


def write_json(path, rows) -> None:
    """Writes ``rows`` to ``path`` as indented JSON, atomically (nothing if ``path`` is None)."""
    if path:
        with replaced_atomically(path) as tmp, open(tmp, "w") as f:
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
