"""Pruning masks of a whole plan: first masks, scheduled refreshes, global groups, biases.

Transforms layer: :func:`masks_for` computes every mask a :class:`Plan` asks for,
at ``init`` (``prev`` None) or refreshed at ``step`` under ``lax.cond``, so one
compiled training step serves every step.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxqp import Rule, resolve
    >>> from jaxqp import PruneSpec
    >>> params = {"w": jnp.array([0.1, -0.4, 0.3, 0.2])}
    >>> plan = resolve([Rule("w", prune=PruneSpec(sparsity=0.5))], params)
    >>> masks_for(plan, [("w", params["w"])], None, 0)["w"]
    Array([False,  True,  True, False], dtype=bool)
"""

from __future__ import annotations

import functools
import zlib
from typing import NamedTuple

import jax
import jax.core
import jax.numpy as jnp

from .._specs.prune import NM, Blocks, Channels, PruneSpec
from .._specs.rules import LeafPlan, Plan
from .._specs.schedules import final_sparsity
from ..numerics._masks import (
    block_mask,
    channel_mask,
    erk_sparsities,
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    threshold_mask,
)
from .rigl import rigl_due, rigl_mask

Masks = dict[str, jax.Array]


class MaskInputs(NamedTuple):
    """What gradient and random criteria need at a refresh (all optional)."""

    grads: dict | None = None  # {path: gradient} of this step
    scores: dict | None = None  # {path: movement score}
    key: jax.Array | None = None  # uint32[2] key data of the transform state


def leaf_key(key_data, path: str, step) -> jax.Array:
    """A PRNG key for ``path`` at ``step``: ``fold_in(fold_in(key, crc32(path)), step)``."""
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, step)


def pruned(entry: LeafPlan) -> PruneSpec:
    """``entry``'s PruneSpec; only called for entries that prune."""
    if entry.prune is None:
        raise ValueError(f"'{entry.path}' is not pruned")  # unreachable from masks_for
    return entry.prune


def criterion_scores(leaf, entry: LeafPlan, inputs: MaskInputs, step):
    """What ``entry``'s criterion ranks (larger ``|score|`` keeps); gradient criteria fall back to ``|w|``."""
    criterion = pruned(entry).criterion
    if criterion == "random":
        return jax.random.uniform(leaf_key(inputs.key, entry.path, step), jnp.shape(leaf))
    if criterion == "saliency" and inputs.grads is not None:
        return leaf * inputs.grads[entry.path]
    if criterion == "wanda" and inputs.scores is not None:
        return leaf * jnp.expand_dims(inputs.scores[entry.path], -1)  # |w_ij| * ||x_i||
    if criterion == "movement" and inputs.scores is not None:
        score = inputs.scores[entry.path]
        return score - jnp.min(score)  # order-preserving shift to >= 0: largest movement keeps
    return leaf


def _is_multi_device(leaf) -> bool:
    # Concrete arrays spread over several devices; single-device arrays are left as they
    # are, so that committing them does not change the jit cache key of the first step.
    return (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
            and len(leaf.sharding.device_set) > 1)


def _scheduled_mask(leaf, spec: PruneSpec, sparsity, prev):
    if isinstance(spec.structure, Channels):
        return channel_mask(leaf, sparsity, spec.structure.axis, prev)
    if isinstance(spec.structure, Blocks):
        b = spec.structure
        return block_mask(leaf, sparsity, (b.rows, b.cols), b.axes, prev)
    return magnitude_mask(leaf, sparsity, prev)


def _first_mask(leaf: jax.Array, entry: LeafPlan, inputs: MaskInputs) -> jax.Array:
    spec = pruned(entry)
    if spec.threshold is not None:
        mask = threshold_mask(leaf, spec.threshold)
    elif isinstance(spec.structure, NM):
        mask = nm_mask(leaf, spec.structure.n, spec.structure.m, spec.structure.axis)
    else:
        mask = _scheduled_mask(criterion_scores(leaf, entry, inputs, 0), spec, spec.schedule(0), None)
    return _follow_sharding(mask, leaf)


def _follow_sharding(mask: jax.Array, leaf) -> jax.Array:
    if _is_multi_device(leaf):
        return jax.device_put(mask, leaf.sharding)  # a mask follows its parameter's sharding
    return mask


