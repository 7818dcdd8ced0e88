"""``t.refresh``: the mask refresh of ``t = transform(..., refresh="separate")``, between steps (transforms layer).

A train step that refreshes masks inside ``update`` compiles the refresh (thresholds found by
bisection, ties ranked) under ``lax.cond`` into every step it is part of: 2-3x the float
step's compile time, paid again each time a research loop rebuilds its step. With
``refresh="separate"``, ``update`` only advances the step and keeps the masks, and this
function, jitted once per process for a given model, refreshes them between steps:

1. on the host it reads each separate-mode state's step and frozen flag, and returns at once
   when no refresh is due at the coming step (no dispatch);
2. otherwise it computes, for the coming step, the masks ``update`` would have computed,
   from the same weights (the ones the coming step's forward will see), and sets the newly
   pruned weights to exactly 0, as :func:`jaxqp.wrap` does for in-update refreshes. Only the
   params and the transform states enter the compiled refresh: rebuilt steps, other
   learning rates or optimizers around the same model and rules reuse it.

The masks are the in-update ones; they apply one step earlier (from the coming step's
forward on, where in-update masks apply from the updates of that step on).

Example:
    >>> import jax.numpy as jnp, optax, jaxqp
    >>> t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(
    ...     sparsity=jaxqp.polynomial(0.0, 0.5, begin=0, end=2, every=1)))], refresh="separate")
    >>> tx = jaxqp.wrap(optax.sgd(0.1), t)
    >>> params = {"w": jnp.array([1.0, -2.0, 0.5, 3.0])}
    >>> opt_state = tx.init(params)
    >>> params, opt_state = t.refresh(params, opt_state)  # due at step 1: 2 of 4 pruned
    >>> params["w"]
    Array([ 0., -2.,  0.,  3.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from .._specs.paths import paths_and_leaves
from .pruning import MaskInputs, masks_for, refresh_due
from .state_tree import map_states, transform_states
from .transform import TransformState, enforced_masks, pack_masks


@functools.partial(jax.jit, static_argnums=0)
def _due_on_device(plans: tuple, steps: tuple, frozen: tuple, checks: tuple) -> jax.Array:
    due = [(~f & refresh_due(plan, s + 1)).astype(jnp.int32) for plan, s, f in zip(plans, steps, frozen, strict=True)]
    return jnp.stack([jnp.stack(due), jnp.stack(checks)])


def _due(states: list[TransformState]) -> tuple[bool, ...]:
    """On the host, per state: whether ``update``'s next step would refresh its masks (one small jitted call).

    Raises ``ValueError`` first if a refresh due at an earlier step did not run."""
    separate = [s for s in states if s.refresh == "separate"]
    due, checks = np.asarray(_due_on_device(tuple(s.plan for s in separate), tuple(s.step for s in separate),
                                            tuple(s.frozen for s in separate),
                                            tuple(s.refresh_check for s in separate))).tolist()
    _refuse_missed(checks, "t.refresh")
    flags = iter(due)
    return tuple(bool(next(flags)) if s.refresh == "separate" else False for s in states)


def _refuse_missed(checks: list[int], where: str) -> None:
    missed = [c for c in checks if c > 0]
    if missed:
        raise ValueError(f"{where}: the masks due at step {min(missed)} were never refreshed (a transform made with "
                         "refresh='separate' refreshes only in t.refresh). Fix: call params, opt_state = "
                         "t.refresh(params, opt_state) before every train step, and restart from a state "
                         "before that step")


def require_refreshed(state: Any, where: str) -> None:
    """Refuses ``state`` (any tree of transform states) if a ``refresh="separate"`` refresh did not run.

    Args:
      state: a transform state, a chain's states or an optimizer state.
      where: the caller's name, for the message.

    Raises:
      ValueError: naming the first step whose refresh was missed, and the fix.

    Example:
      >>> import jax.numpy as jnp, jaxqp
      >>> t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))], refresh="separate")
      >>> require_refreshed(t.init({"w": jnp.ones((4, 4))}), "jaxqp.export")  # nothing was due
    """
    checks = [s.refresh_check for s in transform_states(state) if s.refresh == "separate"]
    if checks:
        _refuse_missed([int(c) for c in jax.device_get(checks)], where)


def _refreshed(params, state: TransformState) -> TransformState:
    flat, _ = state.plan.check(params, "params")
    step = state.step + 1
    masks = masks_for(state.plan, flat, state.masks, step, MaskInputs(None, state.scores, state.key))
    return dataclasses.replace(state, mask_bits=pack_masks(masks), refresh_check=-step)  # done for `step`


@functools.partial(jax.jit, static_argnums=2)
def _refresh(params, states: tuple[TransformState, ...], due: tuple[bool, ...]):
    """``(params, states)`` with the due states refreshed: only the transform states go in, so the
    compiled refresh does not depend on the optimizer around them."""
    states = tuple(_refreshed(params, s) if d else s for s, d in zip(states, due, strict=True))
    zeroed: dict[str, jax.Array] = {}
    for state, refreshed in zip(states, due, strict=True):
        if not refreshed:
            continue
        for path, mask in enforced_masks(state).items():
            zeroed[path] = zeroed[path] & mask if path in zeroed else mask
    flat, treedef = paths_and_leaves(params)
    out = [jnp.where(zeroed[path], leaf, jnp.zeros((), leaf.dtype)) if path in zeroed else leaf
           for path, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, out), states


def refresh_masks(params: Any, opt_state: Any) -> tuple[Any, Any]:
    """Refreshes the masks of ``transform(..., refresh="separate")`` due at the coming step (``t.refresh``).

    Call it before each train step, outside ``jax.jit``, on the params and optimizer state
    the step will get (``opt_state`` from :func:`jaxqp.wrap`, or a transform state). When no
    mask is due it returns its arguments unchanged without running anything; otherwise one
    jitted call (compiled once per process for a given model and rules, whatever the
    optimizer) computes the
    new masks from ``params`` and sets newly pruned weights to exactly 0. Reading the step
    waits for the previous step to finish.

    Args:
      params: the current parameters.
      opt_state: the optimizer state (or transform state) holding the transform state(s).

    Returns:
      ``(params, opt_state)``, refreshed where due.

    Raises:
      TypeError: inside ``jax.jit`` (traced arguments): the refresh runs between steps.
      ValueError: if ``opt_state`` holds no transform state made with ``refresh="separate"``,
        ``params`` do not match its plan (the message names the path), or a refresh due at
        an earlier step did not run (``t.refresh`` was not called before that step).

    Example:
      >>> import jax.numpy as jnp, jaxqp
      >>> t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))], refresh="separate")
      >>> params = {"w": jnp.array([1.0, -2.0, 0.5, 3.0])}
      >>> state = t.init(params)
      >>> t.refresh(params, state)[0] is params  # a constant sparsity: nothing is ever due
      True
    """
    states = transform_states(opt_state)
    if not states:
        raise ValueError(f"t.refresh: opt_state holds no jaxqp transform state (got {type(opt_state).__name__}). "
                         "Fix: pass the optimizer state of jaxqp.wrap(tx, t), or t.init(params)")
    if not any(s.refresh == "separate" for s in states):
        raise ValueError("t.refresh: opt_state holds no transform state made with refresh='separate' "
                         f"({len(states)} in-update state(s) found, whose update refreshes the masks itself). "
                         "Fix: jaxqp.transform(rules, refresh='separate'), or drop the t.refresh call")
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((params, opt_state))):
        raise TypeError("t.refresh: called with traced values (inside jax.jit?). It runs between "
                        "train steps, outside jit: params, opt_state = t.refresh(params, opt_state)")
    for state in states:
        if state.refresh == "separate":
            state.plan.check(params, "params")  # a clear error for another model's params, before any work
    due = _due(states)
    if not any(due):
        return params, opt_state
    params, refreshed = _refresh(params, tuple(states), due)
    new_states = iter(refreshed)
    return params, map_states(opt_state, lambda _: next(new_states))
