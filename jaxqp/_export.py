"""``jaxqp.export``: a trained tree with truly compressed leaves (export layer).

Each leaf becomes what stores it in the fewest bytes while decoding, with
:func:`jaxqp.dequantize`, to exactly what ``t.apply(params, state)`` computes:

* quantized leaves: a :class:`QArray` of integer codes (packed below 8 bits),
  sparse (bitmask + kept codes) when pruned and that is smaller;
* pruned float leaves: a :class:`SparseArray` (bitmask + kept values) when that is
  smaller than the dense array, else the dense array with exact zeros;
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
from ._qarray import QArray, SparseArray
from ._quant import quantize
from ._quantizer import weight_quantizer
from ._transform import LeafView, leaf_views


def _export_leaf(leaf, view: LeafView):
    if view.quant is None and view.mask is None:
        return leaf
    w = jnp.asarray(leaf)
    if view.mask is not None:
        w = apply_mask(w, view.mask)
    if view.quant is None:
        sparse = SparseArray.from_dense(w, view.mask)
        return sparse if sparse.nbytes < w.nbytes else w
    q = weight_quantizer(w, view.quant)
    codes = quantize(w, q.scale, q.zero_point, q.qmin, q.qmax).astype(jnp.int32)
    build = lambda mask=None: QArray.from_codes(  # noqa: E731
        codes, q.scale, q.zero_point, view.quant.bits, q.qmin, q.qmax, w.dtype, mask=mask)
    dense = build()
    if view.mask is None:
        return dense
    sparse = build(np.asarray(view.mask))
    return sparse if sparse.nbytes < dense.nbytes else dense


def export(params, state):
    """``params`` with every transformed leaf replaced by its compressed form.

    ``state`` is the transform state (``t.init``/``jaxqp.state_of(opt_state)``), a
    chain's tuple of states, or an optimizer state built by :func:`jaxqp.wrap`.
    """
    flat, treedef, views = leaf_views(params, state)
    out = [_export_leaf(leaf, view) for (_, leaf), view in zip(flat, views)]
    return jax.tree_util.tree_unflatten(treedef, out)
