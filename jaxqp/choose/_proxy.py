"""Cheap sensitivity proxies: Hutchinson Hessian traces (HAWQ-v2) and Spearman rank correlation.

HAWQ-v2 (Dong et al. 2020) predicts the loss increase of perturbing layer ``i`` by
``dW_i`` as ``0.5 * Tr(H_i) / n_i * ||dW_i||^2``, with ``H_i`` the Hessian block of
the layer's ``n_i`` weights. Hutchinson's estimator gives ``Tr(H_i) = E[v_i . (H v)_i]``
for Rademacher ``v``: one Hessian-vector product (forward-over-reverse) per sample
estimates every layer's trace at once, since the cross terms have zero mean.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxqp.choose import hessian_traces, spearman
    >>> loss = lambda p, b: jnp.sum(b * p["w"] ** 2)      # Hessian diag(2b): Tr = 2 * sum(b)
    >>> tr = hessian_traces(loss, {"w": jnp.ones(3)}, [jnp.array([1.0, 2.0, 3.0])], ["w"])
    >>> round(float(tr[0]), 4)
    12.0
    >>> spearman([1, 2, 3, 4], [10, 30, 20, 40])
    0.8
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._sweep import batched_loss, layer_ids


def hessian_traces(loss_fn: Callable[[Any, Any], Any], params: Any, batches: Sequence[Any],
                   layers: Sequence[str], *, samples: int = 16, seed: int = 0) -> np.ndarray:
    """Hutchinson estimates of the Hessian trace of each layer's weights, averaged over ``batches``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the trained parameters (any pytree).
      batches: calibration batches of equal shapes (a list of pytrees of arrays).
      layers: the "/"-joined paths of the leaves to estimate.
      samples: Rademacher probes; the estimate's standard error falls as ``1/sqrt(samples)``.
      seed: the probes' random seed.

    Returns:
      float64 array, one trace per layer (the sum of the diagonal of its Hessian block).

    Example:
        >>> import jax.numpy as jnp
        >>> tr = hessian_traces(lambda p, b: jnp.sum(p["w"] ** 2), {"w": jnp.ones(4)}, [0.0], ["w"])
        >>> float(tr[0])
        8.0
    """
    if samples < 1:
        raise ValueError(f"samples={samples}: Hutchinson's estimator needs at least one probe")
    ids, treedef = layer_ids(params, layers)
    mean_loss = batched_loss(loss_fn, batches)

    @jax.jit
    def probe(params, key):
        leaves = jax.tree.leaves(params)
        keys = jax.random.split(key, len(leaves))
        vs = [jax.random.rademacher(k, jnp.shape(x), jnp.result_type(x)) if i is not None else jnp.zeros_like(x)
              for k, x, i in zip(keys, leaves, ids)]
        v = jax.tree.unflatten(treedef, vs)
        _, hv = jax.jvp(jax.grad(lambda p: mean_loss(p)), (params,), (v,))
        products = [jnp.vdot(a, b).astype(jnp.float32) for a, b in zip(vs, jax.tree.leaves(hv))]
        return jnp.stack([products[ids.index(k)] for k in range(len(layers))])

    keys = jax.random.split(jax.random.key(seed), samples)
    total = np.zeros(len(layers))
    for key in keys:
        total += np.asarray(probe(params, key), np.float64)
    return total / samples


def ranks(values) -> np.ndarray:
    """Ranks from 0 with ties given their average rank (as Spearman's rho needs)."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        out[order[start:stop + 1]] = 0.5 * (start + stop)
        start = stop + 1
    return out


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation of two equal-length sequences (NaN pairs dropped; ties averaged).

    Args:
      a: the first values.
      b: the second values.

    Returns:
      rho in [-1, 1], or NaN when fewer than two pairs remain or one side is constant.

    Example:
        >>> spearman([1, 2, 3], [3, 2, 1])
        -1.0
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of one length, got shapes {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    ra, rb = ranks(a[keep]), ranks(b[keep])
    if len(ra) < 2 or np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.round(np.corrcoef(ra, rb)[0, 1], 12))