def _refresh_mask(leaf: jax.Array, entry: LeafPlan, prev: jax.Array, step, inputs: MaskInputs) -> jax.Array:
    spec = pruned(entry)
    if spec.threshold is not None:
        return threshold_mask(leaf, spec.threshold, prev)
    if isinstance(spec.structure, NM):
        return prev  # N:M masks are fixed from init on
    schedule = spec.schedule
    mask = prev
    if schedule.refreshes:
        mask = jax.lax.cond(
            schedule.update_at(step),
            lambda: _scheduled_mask(criterion_scores(leaf, entry, inputs, step), spec, schedule(step), prev),
            lambda: prev,
        )
    if spec.regrow is not None:
        grad = None if inputs.grads is None else inputs.grads[entry.path]
        if grad is None and spec.regrow.grow == "gradient":
            raise ValueError(f"'{entry.path}': RigL grows by gradient; t.update needs grads= "
                             "(jaxqp.wrap passes them)")
        key = None if inputs.key is None else leaf_key(inputs.key, entry.path, step)
        mask = rigl_mask(leaf, mask, grad, spec.regrow, step, key)
    return mask


def _groups(plan: Plan, scope: str) -> dict[PruneSpec, list[LeafPlan]]:
    """Leaves pruned with ``scope`` ("global", "erk"), grouped by (equal) spec, in tree order."""
    groups: dict[PruneSpec, list[LeafPlan]] = {}
    for entry in plan.leaves:
        if entry.prune is not None and entry.prune.scope == scope:
            groups.setdefault(entry.prune, []).append(entry)
    return groups


def refresh_due(plan: Plan, step) -> jax.Array:
    """Whether :func:`masks_for` at ``step`` can change any mask: a schedule's update step, a
    RigL/SET update, or a threshold (recomputed every step). N:M and constant masks never change."""
    due = jnp.zeros((), bool)
    for entry in plan.leaves:
        spec = entry.prune
        if spec is None:
            continue
        if spec.threshold is not None:
            return jnp.ones((), bool)
        if isinstance(spec.structure, NM):
            continue
        if spec.schedule.refreshes:
            due = due | spec.schedule.update_at(step)
        if spec.regrow is not None:
            due = due | rigl_due(spec.regrow, step)
    return due


@functools.partial(jax.jit, static_argnums=0)
def _first_masks_jit(plan: Plan, leaves: dict, inputs: MaskInputs) -> Masks:
    return masks_for(plan, list(leaves.items()), None, 0, inputs)


def first_masks(plan: Plan, flat: list, inputs: MaskInputs) -> Masks:
    """The masks at step 0, computed in one compiled call.

    Eagerly, a mask costs dozens of small dispatches (each compiled once per shape and
    sharding: 0.2-0.3 s for a global mask over a sharded tree); one jit of all of them
    compiles once. Masks are booleans from exact comparisons and counts, so the compiled
    call gives the same masks as eager ops. Each mask is then placed like its parameter.

    Args:
      plan: the resolved plan (static: the jit is cached per plan and leaf shapes).
      flat: ``[(path, leaf), ...]`` of the whole tree.
      inputs: the key and scores random and movement criteria read.

    Returns:
      ``{path: bool mask}``, as :func:`masks_for` at step 0.
    """
    if not any(entry.prune is not None for entry in plan.leaves):
        return {}
    leaves = dict(flat)  # all of them: a channel mask also covers the bias that goes with a kernel
    try:
        hash(plan)
    except TypeError:  # a spec holding something unhashable cannot key a jit cache: eager
        return masks_for(plan, flat, None, 0, inputs)
    masks = _first_masks_jit(plan, leaves, inputs)
    return {path: _follow_sharding(mask, leaves[path]) for path, mask in masks.items()}


