"""Model adapters (private): quantized layer inputs for unmodified Flax linen and NNX models.
The only layer below serving that imports flax. The public names are re-exported by ``jaxqp``."""
