"""A pruning + int8 + static-range training run that can stop, checkpoint with orbax, and resume.

Used by ``tests/test_checkpoint.py``: the test trains ``2 * N`` steps in one go, and ``N``
steps, saves ``params`` and the optimizer state with orbax, then runs this file in a fresh
process, which restores them and trains ``N`` more:

    python tests/_resume.py CHECKPOINT_DIR OUT.npz N
"""

import sys

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxqp


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


def setup(freeze_at: int | None = None):
    """Model, data, initial params, optimizer and the jitted step ``(params, opt_state, i) -> (params, opt_state)``."""
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (64, 16))
    y = jax.random.randint(jax.random.key(1), (64,), 0, 4)
    params = model.init(jax.random.key(2), x)["params"]
    sparsity = jaxqp.polynomial(0.0, 0.8, begin=1, end=9, every=2)  # refreshes on both sides of the stop
    rule = jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8), prune=jaxqp.PruneSpec(sparsity=sparsity),
                      act=jaxqp.ActSpec(bits=8, range="static"))  # EMA ranges from `observed`
    t = jaxqp.transform([rule])
    tx = jaxqp.wrap(optax.adam(1e-2), t)

    @jax.jit
    def step(params, opt_state):
        state = jaxqp.state_of(opt_state)

        def loss_fn(p):
            logits, observed = jaxqp.linen_apply(model, state, {"params": t.apply(p, state)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), observed

        grads, observed = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state

    def run(params, opt_state, start: int, steps: int):
        for i in range(start, start + steps):
            if freeze_at is not None and i == freeze_at:
                opt_state = jaxqp.freeze_masks(opt_state)
            params, opt_state = step(params, opt_state)
        return params, opt_state

    return params, tx, run


def target(params, tx):
    """The abstract tree orbax restores into: shapes and dtypes of a fresh ``(params, opt_state)``."""
    import orbax.checkpoint as ocp

    return jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": tx.init(params)})


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def main(checkpoint: str, out: str, steps: int, freeze_at: int | None) -> None:
    import orbax.checkpoint as ocp

    params, tx, run = setup(freeze_at)
    restored = ocp.StandardCheckpointer().restore(checkpoint, target(params, tx))
    params, opt_state = run(restored["params"], restored["opt_state"], steps, steps)
    np.savez(out, **leaves({"params": params, "opt_state": opt_state}))


if __name__ == "__main__":
    jax.config.update("jax_numpy_dtype_promotion", "standard")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), None if sys.argv[4] == "None" else int(sys.argv[4]))
