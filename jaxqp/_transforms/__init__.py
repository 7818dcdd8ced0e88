"""Training transforms (private): ``ParamTransform`` and its state, weight and input quantizers,
masks of a plan, RigL, PTQ calibration, rewinding, and ``wrap`` for optax. Imports ``numerics``
and ``_specs`` (and optax); never flax. The public names are re-exported by ``jaxqp``."""
