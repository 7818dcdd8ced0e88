"""``jaxqp.export``: a trained tree with truly compressed leaves (export layer).

Each leaf becomes what stores it in the fewest bytes while decoding, with
:func:`jaxqp.dequantize`, to exactly what ``t.apply(params, state)`` computes:

* quantized leaves: a :class:`QArray` of integer codes (packed below 8 bits),
  sparse (bitmask + kept codes) when pruned and that is smaller;
* pruned float leaves: a :class:`SparseArray` (bitmask + kept values) when that is
  smaller than the dense array, else the dense array with exact zeros;
* leaves pruned with ``NM(n, m)``: an :class:`NMArray` (kept values or a QArray of
  kept codes, plus each one's position in its group) unless another form is smaller;
* ``pow2`` leaves: a :class:`Pow2Array` (``bits``-bit codes, packed, plus an
  exponent per channel), sparse when pruned and that is smaller;
* fp8 leaves: an :class:`Fp8Array` (the float8 values and a scale per channel),
  with a bitmask and only the kept values when pruned and that is smaller;
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

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._specs.prune import NM
from .._transforms.separate_refresh import require_refreshed
from .._transforms.views import LeafView, leaf_views
from .._transforms.weight_quantizer import fp8_weight, weight_codes
from ..numerics._formats import pow2_codes_of
from ..numerics._masks import apply_mask
from .compressed import require_on_this_host
from .nm_array import NMArray
from .qarray import QArray
from .sparse_array import SparseArray
from .value_arrays import Fp8Array, Pow2Array


def _smallest(*candidates):
    return min((c for c in candidates if c is not None), key=lambda c: c.nbytes)


def _nm(view: LeafView):
    prune = view.entry.prune
    return prune.structure if prune is not None and isinstance(prune.structure, NM) else None


def _export_leaf(leaf, view: LeafView):
    if view.quant is None and view.mask is None:
        return leaf
    w = jnp.asarray(leaf)
    mask = None if view.mask is None else np.asarray(view.mask)
    if view.mask is not None:
        w = apply_mask(w, view.mask)
    spec, nm = view.quant, _nm(view)
    if spec is None:
        nm_array = None if nm is None else NMArray.from_dense(w, mask, nm.n, nm.m, nm.axis)
        return _smallest(nm_array, SparseArray.from_dense(w, mask), w)
    if spec.format == "pow2":
        codes, emin = pow2_codes_of(w, spec.bits, spec.axis)
        build = lambda m=None: Pow2Array.from_codes(codes, emin, spec.bits, w.dtype, m)
        return build() if mask is None else _smallest(build(mask), build())
    if spec.format in ("e4m3", "e5m2"):
        values, scale = fp8_weight(w, spec)
        dense = Fp8Array(values, scale, str(w.dtype))
        return dense if mask is None else _smallest(
            Fp8Array(SparseArray.from_dense(values, mask), scale, str(w.dtype)), dense)
    return _integer(w, spec, view.learned, mask, nm)


def _integer(w, spec, learned, mask, nm: NM | None):
    """A QArray of ``w``'s codes: dense, bitmask-sparse or N:M, whichever is smallest."""
    codes, q = weight_codes(w, spec, learned)
    codes = codes.astype(jnp.int32)
    bits = max(spec.bits, 2)  # binary codes are -1, 0, 1
    build = lambda c, mask=None, group=q.group: QArray.from_codes(
        c, q.scale, q.zero_point, bits, q.qmin, q.qmax, w.dtype, mask=mask, group=group)
    dense = build(codes)
    if mask is None:
        return dense
    return _smallest(_nm_codes(codes, mask, nm, q, build), build(codes, mask), dense)


