"""Sparsity schedules: static, hashable objects evaluated on a traced step.

A schedule answers two questions for an integer ``step`` (the number of
optimizer updates applied so far): ``schedule(step)``, the target sparsity, and
``schedule.update_at(step)``, whether masks are recomputed at that step. Both
work on traced steps, so a jitted training step compiles once.

Example:
    >>> s = polynomial(0.0, 0.8, begin=100, end=1000, every=50)
    >>> float(s(1000)), bool(s.update_at(150)), bool(s.update_at(151))
    (0.800000011920929, True, False)
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._linear import reciprocal


def check_sparsity(value, name: str) -> float:
    """Returns ``value`` as a float if it lies in [0, 1), else raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: sparsity must be a float in [0, 1), e.g. {name}=0.8")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{name}={value!r}: sparsity must lie in [0, 1) (1.0 would prune everything); "
            f"e.g. {name}=0.8"
        )
    return float(value)


def _check_step(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}={value!r}: a step must be an integer >= 0")
    return int(value)


class Schedule:
    """Base class: subclasses are frozen dataclasses with ``__call__`` and ``update_at``.

    ``refreshes`` is a static flag: False when masks never change after ``init``,
    so the transform compiles no mask refresh at all.

    Attributes:
      refreshes: whether masks change after ``init`` (static).
    """

    refreshes = True

    def __call__(self, step) -> jax.Array:
        raise NotImplementedError

    def update_at(self, step) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    """Sparsity ``value`` at every step; masks are computed once, by ``init``."""

    value: float
    refreshes = False

    def __post_init__(self):
        object.__setattr__(self, "value", check_sparsity(self.value, "constant(value)"))

    def __call__(self, step):
        return jnp.full((), self.value, jnp.float32)

    def update_at(self, step):
        return jnp.zeros((), bool)


@dataclasses.dataclass(frozen=True)
class OneShot(Schedule):
    """No pruning before ``step``; ``sparsity`` from ``step`` on, masks computed at ``step``."""

    sparsity: float
    step: int

    def __post_init__(self):
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity, "one_shot(sparsity)"))
        object.__setattr__(self, "step", _check_step(self.step, "one_shot(step)"))

    def __call__(self, step):
        return jnp.where(jnp.asarray(step) >= self.step, self.sparsity, 0.0).astype(jnp.float32)

    def update_at(self, step):
        return jnp.asarray(step) == self.step


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
    """Zhu & Gupta (2017) gradual pruning; see :func:`polynomial`."""

    initial: float
    final: float
    begin: int
    end: int
    every: int = 1
    power: float = 3.0

    def __post_init__(self):
        object.__setattr__(self, "initial", check_sparsity(self.initial, "polynomial(initial)"))
        object.__setattr__(self, "final", check_sparsity(self.final, "polynomial(final)"))
        begin = _check_step(self.begin, "polynomial(begin)")
        end = _check_step(self.end, "polynomial(end)")
        if end <= begin:
            raise ValueError(
                f"polynomial(begin={begin}, end={end}): end must come after begin; "
                f"e.g. polynomial(0.0, 0.8, begin={begin}, end={begin + 1000})"
            )
        every = self.every
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"polynomial(every={every!r}): every must be an integer >= 1")
        if not isinstance(self.power, numbers.Real) or self.power <= 0:
            raise ValueError(f"polynomial(power={self.power!r}): power must be > 0, e.g. 3")
        object.__setattr__(self, "power", float(self.power))

    def _last_update(self, step):
        # The most recent update step at or before ``step`` (clamped to [begin, end]).
        t = jnp.asarray(step, jnp.int32)
        t = self.begin + (t - self.begin) // self.every * self.every
        return jnp.where(jnp.asarray(step) >= self.end, self.end, t)

    def __call__(self, step):
        t = self._last_update(step).astype(jnp.float32)
        # a product with the float32 reciprocal: what XLA computes for a division by a
        # constant under jit, so eager and jitted schedules agree bit for bit
        frac = jnp.clip((t - self.begin) * reciprocal(self.end - self.begin), 0.0, 1.0)
        if self.power == int(self.power):  # x*x*x, as XLA also rewrites pow(x, 3) under jit
            decay = jax.lax.integer_pow(1.0 - frac, int(self.power))
        else:
            decay = (1.0 - frac) ** self.power
        value = self.final + (self.initial - self.final) * decay
        return jnp.where(jnp.asarray(step) >= self.begin, value, 0.0).astype(jnp.float32)

    def update_at(self, step):
        step = jnp.asarray(step)
        on_grid = (step - self.begin) % self.every == 0
        return (step >= self.begin) & (step <= self.end) & (on_grid | (step == self.end))


