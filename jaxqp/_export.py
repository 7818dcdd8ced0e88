"""``jaxqp.export``: a trained tree with truly compressed leaves (export layer).

Each leaf becomes what stores it in the fewest bytes while decoding, with
:func:`jaxqp.dequantize`, to exactly what ``t.apply(params, state)`` computes:

* quantized leaves: a :class:`QArray` of integer codes (packed below 8 bits),
  sparse (bitmask + kept codes) when pruned and that is smaller;
* pruned float leaves: a :class:`SparseArray` (bitmask + kept values) when that is
  smaller than the dense array, else the dense array with exact zeros;
* leaves pruned with ``NM(n, m)``: an :class:`NMArray` (kept values or a QArray of
  kept codes, plus each one's position in its group) unless another form is smaller;
* ``pow2`` and fp8 formats: the dense fake-quantized float array (exact, not
  yet smaller: a value container for them is future work);
* other leaves: unchanged.

Export runs eagerly (the sizes of sparse leaves depend on the data), once, after
training; what it returns can be passed to jitted functions.

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> params = {"w": jnp.arange(-8.0, 8.0).reshape(4, 4)}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=4))])
    >>> state = t.init(params)
    >>> packed = jaxqp.export(params, state)
    >>> packed["w"].codes.dtype, packed["w"].nbytes
    (dtype('uint8'), 24)
    >>> bool((jaxqp.dequantize(packed)["w"] == t.apply(params, state)["w"]).all())
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._mask import apply_mask
from ._nm_array import NMArray
from ._prune_spec import NM
from ._qarray import QArray, SparseArray
from ._quantizer import fake_quant_weight, weight_codes
from ._views import LeafView, leaf_views


def _smallest(*candidates):
    return min((c for c in candidates if c is not None), key=lambda c: c.nbytes)


def _nm(view: LeafView):
    prune = view.entry.prune
    return prune.structure if prune is not None and isinstance(prune.structure, NM) else None


def _export_leaf(leaf, view: LeafView):
    if view.quant is None and view.mask is None:
        return leaf
    w = jnp.asarray(leaf)
    nm = _nm(view)
    if view.mask is not None:
        w = apply_mask(w, view.mask)
    if view.quant is None:
        mask = np.asarray(view.mask)
        nm_array = None if nm is None else NMArray.from_dense(w, mask, nm.n, nm.m, nm.axis)
        return _smallest(nm_array, SparseArray.from_dense(w, mask), w)
    spec = view.quant
    if spec.format in ("pow2", "e4m3", "e5m2"):
        return fake_quant_weight(w, spec)
    codes, q = weight_codes(w, spec, view.learned)
    codes = codes.astype(jnp.int32)
    bits = max(spec.bits, 2)  # binary codes are -1, 0, 1
    build = lambda c, mask=None, group=q.group: QArray.from_codes(  # noqa: E731
        c, q.scale, q.zero_point, bits, q.qmin, q.qmax, w.dtype, mask=mask, group=group)
    dense = build(codes)
    if view.mask is None:
        return dense
    mask = np.asarray(view.mask)
    return _smallest(_nm_codes(codes, mask, nm, q, build), build(codes, mask), dense)


def _nm_codes(codes, mask, nm: NM | None, q, build):
    """An NMArray of the kept codes, or None (no N:M rule, or scales it would split)."""
    if nm is None:
        return None
    axis, group = nm.axis % codes.ndim, q.group
    grouped_here = group is not None and group[0] == axis
    if not grouped_here and q.scale.shape[axis] != 1:  # one scale per entry along the N:M axis
        return None
    if grouped_here:
        if group[1] % nm.m:
            return None
        group = (axis, group[1] // nm.m * nm.n)
    return NMArray.from_codes(codes, mask, nm.n, nm.m, axis, lambda c: build(c, group=group))


def export(params, state):
    """``params`` with every transformed leaf replaced by its compressed form.

    ``state`` is the transform state (``t.init``/``jaxqp.state_of(opt_state)``), a
    chain's tuple of states, or an optimizer state built by :func:`jaxqp.wrap`.
    """
    flat, treedef, views = leaf_views(params, state)
    out = [_export_leaf(leaf, view) for (_, leaf), view in zip(flat, views)]
    return jax.tree_util.tree_unflatten(treedef, out)
