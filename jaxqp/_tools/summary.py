"""``jaxqp.summary``: per-layer bits, sparsity and bytes (tools layer).

Compressed bytes are what :func:`jaxqp.export` really stores for each leaf:
integer codes in their container (packed below 8 bits), a bitmask and only the
kept entries (or, for N:M, the kept entries and their packed positions) when that
is smaller, float32 scales and int32 zero points.
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
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._export.compressed import nbytes
from .._export.export import views_nbytes
from .._transforms.views import LeafView, leaf_views

COLUMNS = ("path", "shape", "bits", "sparsity", "bytes_float", "bytes_compressed")


def _row(leaf, view: LeafView, stored: int) -> dict:
    entry = view.entry
    itembits = jnp.dtype(entry.dtype).itemsize * 8 if hasattr(leaf, "dtype") else 0
    kept = entry.size if view.mask is None else int(np.count_nonzero(np.asarray(view.mask)))
    return {
        "path": entry.path,
        "shape": entry.shape,
        "bits": view.quant.bits if view.quant is not None else itembits,
        "sparsity": 0.0 if entry.size == 0 else 1.0 - kept / entry.size,
        "bytes_float": nbytes(leaf),
        "bytes_compressed": stored,
    }


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-leaf rows (dicts with keys ``COLUMNS``) and totals; ``str()`` is a table.

    Attributes:
      rows: one dict per leaf, with the keys ``COLUMNS``.
    """

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


def summary(params: Any, state: Any) -> Summary:
    """Per-layer table of ``params`` under the jaxqp ``state`` (or an optimizer state holding it).

    Args:
      params: the params.
      state: the transform state or an optimizer state holding it.

    Returns:
      A :class:`Summary`; it prints as a table.
    """
    flat, _, views = leaf_views(params, state, host_masks=True)
    stored = views_nbytes(flat, views)
    return Summary(tuple(_row(leaf, view, n) for (_, leaf), view, n in zip(flat, views, stored)))
