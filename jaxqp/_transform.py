"""ParamTransform: quantize and prune a parameter tree (transforms layer).

A :class:`ParamTransform` is a NamedTuple of pure functions, like an optax
``GradientTransformation``:

* ``init(params) -> state``: resolves the rules and computes the first masks;
* ``apply(params, state) -> params``: the tree the model sees: pruned entries
  exactly 0, then fake-quantized (scales computed on the surviving weights);
* ``update(params, state) -> state``: advances the step by one and recomputes
  masks where the schedule says so (under ``lax.cond``: one compiled step);
* ``masks(state) -> {path: bool array}``: the pruning masks, for
  :func:`jaxqp.wrap` to keep pruned params exactly 0.

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> t = jaxqp.transform([jaxqp.Rule(r"w", quant=jaxqp.QuantSpec(bits=8),
    ...                                 prune=jaxqp.PruneSpec(sparsity=0.5))])
    >>> params = {"w": jnp.array([[0.1, -0.4], [0.3, 0.2]])}
    >>> state = t.init(params)
    >>> t.apply(params, state)["w"]
    Array([[ 0. , -0.4],
           [ 0.3,  0. ]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from ._mask import apply_mask, channel_mask, global_magnitude_masks, magnitude_mask, nm_mask, threshold_mask
from ._quantizer import fake_quant_weight
from ._rule import LeafPlan, Plan, Rule, _as_rules, resolve
from ._spec import NM, Channels, PruneSpec

Params = Any
Masks = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TransformState:
    """State of :func:`transform`: a pytree whose leaves are ``step`` and ``masks``.

    Attributes:
      step: int32 scalar, optimizer updates applied so far.
      masks: ``{path: bool array}`` for every pruned parameter (True keeps).
      plan: static metadata (not a leaf): the resolved :class:`Plan`, so tools
        such as :func:`jaxqp.summary` need no rules.
    """

    step: jax.Array
    masks: Masks
    plan: Plan = dataclasses.field(repr=False)


jax.tree_util.register_dataclass(TransformState, data_fields=["step", "masks"], meta_fields=["plan"])


def _no_masks(state) -> Masks:
    del state
    return {}


class ParamTransform(NamedTuple):
    """``(init, apply, update, masks)``: see the module docstring."""

    init: Callable[[Params], Any]
    apply: Callable[[Params, Any], Params]
    update: Callable[[Params, Any], Any]
    masks: Callable[[Any], Masks] = _no_masks


def _is_multi_device(leaf) -> bool:
    # Concrete arrays spread over several devices; single-device arrays are left as they
    # are, so that committing them does not change the jit cache key of the first step.
    return (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
            and len(leaf.sharding.device_set) > 1)


def _scheduled_mask(leaf, spec: PruneSpec, sparsity, prev):
    if isinstance(spec.structure, Channels):
        return channel_mask(leaf, sparsity, spec.structure.axis, prev)
    return magnitude_mask(leaf, sparsity, prev)


def _first_mask(leaf: jax.Array, spec: PruneSpec) -> jax.Array:
    if spec.threshold is not None:
        mask = threshold_mask(leaf, spec.threshold)
    elif isinstance(spec.structure, NM):
        mask = nm_mask(leaf, spec.structure.n, spec.structure.m, spec.structure.axis)
    else:
        mask = _scheduled_mask(leaf, spec, spec.sparsity(0), None)
    return _follow_sharding(mask, leaf)


def _follow_sharding(mask: jax.Array, leaf) -> jax.Array:
    if _is_multi_device(leaf):
        return jax.device_put(mask, leaf.sharding)  # a mask follows its parameter's sharding
    return mask


def _refresh_mask(leaf: jax.Array, spec: PruneSpec, prev: jax.Array, step: jax.Array) -> jax.Array:
    if spec.threshold is not None:
        return threshold_mask(leaf, spec.threshold, prev)
    if isinstance(spec.structure, NM):
        return prev  # N:M masks are fixed from init on
    schedule = spec.sparsity
    if not schedule.refreshes:
        return prev
    return jax.lax.cond(
        schedule.update_at(step),
        lambda: _scheduled_mask(leaf, spec, schedule(step), prev),
        lambda: prev,
    )


def _global_groups(plan: Plan) -> dict[PruneSpec, list[LeafPlan]]:
    """Leaves pruned with scope='global', grouped by (equal) spec, in tree order."""
    groups: dict[PruneSpec, list[LeafPlan]] = {}
    for entry in plan.leaves:
        if entry.prune is not None and entry.prune.scope == "global":
            groups.setdefault(entry.prune, []).append(entry)
    return groups


def _masks_for(plan: Plan, flat: list, prev: Masks | None, step) -> Masks:
    """Every pruning mask of ``plan``: the first ones (``prev`` None) or refreshed at ``step``."""
    leaves = {path: leaf for path, leaf in flat}
    masks: Masks = {}
    for entry in plan.leaves:
        if entry.prune is not None and entry.prune.scope == "layer":
            leaf = leaves[entry.path]
            if prev is None:
                leaf = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
                masks[entry.path] = _first_mask(leaf, entry.prune)
            else:
                masks[entry.path] = _refresh_mask(leaf, entry.prune, prev[entry.path], step)
    for spec, entries in _global_groups(plan).items():
        xs = [jnp.asarray(leaves[e.path]) for e in entries]
        schedule = spec.sparsity
        if prev is None:
            group = [_follow_sharding(m, leaves[e.path])
                     for m, e in zip(global_magnitude_masks(xs, schedule(0)), entries)]
        elif not schedule.refreshes:
            group = [prev[e.path] for e in entries]
        else:
            old = [prev[e.path] for e in entries]
            group = jax.lax.cond(schedule.update_at(step),
                                 lambda: global_magnitude_masks(xs, schedule(step), old), lambda: old)
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
        axis = entry.prune.structure.axis % len(entry.shape)
        if entries[bias].shape != (entry.shape[axis],):
            continue
        if entries[bias].prune is not None:
            raise ValueError(
                f"'{bias}' is pruned by its own rule and, as the bias of '{entry.path}', by "
                "Channels(bias=True). Fix: drop one (e.g. Channels(bias=False))."
            )
        others = tuple(a for a in range(len(entry.shape)) if a != axis)
        out[bias] = jnp.any(masks[entry.path], axis=others)
    return out


def _describe_difference(want: Plan, got: Plan) -> str:
    for a, b in zip(want.leaves, got.leaves):
        if a != b:
            return f"'{a.path}': the rules give {a}, the state holds {b}"
    return "the number of leaves differs"


def _checked(rules: tuple[Rule, ...], params, state, what: str) -> tuple[list, Any, Plan]:
    if not isinstance(state, TransformState):
        raise TypeError(
            f"{what}: state must be the jaxqp state returned by t.init(params) "
            f"(inside an optimizer: jaxqp.state_of(opt_state)), got {type(state).__name__}"
        )
    flat, treedef = state.plan.check(params)
    plan = resolve(rules, params)
    if plan != state.plan:
        raise ValueError(
            f"{what}: this state was made by a transform with other rules "
            f"({_describe_difference(plan, state.plan)}). Fix: call t.init(params) with this transform."
        )
    return flat, treedef, plan


def transform(rules: Sequence[Rule] | Rule) -> ParamTransform:
    """The quantize-and-prune transform of ``rules`` (first matching rule wins per leaf).

    For a leaf with both specs, the mask is applied first and the quantizer is
    calibrated on the survivors, so pruned weights stay exactly 0.
    """
    rules = _as_rules(rules)

    def init(params) -> TransformState:
        plan = resolve(rules, params)
        flat, _ = plan.check(params)
        return TransformState(jnp.zeros((), jnp.int32), _masks_for(plan, flat, None, 0), plan)

    def apply(params, state: TransformState):
        flat, treedef, plan = _checked(rules, params, state, "t.apply")
        out = [_apply_leaf(leaf, entry, state.masks) for (_, leaf), entry in zip(flat, plan.leaves)]
        return jax.tree_util.tree_unflatten(treedef, out)

    def update(params, state: TransformState) -> TransformState:
        flat, _, plan = _checked(rules, params, state, "t.update")
        step = state.step + 1
        return TransformState(step, _masks_for(plan, flat, state.masks, step), plan)

    def masks(state: TransformState) -> Masks:
        return dict(state.masks)

    return ParamTransform(init, apply, update, masks)


def _apply_leaf(leaf, entry: LeafPlan, masks: Masks):
    if entry.path in masks:  # a pruned leaf, or the bias of a Channels-pruned kernel
        leaf = apply_mask(leaf, masks[entry.path])
    if entry.quant is not None:
        leaf = fake_quant_weight(leaf, entry.quant)
    return leaf


def chain(*transforms: ParamTransform) -> ParamTransform:
    """Applies ``transforms`` in order; the state is a tuple of their states.

    Masks of the same path are combined with logical AND.

    >>> import jaxqp
    >>> t = jaxqp.chain(jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))]),
    ...                 jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=4))]))
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, ParamTransform):
            raise TypeError(f"chain argument {i} is {type(t).__name__}; pass jaxqp.ParamTransform values")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def apply(params, state):
        for t, s in zip(transforms, state, strict=True):
            params = t.apply(params, s)
        return params

    def update(params, state):
        return tuple(t.update(params, s) for t, s in zip(transforms, state, strict=True))

    def masks(state) -> Masks:
        merged: Masks = {}
        for t, s in zip(transforms, state, strict=True):
            for path, mask in t.masks(s).items():
                merged[path] = merged[path] & mask if path in merged else mask
        return merged

    return ParamTransform(init, apply, update, masks)


