"""Frozen, validated pruning specs: ``PruneSpec`` and its structures (specs layer).

Like :class:`jaxqp.QuantSpec`, these are static and hashable, and bad values fail at
construction with the field and a fix in the message.

Example:
    >>> PruneSpec(sparsity=0.5).sparsity
    Constant(value=0.5)
    >>> NM(2, 4)
    NM(n=2, m=4, axis=-2)
"""

from __future__ import annotations

import dataclasses
import numbers

from .checks import check_int, choice
from .schedules import Schedule, check_sparsity, constant


@dataclasses.dataclass(frozen=True)
class NM:
    """N:M structured sparsity: in every group of ``m`` consecutive entries along
    ``axis``, keep the ``n`` largest magnitudes (ties: lower index pruned first).

    The default axis -2 is the input (contraction) axis of Flax Dense ``(in, out)``
    and Conv ``(..., in, out)`` kernels, the layout sparse tensor cores use. An
    axis whose length is not a multiple of ``m`` is padded: the last, shorter group
    keeps ``min(n, length)`` entries.

    Attributes:
      n: entries kept per group.
      m: the group length (at most 32).
      axis: the axis groups run along.

    Example:
      >>> NM(2, 4)
      NM(n=2, m=4, axis=-2)
    """

    n: int
    m: int
    axis: int = -2

    def __post_init__(self):
        n = check_int(self.n, "NM(n)", 1)
        m = check_int(self.m, "NM(m)", 2)
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

    ``next`` names (exact path) the kernel of the layer that consumes these channels;
    its input rows (axis -2) of pruned channels are zeroed too, so the pruned channels
    can be removed from both layers. Its axis -2 must have one entry per channel.

    Attributes:
      axis: the channel axis.
      bias: also mask the sibling bias of a kernel.
      next: the exact path of the consuming layer's kernel, or None.

    Example:
      >>> Channels()
      Channels(axis=-1, bias=True, next=None)
    """

    axis: int = -1
    bias: bool = True
    next: str | None = None

    def __post_init__(self):
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
            raise TypeError(f"Channels(axis={self.axis!r}): axis must be an int")
        if not isinstance(self.bias, bool):
            raise TypeError(f"Channels(bias={self.bias!r}): use True or False")
        if self.next is not None and not isinstance(self.next, str):
            raise TypeError(f"Channels(next={self.next!r}): give the next kernel's path, e.g. 'Dense_1/kernel'")
        object.__setattr__(self, "axis", int(self.axis))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sparsity: whole ``rows x cols`` tiles of the ``axes`` with the smallest L2 norm.

    The fraction of blocks pruned comes from ``PruneSpec(sparsity=...)`` (a float or a
    schedule); the default axes are a kernel's (input, output) axes.

    Attributes:
      rows: the tile's extent along ``axes[0]``.
      cols: the tile's extent along ``axes[1]``.
      axes: the two axes tiled.

    Example:
      >>> Blocks(4, 4)
      Blocks(rows=4, cols=4, axes=(-2, -1))
    """

    rows: int
    cols: int
    axes: tuple[int, int] = (-2, -1)

    def __post_init__(self):
        object.__setattr__(self, "rows", check_int(self.rows, "Blocks(rows)", 1))
        object.__setattr__(self, "cols", check_int(self.cols, "Blocks(cols)", 1))
        axes = self.axes
        if (not isinstance(axes, (tuple, list)) or len(axes) != 2
                or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axes)):
            raise TypeError(f"Blocks(axes={axes!r}): give two ints, e.g. axes=(-2, -1)")
        object.__setattr__(self, "axes", (int(axes[0]), int(axes[1])))


