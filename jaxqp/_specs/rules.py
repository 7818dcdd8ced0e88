"""Rules and plans: which parameter gets which spec (specs layer).

A :class:`Rule` pairs a regular expression with specs. :func:`resolve` walks a
parameter tree and gives each float leaf the specs of the *first* rule whose
pattern ``re.fullmatch``-es its path; the result is a static, hashable
:class:`Plan`. Non-float leaves (integer counters, RNG keys) are never touched.
A rule that matches no float leaf is an error, because it is almost always a
typo in the pattern.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    >>> plan = resolve([Rule(r".*/kernel", quant=QuantSpec(bits=8))], params)
    >>> [(leaf.path, leaf.quant.bits if leaf.quant else None) for leaf in plan.leaves]
    [('Dense_0/bias', None), ('Dense_0/kernel', 8)]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from .activation import ActSpec
from .layout import LAYOUTS, in_layout
from .paths import paths_and_leaves
from .prune import Blocks, PruneSpec
from .quant import QuantSpec

_EXAMPLES = 6


@dataclasses.dataclass(frozen=True)
class Rule:
    """``Rule(pattern, quant=None, prune=None, act=None, layout="in_out")``: specs for the paths ``pattern`` matches.

    ``act`` fake-quantizes the *input* of the layer that owns a matched kernel
    (see :class:`jaxqp.ActSpec`). A rule with no spec excludes what it matches
    from later rules (first match wins), e.g. ``Rule(r"head/.*")`` before a
    catch-all rule.

    Attributes:
      pattern: a regex, ``re.fullmatch``-ed against each leaf's path (``a/b/kernel``).
      quant: the weight's :class:`QuantSpec`, or None.
      prune: the weight's :class:`PruneSpec`, or None.
      act: the layer input's :class:`ActSpec`, or None.
      layout: ``"in_out"`` (Flax kernels ``(*spatial, in, out)``; default) or ``"out_in"``
        (Equinox and PyTorch weights ``(out, in, *spatial)``): the specs' axes keep their Flax
        meaning (``axis=-1`` is the output channel, ``NM(axis=-2)`` the input axis) and are
        mapped onto the matched arrays (see ``jaxqp._specs.layout``).
    """

    pattern: str
    quant: QuantSpec | None = None
    prune: PruneSpec | None = None
    act: ActSpec | None = None
    layout: str = "in_out"

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule(pattern={self.pattern!r}): pattern must be a regex string, e.g. r'.*/kernel'")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"Rule(pattern={self.pattern!r}) is not a valid regular expression: {err}") from None
        if self.quant is not None and not isinstance(self.quant, QuantSpec):
            raise TypeError(f"Rule({self.pattern!r}, quant={self.quant!r}): quant must be a jaxqp.QuantSpec or None")
        if self.prune is not None and not isinstance(self.prune, PruneSpec):
            raise TypeError(f"Rule({self.pattern!r}, prune={self.prune!r}): prune must be a jaxqp.PruneSpec or None")
        if self.act is not None and not isinstance(self.act, ActSpec):
            raise TypeError(f"Rule({self.pattern!r}, act={self.act!r}): act must be a jaxqp.ActSpec or None")
        if self.layout not in LAYOUTS:
            raise ValueError(f"Rule({self.pattern!r}, layout={self.layout!r}): layout must be 'in_out' (Flax "
                             "kernels) or 'out_in' (Equinox / PyTorch weights)")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What happens to one leaf: its path, shape, dtype and specs (None: untouched).

    Attributes:
      path: the leaf's path.
      shape: its shape.
      dtype: its dtype name.
      quant: its :class:`QuantSpec`, or None.
      prune: its :class:`PruneSpec`, or None.
      act: its layer input's :class:`ActSpec`, or None.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    quant: QuantSpec | None = None
    prune: PruneSpec | None = None
    act: ActSpec | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static result of :func:`resolve`: one :class:`LeafPlan` per leaf, in tree order.

    Attributes:
      leaves: one :class:`LeafPlan` per leaf of the tree, in tree order.
    """

    leaves: tuple[LeafPlan, ...]

    def check(self, tree, what: str = "params") -> tuple[list[tuple[str, Any]], Any]:
        """Flattens ``tree`` and checks it is the tree this plan was made for.

        Returns ``([(path, leaf), ...], treedef)``; raises ValueError naming the
        first path that differs.
        """
        flat, treedef = paths_and_leaves(tree)
        expected = {leaf.path: leaf for leaf in self.leaves}
        got = {path for path, _ in flat}
        missing = sorted(p for p in expected if p not in got)
        extra = sorted(p for p in got if p not in expected)  # sorted: the message is the same every run
        if missing or extra:
            raise ValueError(
                f"{what} do not match the jaxqp state: the state was made for another tree "
                f"(missing from {what}: {missing[:_EXAMPLES]}; not in the state: {extra[:_EXAMPLES]}). "
                f"Fix: call t.init({what}) on this tree."
            )
        for path, leaf in flat:
            want = expected[path]
            shape = leaf_shape(leaf)
            if shape != want.shape:
                raise ValueError(
                    f"{what} leaf '{path}' has shape {shape} but the jaxqp state was made for "
                    f"shape {want.shape}. Fix: call t.init({what}) on this tree."
                )
        return flat, treedef

    def by_path(self) -> dict[str, LeafPlan]:
        return {leaf.path: leaf for leaf in self.leaves}


def leaf_shape(leaf) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def _dtype(leaf) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return jnp.dtype(dtype) if dtype is not None else np.result_type(leaf)


