"""Weight layouts: jaxqp's axes are written for Flax; ``Rule(layout="out_in")`` maps them (specs layer).

Flax stores a Dense kernel as ``(in, out)`` and a convolution kernel as
``(*spatial, in, out)``; the defaults of every spec follow that: one scale per output
channel (``QuantSpec(axis=-1)``), groups and N:M along the input axis (``group_axis=-2``,
``NM(axis=-2)``), channel pruning along the output axis (``Channels(axis=-1)``).
Equinox and PyTorch store ``(out, in)`` and ``(out, in, *spatial)``. With
``layout="out_in"`` a rule's axes keep their Flax meaning and jaxqp maps them onto the
array: Flax's last axis (out) is axis 0, its second-to-last (in) is axis 1, a spatial
axis ``i`` is axis ``2 + i``. So the same specs do the same thing to either layout.

Example:
    >>> to_out_in(-1, 2), to_out_in(-2, 2), to_out_in(0, 3)
    (0, 1, 2)
"""

from __future__ import annotations

import dataclasses

from .prune import NM, Blocks, Channels, PruneSpec
from .quant import QuantSpec

LAYOUTS = ("in_out", "out_in")


def to_out_in(axis: int, ndim: int) -> int:
    """The axis of an ``(out, in, *spatial)`` array that Flax's axis ``axis`` of ``(*spatial, in, out)`` names.

    Args:
      axis: an axis in the Flax layout (negative allowed).
      ndim: the number of axes (at least 2).

    Returns:
      The non-negative axis of the ``(out, in, *spatial)`` array.
    """
    a = axis % ndim
    if a == ndim - 1:
        return 0
    if a == ndim - 2:
        return 1
    return a + 2


def _axes(value, ndim: int):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(to_out_in(a, ndim) for a in value)
    return to_out_in(value, ndim)


def in_layout(quant: QuantSpec | None, prune: PruneSpec | None, layout: str, path: str,
              ndim: int) -> tuple[QuantSpec | None, PruneSpec | None]:
    """``quant`` and ``prune`` with their axes mapped onto a leaf of ``layout`` with ``ndim`` axes.

    Args:
      quant: the rule's weight spec.
      prune: the rule's pruning spec.
      layout: ``"in_out"`` (Flax: unchanged) or ``"out_in"`` (Equinox, PyTorch).
      path: the leaf's path, for error messages.
      ndim: the leaf's number of axes.

    Returns:
      The specs to apply to the leaf.
    """
    if layout == "in_out" or ndim < 2:
        return quant, prune
    if quant is not None:
        quant = dataclasses.replace(quant, axis=_axes(quant.axis, ndim), group_axis=to_out_in(quant.group_axis, ndim))
    if prune is not None and prune.structure is not None:
        s = prune.structure
        if isinstance(s, Channels) and s.next is not None:
            raise ValueError(f"'{path}': Channels(next=...) assumes the Flax (in, out) layout of the next kernel; "
                             "with layout='out_in' prune the next layer's input rows with its own rule instead")
        if isinstance(s, (NM, Channels)):
            s = dataclasses.replace(s, axis=to_out_in(s.axis, ndim))
        elif isinstance(s, Blocks):
            s = dataclasses.replace(s, axes=_axes(s.axes, ndim))
        prune = dataclasses.replace(prune, structure=s)
    return quant, prune
