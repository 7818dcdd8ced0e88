"""Export and files (private): compressed containers (``QArray``, ``SparseArray``, ``NMArray``,
``Pow2Array``, ``Fp8Array``), ``export`` and ``save``/``load``. Imports ``numerics``, ``_specs``
and the transform state's views; never flax. The public names are re-exported by ``jaxqp``."""