def is_float(leaf) -> bool:
    """True for floating-point leaves (the only ones rules apply to)."""
    try:
        return jnp.issubdtype(_dtype(leaf), jnp.floating)
    except TypeError:  # e.g. a typed PRNG key or an object leaf
        return False


def _as_rules(rules) -> tuple[Rule, ...]:
    if isinstance(rules, Rule):
        return (rules,)
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a list of jaxqp.Rule, got {type(rules).__name__}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, Rule):
            raise TypeError(f"rules[{i}] is {rule!r}; every rule must be a jaxqp.Rule(pattern, quant=, prune=)")
    return tuple(rules)


def _check_fits(path: str, shape: tuple[int, ...], rule: Rule, index: int) -> None:
    where = f"rules[{index}] (pattern {rule.pattern!r}) matches '{path}' of shape {shape}, but"
    fix = "Fix: pick an axis of this parameter, or a rule that does not match it."
    if 0 in shape and (rule.quant is not None or rule.prune is not None or rule.act is not None):
        raise ValueError(f"{where} it holds no values: there is nothing to quantize or prune (a scale or a "
                         "threshold of no values is undefined). Fix: narrow the pattern so that it skips "
                         f"'{path}', e.g. with a rule before it that matches '{path}' and does nothing")

    def in_range(axis) -> bool:
        return -len(shape) <= axis < len(shape)

    structure = rule.prune.structure if rule.prune is not None else None
    if isinstance(structure, Blocks):
        field, axes = f"axes={structure.axes}", structure.axes
    elif structure is not None:
        field, axes = f"axis={structure.axis}", (structure.axis,)
    else:
        field, axes = "", ()
    for a in axes:
        if not in_range(a):
            raise ValueError(f"{where} {type(structure).__name__}({field}) is out of range. {fix}")
    quant = rule.quant
    if rule.act is not None and rule.act.integer:
        _check_integer(where, shape, quant)
    if quant is None:
        return
    axes = () if quant.axis is None else (quant.axis,) if isinstance(quant.axis, int) else quant.axis
    for a in axes:
        if not in_range(a):
            raise ValueError(f"{where} QuantSpec(axis={quant.axis}) is out of range. "
                             "Fix: use axis=None (per tensor) for it, or a rule that does not match it.")
    if quant.group_size is not None:
        if not in_range(quant.group_axis):
            raise ValueError(f"{where} QuantSpec(group_axis={quant.group_axis}) is out of range. {fix}")
        if quant.group_axis % len(shape) in {a % len(shape) for a in axes}:
            raise ValueError(f"{where} QuantSpec(group_axis={quant.group_axis}) is also its channel axis "
                             f"(axis={quant.axis}). Fix: group along another axis, e.g. group_axis=-2, axis=-1.")


def _check_integer(where: str, shape, quant: QuantSpec | None) -> None:
    ok = (quant is not None and quant.linear and quant.bits <= 8 and quant.symmetric and quant.signed
          and quant.scale_pow2 and quant.group_size is None and quant.learned is None
          and quant.calibration == "max" and quant.rounding == "nearest" and len(shape) >= 2
          and quant.axis in (None, -1, len(shape) - 1))
    if not ok:
        raise ValueError(
            f"{where} its ActSpec(integer=True) needs a kernel of 2+ axes with an integer weight spec whose "
            "codes fit int8 and whose scales are powers of two per last-axis channel or per tensor. "
            "Fix: quant=jaxqp.QuantSpec(bits=8, scale_pow2=True) (no groups, LSQ or clipping "
            "calibration), or drop integer=True."
        )


def resolve(rules: Sequence[Rule] | Rule, params: Any) -> Plan:
    """Matches ``rules`` against the float leaves of ``params`` (first match wins).

    Raises ValueError if a rule matches no float leaf, listing some real paths.
    ``params`` may hold arrays or ``jax.ShapeDtypeStruct``s.

    Args:
      rules: the rules, or one rule.
      params: the tree they apply to.

    Returns:
      The :class:`Plan`.

    Raises:
      ValueError: if a rule matches no float leaf or a spec does not fit its leaf.
    """
    rules = _as_rules(rules)
    flat, _ = paths_and_leaves(params)
    used = [False] * len(rules)
    leaves, seen = [], set()
    for path, leaf in flat:
        if path in seen:
            raise ValueError(f"two leaves share the path '{path}'; jaxqp needs distinct paths")
        seen.add(path)
        shape, dtype = leaf_shape(leaf), _dtype(leaf) if is_float(leaf) else None
        quant = prune = act = None
        if dtype is not None:
            for i, rule in enumerate(rules):
                if rule.matches(path):
                    used[i] = True
                    quant, prune = in_layout(rule.quant, rule.prune, rule.layout, path, len(shape))
                    act = rule.act
                    _check_fits(path, shape, dataclasses.replace(rule, quant=quant, prune=prune), i)
                    break
        dtype_name = str(dtype if dtype is not None else _safe_dtype(leaf))
        leaves.append(LeafPlan(path, shape, dtype_name, quant, prune, act))
    unused = [i for i, u in enumerate(used) if not u]
    if unused:
        i = unused[0]
        examples = [leaf.path for leaf in leaves if is_float_dtype(leaf.dtype)][:_EXAMPLES]
        raise ValueError(
            f"rules[{i}] (pattern {rules[i].pattern!r}) matches no float parameter"
            + (" not already taken by an earlier rule" if i else "")
            + f". Paths look like: {examples}. Fix the pattern (it must match the whole path, "
            "re.fullmatch) or remove the rule."
        )
    return Plan(tuple(leaves))


def _safe_dtype(leaf) -> str:
    try:
        return str(_dtype(leaf))
    except TypeError:
        return type(leaf).__name__


def is_float_dtype(dtype: str) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        return False
