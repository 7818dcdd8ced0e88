"""``describe``: what a prepared tree holds in memory and which path each kernel takes (serving layer).

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8))])
    >>> served = jaxqp.prepare(jaxqp.export(params, t.init(params)), path="int8")
    >>> report = jaxqp.serving.describe(served, rows=[4])
    >>> report.rows[0]["paths"]
    {4: 'int8'}
    >>> report.rows[0]["bytes"]  # int8 codes and a float32 scale per output
    66560
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .._export.compressed import is_compressed
from ..numerics._path_choice import decisions, machine_key, row_bucket
from ._kernels import GeneralKernel, ServingKernel
from ._matmul import kernel_path


def _is_kernel(x) -> bool:
    return isinstance(x, (ServingKernel, GeneralKernel))


def _bytes(tree) -> int:
    arrays = (x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype"))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in arrays)  # not an Equinox model's functions


def _measured(kernel) -> dict[int, dict]:
    """The decisions made in this process for the kernel's kind and its 2-D views, by row bucket."""
    shape = kernel.kernel_shape()
    views = {"x".join(map(str, kernel.matrix_shape(n))) for n in range(1, len(shape))}
    prefix = f"{machine_key()}|{kernel.kind}|"
    found = {}
    for key, decision in decisions().items():
        if key.startswith(prefix):
            view, bucket = key[len(prefix):].rsplit("|", 1)
            if view in views:
                found[int(bucket)] = {"path": decision.path, "ratio": round(decision.ratio, 3),
                                      "ms": {p: round(s * 1e3, 4) for p, s in decision.seconds.items()},
                                      "float_ms": round(decision.float_seconds * 1e3, 4)}
    return dict(sorted(found.items()))


def _model_choices() -> list[dict]:
    """The whole-model choices made in this process (``linen_serving_apply``, ``nnx_serving_apply``)."""
    prefix = f"{machine_key()}|model|"
    found = []
    for key, decision in decisions().items():
        if key.startswith(prefix):
            signature, bucket = key[len(prefix):].rsplit("|", 1)
            found.append({"model": signature, "rows": int(bucket), "policy": decision.path,
                          "ms": {p: round(s * 1e3, 4) for p, s in decision.seconds.items()}})
    return sorted(found, key=lambda m: (m["model"], m["rows"]))


@dataclasses.dataclass(frozen=True)
class ServingReport:
    """Per-kernel rows and the tree's bytes in memory; ``str()`` is a table, ``to_json()`` a JSON string.

    Attributes:
      rows: one dict per prepared kernel: ``path`` (in the tree), ``shape``, ``bits``,
        ``bytes`` (in memory), ``pin`` (``"auto"`` or the pinned path), ``paths`` (row
        bucket -> chosen path) and ``measured`` (row bucket -> the decision's timings and
        its ratio to the float matmul; empty for pinned kernels).
      served_bytes: bytes of every array in the tree.
      machine: what the decisions are valid for (backend, CPU model and flags, jax version).
      models: the whole-model choices made in this process, one dict per (model, row bucket):
        ``model`` (name and a digest of its shapes), ``rows``, ``policy`` (``"auto"``: the
        per-layer paths above; a path: every ``"auto"`` kernel of that model took it there) and
        ``ms`` (each policy's time).
    """

    rows: list
    served_bytes: int
    machine: str
    models: list = dataclasses.field(default_factory=list)

    def slower_than_float(self) -> list[str]:
        """One line for each (kernel, row bucket) whose measured path is slower than the float matmul."""
        lines = []
        for row in self.rows:
            for bucket, m in row["measured"].items():
                if m["ratio"] > 1.0:
                    lines.append(f"{row['path']} at {bucket} rows: {m['path']} takes {m['ratio']:.2f}x the float "
                                 "matmul, the fastest of the paths from codes here; prepare(..., keep_float=True) "
                                 "keeps a float copy for a faster float path, at 4 bytes per weight")
        return lines

    def to_json(self) -> str:
        """The report as a JSON string."""
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)

    def __str__(self) -> str:
        lines = [f"{'kernel':<40} {'shape':<16} {'bits':>4} {'bytes':>10}  paths (rows: path, x float)"]
        for row in self.rows:
            chosen = ", ".join(
                f"{b}: {p}" + (f" {row['measured'][b]['ratio']:.2f}x" if b in row["measured"] else "")
                for b, p in row["paths"].items()) or f"{row['pin']} (not traced yet)"
            lines.append(f"{row['path']:<40} {row['shape']!s:<16} {row['bits']:>4} {row['bytes']:>10}  {chosen}")
        lines.append(f"served bytes in memory: {self.served_bytes}")
        for m in self.models:
            taken = "the per-layer paths" if m["policy"] == "auto" else f"{m['policy']} for every auto kernel"
            times = ", ".join(f"{p} {t:.3g}" for p, t in m["ms"].items())
            lines.append(f"whole model {m['model']} at {m['rows']} rows: {taken} (ms: {times})")
        lines += [f"slower than float: {line}" for line in self.slower_than_float()]
        return "\n".join(lines)


def describe(served: Any, rows: Sequence[int] | None = None) -> ServingReport:
    """Bytes in memory and the compute path of every prepared kernel.

    A kernel's path is decided when a served function is traced, per row bucket (powers
    of two); the report shows the decisions made so far in this process. ``rows``
    decides (measuring if needed) for ``ServingKernel`` s at those row counts now. The
    report also lists the whole-model choices made in this process: where one picked a
    single path, every ``"auto"`` kernel of that model took it, whatever its own row says.

    Args:
      served: a tree from :func:`jaxqp.prepare`.
      rows: row counts to decide for now (the product of the input's leading axes).

    Returns:
      A :class:`ServingReport`.

    Raises:
      ValueError: for non-positive ``rows``, or a tree exported but not prepared.
    """
    if rows is not None and any(int(r) < 1 for r in rows):
        raise ValueError(f"describe: rows={list(rows)} must be positive row counts")
    out = []
    flat = jax.tree_util.tree_flatten_with_path(served, is_leaf=is_compressed)[0]
    for key_path, leaf in flat:
        if is_compressed(leaf) and not _is_kernel(leaf):
            raise ValueError(f"describe: {jax.tree_util.keystr(key_path)} is a {type(leaf).__name__}, not a served "
                             "kernel; describe jaxqp.prepare(tree), the tree a model is served from")
        if not _is_kernel(leaf):
            continue
        if rows is not None and isinstance(leaf, ServingKernel):
            for r in rows:
                kernel_path(leaf, int(r))
        measured = {} if leaf.path != "auto" else _measured(leaf)
        paths = {b: m["path"] for b, m in measured.items()}
        if leaf.path != "auto" and rows is not None:
            paths = {row_bucket(int(r)): leaf.path for r in rows}
        out.append({"path": jax.tree_util.keystr(key_path), "shape": tuple(leaf.kernel_shape()), "bits": leaf.bits,
                    "bytes": _bytes(leaf), "pin": leaf.path, "paths": paths, "measured": measured})
    return ServingReport(out, _bytes(served), machine_key(), _model_choices())
