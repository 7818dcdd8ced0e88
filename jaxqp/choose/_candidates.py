"""Candidates: the ways one layer may be compressed, named (tools layer).

A candidate is a weight ``QuantSpec``, a ``PruneSpec``, or both: what one
``jaxqp.Rule`` would do to one layer. The sweep tries each on each layer; the
allocation picks one per layer and turns the picks back into rules.

Example:
    >>> import jaxqp
    >>> from jaxqp.choose import Candidate
    >>> Candidate.of(jaxqp.QuantSpec(bits=4, group_size=32)).name
    'w4g32'
    >>> Candidate.of((jaxqp.QuantSpec(bits=8), jaxqp.PruneSpec(sparsity=0.8))).name
    'w8+s80'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._specs.prune import NM, Channels, PruneSpec
from .._specs.quant import QuantSpec
from .._specs.rules import Rule
from .._specs.schedules import Constant

KEEP = "keep"  # the name of "leave the layer as it is" in sensitivity tables and allocations


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to compress one layer: a weight quantizer, a pruner, or both.

    Attributes:
      name: the column name in tables, plots and JSON.
      quant: the weight ``QuantSpec`` (None: weights stay float).
      prune: the ``PruneSpec`` (None: dense). Its sparsity must be a constant: the sweep
        measures, and the allocation counts bytes of, the final mask.
    """

    name: str
    quant: QuantSpec | None = None
    prune: PruneSpec | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == KEEP:
            raise ValueError(f"candidate name {self.name!r} must be a non-empty string other than {KEEP!r} "
                             f"({KEEP!r} names the uncompressed layer)")
        if self.quant is None and self.prune is None:
            raise ValueError(f"candidate {self.name!r} compresses nothing: give it quant=, prune= or both")
        if self.quant is not None and not isinstance(self.quant, QuantSpec):
            raise TypeError(f"candidate {self.name!r}: quant= must be a jaxqp.QuantSpec, got {self.quant!r}")
        if self.prune is not None:
            if not isinstance(self.prune, PruneSpec):
                raise TypeError(f"candidate {self.name!r}: prune= must be a jaxqp.PruneSpec, got {self.prune!r}")
            scheduled = self.prune.sparsity is not None and not isinstance(self.prune.sparsity, Constant)
            if scheduled or self.prune.regrow is not None:
                raise ValueError(
                    f"candidate {self.name!r} prunes on a schedule or regrows: its final mask is unknown when "
                    "the sweep runs. Fix: give the final sparsity as a number, e.g. PruneSpec(sparsity=0.8); "
                    "the rules that allocate() returns can be given a schedule afterwards.")
            if isinstance(self.prune.structure, Channels) and self.prune.structure.next is not None:
                raise ValueError(
                    f"candidate {self.name!r} prunes channels of the next layer too (Channels(next=...)): "
                    "its effect is not one layer's, so one-layer sensitivities cannot price it. Fix: "
                    "Channels() without next=")
            if self.prune.criterion not in ("magnitude", "random"):
                raise ValueError(
                    f"candidate {self.name!r} prunes by {self.prune.criterion!r}, which needs gradients or "
                    "activations from training steps: its mask is unknown when the sweep runs. Fix: try "
                    "magnitude pruning in the sweep (criterion='magnitude')")

    @classmethod
    def of(cls, spec: Any, name: str | None = None) -> Candidate:
        """A candidate from a ``QuantSpec``, a ``PruneSpec``, a ``(quant, prune)`` pair or a ``Candidate``.

        Args:
          spec: what to try on a layer.
          name: its name; default: a short name such as ``w4``, ``w2g32``, ``s90``, ``nm2:4`` or ``w8+s80``.

        Returns:
          The candidate.
        """
        if isinstance(spec, Candidate):
            return spec if name is None else dataclasses.replace(spec, name=name)
        if isinstance(spec, QuantSpec):
            quant, prune = spec, None
        elif isinstance(spec, PruneSpec):
            quant, prune = None, spec
        elif isinstance(spec, tuple) and len(spec) == 2:
            quants = [x for x in spec if isinstance(x, QuantSpec)]
            prunes = [x for x in spec if isinstance(x, PruneSpec)]
            if len(quants) != 1 or len(prunes) != 1:
                raise TypeError(f"a candidate pair is (QuantSpec, PruneSpec), got {spec!r}")
            quant, prune = quants[0], prunes[0]
        else:
            raise TypeError(f"a candidate is a jaxqp.QuantSpec, a jaxqp.PruneSpec or a (QuantSpec, PruneSpec) "
                            f"pair, got {spec!r}")
        return cls(name or _short_name(quant, prune), quant, prune)

    def rule(self, path: str) -> Rule:
        """The ``jaxqp.Rule`` that applies this candidate to the leaf at ``path`` (and nothing else)."""
        return Rule(re.escape(path), quant=self.quant, prune=self.prune)


def _short_name(quant: QuantSpec | None, prune: PruneSpec | None) -> str:
    parts = []
    if quant is not None:
        fmt = "w" if quant.format == "int" else quant.format
        name = f"{fmt}{quant.bits}" if quant.format == "int" else fmt
        if quant.group_size is not None:
            name += f"g{quant.group_size}"
        if quant.axis is None:
            name += "t"  # per tensor
        parts.append(name)
    if prune is not None:
        structure = prune.structure
        if isinstance(structure, NM):
            parts.append(f"nm{structure.n}:{structure.m}")
        elif prune.sparsity is not None:
            prefix = "c" if isinstance(structure, Channels) else "s"
            value = getattr(prune.sparsity, "value", None)  # a schedule is refused right after naming
            parts.append(prefix + ("?" if value is None else str(round(100 * value))))
        else:
            parts.append(f"t{prune.threshold:g}")
    return "+".join(parts)


def as_candidates(candidates) -> tuple[Candidate, ...]:
    """Normalizes a mapping ``{name: spec}`` or a sequence of specs to distinct candidates.

    Args:
      candidates: specs as accepted by :meth:`Candidate.of`, in a list (or tuple) or a name -> spec
        mapping. Inside the list, a ``(QuantSpec, PruneSpec)`` pair is one candidate.

    Returns:
      The candidates, in the given order.
    """
    if isinstance(candidates, Mapping):
        out = tuple(Candidate.of(spec, name) for name, spec in candidates.items())
    elif isinstance(candidates, Sequence) and not isinstance(candidates, (str, bytes)):
        out = tuple(Candidate.of(spec) for spec in candidates)
    else:
        raise TypeError("candidates must be a list of specs (QuantSpec, PruneSpec, (QuantSpec, PruneSpec) or "
                        f"Candidate) or a dict name -> spec, got {candidates!r}")
    if not out:
        raise ValueError("candidates is empty: give at least one spec to try, e.g. [jaxqp.QuantSpec(bits=4)]")
    names = [c.name for c in out]
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        raise ValueError(f"two candidates share the name {doubles[0]!r}; pass a dict name -> spec to name them")
    return out

