"""Small datasets generated or shipped locally, for examples, tests and benchmarks (tools layer).

Nothing here downloads: MNIST-1D comes from the ``mnist1d`` package's generator
(``make_dataset`` with its default arguments and built-in templates).

Example:
    >>> (x, y), (x_test, y_test) = load_mnist1d()   # doctest: +SKIP
    >>> x.shape, x_test.shape                        # doctest: +SKIP
    ((16000, 40), (4000, 40))
"""

from __future__ import annotations

import numpy as np

QUICK_SAMPLES = 2000  # what --quick runs of the examples and benchmarks generate (under a second)


def load_mnist1d(num_samples: int = 20000, seed: int = 42):
    """MNIST-1D (Greydanus 2020): signals of length 40, 10 classes, split 80/20 into train/test.

    Generated locally with ``mnist1d.data.make_dataset`` (a few seconds). The package
    default is 5000 samples, on which a small CNN overfits within a few hundred steps
    and test NLL mostly measures overconfidence; 20000 (the default here) gives 97%
    and a stable NLL. ``seed`` is the generator seed (42 is the package default).
    Inputs float32, labels int32.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("MNIST-1D needs the mnist1d package: pip install 'jaxqp[examples]'") from None
    args = dict(vars(get_dataset_args()), seed=seed, num_samples=int(num_samples))
    data = make_dataset(ObjectView(args))
    as_x = lambda a: np.asarray(a, np.float32)
    as_y = lambda a: np.asarray(a, np.int32)
    return (as_x(data["x"]), as_y(data["y"])), (as_x(data["x_test"]), as_y(data["y_test"]))
