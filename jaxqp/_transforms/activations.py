"""Quantized layer inputs for any model, and PTQ calibration (transforms layer, no flax).

* :func:`quantize_input` fake-quantizes the input ``x`` of the weight at
  ``path`` as its rule's :class:`ActSpec` says, for hand-written models;
* :func:`calibrate` runs a forward function over sample batches with inputs
  left float, records their statistics and returns the state with static
  ranges set and learned clips/steps initialised from the data (PTQ).

The Flax adapters (:func:`jaxqp.linen_apply`, :func:`jaxqp.nnx_apply`) call
:func:`quantize_input` for every matched Dense/Conv/Einsum layer.

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> params = {"w": jnp.ones((3, 2))}
    >>> t = jaxqp.transform([jaxqp.Rule("w", quant=jaxqp.QuantSpec(bits=8), act=jaxqp.ActSpec(bits=8))])
    >>> state = t.init(params)
    >>> x_hat, observed = jaxqp.quantize_input(jnp.array([[0.1, -0.5, 2.0]]), state, "w")
    >>> x_hat.shape, observed
    ((1, 3), {})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._specs.activation import ActSpec
from . import input_quantizer
from .pruning import MaskInputs, masks_for
from .state_tree import map_states, transform_states
from .transform import TransformState


class InputEntry(NamedTuple):
    """The spec and state of one quantized (or, for Wanda, observed) input."""

    spec: ActSpec | None  # None: a Wanda-pruned kernel whose input is only observed
    ranges: dict | None
    learned: dict | None
    calibrating: bool
    wanda: bool  # the kernel is pruned by Wanda: calibration records its input norms


def _is_wanda(entry) -> bool:
    return entry.prune is not None and entry.prune.criterion == "wanda"


def input_entries(state) -> dict[str, InputEntry]:
    """``{kernel_path: InputEntry}`` over every transform state in ``state`` (first one wins)."""
    out: dict[str, InputEntry] = {}
    for s in transform_states(state):
        for entry in s.plan.leaves:
            if (entry.act is not None or _is_wanda(entry)) and entry.path not in out:
                learned = s.learned.get("inputs", {}).get(entry.path)
                out[entry.path] = InputEntry(entry.act, s.ranges.get(entry.path), learned, s.calibrating,
                                             _is_wanda(entry))
    return out


def _feature_sumsq(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)))


def _entry(state, path: str) -> InputEntry:
    entries = input_entries(state)
    if path not in entries:
        raise ValueError(f"quantize_input: no rule gives '{path}' an ActSpec; quantized inputs: "
                         f"{sorted(entries)}. Fix: add act=jaxqp.ActSpec(...) to the rule matching '{path}'.")
    return entries[path]


def quantize_input(x: jax.Array, state: Any, path: str) -> tuple[jax.Array, dict]:
    """``(x_hat, observed)``: ``x`` as the layer of weight ``path`` should see it.

    ``observed`` is ``{path: statistics}`` for static ranges (pass the merged dicts
    of a step to ``tx.update(..., observed=...)``) and ``{}`` otherwise.

    Args:
      x: the layer's input.
      state: the transform state.
      path: the path of the layer's weight, as the rules match it (e.g. ``"Dense_0/kernel"``).

    Returns:
      ``(x_hat, observed)``.
    """
    e = _entry(state, path)
    y, seen = x, {}
    if e.spec is not None:  # None: Wanda only, observed while calibrating, never quantized
        y, seen = input_quantizer.fake_quant_input(x, e.spec, e.ranges, e.learned, e.calibrating)
    if e.calibrating and e.wanda:
        seen = {**seen, "sumsq": _feature_sumsq(x)}
    return y, ({path: seen} if seen else {})


def _require_finite(seen: dict[str, list]) -> None:
    """Refuses a NaN or infinity observed at a layer's input: a static range or Wanda score made of it
    would turn every later quantized output into NaN."""
    for path, per_batch in seen.items():
        for i, stats in enumerate(per_batch):
            values = {name: np.asarray(v) for name, v in stats.items()}
            if not all(np.isfinite(v).all() for v in values.values()):
                shown = ", ".join(f"{name}={v.ravel()[:3].tolist()}" for name, v in sorted(values.items()))
                raise ValueError(
                    f"calibrate: the input of '{path}' held NaN or an infinity in batch {i} (observed {shown}); "
                    "its calibrated range would make every quantized output NaN. Fix: check that batch (and "
                    "the layers before this one) for NaN and infinite values")


def calibrate(state: Any, forward: Callable[[Any, Any], tuple[Any, dict]], batches: Iterable, params: Any=None) -> Any:
    """Post-training calibration of every quantized input (PTQ).

    ``forward(state, batch) -> (output, observed)`` is the same quantized forward
    used in training (e.g. built on :func:`jaxqp.linen_apply`); it is jitted once
    and run on each batch with inputs left float. Returns ``state`` with
    ``range="static"`` inputs set to the observed ranges (min of ``lo``, max of
    ``hi``; the mean for percentiles) and PACT/LSQ/LSQ+ values initialised from
    them (alpha = the range's top; LSQ step = ``2 mean|x| / sqrt(qmax)``; LSQ+ step and
    offset map the range onto ``[qmin, qmax]``). Weights need no calibration:
    their scales are computed from the weights by their specs.

    Kernels pruned with ``criterion="wanda"`` get the L2 norm of each input feature
    over all batches as their scores; given ``params``, their masks are recomputed
    from ``|w| * ||x||`` (one-shot Wanda pruning at the schedule's step-0 sparsity).

    Args:
      state: the transform state (``t.init(params)``), a chain's states or an optimizer state.
      forward: ``forward(state, batch) -> (output, observed)``, the quantized forward.
      batches: calibration batches, each passed to ``forward`` as it is.
      params: the params, needed only to recompute Wanda masks.

    Returns:
      ``state`` with calibrated ranges, learned values and Wanda scores (and masks).

    Raises:
      TypeError: if ``forward`` is not callable.
      ValueError: if ``state`` holds no transform state or nothing to calibrate (no quantized
        input, no Wanda kernel), ``batches`` is empty, ``forward`` misses a quantized input,
        or a layer's input held a NaN or an infinity (the message names the layer and batch).
    """
    if not callable(forward):
        raise TypeError(f"calibrate: forward must be forward(state, batch) -> (output, observed), got "
                        f"{type(forward).__name__}")
    if not transform_states(state):
        raise ValueError("calibrate: no jaxqp state found in `state`; pass t.init(params)'s result or "
                         "jaxqp.state_of(opt_state)")
    entries = input_entries(state)
    if not entries:
        raise ValueError("calibrate: nothing to calibrate: no rule of this state quantizes a layer's input "
                         "(act=jaxqp.ActSpec(...)) or prunes with criterion='wanda'. Weights need no calibration")
    calibrating = map_states(state, lambda s: dataclasses.replace(s, calibrating=True))
    run = jax.jit(forward)
    seen: dict[str, list] = {}
    n_batches = 0
    for batch in batches:
        _, observed = run(calibrating, batch)
        n_batches += 1
        for path, stats in observed.items():
            seen.setdefault(path, []).append(stats)
    if n_batches == 0:
        raise ValueError("calibrate: batches is empty; give at least one calibration batch, e.g. [x[:256]]")
    missing = sorted(set(entries) - set(seen))
    if missing:
        raise ValueError(f"calibrate: no input was observed for {missing}: the forward never ran the layers "
                         "owning these kernels through jaxqp (or no batch was given). Fix: build forward on "
                         "jaxqp.linen_apply / jaxqp.nnx_apply / jaxqp.quantize_input and pass batches.")
    _require_finite(seen)

    def calibrated(s: TransformState) -> TransformState:
        ranges, inputs, scores = dict(s.ranges), dict(s.learned.get("inputs", {})), dict(s.scores)
        for entry in s.plan.leaves:
            if _is_wanda(entry):
                scores[entry.path] = jnp.sqrt(sum(b["sumsq"] for b in seen[entry.path]))
            if entry.act is None:
                continue
            r, learned = input_quantizer.from_calibration(entry.act, seen[entry.path])
            if r is not None:
                ranges[entry.path] = r
            if learned is not None:
                inputs[entry.path] = learned
        learned_all = {**s.learned, "inputs": inputs} if inputs else s.learned
        masks = s.masks
        wanda = {e.path for e in s.plan.leaves if _is_wanda(e)}
        if params is not None and wanda:
            flat, _ = s.plan.check(params)
            fresh = masks_for(s.plan, flat, None, 0, MaskInputs(scores=scores, key=s.key))
            masks = {path: fresh[path] if path in wanda else m for path, m in s.masks.items()}
        return dataclasses.replace(s, ranges=ranges, learned=learned_all, scores=scores,
                                   calibrating=False).with_masks(masks)

    return map_states(state, calibrated)
