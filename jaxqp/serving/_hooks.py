"""What a prepared kernel's product may be told from outside: its path, or an exporter's hook (serving layer).

``PATHS`` are the ways a kernel can multiply; ``PINS`` add ``"auto"`` (measure). A whole-model
decision (``_model_choice``) traces a model with every ``"auto"`` kernel on one path
(:func:`override_paths`); an exporter (``jaxqp.deploy``) replaces how kernels multiply and
decode while it traces (:func:`kernel_hook`). Both are context variables, so they hold for
the thread that traces and nothing else.

Example:
    >>> with override_paths("int8"):
    ...     current_override()
    'int8'
"""

from __future__ import annotations

import contextlib
import contextvars

PATHS = ("int8", "int8_t", "bf16", "float")
PINS = ("auto", *PATHS)

# An exporter (jaxqp.deploy) replaces how every prepared kernel multiplies and decodes while
# it traces a served model: ``hook.product(rows, kernel, n_contract) -> float32 (n, F)``,
# ``hook.decode(kernel) -> the dequantized weight`` and ``hook.lookup(kernel, indices) -> rows``.
_HOOK: contextvars.ContextVar = contextvars.ContextVar("jaxqp_kernel_hook", default=None)


@contextlib.contextmanager
def kernel_hook(hook):
    """Within the block, prepared kernels multiply by ``hook.product``, decode by ``hook.decode``
    and look up embedding rows by ``hook.lookup``.

    Args:
      hook: an object with ``product(rows (n, K), kernel, n_contract) -> float32 (n, F)``,
        ``decode(kernel) -> weight`` (the array ``kernel.dequantize()`` would return) and
        ``lookup(kernel, indices) -> rows`` (what ``kernel.lookup(indices)`` would return).
    """
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


# A whole-model decision (``_model_choice``) traces the model with every "auto" kernel on one path.
_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("jaxqp_path_override", default="auto")


def current_hook():
    """The exporter's hook set by :func:`kernel_hook`, or None."""
    return _HOOK.get()


def current_override() -> str:
    """The path :func:`override_paths` set for ``"auto"`` kernels (``"auto"`` outside it)."""
    return _OVERRIDE.get()


@contextlib.contextmanager
def override_paths(path: str):
    """Within the block, every kernel whose path is ``"auto"`` takes ``path`` (``"auto"``: measure per layer).

    Args:
      path: one of ``PINS``.
    """
    if path not in PINS:
        raise ValueError(f"override_paths: path={path!r}; expected one of {PINS}")
    token = _OVERRIDE.set(path)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)
