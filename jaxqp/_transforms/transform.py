"""ParamTransform: quantize and prune a parameter tree (transforms layer).

A :class:`ParamTransform` is a NamedTuple of pure functions, like an optax
``GradientTransformation``:

* ``init(params) -> state``: resolves the rules and computes the first masks;
* ``apply(params, state) -> params``: the tree the model sees: pruned entries
  exactly 0, then fake-quantized (scales computed on the surviving weights);
* ``update(params, state, observed=None, grads=None) -> state``: advances the step by one and recomputes
  masks where the schedule says so (under ``lax.cond``: one compiled step);
* ``masks(state) -> {path: bool array}``: the pruning masks, for
  :func:`jaxqp.wrap` to keep pruned params exactly 0;
* ``refresh(params, opt_state) -> (params, opt_state)``: for ``transform(...,
  refresh="separate")``, the mask refresh between steps (compiled apart from the step).

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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .._specs.rules import LeafPlan, Plan, Rule, _as_rules, resolve
from ..numerics._formats import straight_through
from ..numerics._masks import apply_mask
from ..numerics._packing import pack_mask_rows, unpack_mask_rows
from . import input_quantizer
from .pruning import MaskInputs, first_masks, masks_for, refresh_due
from .refresh_mode import REFRESH_MODES, check_separable, checked_refresh
from .weight_quantizer import fake_quant_weight, init_step

Params = Any
Masks = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TransformState:
    """State of :func:`transform`: a pytree (a registered dataclass).

    Attributes:
      step: int32 scalar, optimizer updates applied so far.
      mask_bits: ``{path: uint8 array}``, the mask of every pruned parameter packed 8 entries
        per byte along its first axis (:func:`jaxqp.numerics.pack_mask_rows`): 1/32 of a
        float32 parameter's bytes where a bool mask took 1/4. Read them as bool arrays with
        :attr:`masks` or :meth:`mask`; build a state from bool masks with :meth:`with_masks`.
      plan: static metadata (not a leaf): the resolved :class:`Plan`, so tools
        such as :func:`jaxqp.summary` need no rules.
      learned: trainable quantizer values, ``{"weights": {path: {"step": ...}},
        "inputs": {kernel_path: {"alpha" | "step" | "offset": ...}}}``; gradients
        reach them through ``jax.grad(..., argnums=(0, 1), allow_int=True)`` and
        :func:`jaxqp.wrap` (see docs/design.md).
      ranges: ``{kernel_path: {"lo", "hi", "count"}}`` of static input ranges.
      scores: ``{path: float array}`` movement-pruning scores ``-sum_t w * g``.
      key: uint32[2] PRNG key for stochastic rounding and random criteria (None without a seed).
      calibrating: static flag set by :func:`jaxqp.calibrate`: inputs pass through
        unquantized and their statistics are recorded.
      frozen: bool scalar set by :func:`freeze_masks`: ``update`` keeps the masks. A leaf,
        not static metadata, so that a checkpoint of the state (orbax) keeps it.
      refresh: static, where the masks are refreshed: ``"in_update"`` (inside ``update``) or
        ``"separate"`` (by :attr:`ParamTransform.refresh`, compiled apart from the train step).
      refresh_check: int32 scalar kept by ``"separate"`` states so that a refresh never
        silently does not happen: ``-c`` after ``t.refresh`` refreshed the masks for step
        ``c``, ``+s`` (sticky) once ``update`` reached a step ``s`` whose refresh did not run,
        else 0. ``t.refresh`` and :func:`jaxqp.export` refuse a state with a missed refresh.
    """

    step: jax.Array
    mask_bits: dict
    plan: Plan = dataclasses.field(repr=False)
    learned: dict = dataclasses.field(default_factory=dict)
    ranges: dict = dataclasses.field(default_factory=dict)
    key: jax.Array | None = None
    calibrating: bool = False
    scores: dict = dataclasses.field(default_factory=dict)
    frozen: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), bool))
    refresh: str = "in_update"
    refresh_check: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))

    def mask(self, path: str) -> jax.Array:
        """The bool mask of ``path`` (True keeps), unpacked from :attr:`mask_bits`."""
        return unpack_mask_rows(self.mask_bits[path], self.plan.by_path()[path].shape)

    @property
    def masks(self) -> Masks:
        """``{path: bool array}`` for every pruned parameter (True keeps), unpacked."""
        entries = self.plan.by_path()
        return {path: unpack_mask_rows(bits, entries[path].shape) for path, bits in self.mask_bits.items()}

    def with_masks(self, masks: Masks) -> TransformState:
        """This state holding ``masks`` (``{path: bool array}``), packed."""
        return dataclasses.replace(self, mask_bits=pack_masks(masks))


def pack_masks(masks: Masks) -> dict:
    """``{path: bool mask}`` packed for :attr:`TransformState.mask_bits`."""
    return {path: pack_mask_rows(m) for path, m in masks.items()}


jax.tree_util.register_dataclass(TransformState,
                                 data_fields=["step", "mask_bits", "learned", "ranges", "key", "scores", "frozen",
                                              "refresh_check"],
                                 meta_fields=["plan", "calibrating", "refresh"])


def _no_masks(state) -> Masks:
    del state
    return {}


class UpdateFn(Protocol):
    """``update(params, state, observed=None, grads=None) -> state``."""

    def __call__(self, params: Params, state: Any, observed: dict | None = None, grads: Params | None = None) -> Any:
        ...


def _refresh_between_steps(params: Params, opt_state: Any) -> tuple[Params, Any]:
    from .separate_refresh import refresh_masks  # it builds on this module's state

    return refresh_masks(params, opt_state)


class ParamTransform(NamedTuple):
    """``(init, apply, update, masks, refresh)``: see the module docstring.

    Attributes:
        init: ``init(params) -> state``.
        apply: ``apply(params, state) -> params`` as the model sees them.
        update: ``update(params, state, observed=None, grads=None) -> state``; ``observed``
            are the layer-input statistics of :func:`jaxqp.linen_apply`/:func:`jaxqp.nnx_apply`,
            ``grads`` (a tree like ``params``) feeds gradient criteria.
        masks: ``masks(state) -> {path: bool array}`` that :func:`jaxqp.wrap` enforces.
        refresh: ``refresh(params, opt_state) -> (params, opt_state)``, called before each
            train step, outside jit, when the state was made with ``refresh="separate"``:
            refreshes the masks due at the coming step, in a function compiled once per
            process, and sets newly pruned weights to exactly 0. When no mask is due it
            returns its arguments unchanged, without running anything. Reading the step
            waits for the previous step to finish. Raises ``ValueError`` for a state made
            with ``refresh="in_update"`` (its ``update`` refreshes) or params of another
            model, ``TypeError`` inside ``jax.jit``.
    """

    init: Callable[[Params], Any]
    apply: Callable[[Params, Any], Params]
    update: UpdateFn
    masks: Callable[[Any], Masks] = _no_masks
    refresh: Callable[[Params, Any], tuple[Params, Any]] = _refresh_between_steps


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


def _needs_key(plan: Plan) -> bool:
    return any((e.quant is not None and e.quant.rounding == "stochastic") or (e.prune is not None and e.prune.needs_key)
               for e in plan.leaves)


def _require_grads(plan: Plan) -> None:
    """A gradient criterion advanced without gradients would keep its masks and scores silently."""
    for e in plan.leaves:
        if e.prune is not None and e.prune.needs_grads:
            what = repr(e.prune.criterion) if e.prune.criterion in ("saliency", "movement") else \
                "RigL(grow='gradient')"
            raise ValueError(f"t.update: '{e.path}' is pruned by {what}, which needs gradients. Fix: "
                             "t.update(params, state, grads=grads) with grads like params (jaxqp.wrap "
                             "passes them), or a criterion without gradients (e.g. 'magnitude')")


def _initial_scores(plan: Plan) -> dict:
    """Movement scores start at 0; Wanda input norms at 1 (plain magnitude until calibrated)."""
    scores = {}
    for e in plan.leaves:
        if e.prune is not None and e.prune.criterion == "movement":
            scores[e.path] = jnp.zeros(e.shape, jnp.float32)
        if e.prune is not None and e.prune.criterion == "wanda":
            if len(e.shape) < 2:
                raise ValueError(f"'{e.path}' has shape {e.shape}: Wanda scores a kernel's input rows "
                                 "(axis -2). Fix: match only kernels with the wanda rule.")
            scores[e.path] = jnp.ones(e.shape[-2], jnp.float32)
    return scores


def _movement_scores(plan: Plan, flat, scores: dict, grads: dict | None) -> dict:
    if grads is None:
        return scores
    leaves, entries = dict(flat), plan.by_path()
    moving = {path for path, e in entries.items() if e.prune is not None and e.prune.criterion == "movement"}
    return {path: (score - jnp.asarray(leaves[path], score.dtype) * jnp.asarray(grads[path], score.dtype)
                   if path in moving else score)
            for path, score in scores.items()}


def _initial_learned(plan: Plan, flat, masks: Masks) -> dict:
    leaves = dict(flat)
    weights, inputs = {}, {}
    for entry in plan.leaves:
        if entry.quant is not None and entry.quant.learned == "lsq":
            w = jnp.asarray(leaves[entry.path])
            if entry.path in masks:
                w = apply_mask(w, masks[entry.path])
            weights[entry.path] = {"step": init_step(w, entry.quant)}
        if entry.act is not None and input_quantizer.init_learned(entry.act) is not None:
            inputs[entry.path] = input_quantizer.init_learned(entry.act)
    return {"weights": weights, "inputs": inputs} if weights or inputs else {}


def transform(rules: Sequence[Rule] | Rule, *, seed: int | None = None, refresh: str = "in_update") -> ParamTransform:
    """The quantize-and-prune transform of ``rules`` (first matching rule wins per leaf).

    For a leaf with both specs, the mask is applied first and the quantizer is
    calibrated on the survivors, so pruned weights stay exactly 0. ``seed``
    makes the PRNG key that stochastic rounding draws from (stored in the state;
    step ``s`` of leaf ``i`` uses ``fold_in(fold_in(key, s), i)``).

    ``refresh="separate"`` takes the mask refresh out of ``update`` (and so out of the
    compiled train step, which then compiles like a fixed-mask step): call
    ``params, opt_state = t.refresh(params, opt_state)`` before each step instead. It
    computes the masks that ``update`` would have computed at that step, from the same
    weights, in a function compiled once per process, but they apply from that step's
    forward on, one step earlier than in-update masks (docs/design.md).

    Args:
      rules: the rules, or one rule.
      seed: seed of the PRNG key for stochastic rounding and random criteria.
      refresh: ``"in_update"`` (default): masks are refreshed inside ``update`` under
        ``lax.cond``; ``"separate"``: by ``t.refresh(params, opt_state)`` between steps (not for
        saliency pruning or RigL/SET, which need the step's gradients).

    Returns:
      A :class:`ParamTransform` ``(init, apply, update, masks, refresh)``.

    Raises:
      TypeError: if ``seed`` is not an int or None.
      ValueError: for an unknown ``refresh``; at ``init``, if a rule matches no float leaf, a
        spec does not fit the leaf it matches (the message names the rule and the path) or
        a ``refresh="separate"`` rule needs gradients to refresh.
    """
    rules = _as_rules(rules)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"jaxqp.transform: seed={seed!r} must be an int (or None), e.g. jaxqp.transform(rules, seed=0)")
    if refresh not in REFRESH_MODES:
        raise ValueError(f"jaxqp.transform: refresh={refresh!r}; expected one of {REFRESH_MODES}")

    def init(params) -> TransformState:
        plan = resolve(rules, params)
        flat, _ = plan.check(params)
        if refresh == "separate":
            check_separable(plan)
        if _needs_key(plan) and seed is None:
            raise ValueError("a rule asks for randomness (QuantSpec(rounding='stochastic'), PruneSpec("
                             "criterion='random') or RigL(grow='random')): give the transform a seed, "
                             "e.g. jaxqp.transform(rules, seed=0)")
        key = None if seed is None else jax.random.key_data(jax.random.key(seed))
        scores = _initial_scores(plan)
        masks = first_masks(plan, flat, MaskInputs(key=key, scores=scores))
        ranges = {e.path: input_quantizer.init_ranges(e.act) for e in plan.leaves
                  if e.act is not None and e.act.range == "static"}
        return TransformState(jnp.zeros((), jnp.int32), pack_masks(masks), plan, _initial_learned(plan, flat, masks),
                              ranges, key, scores=scores, refresh=refresh)

    def apply(params, state: TransformState):
        flat, treedef, plan = _checked(rules, params, state, "t.apply")
        out = [_apply_leaf(leaf, entry, state, i) for i, ((_, leaf), entry) in enumerate(zip(flat, plan.leaves))]
        return jax.tree_util.tree_unflatten(treedef, out)

    def update(params, state: TransformState, observed: dict | None = None, grads=None) -> TransformState:
        """``grads`` (a tree like ``params``) feeds saliency, movement and RigL criteria."""
        flat, _, plan = _checked(rules, params, state, "t.update")
        if grads is None:
            _require_grads(plan)
        step = state.step + 1
        grads = None if grads is None else dict(plan.check(grads, "grads")[0])
        scores = _movement_scores(plan, flat, state.scores, grads)
        inputs = MaskInputs(grads, scores, state.key)
        ranges = dict(state.ranges)
        for path, seen in (observed or {}).items():
            entry = plan.by_path().get(path)
            if entry is not None and entry.act is not None and path in ranges and "lo" in seen:
                ranges[path] = input_quantizer.update_ranges(entry.act, ranges[path], seen)
        frozen = jnp.asarray(state.frozen)  # data (it survives a checkpoint): chosen when the step runs
        scores = jax.tree_util.tree_map(lambda old, new: jnp.where(frozen, old, new), state.scores, scores)
        if state.refresh == "separate":  # t.refresh refreshes; record a refresh it did not run
            return dataclasses.replace(state, step=step, ranges=ranges, scores=scores,
                                       refresh_check=checked_refresh(state.refresh_check, step,
                                                                      ~frozen & refresh_due(plan, step)))
        # unpacking and repacking the masks only on steps that can change them
        bits = jax.lax.cond(~frozen & refresh_due(plan, step),
                            lambda: pack_masks(masks_for(plan, flat, state.masks, step, inputs)),
                            lambda: state.mask_bits)
        return dataclasses.replace(state, step=step, mask_bits=bits, ranges=ranges, scores=scores)

    return ParamTransform(init, apply, update, enforced_masks)


def enforced_masks(state: TransformState) -> Masks:
    """The masks :func:`jaxqp.wrap` (and ``t.refresh``) enforce on params: straight-through leaves train dense."""
    if not isinstance(state, TransformState):
        raise TypeError("t.masks: state must be the jaxqp state returned by t.init(params) (inside an optimizer: "
                        f"jaxqp.state_of(opt_state)), got {type(state).__name__}")
    soft = {e.path for e in state.plan.leaves if e.prune is not None and e.prune.straight_through}
    return {path: m for path, m in state.masks.items() if path not in soft}


def _apply_leaf(leaf, entry: LeafPlan, state: TransformState, index: int):
    if entry.path in state.mask_bits:  # a pruned leaf, or the bias of a Channels-pruned kernel
        masked = apply_mask(leaf, unpack_mask_rows(state.mask_bits[entry.path], entry.shape))
        dense_grad = entry.prune is not None and (entry.prune.straight_through or entry.prune.regrow is not None)
        leaf = straight_through(leaf, masked) if dense_grad else masked
    if entry.quant is not None:
        learned = state.learned.get("weights", {}).get(entry.path)
        key = None
        if entry.quant.rounding == "stochastic" and state.key is not None:  # no key: a clear error below
            key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step), index)
        leaf = fake_quant_weight(leaf, entry.quant, learned, key)
    return leaf
