"""Frozen, validated specs: what to do to one parameter (specs layer).

Specs are static and hashable: they travel as metadata of the transform state,
so jit caches on them and never on their values. Bad values fail here, at
construction, with the field and a fix in the message.

Example:
    >>> QuantSpec(bits=4, axis=None)
    QuantSpec(bits=4, symmetric=True, axis=None, ste='clipped')
    >>> PruneSpec(sparsity=0.5).sparsity
    Constant(value=0.5)
"""

from __future__ import annotations

import dataclasses
import numbers

from ._schedule import Schedule, check_sparsity, constant

MIN_BITS, MAX_BITS = 2, 16


def _normalize_axis(axis):
    if axis is None or (isinstance(axis, numbers.Integral) and not isinstance(axis, bool)):
        return None if axis is None else int(axis)
    if isinstance(axis, (tuple, list)) and axis and all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis
    ):
        return tuple(int(a) for a in axis)
    raise TypeError(
        f"QuantSpec(axis={axis!r}): axis must be an int (one scale per index along it), "
        "a non-empty tuple of ints, or None (one scale per tensor)"
    )


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Integer fake-quantization of a parameter.

    Attributes:
      bits: integer width, 2 to 16.
      symmetric: True (default): absmax scale, narrow signed range
        ``[-(2^(b-1)-1), 2^(b-1)-1]``, zero point 0. False: min/max scale over the
        full signed range with an integer zero point.
      axis: channel axis (or axes) that get their own scale; -1 (default) is the
        output channel of a Flax Dense or Conv kernel; None is one scale per tensor.
      ste: straight-through gradient: "clipped" (1 inside the clipping range,
        0 outside) or "identity" (1 everywhere).
    """

    bits: int = 8
    symmetric: bool = True
    axis: int | tuple[int, ...] | None = -1
    ste: str = "clipped"

    def __post_init__(self):
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
            raise TypeError(f"QuantSpec(bits={bits!r}): bits must be an int, e.g. QuantSpec(bits=8)")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"QuantSpec(bits={bits}): bits must lie in [{MIN_BITS}, {MAX_BITS}]; "
                "e.g. QuantSpec(bits=8), or leave the parameter float by giving its rule quant=None"
            )
        object.__setattr__(self, "bits", int(bits))
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec(symmetric={self.symmetric!r}): use True or False")
        object.__setattr__(self, "axis", _normalize_axis(self.axis))
        if self.ste not in ("clipped", "identity"):
            raise ValueError(f"QuantSpec(ste={self.ste!r}): use ste='clipped' or ste='identity'")


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class NM:
    """N:M structured sparsity: in every group of ``m`` consecutive entries along
    ``axis``, keep the ``n`` largest magnitudes (ties: lower index pruned first).

    The default axis -2 is the input (contraction) axis of Flax Dense ``(in, out)``
    and Conv ``(..., in, out)`` kernels, the layout sparse tensor cores use. An
    axis whose length is not a multiple of ``m`` is padded: the last, shorter group
    keeps ``min(n, length)`` entries.

    >>> NM(2, 4)
    NM(n=2, m=4, axis=-2)
    """

    n: int
    m: int
    axis: int = -2

    def __post_init__(self):
        n = _check_int(self.n, "NM(n)", 1)
        m = _check_int(self.m, "NM(m)", 2)
        if n >= m:
            raise ValueError(f"NM(n={n}, m={m}): n must be smaller than m (n = m would prune nothing); e.g. NM(2, 4)")
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
            raise TypeError(f"NM(axis={self.axis!r}): axis must be an int")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "axis", int(self.axis))


@dataclasses.dataclass(frozen=True)
class Channels:
    """Structured pruning of whole channels: slices along ``axis`` with the smallest L2 norm.

    The default axis -1 is the output axis of Flax Dense (neurons) and Conv (filters)
    kernels. With ``bias=True`` the sibling ``.../bias`` of a ``.../kernel`` (if it has
    one entry per channel) is masked with the same channels, so a pruned neuron
    outputs exactly 0 before its activation. The fraction of channels pruned comes
    from ``PruneSpec(sparsity=...)`` (a float or a schedule); the count is
    ``round(sparsity * channels)``, ties broken by lower channel index first.

    >>> Channels()
    Channels(axis=-1, bias=True)
    """

    axis: int = -1
    bias: bool = True

    def __post_init__(self):
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
            raise TypeError(f"Channels(axis={self.axis!r}): axis must be an int")
        if not isinstance(self.bias, bool):
            raise TypeError(f"Channels(bias={self.bias!r}): use True or False")
        object.__setattr__(self, "axis", int(self.axis))


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """Mask-based pruning of a parameter. Give exactly one of:

    Attributes:
      sparsity: magnitude pruning to this fraction of zeros, a float in [0, 1)
        (a :func:`jaxqp.constant` schedule) or a schedule such as
        :func:`jaxqp.polynomial`. The count pruned is ``round(sparsity * size)``.
      threshold: prune every entry with ``|w| < threshold`` (recomputed at each
        update; pruned entries stay pruned).
      structure: :class:`NM` structured sparsity, applied from ``init`` on (its
        sparsity is ``1 - n / m``; give no ``sparsity``), or :class:`Channels`
        (whole channels; ``sparsity`` is the fraction of channels pruned).
      scope: "layer" (default): each parameter meets ``sparsity`` on its own.
        "global": every parameter matched with an equal global spec shares one
        magnitude threshold, so ``sparsity`` holds over them together (found by
        counting, never by concatenating the parameters).
    """

    sparsity: float | Schedule | None = None
    threshold: float | None = None
    structure: NM | Channels | None = None
    scope: str = "layer"

    def __post_init__(self):
        if self.scope not in ("layer", "global"):
            raise ValueError(f"PruneSpec(scope={self.scope!r}): use scope='layer' or scope='global'")
        if self.scope == "global" and (self.sparsity is None or self.structure is not None):
            raise ValueError(
                "PruneSpec(scope='global') is unstructured magnitude pruning: give sparsity= and no "
                "structure= or threshold=; e.g. PruneSpec(sparsity=0.9, scope='global')"
            )
        if self.structure is not None and not isinstance(self.structure, (NM, Channels)):
            raise TypeError(f"PruneSpec(structure={self.structure!r}): use jaxqp.NM(n, m) or jaxqp.Channels()")
        if isinstance(self.structure, Channels):
            if self.sparsity is None or self.threshold is not None:
                raise ValueError(
                    "PruneSpec(structure=Channels(...)) needs sparsity= (the fraction of channels "
                    "pruned) and no threshold=; e.g. PruneSpec(sparsity=0.5, structure=Channels())"
                )
        elif sum(x is not None for x in (self.sparsity, self.threshold, self.structure)) != 1:
            raise ValueError(
                "PruneSpec needs exactly one of sparsity=, threshold= or structure=NM(...); "
                "e.g. PruneSpec(sparsity=0.8), PruneSpec(threshold=1e-3) or PruneSpec(structure=NM(2, 4))"
            )
        if self.sparsity is not None and not isinstance(self.sparsity, Schedule):
            object.__setattr__(self, "sparsity", constant(check_sparsity(self.sparsity, "PruneSpec(sparsity)")))
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t >= 0:
                raise ValueError(f"PruneSpec(threshold={t!r}): threshold must be a float >= 0")
            object.__setattr__(self, "threshold", float(t))
