"""Helpers shared by the tests (imported as ``from helpers import ...``; tests/ is on sys.path)."""

import flax.linen as nn
import jax
import numpy as np
from flax import nnx


def counted_jit(fn, **jit_kwargs):
    """``(jax.jit(fn), traces)``: ``traces`` gets one entry per trace, i.e. per compile.

    "Compiles once" is asserted as ``len(traces) == 1``, not with ``jitted._cache_size()``: in
    long xdist workers that C++ dispatch cache read 0 after calls that did not retrace (jax 0.10).
    """
    traces = []

    def counting(*args, **kwargs):
        traces.append(1)
        return fn(*args, **kwargs)

    return jax.jit(counting, **jit_kwargs), traces


def bits_equal(a, b) -> bool:
    """Bit-for-bit equality of two arrays: same dtype, shape and bytes, so -0.0 and +0.0 differ.

    Example:
        >>> bits_equal(np.float32([0.0]), np.float32([-0.0]))
        False
    """
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class MLP(nn.Module):
    """The small two-layer model the deploy tests export (ONNX, LiteRT)."""

    width: int = 128

    @nn.compact
    def __call__(self, x):
        return nn.Dense(64)(nn.relu(nn.Dense(self.width)(x)))


class CNN(nn.Module):
    """A convolution and a Dense head, for the deploy tests."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def with_biases(params):
    """``params`` with every bias nonzero (initialized biases are zeros, which hide rounding at the add)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * jax.random.normal(jax.random.key(len(path)), a.shape)
        if "bias" in jax.tree_util.keystr(path) else a, params)


class NnxNet(nnx.Module):
    """Two ``nnx.Linear`` layers, for the deploy tests of NNX models."""

    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(32, 64, rngs=rngs), nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))