def masks_for(plan: Plan, flat: list, prev: Masks | None, step, inputs: MaskInputs | None = None) -> Masks:
    """Every pruning mask of ``plan``: the first ones (``prev`` None) or refreshed at ``step``."""
    inputs = MaskInputs() if inputs is None else inputs
    leaves = {path: leaf for path, leaf in flat}
    masks: Masks = {}
    for entry in plan.leaves:
        if entry.prune is not None and entry.prune.scope == "layer":
            leaf = leaves[entry.path]
            if prev is None:
                leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
                masks[entry.path] = _first_mask(leaf, entry, inputs)
            else:
                masks[entry.path] = _refresh_mask(leaf, entry, prev[entry.path], step, inputs)
    for spec, entries in _groups(plan, "erk").items():
        schedule = spec.schedule
        final = final_sparsity(schedule)
        shares = erk_sparsities([e.shape for e in entries], final)
        for entry, share in zip(entries, shares):
            scale = share / final if final > 0 else 0.0
            leaf = jnp.asarray(leaves[entry.path])
            if prev is None:
                masks[entry.path] = _follow_sharding(magnitude_mask(leaf, schedule(0) * scale), leaves[entry.path])
            elif schedule.refreshes:
                old_mask = prev[entry.path]
                masks[entry.path] = jax.lax.cond(schedule.update_at(step),
                                                 lambda: magnitude_mask(leaf, schedule(step) * scale, old_mask),
                                                 lambda: old_mask)
            else:
                masks[entry.path] = prev[entry.path]
    for spec, entries in _groups(plan, "global").items():
        xs = [jnp.asarray(leaves[e.path]) for e in entries]
        schedule = spec.schedule
        if prev is None:
            group = [_follow_sharding(m, leaves[e.path])
                     for m, e in zip(global_magnitude_masks(xs, schedule(0)), entries)]
        elif not schedule.refreshes:
            group = [prev[e.path] for e in entries]
        else:
            old_group = [prev[e.path] for e in entries]
            group = jax.lax.cond(schedule.update_at(step),
                                 lambda: global_magnitude_masks(xs, schedule(step), old_group), lambda: old_group)
        masks.update({e.path: m for e, m in zip(entries, group)})
    return _with_bias_masks(plan, masks)


def _bias_path(entry: LeafPlan) -> str | None:
    structure = entry.prune.structure if entry.prune is not None else None
    if not (isinstance(structure, Channels) and structure.bias and entry.path.endswith("kernel")):
        return None
    return entry.path[: -len("kernel")] + "bias"


def _with_bias_masks(plan: Plan, masks: Masks) -> Masks:
    """Adds, for Channels(bias=True) kernels, the mask of their sibling bias."""
    entries = plan.by_path()
    out = dict(masks)
    for entry in plan.leaves:
        bias = _bias_path(entry)
        if bias is None or bias not in entries:
            continue
        structure = pruned(entry).structure
        assert isinstance(structure, Channels)  # _bias_path returned a path
        axis = structure.axis % len(entry.shape)
        if entries[bias].shape != (entry.shape[axis],):
            continue
        if entries[bias].prune is not None:
            raise ValueError(
                f"'{bias}' is pruned by its own rule and, as the bias of '{entry.path}', by "
                "Channels(bias=True). Fix: drop one (e.g. Channels(bias=False))."
            )
        others = tuple(a for a in range(len(entry.shape)) if a != axis)
        out[bias] = jnp.any(masks[entry.path], axis=others)
    return _with_next_rows(plan, out)


def _with_next_rows(plan: Plan, masks: Masks) -> Masks:
    """ANDs, for Channels(next=path) kernels, the channel mask into the next kernel's input rows."""
    entries = plan.by_path()
    out = dict(masks)
    for entry in plan.leaves:
        structure = entry.prune.structure if entry.prune is not None else None
        if not (isinstance(structure, Channels) and structure.next is not None):
            continue
        axis = structure.axis % len(entry.shape)
        nxt = entries.get(structure.next)
        channels = entry.shape[axis]
        if nxt is None or len(nxt.shape) < 2 or nxt.shape[-2] != channels:
            found = "no such parameter" if nxt is None else f"shape {nxt.shape}"
            raise ValueError(
                f"'{entry.path}': Channels(next={structure.next!r}) names the next layer's kernel, whose "
                f"axis -2 must have {channels} entries (one per channel), but it has {found}. "
                "Fix: give the exact path of the kernel that consumes these channels."
            )
        others = tuple(a for a in range(len(entry.shape)) if a != axis)
        keep = jnp.any(masks[entry.path], axis=others)
        rows = jnp.broadcast_to(keep[:, None], nxt.shape[-2:])
        rows = jnp.broadcast_to(rows, nxt.shape)
        out[nxt.path] = out[nxt.path] & rows if nxt.path in out else rows
    return out


