"""``jaxqp.wrap``: one optax optimizer that also runs a ParamTransform (optax layer).

``wrap(tx, t)`` holds the transform state next to ``tx``'s state. Each
``update(grads, opt_state, params)``:

1. runs ``tx`` on the gradients;
2. calls ``t.update(params, state)`` with the params it was given (the ones
   this step's forward used), advancing the step and refreshing masks on
   schedule;
3. masks the updates so that every pruned parameter becomes exactly 0:
   kept entries get ``tx``'s update unchanged, pruned entries get ``-params``
   (``p + (-p)`` is exactly 0 in IEEE arithmetic).

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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._path import paths_and_leaves
from ._transform import ParamTransform


class WrapState(NamedTuple):
    """Optimizer state of :func:`wrap`: the inner optimizer's and the transform's."""

    inner: Any
    transform: Any


def _mask_updates(updates, params, masks):
    flat_u, treedef = paths_and_leaves(updates)
    flat_p, _ = paths_and_leaves(params)
    out = []
    for (path, u), (_, p) in zip(flat_u, flat_p, strict=True):
        if path in masks:
            u = jnp.where(masks[path], u, -jnp.asarray(p, jnp.result_type(u)))
        out.append(u)
    return jax.tree_util.tree_unflatten(treedef, out)


def wrap(tx: optax.GradientTransformation, t: ParamTransform) -> optax.GradientTransformationExtraArgs:
    """``tx`` plus the transform ``t``: masked updates, advanced schedules, fresh masks.

    Works with any optax transformation (``optax.chain``, ``inject_hyperparams``,
    ``MultiSteps``). ``tx.update`` must be given ``params``. Read the transform
    state back with :func:`state_of`.
    """
    if not isinstance(t, ParamTransform):
        raise TypeError(f"jaxqp.wrap(tx, t): t must be a jaxqp.ParamTransform (from jaxqp.transform), got {type(t).__name__}")
    if not hasattr(tx, "init") or not hasattr(tx, "update"):
        raise TypeError(f"jaxqp.wrap(tx, t): tx must be an optax GradientTransformation, got {type(tx).__name__}")
    inner = optax.with_extra_args_support(tx)

    def init(params):
        return WrapState(inner.init(params), t.init(params))

    def update(updates, state: WrapState, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "jaxqp.wrap needs the current params to keep pruned weights at 0: "
                "call tx.update(grads, opt_state, params)"
            )
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        new_state = t.update(params, state.transform)
        masks = t.masks(new_state)
        if masks:
            updates = _mask_updates(updates, params, masks)
        return updates, WrapState(inner_state, new_state)

    return optax.GradientTransformationExtraArgs(init, update)


def state_of(opt_state) -> Any:
    """The transform state inside an optimizer state built by :func:`wrap`.

    Looks through any nesting (``optax.chain``, ``MultiSteps``, ``inject_hyperparams``).
    """
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