@dataclasses.dataclass(frozen=True)
class RigL:
    """Dynamic sparse training: every ``every`` steps until ``end``, drop and regrow weights.

    At such a step a fraction ``f = drop_fraction * (1 + cos(pi * step / end)) / 2`` of the
    active weights with the smallest ``|w|`` is dropped and as many inactive weights are
    grown, by largest ``|gradient|`` (``grow="gradient"``: RigL, Evci et al. 2020) or at
    random (``grow="random"``: SET, Mocanu et al. 2018), so the sparsity never changes.
    Grown weights start at 0 and :func:`jaxqp.wrap` zeroes their optimizer moments.

    Attributes:
      every: steps between updates.
      drop_fraction: the fraction dropped at step 0 (cosine-decayed).
      end: the last update step.
      grow: "gradient" (RigL) or "random" (SET).

    Example:
      >>> RigL(every=100, end=1000)
      RigL(every=100, drop_fraction=0.3, end=1000, grow='gradient')
    """

    every: int = 100
    drop_fraction: float = 0.3
    end: int = 10_000
    grow: str = "gradient"

    def __post_init__(self):
        object.__setattr__(self, "every", check_int(self.every, "RigL(every)", 1))
        object.__setattr__(self, "end", check_int(self.end, "RigL(end)", 1))
        f = self.drop_fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1:
            raise ValueError(f"RigL(drop_fraction={f!r}): must lie in (0, 1), e.g. 0.3")
        object.__setattr__(self, "drop_fraction", float(f))
        choice(self.grow, ("gradient", "random"), "grow", "RigL")


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
      criterion: what ranks weights for ``sparsity``: "magnitude" (default) ``|w|``,
        "random" (needs ``jaxqp.transform(rules, seed=...)``), "saliency" ``|w * g|``
        "movement" (scores ``-sum_t w * g`` accumulated every step, Sanh et al.
        2020), or "wanda" ``|w| * ||x||`` with the input feature norms recorded by
        :func:`jaxqp.calibrate` (Sun et al. 2023; per layer); gradient criteria use
        magnitude for the first mask at ``init``, Wanda until calibrated.
      regrow: a :class:`RigL` for dynamic sparse training (RigL or SET).
      straight_through: the forward uses the masked weight, but the dense weight
        keeps training (its gradient passes the mask, updates are not masked);
        with ``decay > 0``, SR-STE's ``decay * w`` is added to pruned weights'
        gradients (Zhou et al. 2021).
      scope: "layer" (default): each parameter meets ``sparsity`` on its own.
        "global": every parameter matched with an equal global spec shares one
        magnitude threshold, so ``sparsity`` holds over them together (found by
        counting, never by concatenating the parameters).
        "erk": the parameters matched with an equal spec share ``sparsity`` with
        Erdos-Renyi-Kernel layer densities ``eps * sum(shape) / prod(shape)``
        (Evci et al. 2020), capped at dense; each layer follows the schedule scaled
        by its share.
    """

    sparsity: float | Schedule | None = None
    threshold: float | None = None
    structure: NM | Channels | None = None
    scope: str = "layer"
    criterion: str = "magnitude"
    regrow: RigL | None = None
    straight_through: bool = False
    decay: float = 0.0

    def __post_init__(self):
        self._check_dynamic()
        choice(self.scope, ("layer", "global", "erk"), "scope", "PruneSpec")
        if self.scope != "layer" and (self.sparsity is None or self.structure is not None):
            raise ValueError(
                f"PruneSpec(scope={self.scope!r}) is unstructured magnitude pruning: give sparsity= and no "
                f"structure= or threshold=; e.g. PruneSpec(sparsity=0.9, scope={self.scope!r})"
            )
        if self.structure is not None and not isinstance(self.structure, (NM, Channels, Blocks)):
            raise TypeError(f"PruneSpec(structure={self.structure!r}): use jaxqp.NM(n, m), jaxqp.Channels() "
                            "or jaxqp.Blocks(rows, cols)")
        if isinstance(self.structure, (Channels, Blocks)):
            if self.sparsity is None or self.threshold is not None:
                kind = type(self.structure).__name__
                unit = "channels" if kind == "Channels" else "blocks"
                example = "Channels()" if kind == "Channels" else "Blocks(4, 4)"
                raise ValueError(
                    f"PruneSpec(structure={kind}(...)) needs sparsity= (the fraction of {unit} "
                    f"pruned) and no threshold=; e.g. PruneSpec(sparsity=0.5, structure={example})"
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

    def _check_dynamic(self):
        choice(self.criterion, ("magnitude", "random", "saliency", "movement", "wanda"), "criterion", "PruneSpec")
        if self.regrow is not None and not isinstance(self.regrow, RigL):
            raise TypeError(f"PruneSpec(regrow={self.regrow!r}): use jaxqp.RigL(...)")
        unstructured = self.sparsity is not None and self.structure is None and self.scope == "layer"
        for field, active in (("criterion", self.criterion != "magnitude"), ("regrow", self.regrow is not None)):
            if active and not unstructured:
                raise ValueError(f"PruneSpec({field}={getattr(self, field)!r}) is for unstructured layer-wise "
                                 "pruning: give sparsity= and no structure=/threshold=/scope='global'")
        if not isinstance(self.straight_through, bool):
            raise TypeError(f"PruneSpec(straight_through={self.straight_through!r}): use True or False")
        d = self.decay
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or d < 0:
            raise ValueError(f"PruneSpec(decay={d!r}): decay must be a float >= 0 (SR-STE uses 2e-4 or so)")
        if d > 0 and not self.straight_through:
            raise ValueError("PruneSpec(decay=...) is SR-STE's decay of pruned dense weights: "
                             "it needs straight_through=True")
        object.__setattr__(self, "decay", float(d))

    @property
    def schedule(self) -> Schedule:
        """The sparsity schedule (a float given as ``sparsity=`` is a :func:`jaxqp.constant`).

        Raises:
            ValueError: if this spec prunes by ``threshold=`` or ``NM`` and has no schedule.
        """
        if not isinstance(self.sparsity, Schedule):
            raise ValueError(f"{self!r} has no sparsity schedule (it prunes by threshold= or NM)")
        return self.sparsity

    @property
    def needs_grads(self) -> bool:
        return self.criterion in ("saliency", "movement") or (
            self.regrow is not None and self.regrow.grow == "gradient")

    @property
    def needs_key(self) -> bool:
        return self.criterion == "random" or (self.regrow is not None and self.regrow.grow == "random")
