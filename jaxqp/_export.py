"""``jaxqp.export``: a trained tree with truly compressed leaves (export layer).

Each leaf becomes what stores it in the fewest bytes while decoding, with
:func:`jaxqp.dequantize`, to exactly what ``t.apply(params, state)`` computes:

* quantized leaves: a :class:`QArray` of integer codes (packed below 8 bits),
  sparse (bitmask + kept codes) when pruned and that is smaller;
* pruned float leaves: a :class:`SparseArray` (bitmask + kept values) when that is
  smaller than the dense array, else the dense array with exact zeros;
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
from ._qarray import QArray, SparseArray
from ._quantizer import fake_quant_weight, weight_codes
from ._views import LeafView, leaf_views


def _export_leaf(leaf, view: LeafView):
    if view.quant is None and view.mask is None:
        return leaf
    w = jnp.asarray(leaf)
    if view.mask is not None:
        w = apply_mask(w, view.mask)
    if view.quant is None:
        sparse = SparseArray.from_dense(w, view.mask)
        return sparse if sparse.nbytes < w.nbytes else w
    spec = view.quant
    if spec.format in ("pow2", "e4m3", "e5m2"):
        return fake_quant_weight(w, spec)
    codes, q = weight_codes(w, spec, view.learned)
    codes = codes.astype(jnp.int32)
    bits = max(spec.bits, 2)  # binary codes are -1, 0, 1
    build = lambda mask=None: QArray.from_codes(  # noqa: E731
        codes, q.scale, q.zero_point, bits, q.qmin, q.qmax, w.dtype, mask=mask, group=q.group)
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
