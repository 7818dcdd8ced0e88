"""``jaxqp.summary``: per-layer bits, sparsity and bytes (tools layer).

Compressed bytes are an estimate of what a packed export stores, per leaf:

* values: ``ceil(size * bits / 8)`` dense, or for pruned leaves the smaller of
  that and a bitmask plus packed survivors, ``ceil(size / 8) + ceil(kept * bits / 8)``;
* plus 4 bytes per float32 scale (and 4 per zero point when affine).

Untouched leaves count at their own dtype width.

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> params = {"w": jnp.ones((4, 8))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> s = jaxqp.summary(params, t.init(params))
    >>> s.rows[0]["bytes_compressed"]
    64
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._quant import reduce_axes
from ._rule import LeafPlan
from ._transform import TransformState

COLUMNS = ("path", "shape", "bits", "sparsity", "bytes_float", "bytes_compressed")


def _transform_states(state) -> list[TransformState]:
    nodes = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, TransformState))
    found = [n for n in nodes if isinstance(n, TransformState)]
    if not found:
        raise ValueError(
            "jaxqp.summary(params, state): no jaxqp state found; pass t.init(params)'s result "
            "or jaxqp.state_of(opt_state)"
        )
    return found


def _num_scales(entry: LeafPlan) -> int:
    if entry.quant.axis is None:
        return 1
    reduced = reduce_axes(len(entry.shape), entry.quant.axis)
    return math.prod(d for a, d in enumerate(entry.shape) if a not in reduced)


def _row(entry: LeafPlan, quant, mask) -> dict:
    size = entry.size
    itembits = jnp.dtype(entry.dtype).itemsize * 8 if _is_array_dtype(entry.dtype) else 0
    bits = quant.bits if quant is not None else itembits
    kept = size if mask is None else int(np.count_nonzero(np.asarray(mask)))
    stored = math.ceil(size * bits / 8)
    if mask is not None:
        stored = min(stored, math.ceil(size / 8) + math.ceil(kept * bits / 8))
    if quant is not None:
        stored += _num_scales(dataclasses.replace(entry, quant=quant)) * (4 if quant.symmetric else 8)
    return {
        "path": entry.path,
        "shape": entry.shape,
        "bits": bits,
        "sparsity": 0.0 if size == 0 else 1.0 - kept / size,
        "bytes_float": math.ceil(size * itembits / 8),
        "bytes_compressed": stored,
    }


def _is_array_dtype(dtype: str) -> bool:
    try:
        jnp.dtype(dtype)
        return True
    except TypeError:
        return False


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-leaf rows (dicts with keys ``COLUMNS``) and totals; ``str()`` is a table."""

    rows: tuple[dict, ...]

    @property
    def bytes_float(self) -> int:
        return sum(r["bytes_float"] for r in self.rows)

    @property
    def bytes_compressed(self) -> int:
        return sum(r["bytes_compressed"] for r in self.rows)

    def to_dicts(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def __str__(self) -> str:
        cells = [
            [r["path"], "x".join(map(str, r["shape"])) or "scalar", str(r["bits"]),
             f"{r['sparsity']:.3f}", str(r["bytes_float"]), str(r["bytes_compressed"])]
            for r in self.rows
        ]
        ratio = self.bytes_compressed / max(self.bytes_float, 1)
        cells.append(["total", "", "", "", str(self.bytes_float), f"{self.bytes_compressed} ({ratio:.3f}x)"])
        widths = [max(len(c[i]) for c in [list(COLUMNS)] + cells) for i in range(len(COLUMNS))]
        line = lambda c: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
        rule = "-" * len(line(list(COLUMNS)))
        return "\n".join([line(list(COLUMNS)), rule, *map(line, cells[:-1]), rule, line(cells[-1])])


def summary(params, state) -> Summary:
    """Per-layer table of ``params`` under the jaxqp ``state`` (or an optimizer state holding it)."""
    states = _transform_states(state)
    for s in states:
        s.plan.check(params)
    quant: dict = {}
    masks: dict = {}
    for s in states:
        for entry in s.plan.leaves:
            if entry.quant is not None and quant.get(entry.path) is None:
                quant[entry.path] = entry.quant
        for path, mask in s.masks.items():
            masks[path] = masks[path] & mask if path in masks else mask
    rows = tuple(_row(e, quant.get(e.path), masks.get(e.path)) for e in states[0].plan.leaves)
    return Summary(rows)
