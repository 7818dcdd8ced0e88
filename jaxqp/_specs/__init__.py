"""Specs and rules (private): frozen, validated ``QuantSpec``/``PruneSpec``/``ActSpec``, schedules,
parameter paths, ``Rule`` and ``resolve``. Imports ``numerics`` only; the public names are
re-exported by ``jaxqp``."""
