"""``jaxqp.wrap``: one optax optimizer that also runs a ParamTransform (optax layer).

``wrap(tx, t)`` holds the transform state next to ``tx``'s state. Each
``update(grads, opt_state, params)``:

1. runs ``tx`` on the gradients;
2. calls ``t.update(params, state)`` with the params it was given (the ones
   this step's forward used), advancing the step and refreshing masks on
   schedule;
3. masks the updates so that every pruned parameter becomes exactly 0:
   kept entries get ``tx``'s update unchanged, pruned entries get ``-params``
   (``p + (-p)`` is exactly 0 in IEEE arithmetic);
4. if the transform has learned quantizer values (LSQ steps, PACT clips), the
   gradients must be ``(param_grads, state_grads)`` from
   ``jax.grad(loss, argnums=(0, 1), allow_int=True)(params, state)``; the state
   part is updated by ``learned_tx`` (default: ``tx``) with its own state.

``update`` also takes ``observed=``: the input statistics returned by
:func:`jaxqp.linen_apply` / :func:`jaxqp.nnx_apply` / :func:`jaxqp.quantize_input`,
folded into static activation ranges.

Example:
    >>> import jax.numpy as jnp, optax, jaxqp
    >>> t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))])
    >>> tx = jaxqp.wrap(optax.sgd(0.1), t)
    >>> params = {"w": jnp.array([1.0, -2.0, 0.5, 3.0])}
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update({"w": jnp.ones(4)}, opt_state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([ 0. , -2.1,  0. ,  2.9], dtype=float32)
    >>> int(jaxqp.state_of(opt_state).step)
    1
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from .._specs.paths import paths_and_leaves
from .rigl import reset_moments
from .state_tree import learned_of, needs_grads, transform_states, with_learned
from .transform import ParamTransform, TransformState


class WrapState(NamedTuple):
    """Optimizer state of :func:`wrap`: the inner optimizer's, the transform's and ``learned_tx``'s.

    Attributes:
      inner: the wrapped optimizer's state.
      transform: the :class:`TransformState` (or a chain's tuple).
      learned: ``learned_tx``'s state, or None without learned values.
    """

    inner: Any
    transform: Any
    learned: Any = None


def _has_learned(state) -> bool:
    return any(bool(d) for d in learned_of(state))


def _regrown_paths(state) -> set[str]:
    return {e.path for s in transform_states(state) for e in s.plan.leaves
            if e.prune is not None and e.prune.regrow is not None}


def _srste_decay(grads, params, state):
    """SR-STE: adds ``decay * w`` to the gradients of pruned entries of straight-through leaves."""
    decays = {e.path: (e.prune.decay, s.mask(e.path)) for s in transform_states(state) for e in s.plan.leaves
              if e.prune is not None and e.prune.decay > 0}
    if not decays:
        return grads
    flat_g, treedef = paths_and_leaves(grads)
    flat_p, _ = paths_and_leaves(params)
    out = []
    for (path, g), (_, p) in zip(flat_g, flat_p, strict=True):
        if path in decays:
            decay, mask = decays[path]
            g = g + jnp.where(mask, jnp.zeros_like(g), decay * jnp.asarray(p, g.dtype))
        out.append(g)
    return jax.tree_util.tree_unflatten(treedef, out)


def _split_grads(updates):
    """``(param_grads, state_grads)`` if ``updates`` is such a pair, else ``(updates, None)``."""
    if isinstance(updates, tuple) and len(updates) == 2 and transform_states(updates[1]):
        return updates
    return updates, None


def _check_grads(grads, params, transform_state) -> None:
    """Refuses gradients of another tree than ``params`` (naming the paths), before any update.

    When the trees differ, ``params`` are checked against the transform state first, so that
    another model's params are named as such (``t.update`` checks them on the normal path).
    """
    if jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params):
        shapes = zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params))
        if all(jnp.shape(g) == jnp.shape(p) for g, p in shapes):
            return
        path, got, want = next((path, jnp.shape(g), jnp.shape(p)) for (path, g), (_, p)
                               in zip(paths_and_leaves(grads)[0], paths_and_leaves(params)[0])
                               if jnp.shape(g) != jnp.shape(p))
        raise ValueError(f"jaxqp.wrap: the gradient of '{path}' has shape {got} but the param has shape "
                         f"{want}. Fix: pass grads = jax.grad(loss_fn)(params) of these params")
    for s in transform_states(transform_state):
        s.plan.check(params)
    got = {path for path, _ in paths_and_leaves(grads)[0]}
    want = {path for path, _ in paths_and_leaves(params)[0]}
    raise ValueError(f"jaxqp.wrap: grads and params are different trees (missing from grads: "
                     f"{sorted(want - got)[:5]}; not in params: {sorted(got - want)[:5]}). Fix: pass "
                     "tx.update(grads, opt_state, params) with grads = jax.grad(loss_fn)(params) of these params")


def _mask_updates(updates, params, masks):
    flat_u, treedef = paths_and_leaves(updates)
    flat_p, _ = paths_and_leaves(params)
    out = []
    for (path, u), (_, p) in zip(flat_u, flat_p, strict=True):
        if path in masks:
            u = jnp.where(masks[path], u, -jnp.asarray(p, jnp.result_type(u)))
        out.append(u)
    return jax.tree_util.tree_unflatten(treedef, out)


def wrap(tx: optax.GradientTransformation, t: ParamTransform,
         learned_tx: optax.GradientTransformation | None = None) -> optax.GradientTransformationExtraArgs:
    """``tx`` plus the transform ``t``: masked updates, advanced schedules, fresh masks.

    Works with any optax transformation (``optax.chain``, ``inject_hyperparams``,
    ``MultiSteps``). ``tx.update`` must be given ``params``. Read the transform
    state back with :func:`state_of`. ``learned_tx`` updates learned quantizer
    values (default ``tx``; pass e.g. ``optax.adam(1e-3)`` to keep ``tx``'s
    weight decay off step sizes).

    Args:
      tx: the optimizer.
      t: the transform.
      learned_tx: the optimizer of learned quantizer values (default ``tx``).

    Returns:
      An optax transformation: ``init(params)`` and
      ``update(grads, opt_state, params, observed=None)``.

    Raises:
      TypeError: if ``t`` is not a :class:`ParamTransform`.
    """
    if not isinstance(t, ParamTransform):
        raise TypeError(
            f"jaxqp.wrap(tx, t): t must be a jaxqp.ParamTransform (from jaxqp.transform), got {type(t).__name__}"
        )
    if not hasattr(tx, "init") or not hasattr(tx, "update"):
        raise TypeError(f"jaxqp.wrap(tx, t): tx must be an optax GradientTransformation, got {type(tx).__name__}")
    inner = optax.with_extra_args_support(tx)
    inner_learned = optax.with_extra_args_support(tx if learned_tx is None else learned_tx)

    def init(params):
        t_state = t.init(params)
        learned = inner_learned.init(learned_of(t_state)) if _has_learned(t_state) else None
        return WrapState(inner.init(params), t_state, learned)

    def update(updates, state: optax.OptState, params=None, observed=None, **extra_args):
        if not isinstance(state, WrapState):
            raise TypeError(f"jaxqp.wrap: opt_state must come from this optimizer's init, got {type(state).__name__}")
        if params is None:
            raise ValueError(
                "jaxqp.wrap needs the current params to keep pruned weights at 0: "
                "call tx.update(grads, opt_state, params)"
            )
        updates, state_grads = _split_grads(updates)
        _check_grads(updates, params, state.transform)
        learns = _has_learned(state.transform)
        if learns and state_grads is None:
            raise ValueError(
                "this transform learns quantizer values (LSQ steps / PACT clips) held in its state: "
                "differentiate w.r.t. (params, state), e.g. grads = jax.grad(loss_fn, argnums=(0, 1), "
                "allow_int=True)(params, state), and pass that pair to tx.update(grads, opt_state, params)"
            )
        grads = updates
        updates, inner_state = inner.update(_srste_decay(grads, params, state.transform), state.inner, params,
                                            **extra_args)
        extra = () if observed is None else (observed,)
        kw = {"grads": grads} if needs_grads(state.transform) else {}
        new_state = t.update(params, state.transform, *extra, **kw)
        regrown = _regrown_paths(state.transform)
        if regrown:  # RigL/SET: grown weights start at 0 with zero moments, and get no update now
            old, new = t.masks(state.transform), t.masks(new_state)
            grown = {path: new[path] & ~old[path] for path in regrown}
            inner_state = reset_moments(inner_state, params, grown)
            updates = _mask_updates(updates, params, {path: ~g for path, g in grown.items()})
        learned_state = state.learned
        if learns:
            values = learned_of(state.transform)
            steps, learned_state = inner_learned.update(learned_of(state_grads), state.learned, values)
            new_state = with_learned(new_state, cast(tuple, optax.apply_updates(values, steps)))
        masks = t.masks(new_state)
        if masks:
            updates = _mask_updates(updates, params, masks)
        return updates, WrapState(inner_state, new_state, learned_state)

    return optax.GradientTransformationExtraArgs(init, update)


def state_of(opt_state: Any) -> Any:
    """The transform state inside an optimizer state built by :func:`wrap`.

    Looks through any nesting (``optax.chain``, ``MultiSteps``, ``inject_hyperparams``).

    Args:
      opt_state: the optimizer state.

    Returns:
      The :class:`TransformState` (or a chain's tuple of them); given one (or such a tuple)
      itself, that same state.

    Raises:
      ValueError: if ``opt_state`` holds no jaxqp state.
    """
    if isinstance(opt_state, TransformState) or (
            isinstance(opt_state, tuple) and opt_state and all(isinstance(s, TransformState) for s in opt_state)):
        return opt_state  # already the transform state (t.init's result): no optimizer around it
    found = [
        node
        for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, WrapState))
        if isinstance(node, WrapState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"jaxqp.state_of: expected one jaxqp state in opt_state, found {len(found)}. "
            "Build the optimizer with tx = jaxqp.wrap(optax_tx, t) and pass tx.init(params)'s result."
        )
    return found[0].transform