def constant(value: float) -> Constant:
    """A fixed sparsity, applied from ``init`` on (pruning at initialization).

    Args:
      value: the sparsity, in [0, 1).

    Returns:
      The schedule.
    """
    return Constant(value)


def one_shot(sparsity: float, step: int) -> OneShot:
    """Prune to ``sparsity`` once, at optimizer step ``step``.

    Args:
      sparsity: the sparsity, in [0, 1).
      step: the optimizer step at which to prune (0 before it).

    Returns:
      The schedule.
    """
    return OneShot(sparsity, step)


def polynomial(
    initial: float, final: float, begin: int, end: int, every: int = 1, power: float = 3.0
) -> Polynomial:
    """Gradual pruning of Zhu & Gupta (2017).

    At update steps ``t = begin, begin + every, ...`` (and at ``end``) the target is
    ``final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power``; between
    them it holds its last value; it is 0 before ``begin`` and ``final`` from ``end`` on.

    Args:
      initial: the sparsity at ``begin``.
      final: the sparsity from ``end`` on.
      begin: the first pruning step.
      end: the last pruning step.
      every: steps between mask updates.
      power: the exponent (3 in the paper).

    Returns:
      The schedule.

    Raises:
      ValueError: if the sparsities are outside [0, 1) or ``begin >= end``.
    """
    return Polynomial(initial, final, begin, end, every, power)


@dataclasses.dataclass(frozen=True)
class Iterative(Schedule):
    """Iterative pruning in ``rounds``; see :func:`iterative`."""

    final: float
    rounds: int
    every: int
    begin: int = 0

    def __post_init__(self):
        object.__setattr__(self, "final", check_sparsity(self.final, "iterative(final)"))
        for name in ("rounds", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"iterative({name}={value!r}): must be an integer >= 1")
        object.__setattr__(self, "begin", _check_step(self.begin, "iterative(begin)"))

    def levels(self) -> tuple[float, ...]:
        """Sparsity after round ``r = 0..rounds``: ``1 - (1 - final)^(r / rounds)`` (float32)."""
        keep = 1.0 - self.final
        return tuple(float(np.float32(1.0 - keep ** (r / self.rounds))) for r in range(self.rounds + 1))

    def _round(self, step):
        t = jnp.asarray(step, jnp.int32) - self.begin
        return jnp.where(t >= 0, jnp.minimum(t // self.every + 1, self.rounds), 0)

    def __call__(self, step):
        return jnp.asarray(self.levels(), jnp.float32)[self._round(step)]

    def update_at(self, step):
        t = jnp.asarray(step) - self.begin
        return (t >= 0) & (t % self.every == 0) & (t // self.every < self.rounds)


def iterative(final: float, rounds: int, every: int, begin: int = 0) -> Iterative:
    """Iterative prune-retrain: ``rounds`` prunings ``every`` steps apart from ``begin``.

    Each round removes the same fraction of the surviving weights, so after round ``r``
    the sparsity is ``1 - (1 - final)^(r / rounds)``, ``final`` after the last; the
    steps in between retrain the survivors. Combine with :func:`jaxqp.rewind` for
    lottery tickets (rewind the survivors to early weights after each round).

    Args:
      final: the sparsity after the last round, in [0, 1).
      rounds: the number of pruning rounds.
      every: steps between rounds.
      begin: the step of the first round.

    Returns:
      The schedule.

    Examples:
        >>> s = iterative(0.875, rounds=3, every=100)
        >>> [round(float(s(t)), 3) for t in (0, 99, 100, 200, 500)]
        [0.5, 0.5, 0.75, 0.875, 0.875]
    """
    return Iterative(final, rounds, every, begin)


def final_sparsity(schedule: Schedule) -> float:
    """The sparsity ``schedule`` ends at (a static float)."""
    for name in ("value", "final", "sparsity"):
        if hasattr(schedule, name):
            return float(getattr(schedule, name))
    raise TypeError(f"{type(schedule).__name__} has no final sparsity (value, final or sparsity)")
