"""StableHLO export of a serving function (``jax.export``), and loading it back (serving layer).

Example:
    >>> import jax.numpy as jnp, jaxqp
    >>> blob = jaxqp.export_serving(lambda x: 2 * x, jnp.ones(3))
    >>> jaxqp.load_serving(blob)(jnp.ones(3))
    Array([2., 2., 2.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def export_serving(apply_fn: Callable, *example_args: Any) -> bytes:
    """Serializes ``jax.jit(apply_fn)`` for these argument shapes as StableHLO (``jax.export``).

    ``example_args`` may be arrays, prepared trees or ``jax.ShapeDtypeStruct``s; only
    their shapes and dtypes are recorded. Run the result with :func:`load_serving`.

    Args:
      apply_fn: the serving function, e.g. ``jaxqp.linen_serving_apply(model)``.
      *example_args: its arguments (or their shapes).

    Returns:
      The serialized bytes.

    Raises:
      TypeError: if ``apply_fn`` is not callable.

    Example:
      >>> import jax, jax.numpy as jnp, jaxqp
      >>> blob = jaxqp.export_serving(lambda x: 2 * x, jnp.ones(3))
      >>> jaxqp.load_serving(blob)(jnp.ones(3))
      Array([2., 2., 2.], dtype=float32)
    """
    if not callable(apply_fn):
        raise TypeError(f"export_serving: apply_fn must be the serving function, e.g. "
                        f"jaxqp.linen_serving_apply(model); got {type(apply_fn).__name__}")
    specs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example_args)
    return bytes(jax.export.export(jax.jit(apply_fn))(*specs).serialize())


def load_serving(blob: bytes) -> Callable:
    """The function serialized by :func:`export_serving`, ready to call (it runs compiled).

    Args:
      blob: bytes from :func:`export_serving`.

    Returns:
      A callable taking the same arguments as the exported function.

    Raises:
      TypeError: if ``blob`` is not bytes.
      ValueError: if ``blob`` is not a function serialized by :func:`export_serving` (empty,
        truncated, corrupted or foreign bytes), before anything runs.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_serving: blob must be the bytes export_serving returned, got {type(blob).__name__}")
    try:
        exported = jax.export.deserialize(bytearray(blob))
        exported.mlir_module()  # parses the StableHLO now: corrupted bytes fail here, not at the first call
    except Exception as err:  # struct.error, flatbuffers' IndexError, MLIR parse errors: all mean "not ours"
        raise ValueError(f"load_serving: these {len(blob)} bytes are not a function serialized by "
                         f"jaxqp.export_serving (truncated, corrupted or another format: {type(err).__name__}: "
                         f"{str(err)[:200]}). Fix: pass the exact bytes export_serving returned") from err
    return exported.call
