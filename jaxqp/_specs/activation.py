"""``ActSpec``: fake-quantization of a layer's input activations (specs layer).

An ``ActSpec`` rides on a :class:`jaxqp.Rule` next to the weight specs:
``Rule(r".*/kernel", quant=QuantSpec(bits=8), act=ActSpec(bits=8))`` quantizes
each matched kernel and the input its layer multiplies it with (w8a8).

Example:
    >>> ActSpec(bits=4, range="pact", signed=False)
    ActSpec(bits=4, signed=False, range='pact')
"""

from __future__ import annotations

import dataclasses
import numbers

from .checks import check_bits, check_percentile, choice, short_repr

RANGES = ("dynamic", "static", "pact", "lsq", "lsq+")


@dataclasses.dataclass(frozen=True, repr=False)
class ActSpec:
    """How the input of a matched layer is fake-quantized.

    Attributes:
      bits: 2 to 16.
      symmetric: False (default): affine, full range, integer zero point.
        True: narrow signed range and zero point 0.
      signed: False: unsigned codes ``[0, 2^b - 1]``, e.g. after a ReLU.
      range: where the range comes from:
        "dynamic" (default): from each batch as it comes (per tensor, or per
        row with ``per_token``); "static": ranges kept in the state, an EMA of
        the batches seen in training (``decay``) or set by :func:`jaxqp.calibrate`
        (the first batch's range is used until one is recorded); "pact": a learned
        clip ``alpha`` (Choi et al. 2018); "lsq" / "lsq+": a learned step
        (and offset) (Esser et al. 2020; Bhalgat et al. 2020).
      per_token: dynamic ranges per row: the last axis is reduced, every other
        axis keeps its own range (one per token of a ``(batch, tokens, features)``
        input).
      calibration: "max" (default) or "percentile" for observed ranges.
      percentile: for ``calibration="percentile"``, in (0, 100].
      decay: EMA decay of static ranges, in [0, 1).
      init: initial ``alpha`` (pact) or initial range ``step * qmax`` (lsq, lsq+)
        until :func:`jaxqp.calibrate` sets them from data.
      scale_pow2: round scales up to powers of two (symmetric dynamic/static ranges).
      integer: run the layer's matmul as int8 x int8 -> int32 (``lax.dot_general``)
        in training and evaluation, for linen ``nn.Dense`` / NNX ``nnx.Linear``, and
        ``nn.DenseGeneral`` / ``nnx.LinearGeneral`` contracting trailing input axes
        without batch axes (other layers keep the fake-quant matmul, same numbers);
        needs power-of-two scales on both operands
        (``symmetric=True, scale_pow2=True`` here and on the weight's QuantSpec), so
        the result equals the fake-quant matmul bit for bit (see ``jaxqp.numerics.int_dense``).
    """

    bits: int = 8
    symmetric: bool = False
    signed: bool = True
    range: str = "dynamic"
    per_token: bool = False
    calibration: str = "max"
    percentile: float = 99.99
    decay: float = 0.99
    init: float = 6.0
    scale_pow2: bool = False
    integer: bool = False

    def __post_init__(self):
        bits = check_bits(self.bits, "ActSpec")
        if bits < 2:
            raise ValueError(f"ActSpec(bits={bits}): activations take 2 to 16 bits, e.g. ActSpec(bits=8)")
        object.__setattr__(self, "bits", bits)
        for flag in ("symmetric", "signed", "per_token", "scale_pow2", "integer"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"ActSpec({flag}={getattr(self, flag)!r}): use True or False")
        choice(self.range, RANGES, "range", "ActSpec")
        choice(self.calibration, ("max", "percentile"), "calibration", "ActSpec")
        object.__setattr__(self, "percentile", check_percentile(self.percentile, "ActSpec"))
        d = self.decay
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d < 1:
            raise ValueError(f"ActSpec(decay={d!r}): decay must lie in [0, 1), e.g. decay=0.99")
        if isinstance(self.init, bool) or not isinstance(self.init, numbers.Real) or not self.init > 0:
            raise ValueError(f"ActSpec(init={self.init!r}): init must be a float > 0")
        object.__setattr__(self, "decay", float(d))
        object.__setattr__(self, "init", float(self.init))
        if self.per_token and self.range != "dynamic":
            raise ValueError("ActSpec(per_token=True) is for range='dynamic' (one range per row of each batch)")
        if self.range == "lsq" and not self.symmetric:
            raise ValueError("ActSpec(range='lsq') learns a symmetric step: give symmetric=True "
                             "(or range='lsq+' for a learned offset too)")
        if self.range == "lsq+" and (self.symmetric or not self.signed):
            raise ValueError("ActSpec(range='lsq+') learns an offset: leave symmetric=False, signed=True")
        if self.scale_pow2 and not (self.symmetric and self.range in ("dynamic", "static")):
            raise ValueError("ActSpec(scale_pow2=True) needs symmetric=True and range='dynamic' or 'static'")
        if self.integer and not (self.range == "dynamic" and self.symmetric and self.signed and self.scale_pow2
                                 and self.bits <= 8 and self.calibration == "max"):
            raise ValueError("ActSpec(integer=True) runs an int8 matmul that must equal the fake-quant one: "
                             "give bits <= 8, range='dynamic', symmetric=True, scale_pow2=True, "
                             "calibration='max', e.g. ActSpec(bits=8, symmetric=True, per_token=True, "
                             "scale_pow2=True, integer=True)")
        if self.range == "pact" and not self.symmetric and self.signed:
            raise ValueError("ActSpec(range='pact') clips to [0, alpha] (signed=False) or [-alpha, alpha] "
                             "(symmetric=True); e.g. ActSpec(range='pact', signed=False)")

    def __repr__(self):
        return short_repr(self)
