"""Checks every spec shares: bits, percentiles, choices, integers, and a short repr (specs layer).

Each check returns the normalized value or raises a ``TypeError``/``ValueError`` that names
the spec, the field and the fix.

Example:
    >>> check_bits(8, "QuantSpec")
    8
    >>> choice("max", ("max", "mse"), "calibration")
"""

from __future__ import annotations

import dataclasses
import numbers

MIN_BITS, MAX_BITS = 1, 16


def check_bits(bits, owner: str) -> int:
    """``bits`` as an int in [1, 16], or a TypeError/ValueError naming ``owner`` and the fix."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{owner}(bits={bits!r}): bits must be an int, e.g. {owner}(bits=8)")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(
            f"{owner}(bits={bits}): bits must lie in [{MIN_BITS}, {MAX_BITS}]; "
            f"e.g. {owner}(bits=8), or leave the tensor float by giving its rule no spec"
        )
    return int(bits)


def check_percentile(p, owner: str) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < float(p) <= 100:
        raise ValueError(f"{owner}(percentile={p!r}): percentile must lie in (0, 100], e.g. percentile=99.99")
    return float(p)


def short_repr(spec) -> str:
    """``Name(bits=..., <fields that differ from their defaults>)``."""
    fields = [f"bits={spec.bits}"]
    for f in dataclasses.fields(spec)[1:]:
        value = getattr(spec, f.name)
        if value != f.default:
            fields.append(f"{f.name}={value!r}")
    return f"{type(spec).__name__}({', '.join(fields)})"


def choice(value, allowed, field: str, owner: str = "QuantSpec"):
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{owner}({field}={value!r}): unknown {field}; use one of {options}")


def check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    return int(value)