def _nm_codes(codes, mask, nm: NM | None, q, build):
    """An NMArray of the kept codes, or None (no N:M rule, or scales it would split)."""
    if nm is None:
        return None
    axis, group = nm.axis % codes.ndim, q.group
    if group is not None and group[0] == axis:  # groups along the N:M axis shrink with it
        if group[1] % nm.m:
            return None
        group = (axis, group[1] // nm.m * nm.n)
    elif q.scale.shape[axis] != 1:  # one scale per entry along the N:M axis
        return None
    return NMArray.from_codes(codes, mask, nm.n, nm.m, axis, lambda c: build(c, group=group))


def _require_finite(path: str, leaf, view: LeafView) -> None:
    """Refuses a NaN or infinity that a compressed leaf would keep.

    No integer code or scale holds one: a NaN would vanish into code 0 under a scale of 1.0
    (its whole channel mis-scaled), an infinity would decode to NaN: either way a model that
    looks fine and is not. Entries the mask prunes are not kept, so they may hold anything.
    """
    bad = ~jnp.isfinite(jnp.asarray(leaf))  # on the leaf's devices: a host copy only for the message
    if view.mask is not None:
        bad &= jnp.asarray(view.mask, bool)
    if bool(bad.any()):
        values, bad = np.asarray(leaf), np.asarray(bad)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"jaxqp.export: '{path}' holds {int(np.isnan(values[bad]).sum())} NaN and "
            f"{int(np.isinf(values[bad]).sum())} infinite kept values (the first at index {first}); "
            "a compressed leaf must be finite (a NaN would become code 0 and mis-scale its channel). "
            "Did training diverge? Export params from before the divergence (e.g. a restored "
            "checkpoint), or leave this leaf float with a rule without a spec placed first.")


def _abstract_nbytes(tree) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree))


def stored_nbytes(params: Any, state: Any) -> list[int]:
    """Bytes ``export(params, state)`` stores for each leaf (tree order), without computing any codes.

    The export of each leaf is traced abstractly (``jax.eval_shape``) with its mask as a host array,
    so the sizes, which depend only on shapes, specs and mask counts, come out exactly and no
    device op runs or compiles. ``jaxqp.summary`` and ``jaxqp.choose`` count bytes with it.

    Args:
      params: the params (arrays or ``jax.ShapeDtypeStruct``s).
      state: the transform state, a chain's states, or an optimizer state from :func:`jaxqp.wrap`.

    Returns:
      One int per leaf of ``params``.
    """
    flat, _, views = leaf_views(params, state, host_masks=True)
    return views_nbytes(flat, views)


def views_nbytes(flat: list, views: list) -> list[int]:
    """:func:`stored_nbytes` of leaves already paired with their views (``leaf_views(..., host_masks=True)``)."""
    out = []
    for (_, leaf), view in zip(flat, views):
        if view.quant is None and view.mask is None:
            out.append(_abstract_nbytes(leaf) if hasattr(leaf, "dtype") else 0)
            continue
        abstract = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        out.append(_abstract_nbytes(jax.eval_shape(lambda w, view=view: _export_leaf(w, view), abstract)))
    return out


def export(params: Any, state: Any) -> Any:
    """``params`` with every transformed leaf replaced by its compressed form.

    ``state`` is the transform state (``t.init``/``jaxqp.state_of(opt_state)``), a
    chain's tuple of states, or an optimizer state built by :func:`jaxqp.wrap`.

    Args:
      params: the trained params.
      state: the transform state, a chain's states, or an optimizer state from :func:`jaxqp.wrap`.

    Returns:
      The tree with :class:`QArray`, :class:`SparseArray`, :class:`NMArray`,
      :class:`Pow2Array` or :class:`Fp8Array` leaves where a spec applies; other leaves
      unchanged. ``jaxqp.dequantize`` of it equals ``t.apply(params, state)`` bit for bit.

    Raises:
      ValueError: if ``state`` was not made for ``params``' tree, a ``refresh="separate"``
        state missed a mask refresh (``t.refresh`` not called before a due step), a
        transformed leaf keeps a NaN or an infinity (the message names the leaf and the first
        index), or a transformed leaf has shards in another process (``jax.distributed``):
        gather it first (the message says how). Nothing is compressed before these checks.
    """
    flat, treedef, views = leaf_views(params, state)
    require_refreshed(state, "jaxqp.export")
    for (path, leaf), view in zip(flat, views):
        if view.quant is not None or view.mask is not None:
            for array in (leaf, view.mask):
                require_on_this_host("jaxqp.export", path, array, "export builds each compressed leaf on this host")
            _require_finite(path, leaf, view)
    out = [_export_leaf(leaf, view) for (_, leaf), view in zip(flat, views)]
    return jax.tree_util.tree_unflatten(treedef, out)
