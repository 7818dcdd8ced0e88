"""Lottery-ticket rewinding: early weights, survivors only, exact zeros."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxqp
from jaxqp import PruneSpec, QuantSpec, Rule


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.standard_promotion  # optax adam
def test_rewind_keeps_early_values_of_survivors():
    params = {"a": jax.random.normal(jax.random.key(0), (12, 6)), "b": jnp.ones(6)}
    t = jaxqp.transform([Rule("a", quant=QuantSpec(bits=8), prune=PruneSpec(sparsity=jaxqp.one_shot(0.75, step=3)))])
    tx = jaxqp.wrap(optax.adam(0.05), t)
    opt_state = tx.init(params)
    early = None
    for i in range(5):
        if i == 1:
            early = jax.tree.map(jnp.copy, params)
        grads = jax.tree.map(lambda x: jnp.sin(x) + 0.3, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    state = jaxqp.state_of(opt_state)
    rewound = jaxqp.rewind(early, opt_state)
    mask = np.asarray(state.masks["a"])
    assert (~mask).sum() == 54
    np.testing.assert_array_equal(np.asarray(rewound["a"])[mask], np.asarray(early["a"])[mask])
    assert np.all(np.asarray(rewound["a"])[~mask] == 0.0)
    np.testing.assert_array_equal(np.asarray(rewound["b"]), np.asarray(early["b"]))
    with pytest.raises(ValueError, match="another tree"):
        jaxqp.rewind({"a": early["a"]}, state)