class LeafView(NamedTuple):
    """What every transform in a (possibly chained) state does to one leaf."""

    entry: LeafPlan
    quant: Any  # QuantSpec | None: the first transform's that quantizes the leaf
    mask: jax.Array | None  # AND of every transform's mask of the leaf


def leaf_views(params, state) -> tuple[list, Any, list[LeafView]]:
    """Flattens ``params`` and merges every :class:`TransformState` found in ``state``.

    ``state`` may be a transform state, a tuple of them (``chain``) or an optimizer
    state holding one (``wrap``). Returns ``(flat, treedef, views)`` in leaf order.
    """
    nodes = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, TransformState))
    states = [n for n in nodes if isinstance(n, TransformState)]
    if not states:
        raise ValueError(
            "no jaxqp state found: pass t.init(params)'s result or jaxqp.state_of(opt_state)"
        )
    flat, treedef = states[0].plan.check(params)
    for s in states[1:]:
        s.plan.check(params)
    views = []
    for i, entry in enumerate(states[0].plan.leaves):
        quant, mask = None, None
        for s in states:
            leaf = s.plan.leaves[i]
            quant = quant if quant is not None else leaf.quant
            if leaf.path in s.masks:
                mask = s.masks[leaf.path] if mask is None else mask & s.masks[leaf.path]
        views.append(LeafView(entry, quant, mask))
    return flat, treedef, views
