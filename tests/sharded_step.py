"""Run by tests/test_sharding.py in a subprocess with 2 host devices: a sharded training
step equals the unsharded one, and masks follow their parameter's sharding."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxqp

assert jax.device_count() == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("model",))
rules = [jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8),
                    prune=jaxqp.PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.75, begin=1, end=5, every=1)))]
t = jaxqp.transform(rules)
tx = jaxqp.wrap(optax.adam(1e-2), t)
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
params = {"l1": {"kernel": jax.random.normal(k1, (16, 32)), "bias": jnp.zeros(32)},
          "l2": {"kernel": jax.random.normal(k2, (32, 4)), "bias": jnp.zeros(4)}}
x = jax.random.normal(k3, (8, 16))


def loss_fn(p, state):
    q = t.apply(p, state)
    h = jax.nn.relu(x @ q["l1"]["kernel"] + q["l1"]["bias"])
    return jnp.mean((h @ q["l2"]["kernel"] + q["l2"]["bias"]) ** 2)


@jax.jit
def step(p, opt_state):
    grads = jax.grad(loss_fn)(p, jaxqp.state_of(opt_state))
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state


def run(p):
    opt_state = tx.init(p)
    for _ in range(6):
        p, opt_state = step(p, opt_state)
    return p, jaxqp.state_of(opt_state)


shardings = {"l1": {"kernel": NamedSharding(mesh, P(None, "model")), "bias": NamedSharding(mesh, P("model"))},
             "l2": {"kernel": NamedSharding(mesh, P("model", None)), "bias": NamedSharding(mesh, P())}}
ref_params, ref_state = run(params)
sh_params, sh_state = run(jax.device_put(params, shardings))

for path in ("l1/kernel", "l2/kernel"):
    layer = path.split("/")[0]
    np.testing.assert_array_equal(np.asarray(sh_state.masks[path]), np.asarray(ref_state.masks[path]))
    assert sh_state.masks[path].sharding.is_equivalent_to(shardings[layer]["kernel"], 2), (
        path, sh_state.masks[path].sharding)
    np.testing.assert_allclose(np.asarray(sh_params[layer]["kernel"]), np.asarray(ref_params[layer]["kernel"]),
                               rtol=1e-5, atol=1e-6)
    assert sh_params[layer]["kernel"].sharding.is_equivalent_to(shardings[layer]["kernel"], 2)
init_masks = t.init(jax.device_put(params, shardings)).masks
assert init_masks["l1/kernel"].sharding.is_equivalent_to(shardings["l1"]["kernel"], 2), init_masks["l1/kernel"].sharding
print("sharded step equals unsharded")
