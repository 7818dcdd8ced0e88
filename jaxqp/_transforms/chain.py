"""``jaxqp.chain``: several transforms applied in order, as one (transforms layer).

Example:
    >>> import jaxqp
    >>> t = jaxqp.chain(jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))]),
    ...                 jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=4))]))
"""

from __future__ import annotations

from .state_tree import transform_states
from .transform import Masks, ParamTransform


def _require_one_quantizer(states) -> None:
    """Refuses two transforms of a chain quantizing the same weight (or the same layer input)."""
    for field, what in (("quant", "a QuantSpec"), ("act", "an ActSpec")):
        first: dict[str, int] = {}
        for i, state in enumerate(states):  # a chained chain's states are a tuple of them
            for leaf in (leaf for s in transform_states(state) for leaf in s.plan.leaves):
                if getattr(leaf, field) is None:
                    continue
                if leaf.path in first:
                    raise ValueError(
                        f"jaxqp.chain: '{leaf.path}' gets {what} from transform {first[leaf.path]} and from "
                        f"transform {i}; a path takes one (export stores one set of codes, so the exported "
                        "model would not be the trained one). Fix: give it the spec in one transform only")
                first[leaf.path] = i


def chain(*transforms: ParamTransform) -> ParamTransform:
    """Applies ``transforms`` in order; the state is a tuple of their states.

    Masks of the same path are combined with logical AND. A weight takes at most one
    ``QuantSpec`` and a layer input at most one ``ActSpec`` across the chain: export stores one
    set of codes, so a second quantizer of the same path would make the exported model differ
    from the trained one (``init`` refuses it, naming the path).

    Args:
      *transforms: the transforms, applied first to last (at least one).

    Returns:
      One :class:`ParamTransform`.

    Example:
      >>> import jaxqp
      >>> t = jaxqp.chain(jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))]),
      ...                 jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=4))]))
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, ParamTransform):
            raise TypeError(f"chain argument {i} is {type(t).__name__}; pass jaxqp.ParamTransform values")
    if not transforms:
        raise ValueError("jaxqp.chain: give at least one transform, e.g. chain(prune_t, quant_t)")

    def init(params):
        states = tuple(t.init(params) for t in transforms)
        _require_one_quantizer(states)
        return states

    def apply(params, state):
        for t, s in zip(transforms, state, strict=True):
            params = t.apply(params, s)
        return params

    def update(params, state, observed=None, grads=None):
        extra = () if observed is None else (observed,)
        kw = {} if grads is None else {"grads": grads}
        return tuple(t.update(params, s, *extra, **kw) for t, s in zip(transforms, state, strict=True))

    def masks(state) -> Masks:
        merged: Masks = {}
        for t, s in zip(transforms, state, strict=True):
            for path, mask in t.masks(s).items():
                merged[path] = merged[path] & mask if path in merged else mask
        return merged

    return ParamTransform(init, apply, update, masks)
