"""``QuantSpec``: frozen, validated fake-quantization of a weight (specs layer).

Specs are static and hashable: they travel as metadata of the transform state,
so jit caches on them and never on their values. Bad values fail here, at
construction, with the field and a fix in the message.

Example:
    >>> QuantSpec(bits=4, axis=None)
    QuantSpec(bits=4, axis=None)
"""

from __future__ import annotations

import dataclasses
import numbers

from ..numerics._linear import SteKind
from .checks import check_bits, check_int, check_percentile, choice, short_repr

FORMATS = ("int", "ternary", "pow2", "e4m3", "e5m2")
CALIBRATIONS = ("max", "percentile", "mse")


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


@dataclasses.dataclass(frozen=True, repr=False)
class QuantSpec:
    """Fake-quantization of a weight.

    Attributes:
      bits: 1 to 16. With ``format="int"``, 1 bit is binary: ``sign(w) * mean|w|``.
      symmetric: True (default): zero point 0, narrow signed range
        ``[-(2^(b-1)-1), 2^(b-1)-1]``. False: full range with an integer zero point.
      axis: channel axis (or axes) that get their own scale; -1 (default) is the
        output channel of a Flax Dense or Conv kernel; None is one scale per tensor.
      ste: straight-through gradient where values can be clipped: "clipped"
        (1 inside the clipping range, 0 outside) or "identity" (1 everywhere).
      format: "int" (default), "ternary" (bits=2, TWN), "pow2" (``sign(w) 2^k``,
        bits 2-8), "e4m3" or "e5m2" (fp8, bits=8).
      signed: False quantizes to ``[0, 2^b - 1]`` (negative values clip to 0).
      calibration: how the range is found: "max" (default; absmax or min/max),
        "percentile" (of ``|w|``, see ``percentile``) or "mse" (clip ratio search).
      percentile: for ``calibration="percentile"``, in (0, 100].
      group_size: one scale per block of ``group_size`` entries along
        ``group_axis`` (and per channel of ``axis``); the last block may be shorter.
      group_axis: the blocked axis, -2 (default) is the input axis of a kernel.
      scale_pow2: round each scale up to a power of two (symmetric formats).
      rounding: "nearest" (half to even) or "stochastic" (needs
        ``jaxqp.transform(rules, seed=...)``; export still rounds to nearest).
      learned: None or "lsq": the step size is a trainable leaf of the state,
        initialised to ``2 mean|w| / sqrt(qmax)`` (Esser et al. 2020), or with
        ``calibration="mse"``/``"percentile"`` to that calibration's scale.
    """

    bits: int = 8
    symmetric: bool = True
    axis: int | tuple[int, ...] | None = -1
    ste: SteKind = "clipped"
    format: str = "int"
    signed: bool = True
    calibration: str = "max"
    percentile: float = 99.99
    group_size: int | None = None
    group_axis: int = -2
    scale_pow2: bool = False
    rounding: str = "nearest"
    learned: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("bits", check_bits(self.bits, "QuantSpec"))
        for flag in ("symmetric", "signed", "scale_pow2"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"QuantSpec({flag}={getattr(self, flag)!r}): use True or False")
        set_("axis", _normalize_axis(self.axis))
        choice(self.ste, ("clipped", "identity"), "ste")
        choice(self.format, FORMATS, "format")
        choice(self.calibration, CALIBRATIONS, "calibration")
        choice(self.rounding, ("nearest", "stochastic"), "rounding")
        choice(self.learned, (None, "lsq"), "learned")
        set_("percentile", check_percentile(self.percentile, "QuantSpec"))
        if self.group_size is not None:
            set_("group_size", check_int(self.group_size, "QuantSpec(group_size)", 1))
        if isinstance(self.group_axis, bool) or not isinstance(self.group_axis, numbers.Integral):
            raise TypeError(f"QuantSpec(group_axis={self.group_axis!r}): group_axis must be an int")
        self._check_combination()

    @property
    def linear(self) -> bool:
        """Integer codes times a scale (what ``group_size``, calibration and LSQ apply to)."""
        return self.format == "int" and self.bits >= 2

    def _check_combination(self):
        bits, fmt = self.bits, self.format
        if fmt == "ternary" and bits != 2:
            raise ValueError(f"QuantSpec(format='ternary', bits={bits}): ternary codes take 2 bits; "
                             "use QuantSpec(bits=2, format='ternary')")
        if fmt == "pow2" and not 2 <= bits <= 8:
            raise ValueError(f"QuantSpec(format='pow2', bits={bits}): use 2 to 8 bits "
                             "(a sign, 2^(bits-1)-1 exponents and zero), e.g. QuantSpec(bits=4, format='pow2')")
        if fmt in ("e4m3", "e5m2") and bits != 8:
            raise ValueError(f"QuantSpec(format={fmt!r}, bits={bits}): fp8 formats take bits=8")
        if not self.linear:
            what = "1-bit binary" if fmt == "int" else f"format={fmt!r}"
            for field, default in (("calibration", "max"), ("group_size", None), ("rounding", "nearest"),
                                   ("learned", None), ("symmetric", True), ("signed", True)):
                if getattr(self, field) != default:
                    raise ValueError(f"QuantSpec({field}={getattr(self, field)!r}) does not apply to {what}; "
                                     f"leave {field}={default!r} or use an integer format with bits >= 2")
        if self.scale_pow2 and (not self.symmetric or fmt in ("ternary", "pow2") or bits == 1):
            raise ValueError("QuantSpec(scale_pow2=True) needs a symmetric integer or fp8 format with bits >= 2")
        if self.learned == "lsq" and (not self.symmetric or self.scale_pow2):
            raise ValueError("QuantSpec(learned='lsq') learns a symmetric step size: "
                             "give symmetric=True and scale_pow2=False")

    def __repr__(self):
        return short_repr(self)
