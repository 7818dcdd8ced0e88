"""Tensor-parallel int8 serving on 8 simulated CPU devices against one device (run by test_sharding.py).

A linen MLP 64-256-32 is exported with int8 kernels and prepared; the served tree is placed
Megatron-style on a ``model`` mesh (first layer's codes, scales and bias split on its
outputs, second layer's codes on its inputs) and served under ``jit``. Prints one JSON line
per path choice: the largest difference from serving on one device.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxqp


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(32)(nn.relu(nn.Dense(256)(x)))


def megatron(served, mesh):
    """Codes are ``(out, in)``: the first layer splits its outputs, the second its inputs."""
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    first, second = served["Dense_0"], served["Dense_1"]
    return {
        "Dense_0": {"kernel": dataclasses.replace(first["kernel"], codes=put(first["kernel"].codes, P("model")),
                                                  scale=put(first["kernel"].scale, P("model"))),
                    "bias": put(first["bias"], P("model"))},
        "Dense_1": {"kernel": dataclasses.replace(second["kernel"], codes=put(second["kernel"].codes, P(None, "model")),
                                                  scale=put(second["kernel"].scale, P())),
                    "bias": put(second["bias"], P())},
    }


def main():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    t = jaxqp.transform([jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8))])
    packed = jaxqp.export(params, t.init(params))
    mesh = Mesh(np.array(jax.devices()), ("model",))
    serve = jax.jit(jaxqp.linen_serving_apply(model))
    x = jax.random.normal(jax.random.key(1), (16, 64))
    for path in ("int8", "auto"):
        served = jaxqp.prepare(packed, path=path)
        sharded = megatron(served, mesh)
        out, ref = serve(sharded, x), serve(served, x)
        print(json.dumps({"path": path, "max_abs_diff": float(jnp.max(jnp.abs(out - ref))),
                          "codes_sharding": str(sharded["Dense_0"]["kernel"].codes.sharding.spec),
                          "out_devices": len(out.sharding.device_set)}), flush=True)


if __name__ == "__main__":
    main()
