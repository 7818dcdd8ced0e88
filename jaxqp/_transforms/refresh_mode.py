"""Where a transform refreshes its masks: the ``refresh=`` modes of :func:`jaxqp.transform` (transforms layer).

``"in_update"`` (the default) refreshes inside ``update`` under ``lax.cond``; ``"separate"``
leaves it to ``t.refresh`` between steps (``separate_refresh.py``). This module holds what
both sides need: the modes, the rules a separate refresh cannot serve, and the bookkeeping
that makes a refresh that did not run visible.

Example:
    >>> import jax.numpy as jnp
    >>> int(checked_refresh(jnp.int32(0), jnp.int32(5), jnp.bool_(True)))  # due at 5, not run
    5
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._specs.rules import Plan

REFRESH_MODES = ("in_update", "separate")


def checked_refresh(check: jax.Array, step: jax.Array, due: jax.Array) -> jax.Array:
    """``refresh_check`` after ``update`` reached ``step``: a missed refresh sticks as ``+step``."""
    done = check == -step  # t.refresh refreshed the masks for this step
    return jnp.where(check > 0, check, jnp.where(due & ~done, step, jnp.where(done, 0, check)))


def check_separable(plan: Plan) -> None:
    """``refresh="separate"`` runs the refresh between steps, where no gradients are at hand."""
    for e in plan.leaves:
        if e.prune is None:
            continue
        if e.prune.criterion == "saliency" or e.prune.regrow is not None:
            what = "criterion='saliency'" if e.prune.criterion == "saliency" else "a RigL/SET regrow"
            raise ValueError(f"jaxqp.transform(..., refresh='separate'): '{e.path}' is pruned with {what}, which "
                             "needs this step's gradients (and, for regrowth, the optimizer's moments) when its "
                             "masks change. Fix: keep refresh='in_update' (the default) for this rule")
