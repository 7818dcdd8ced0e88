"""What every exporter of ``jaxqp.deploy`` shares: checks of the served tree, input specs, atomic files.

Example:
    >>> import jax.numpy as jnp
    >>> [s.shape for s in input_specs("jaxqp.deploy.to_onnx", (jnp.ones((3, 4)),), dynamic_batch=False)]
    [(3, 4)]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from .._export.atomic import check_writable, replaced_atomically
from .._specs.paths import path_str
from ..serving._kernels import require_prepared


def check_request(where: str, apply_fn: Any, served: Any, file: Any, suffix: str) -> None:
    """Refuses, before any tracing, what an exporter cannot use: ``apply_fn`` not callable, a ``file``
    that cannot be written (a folder, a missing folder), and leaves that only ``jaxqp.prepare`` makes
    servable (or traced ones).

    Args:
      where: the public function's name, for the message (``"jaxqp.deploy.to_onnx"``).
      apply_fn: the serving function.
      served: the tree to export.
      file: the output file, or None.
      suffix: the output file's usual ending (``".onnx"``), for the message.
    """
    if not callable(apply_fn):
        raise TypeError(f"{where}: apply_fn must be the serving function, apply_fn(served, *inputs), e.g. "
                        f"jaxqp.linen_serving_apply(model); got {type(apply_fn).__name__}")
    if file is not None:
        check_writable(where, file, suffix)
    require_prepared(where, served, "export the model from jaxqp.prepare(tree), not jaxqp.export(...) itself")
    for path, leaf in jax.tree_util.tree_leaves_with_path(served):
        if isinstance(leaf, jax.core.Tracer):
            raise ValueError(f"{where}: '{path_str(path)}' is traced; call {where} outside jit")


def input_specs(where: str, inputs: tuple, dynamic_batch: bool) -> list:
    """One ``jax.ShapeDtypeStruct`` per example input; the first axis symbolic (``B``) with ``dynamic_batch``.

    Args:
      where: the public function's name, for the message.
      inputs: arrays or ``jax.ShapeDtypeStruct``.
      dynamic_batch: make the first axis of every input the symbolic dimension ``B``.
    """
    if not inputs:
        raise ValueError(f"{where}: pass at least one example input, e.g. {where.split('.')[-1]}(apply, served, x)")
    batch = jax.export.symbolic_shape("B")[0] if dynamic_batch else None
    specs = []
    for i, x in enumerate(inputs):
        shape = tuple(np.shape(x))
        if dynamic_batch and not shape:
            raise ValueError(f"{where}: input {i} is a scalar; a symbolic batch needs a leading axis "
                             "(or pass dynamic_batch=False)")
        shape = (batch, *shape[1:]) if dynamic_batch else shape
        specs.append(jax.ShapeDtypeStruct(shape, jnp.result_type(x)))
    return specs


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder: never a half-written file."""
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def require_constant(where: str, kernel: Any) -> None:
    """Refuses a served kernel whose codes are traced values: the exporters write codes as constants.

    Stacked kernels mapped over by ``vmap``/``scan``, or a kernel passed as a traced argument,
    reach the kernel hook as tracers, which cannot become ONNX or LiteRT weights. (A served
    Equinox layer bypasses its ``custom_vmap`` while an exporter traces, so its kernel stays
    a constant.)
    """
    if isinstance(kernel.codes, jax.core.Tracer):
        raise ValueError(
            f"{where}: a served kernel ({type(kernel).__name__} {kernel.codes_shape}) reached the exporter as a "
            "traced value (stacked kernels mapped over with vmap/scan, or a kernel passed as a traced argument), "
            "but export writes the codes as constants. Give each layer its own kernel, closed over or in the "
            "served tree")
