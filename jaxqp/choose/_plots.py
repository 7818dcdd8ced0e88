"""Plots of sensitivity and of the size/quality trade-off (optional extra ``plots``: matplotlib).

Both functions write a PNG and return its path; matplotlib is imported when they
are called (with the non-interactive Agg backend), never at ``import jaxqp``.

Example:
    >>> from jaxqp.choose import plot_pareto
    >>> plot_pareto({"uniform": [(4000, 0.9), (2000, 1.4)], "allocated": [(4000, 0.7), (2000, 1.0)]},
    ...             "/tmp/jaxqp_pareto.png", ylabel="test NLL")  # doctest: +SKIP
    '/tmp/jaxqp_pareto.png'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from .._export.atomic import check_writable, replaced_atomically
from ._allocate import Front
from ._sensitivity import Sensitivity


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("jaxqp's plots need the optional extra 'plots': pip install 'jaxqp[plots]' "
                          "(matplotlib)") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, file: str | os.PathLike) -> str:
    """Writes ``fig`` to ``file`` atomically (the format from its ending, PNG without one), then closes it."""
    fmt = os.path.splitext(os.fspath(file))[1].lstrip(".").lower() or "png"
    try:
        with replaced_atomically(file) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt)
    finally:
        plt.close(fig)
    return os.fspath(file)


def plot_sensitivity(sensitivity: Sensitivity, file: str | os.PathLike, *, use: str = "auto") -> str:
    """A heatmap of loss increase, layers x candidates, each cell labelled with its value.

    Colours are on a log scale from 1e-4 of the largest increase (so that 1e-4 and 1 are both
    readable); smaller and negative increases get the lowest colour, and their label still
    shows the value. Grey cells are candidates that do not fit the layer.

    Args:
      sensitivity: what :func:`jaxqp.choose.sensitivity` returned.
      file: the PNG to write.
      use: ``"measured"``, ``"proxy"`` or ``"auto"``, as in :meth:`Sensitivity.scores`.

    Returns:
      The path written.
    """
    check_writable("jaxqp.choose.plot_sensitivity", file, ".png")
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    scores = sensitivity.scores(use)
    finite = scores[np.isfinite(scores)]
    top = max(float(finite.max()) if finite.size else 1.0, 1e-8)
    tiny = top * 1e-4
    n, m = scores.shape
    fig, ax = plt.subplots(figsize=(0.9 * m + 4.0, 0.4 * n + 2.2), layout="constrained")
    ax.set_facecolor("0.85")
    shown = np.ma.masked_invalid(np.clip(scores, tiny, None))
    image = ax.imshow(shown, cmap="RdYlGn_r", aspect="auto", norm=LogNorm(vmin=tiny, vmax=top))
    for i in range(n):
        for j in range(m):
            if np.isfinite(scores[i, j]):
                ax.text(j, i, f"{scores[i, j]:.2g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(m), sensitivity.names, rotation=45, ha="right")
    ax.set_yticks(range(n), sensitivity.layers, fontsize=8)
    ax.set_xlabel("candidate")
    ax.set_ylabel("layer")
    source = "measured" if use != "proxy" and sensitivity.measured else "HAWQ-v2 proxy"
    ax.set_title(f"Loss increase with one layer compressed ({source}; base loss {sensitivity.base_loss:.3f}; "
                 f"below {tiny:.1g} or negative: darkest green)", fontsize=10)
    fig.colorbar(image, ax=ax, label="loss increase (log scale)")
    return _save(plt, fig, file)


def plot_pareto(series: Mapping[str, Sequence[tuple[float, float]]], file: str | os.PathLike, *,
                ylabel: str = "loss", front: Front | None = None, base: float | None = None,
                labels: Mapping[str, Sequence[str]] | None = None) -> str:
    """Quality against stored bytes: one marked line per series (e.g. ``uniform`` and ``allocated``).

    Args:
      series: ``{name: [(bytes, value), ...]}``, e.g. test NLL of uniform settings and of allocations.
      file: the PNG to write.
      ylabel: what ``value`` is.
      front: optionally, an allocation's Pareto frontier, drawn as ``base + predicted loss increase``.
      base: the uncompressed value, drawn as a dashed line (and the frontier's offset).
      labels: optional ``{name: [text per point]}`` written next to the points (e.g. ``w4``).

    Returns:
      The path written.
    """
    check_writable("jaxqp.choose.plot_pareto", file, ".png")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    markers = "osD^v<>"
    for k, (name, points) in enumerate(series.items()):
        texts = list((labels or {}).get(name, ())) or [""] * len(points)
        order = sorted(range(len(points)), key=lambda i: points[i][0])
        x = [points[i][0] / 1e3 for i in order]
        ax.plot(x, [points[i][1] for i in order], marker=markers[k % len(markers)], label=name)
        for i in order:
            ax.annotate(texts[i], (points[i][0] / 1e3, points[i][1]), textcoords="offset points",
                        xytext=(5, 6 - 14 * k), fontsize=7)
    if front is not None and len(front.bytes):
        ax.step(front.bytes / 1e3, (base or 0.0) + front.delta, where="post", color="0.5", lw=0.8,
                label="predicted (sum of one-layer deltas)")
    if base is not None:
        ax.axhline(base, color="k", ls="--", lw=0.8, label="uncompressed")
    ax.set_xlabel("stored bytes (kB, as jaxqp.export stores them)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} against model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, file)
