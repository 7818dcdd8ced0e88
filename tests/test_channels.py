"""Channel (neuron / filter) pruning: exact channel counts, matching bias, schedules, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxqp
from jaxqp import Channels, PruneSpec, QuantSpec, Rule


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(40)(x))
        return nn.Dense(10)(x)


def cnn_params():
    return CNN().init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]


def test_channel_mask_prunes_smallest_norm_columns():
    x = jnp.array([[3.0, 0.1, -2.0, 1.0], [4.0, 0.2, 0.0, -1.0]])  # column norms 5, .22, 2, 1.41
    mask = np.asarray(jaxqp.numerics.channel_mask(x, 0.5, axis=-1))
    np.testing.assert_array_equal(mask, [[True, False, True, False]] * 2)
    rows = np.asarray(jaxqp.numerics.channel_mask(x, 0.5, axis=0))  # row norms 3.78, 4.58
    np.testing.assert_array_equal(rows, [[False] * 4, [True] * 4])


def test_filters_and_neurons_pruned_exactly_with_their_bias():
    params = cnn_params()
    rules = [Rule(r"Conv_0/kernel", prune=PruneSpec(sparsity=0.5, structure=Channels())),
             Rule(r"Dense_0/kernel", quant=QuantSpec(bits=8), prune=PruneSpec(sparsity=0.25, structure=Channels()))]
    t = jaxqp.transform(rules)
    state = t.init(params)
    out = t.apply(params, state)
    conv = np.asarray(out["Conv_0"]["kernel"])  # (3, 3, 1, 16)
    dead_filters = np.all(conv == 0, axis=(0, 1, 2))
    assert dead_filters.sum() == 8
    assert np.all(np.asarray(out["Conv_0"]["bias"])[dead_filters] == 0.0)
    dense = np.asarray(out["Dense_0"]["kernel"])  # (1024, 40)
    dead_neurons = np.all(dense == 0, axis=0)
    assert dead_neurons.sum() == 10
    # params.bias is 0 at init anyway: perturb it to see the mask act on it
    params["Dense_0"]["bias"] = jnp.ones(40)
    dense = t.apply(params, state)["Dense_0"]
    hidden = jnp.ones((2, 1024)) @ dense["kernel"] + dense["bias"]
    assert np.all(np.asarray(hidden)[:, dead_neurons] == 0.0)
    assert set(state.masks) == {"Conv_0/kernel", "Conv_0/bias", "Dense_0/kernel", "Dense_0/bias"}


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.standard_promotion  # optax adam
def test_channel_pruning_trains_with_a_schedule_and_exact_zeros():
    params = cnn_params()
    params["Dense_0"]["bias"] = jnp.full(40, 0.1)
    sched = jaxqp.polynomial(0.0, 0.5, begin=1, end=5, every=2)
    t = jaxqp.transform([Rule(r"Dense_0/kernel", prune=PruneSpec(sparsity=sched, structure=Channels()))])
    tx = jaxqp.wrap(optax.adam(1e-2), t)
    opt_state = tx.init(params)
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    y = jnp.arange(8) % 10

    @jax.jit
    def step(params, opt_state):
        state = jaxqp.state_of(opt_state)
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            CNN().apply({"params": t.apply(p, state)}, x), y).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    counts = []
    for _ in range(7):
        params, opt_state = step(params, opt_state)
        mask = np.asarray(jaxqp.state_of(opt_state).masks["Dense_0/kernel"])
        counts.append(int((~mask.any(axis=0)).sum()))
        assert np.all(np.asarray(params["Dense_0"]["kernel"])[~mask] == 0.0)
    assert counts == [round(float(sched(s)) * 40) for s in range(1, 8)] and counts[-1] == 20
    dead = ~np.asarray(jaxqp.state_of(opt_state).masks["Dense_0/bias"])
    assert dead.sum() == 20 and np.all(np.asarray(params["Dense_0"]["bias"])[dead] == 0.0)


def test_bias_false_leaves_bias_alone_and_errors():
    params = cnn_params()
    t = jaxqp.transform([Rule(r"Dense_0/kernel", prune=PruneSpec(sparsity=0.5, structure=Channels(bias=False)))])
    assert set(t.init(params).masks) == {"Dense_0/kernel"}
    with pytest.raises(ValueError, match=r"'Dense_0/bias' is pruned by its own rule"):
        jaxqp.transform([Rule(r"Dense_0/kernel", prune=PruneSpec(sparsity=0.5, structure=Channels())),
                         Rule(r"Dense_0/bias", prune=PruneSpec(sparsity=0.5))]).init(params)
    with pytest.raises(ValueError, match="needs sparsity="):
        PruneSpec(structure=Channels())
    with pytest.raises(ValueError, match=r"Channels\(axis=2\) is out of range"):
        rule = Rule(r"Dense_0/kernel", prune=PruneSpec(sparsity=0.5, structure=Channels(axis=2)))
        jaxqp.transform([rule]).init(params)
