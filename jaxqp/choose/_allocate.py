"""``allocate``: one candidate per layer, least predicted loss increase within a byte budget (tools layer).

The problem is a multiple-choice knapsack: layer ``i`` takes option ``c`` at cost
``bytes[i, c]`` and predicted loss ``delta[i, c]`` (additive over layers, as in
HAWQ and AutoQuantize); minimise the sum of deltas with the sum of bytes (plus the
untouched leaves) within the budget. It is solved exactly by dynamic programming
over Pareto frontiers: after each layer only the (bytes, loss) points that no other
point beats on both are kept, so the work depends on the frontier's size, not on
the byte count. The final frontier is the whole trade-off curve; ``allocate``
returns its best point within the budget and keeps the curve for plots.

Example:
    >>> import numpy as np
    >>> front = pareto_front(np.array([[10, 4], [10, 4]]), np.array([[0.0, 1.0], [0.0, 3.0]]), fixed=0)
    >>> [(int(b), float(d)) for b, d in zip(front.bytes, front.delta)]
    [(8, 4.0), (14, 1.0), (20, 0.0)]
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .._specs.rules import Rule
from ._candidates import KEEP
from ._sensitivity import Sensitivity


@dataclasses.dataclass(frozen=True, eq=False)
class Front:
    """The Pareto frontier of total bytes against total predicted loss increase.

    Attributes:
      bytes: ``(points,)`` totals, increasing.
      delta: ``(points,)`` predicted loss increases, decreasing.
      parents: per layer, ``(points_after_layer,)`` indices into the previous layer's points.
      options: per layer, ``(points_after_layer,)`` the option index each point took there.
    """

    bytes: np.ndarray
    delta: np.ndarray
    parents: tuple[np.ndarray, ...]
    options: tuple[np.ndarray, ...]

    def choice(self, point: int) -> list[int]:
        """The option index of every layer at frontier point ``point``."""
        picks = []
        for parents, options in zip(reversed(self.parents), reversed(self.options)):
            picks.append(int(options[point]))
            point = int(parents[point])
        return picks[::-1]


def pareto_front(costs: np.ndarray, deltas: np.ndarray, fixed: int = 0, limit: float = np.inf) -> Front:
    """Exact multiple-choice knapsack frontier: every non-dominated (bytes, delta) total.

    Args:
      costs: ``(layers, options)`` bytes; a negative entry marks an option the layer cannot take.
      deltas: ``(layers, options)`` predicted loss increases (finite where ``costs >= 0``).
      fixed: bytes every point pays (the untouched leaves).
      limit: drop points above this many bytes as they arise (the budget).

    Returns:
      The :class:`Front`.
    """
    costs, deltas = np.asarray(costs, np.int64), np.asarray(deltas, np.float64)
    if costs.ndim != 2 or costs.shape != deltas.shape:
        raise ValueError(f"pareto_front: costs and deltas must both be (layers, options), got shapes {costs.shape} "
                         f"and {deltas.shape}")
    points_bytes, points_delta = np.array([fixed], np.int64), np.array([0.0])
    parents, options = [], []
    for i in range(costs.shape[0]):
        allowed = np.flatnonzero(costs[i] >= 0)
        if not len(allowed):
            raise ValueError(f"layer {i} has no option it can take")
        total_bytes = (points_bytes[:, None] + costs[i, allowed][None, :]).ravel()
        total_delta = (points_delta[:, None] + deltas[i, allowed][None, :]).ravel()
        parent = np.repeat(np.arange(len(points_bytes)), len(allowed))
        option = np.tile(allowed, len(points_bytes))
        within = total_bytes <= limit
        if not within.any():
            return Front(np.zeros(0, np.int64), np.zeros(0), (), ())
        total_bytes, total_delta, parent, option = (a[within] for a in (total_bytes, total_delta, parent, option))
        order = np.lexsort((total_delta, total_bytes))  # by bytes, then by delta
        total_delta_sorted = total_delta[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], total_delta_sorted[:-1]]))
        keep = order[total_delta_sorted < best_before]  # strictly better than every cheaper point
        points_bytes, points_delta = total_bytes[keep], total_delta[keep]
        parents.append(parent[keep])
        options.append(option[keep])
    return Front(points_bytes, points_delta, tuple(parents), tuple(options))


@dataclasses.dataclass(frozen=True, eq=False)
class Allocation:
    """The chosen candidate per layer, as rules for ``jaxqp.transform``, with its predicted size and loss.

    Attributes:
      choice: ``{layer path: candidate name or "keep"}``.
      rules: one ``jaxqp.Rule`` per compressed layer (exact-path patterns), ready for ``jaxqp.transform``.
      bytes: the total bytes ``jaxqp.export`` will store (layers and every other leaf).
      predicted_delta: the sum of the chosen layers' loss increases.
      budget_bytes: the budget it was chosen for.
      front: the whole Pareto frontier (bytes against predicted loss increase).
    """

    choice: dict[str, str]
    rules: tuple[Rule, ...]
    bytes: int
    predicted_delta: float
    budget_bytes: int
    front: Front

    def __str__(self) -> str:
        width = max(len(p) for p in self.choice)
        lines = [f"{path:<{width}}  {name}" for path, name in self.choice.items()]
        return "\n".join([*lines, f"{self.bytes} bytes (budget {self.budget_bytes}), predicted loss increase "
                                  f"{self.predicted_delta:+.4f}"])


def allocate(sensitivity: Sensitivity, budget_bytes: int, *, keep: bool = True, use: str = "auto",
             exclude: str | None = None) -> Allocation:
    """One candidate per layer minimising the predicted loss increase with stored bytes within ``budget_bytes``.

    Args:
      sensitivity: what :func:`sensitivity` measured.
      budget_bytes: the most bytes ``jaxqp.export`` may store for the whole tree (every leaf).
      keep: also allow leaving a layer uncompressed.
      use: allocate with ``"measured"`` deltas, the HAWQ-v2 ``"proxy"``, or ``"auto"`` (measured if any).
      exclude: a regex of candidate names not to use (e.g. ``"nm.*"`` where no sparse kernel runs).

    Returns:
      The :class:`Allocation`.

    Raises:
      TypeError: if ``sensitivity`` is not a :class:`Sensitivity` or ``budget_bytes`` not an int.
      ValueError: if even the smallest choice exceeds the budget (the message gives the smallest size).

    Example:
        >>> import jax.numpy as jnp, jaxqp
        >>> from jaxqp.choose import sensitivity
        >>> s = sensitivity(lambda p, x: jnp.sum(x @ p["kernel"]), {"kernel": jnp.linspace(-1, 1, 64).reshape(8, 8)},
        ...                 [jnp.ones((1, 8))], [jaxqp.QuantSpec(bits=8), jaxqp.QuantSpec(bits=4)], progress=False)
        >>> a = allocate(s, budget_bytes=s.uniform("w4")[0])
        >>> a.choice, a.bytes == s.uniform("w4")[0]
        ({'kernel': 'w4'}, True)
    """
    if not isinstance(sensitivity, Sensitivity):
        raise TypeError(f"allocate: sensitivity must be what jaxqp.choose.sensitivity(...) returned, got "
                        f"{type(sensitivity).__name__}")
    if not isinstance(budget_bytes, (int, np.integer)) or isinstance(budget_bytes, bool):
        raise TypeError(f"budget_bytes must be an int number of bytes, got {budget_bytes!r}")
    scores = sensitivity.scores(use)
    costs = sensitivity.bytes.copy()
    names = list(sensitivity.names)
    if exclude is not None:
        try:
            dropped = [j for j, n in enumerate(names) if re.fullmatch(exclude, n)]
        except re.error as err:
            raise ValueError(f"allocate: exclude={exclude!r} is not a valid regular expression ({err})") from err
        if len(dropped) == len(names):
            raise ValueError(f"allocate: exclude={exclude!r} matches every candidate ({names}), so nothing is left to "
                             "choose; exclude fewer (a regex on candidate names, e.g. 'nm.*')")
        costs[:, dropped] = -1
    costs = np.where(np.isfinite(scores), costs, -1)
    if keep:
        costs = np.concatenate([costs, sensitivity.float_bytes[:, None]], axis=1)
        scores = np.concatenate([scores, np.zeros((len(costs), 1))], axis=1)
        names.append(KEEP)
    missing = [sensitivity.layers[i] for i in range(len(costs)) if not (costs[i] >= 0).any()]
    if missing:
        raise ValueError(f"layer '{missing[0]}' has no candidate left to take; allow keep=True or add a "
                         "candidate that fits it")
    smallest = int(np.where(costs >= 0, costs, np.iinfo(np.int64).max).min(axis=1).sum()) + sensitivity.other_bytes
    if budget_bytes < smallest:
        raise ValueError(f"budget_bytes={budget_bytes} is below the smallest choice of these candidates "
                         f"({smallest} bytes, {sensitivity.other_bytes} of them in leaves that are not layers). "
                         "Fix: raise the budget or add smaller candidates (fewer bits, more sparsity)")
    front = pareto_front(costs, np.where(costs >= 0, scores, 0.0), sensitivity.other_bytes)
    best = int(np.flatnonzero(front.bytes <= budget_bytes)[-1])  # the frontier's delta falls as bytes grow
    picks = front.choice(best)
    choice = {path: names[k] for path, k in zip(sensitivity.layers, picks)}
    by_name = {c.name: c for c in sensitivity.candidates}
    rules = tuple(by_name[name].rule(path) for path, name in choice.items() if name != KEEP)
    return Allocation(choice, rules, int(front.bytes[best]), float(front.delta[best]), int(budget_bytes), front)
