"""Helpers shared by the tests (imported as ``from helpers import ...``; tests/ is on sys.path)."""

import numpy as np


def bits_equal(a, b) -> bool:
    """Bit-for-bit equality of two arrays: same dtype, shape and bytes, so -0.0 and +0.0 differ.

    Example:
        >>> bits_equal(np.float32([0.0]), np.float32([-0.0]))
        False
    """
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
