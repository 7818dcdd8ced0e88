"""``sensitivity``: the loss increase of compressing one layer at a time, for every candidate (tools layer).

For each candidate, one transform compresses every layer it fits
(``t.init`` + ``t.apply``: the exact values jaxqp trains and exports); the stored
bytes per layer come from the same state, counted as ``jaxqp.export`` stores them.
Then one jitted function (see ``_sweep``) measures the calibration loss with one
layer swapped at a time: one compile for the whole sweep. Optionally the
HAWQ-v2 proxy ``0.5 * Tr(H_i) / n_i * ||dW_i||^2`` is computed from Hutchinson
traces, and its rank correlation with the measured deltas is reported.

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> from jaxqp.choose import sensitivity
    >>> params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))},
    ...           "b": {"kernel": jax.random.normal(jax.random.key(1), (8, 4))}}
    >>> def loss(p, x):
    ...     a, b = p["a"], p["b"]
    ...     return jnp.mean((x @ a["kernel"] @ b["kernel"]) ** 2)
    >>> s = sensitivity(loss, params, [jnp.ones((2, 16))], [jaxqp.QuantSpec(bits=2)], progress=False)
    >>> s.layers, s.names, s.delta.shape
    (('a/kernel', 'b/kernel'), ('w2',), (2, 1))
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from .._export.atomic import check_writable, replaced_atomically
from .._specs.paths import paths_and_leaves
from .._specs.rules import is_float, resolve
from .._tools.summary import summary
from .._transforms.transform import transform
from ._candidates import KEEP, Candidate, as_candidates
from ._proxy import hessian_traces, spearman
from ._sweep import swapped_loss

DEFAULT_LAYERS = r"(.*/)?(kernel|weight)"


@dataclasses.dataclass(frozen=True, eq=False)
class Sensitivity:
    """What :func:`sensitivity` measured: rows are layers, columns candidates.

    Attributes:
      layers: paths of the layers, in tree order.
      shapes: their shapes.
      candidates: the candidates, in the given order.
      base_loss: the calibration loss of the uncompressed params.
      delta: ``(layers, candidates)`` loss increase with only that layer compressed (NaN where the candidate
        does not fit the layer, or where nothing was measured: ``measure=False``).
      bytes: ``(layers, candidates)`` bytes ``jaxqp.export`` stores for the compressed layer (-1: does not fit).
      float_bytes: ``(layers,)`` bytes of each layer left as it is.
      other_bytes: bytes of every leaf that is not a layer (biases, norms, ...), stored as they are
        (a ``Channels`` candidate that also prunes its bias stores a little less).
      traces: ``(layers,)`` Hutchinson Hessian traces, or None (``proxy=False``).
      proxy: ``(layers, candidates)`` HAWQ-v2 predicted loss increase, or None.
      seconds: wall time of the measured sweep (compiles included); of the proxy in ``proxy_seconds``.
      proxy_seconds: wall time of the Hessian traces.
      unfit: ``{(layer, candidate): reason}`` for the pairs that do not fit.
    """

    layers: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    candidates: tuple[Candidate, ...]
    base_loss: float
    delta: np.ndarray
    bytes: np.ndarray
    float_bytes: np.ndarray
    other_bytes: int
    traces: np.ndarray | None = None
    proxy: np.ndarray | None = None
    seconds: float = 0.0
    proxy_seconds: float = 0.0
    unfit: dict = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates)

    @property
    def measured(self) -> bool:
        return bool(np.any(np.isfinite(self.delta)))

    def scores(self, use: str = "auto") -> np.ndarray:
        """The ``(layers, candidates)`` loss increases to allocate with: ``"measured"``, ``"proxy"`` or
        ``"auto"`` (measured when it was, else the proxy)."""
        if use not in ("auto", "measured", "proxy"):
            raise ValueError(f"use={use!r}: expected 'auto', 'measured' or 'proxy'")
        if use == "proxy" or (use == "auto" and not self.measured):
            if self.proxy is None:
                raise ValueError("no proxy was computed: call sensitivity(..., proxy=True)")
            return np.where(self.bytes >= 0, self.proxy, np.nan)
        if not self.measured:
            raise ValueError("nothing was measured: call sensitivity(..., measure=True)")
        return self.delta

    def spearman(self) -> dict[str, float]:
        """Rank correlation of the proxy with the measured deltas: per candidate (over layers) and ``"all"``."""
        if self.proxy is None or not self.measured:
            return {}
        out = {name: spearman(self.proxy[:, j], self.delta[:, j]) for j, name in enumerate(self.names)}
        out["all"] = spearman(self.proxy.ravel(), self.delta.ravel())
        return out

    def uniform(self, name: str) -> tuple[int, float]:
        """``(bytes, predicted loss increase)`` of applying candidate ``name`` to every layer it fits.

        Args:
          name: a candidate name, or ``"keep"`` (nothing compressed).

        Raises:
          ValueError: for a name that is not a candidate.
        """
        if name == KEEP:
            return int(self.float_bytes.sum()) + self.other_bytes, 0.0
        if name not in self.names:
            raise ValueError(f"Sensitivity.uniform: no candidate is named {name!r}; the candidates are "
                             f"{list(self.names)} (or {KEEP!r})")
        j = self.names.index(name)
        fits = self.bytes[:, j] >= 0
        total = int(np.where(fits, self.bytes[:, j], self.float_bytes).sum()) + self.other_bytes
        scores = self.scores()[:, j]
        return total, float(np.nansum(np.where(fits, scores, 0.0)))

    def to_dict(self) -> dict:
        """Plain JSON-ready values: layers, candidates, deltas, bytes, proxy, Spearman, times."""
        def cells(a):
            return None if a is None else [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        return {
            "base_loss": self.base_loss, "layers": list(self.layers), "shapes": [list(s) for s in self.shapes],
            "candidates": list(self.names), "delta": cells(self.delta), "bytes": self.bytes.tolist(),
            "float_bytes": self.float_bytes.tolist(), "other_bytes": self.other_bytes,
            "traces": None if self.traces is None else self.traces.tolist(), "proxy": cells(self.proxy),
            "spearman": self.spearman(), "seconds": self.seconds, "proxy_seconds": self.proxy_seconds,
        }

    def to_json(self, file: str | os.PathLike) -> None:
        """Writes :meth:`to_dict` as JSON (atomically: a temporary file, then a rename)."""
        check_writable("Sensitivity.to_json", file, ".json")
        with replaced_atomically(file) as tmp, open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def __str__(self) -> str:
        scores = self.delta if self.measured else self.proxy
        what = "measured loss increase" if self.measured else "predicted loss increase (HAWQ-v2 proxy)"
        head = ["layer", *self.names]
        rows = [[path] + ["-" if self.bytes[i, j] < 0 else f"{scores[i, j]:+.4f}"  # type: ignore[index]
                          for j in range(len(self.names))] for i, path in enumerate(self.layers)]
        rows.append(["kB (all layers)"] + [f"{self.uniform(n)[0] / 1e3:.1f}" for n in self.names])
        widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
        line = lambda r: "  ".join(v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(r, widths)))
        out = [f"{what}, base loss {self.base_loss:.4f}", line(head), "-" * len(line(head)), *map(line, rows)]
        rho = self.spearman()
        if rho:
            out.append("proxy rank correlation (Spearman): " + ", ".join(f"{k} {v:.2f}" for k, v in rho.items()))
        return "\n".join(out)


def _layer_paths(params, layers) -> list[str]:
    flat, _ = paths_and_leaves(params)
    floats = [path for path, leaf in flat if is_float(leaf) and np.ndim(leaf) >= 1]
    if isinstance(layers, str):
        chosen = [path for path in floats if re.fullmatch(layers, path)]
        if not chosen:
            raise ValueError(f"layers={layers!r} matches no float parameter; paths look like {floats[:5]}. "
                             "Fix the pattern (re.fullmatch on '/'-joined paths) or pass a list of paths")
        return chosen
    chosen = list(layers)
    unknown = [p for p in chosen if p not in floats]
    if unknown:
        raise ValueError(f"layers names '{unknown[0]}', which is not a float parameter; paths look like "
                         f"{floats[:5]}")
    return chosen


def _fits(candidate: Candidate, path: str, params) -> str | None:
    try:
        resolve([candidate.rule(path)], params)
    except ValueError as err:
        return str(err)
    return None


def _progress(total: int, enabled: bool | None):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar without tqdm
        return None
    return tqdm(total=total, desc="sensitivity", unit="eval", disable=None if enabled is None else not enabled,
                leave=False)


def sensitivity(loss_fn: Callable[[Any, Any], Any], params: Any, batches: Sequence[Any], candidates: Any, *,
                layers: str | Sequence[str] = DEFAULT_LAYERS, measure: bool = True, proxy: bool = True,
                proxy_samples: int = 16, seed: int = 0, progress: bool | None = None) -> Sensitivity:
    """Loss increase on ``batches`` of compressing each layer alone, for every candidate.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. the mean cross-entropy of ``model.apply``.
      params: the trained float parameters (any pytree: linen, NNX state, plain dicts).
      batches: calibration batches (pytrees of arrays) of equal shapes.
      candidates: what to try: a list of ``QuantSpec`` / ``PruneSpec`` / ``(QuantSpec, PruneSpec)`` /
        ``Candidate``, or a dict name -> spec.
      layers: a regex (``re.fullmatch`` on paths) or a list of paths; default: every ``kernel`` or ``weight``.
      measure: measure the loss increases (one jitted forward pass per batch, layer and candidate).
      proxy: also estimate the HAWQ-v2 proxy from Hutchinson Hessian traces.
      proxy_samples: Hutchinson probes.
      seed: the probes' seed.
      progress: a tqdm bar: None draws it on a terminal only, True always, False never.

    Returns:
      A :class:`Sensitivity`; it prints as a table and writes JSON.

    Raises:
      TypeError: if ``loss_fn`` is not callable.
      ValueError: for empty ``batches`` or ``candidates``, a ``layers`` pattern that matches no
        float parameter, or a loss that is not finite before any compression.

    Example:
        >>> import jax.numpy as jnp, jaxqp
        >>> s = sensitivity(lambda p, x: jnp.sum(x * p["kernel"]), {"kernel": jnp.full((2, 2), 0.3)},
        ...                 [jnp.ones((2, 2))], {"half": jaxqp.PruneSpec(sparsity=0.5)}, progress=False)
        >>> round(float(s.delta[0, 0]), 4), int(s.bytes[0, 0])
        (-0.6, 9)
    """
    if not callable(loss_fn):
        raise TypeError(f"sensitivity: loss_fn must be loss_fn(params, batch) -> scalar, got {type(loss_fn).__name__}")
    if not (measure or proxy):
        raise ValueError("measure=False and proxy=False leave nothing to compute; keep one of them True")
    cands = as_candidates(candidates)
    paths = _layer_paths(params, layers)
    flat = dict(paths_and_leaves(params)[0])
    loss = swapped_loss(loss_fn, params, batches, paths)  # checks the batches before any work
    base = float(loss(params, params, -1))
    if not np.isfinite(base):
        raise ValueError(f"loss_fn(params, batch) is {base} before any compression; check the model and batches")
    unfit = {(path, c.name): reason for c in cands for path in paths if (reason := _fits(c, path, params))}

    n, m = len(paths), len(cands)
    delta = np.full((n, m), np.nan)
    stored = np.full((n, m), -1, np.int64)
    sq_change = np.zeros((n, m))
    compressed = []
    float_bytes = other = None
    for j, cand in enumerate(cands):
        rules = [cand.rule(path) for path in paths if (path, cand.name) not in unfit]
        if not rules:
            compressed.append(None)
            continue
        t = transform(rules)
        state, tree = jax.jit(lambda p, t=t: (lambda s: (s, t.apply(p, s)))(t.init(p)))(params)
        compressed.append(tree)
        rows = {row["path"]: row for row in summary(params, state).rows}
        float_bytes = np.array([rows[p]["bytes_float"] for p in paths], np.int64)
        other = sum(row["bytes_float"] for p, row in rows.items() if p not in set(paths))
        new = dict(paths_and_leaves(compressed[-1])[0])
        for i, path in enumerate(paths):
            if (path, cand.name) not in unfit:
                stored[i, j] = rows[path]["bytes_compressed"]
                change = np.asarray(new[path], np.float64) - np.asarray(flat[path], np.float64)
                sq_change[i, j] = float(np.sum(change**2))
    if float_bytes is None or other is None:
        raise ValueError(f"no candidate fits any layer; first reason: {next(iter(unfit.values()))}")

    start = time.perf_counter()
    if measure:
        bar = _progress(n * m, progress)
        for j, tree in enumerate(compressed):
            for i, path in enumerate(paths):
                if tree is not None and (path, cands[j].name) not in unfit:
                    delta[i, j] = float(loss(params, tree, i)) - base
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start

    traces = predicted = None
    proxy_seconds = 0.0
    if proxy:
        start = time.perf_counter()
        traces = hessian_traces(loss_fn, params, batches, paths, samples=proxy_samples, seed=seed)
        sizes = np.array([np.size(flat[p]) for p in paths], np.float64)
        predicted = np.where(stored >= 0, 0.5 * (traces / sizes)[:, None] * sq_change, np.nan)
        proxy_seconds = time.perf_counter() - start
    return Sensitivity(tuple(paths), tuple(tuple(np.shape(flat[p])) for p in paths), cands, base, delta, stored,
                       float_bytes, int(other), traces, predicted, seconds, proxy_seconds, unfit)
