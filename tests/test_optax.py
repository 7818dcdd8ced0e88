"""jaxqp.wrap: exact zeros in params, schedules, any optax optimizer, no recompiles, Flax."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxqp
from jaxqp import PruneSpec, QuantSpec, Rule

# optax computes python-float ** int32 in adam, which strict promotion rejects.
pytestmark = pytest.mark.standard_promotion

X = jax.random.normal(jax.random.key(0), (64, 12))
Y = (X[:, :3].sum(axis=1) > 0).astype(jnp.int32)
SCHEDULE = jaxqp.polynomial(0.0, 0.8, begin=2, end=12, every=2)
RULES = [Rule(r".*/kernel", quant=QuantSpec(bits=8), prune=PruneSpec(sparsity=SCHEDULE))]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(20)(x))
        return nn.Dense(2)(hidden)


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def linen_setup():
    model = LinenMLP()
    return model, model.init(jax.random.key(1), X)["params"]


def make_step(model, t, tx, trace_counter=None):
    @jax.jit
    def step(params, opt_state):
        if trace_counter is not None:
            trace_counter.append(1)
        state = jaxqp.state_of(opt_state)
        loss, grads = jax.value_and_grad(lambda p: xent(model.apply({"params": t.apply(p, state)}, X), Y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def kernels_zero_where_masked(params, state):
    for path, mask in state.masks.items():
        layer = path.split("/")[0]
        kernel = np.asarray(params[layer]["kernel"])
        if not (np.all(kernel[~np.asarray(mask)] == 0.0) and np.all(kernel[np.asarray(mask)] != 0.0)):
            return False
    return True


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.parametrize(
    "name, optimizer",
    [
        ("adam", optax.adam(1e-2)),
        ("chain", optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))),
        ("inject", optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)),
        ("multisteps", optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)),
    ],
)
def test_linen_trains_with_exact_zeros(name, optimizer):
    model, params = linen_setup()
    t = jaxqp.transform(RULES)
    tx = jaxqp.wrap(optimizer, t)
    opt_state = tx.init(params)
    step = make_step(model, t, tx)
    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
        assert kernels_zero_where_masked(params, jaxqp.state_of(opt_state)), name
    state = jaxqp.state_of(opt_state)
    assert int(state.step) == 20
    for mask in state.masks.values():
        assert int((~mask).sum()) == round(0.8 * mask.size)
    applied = t.apply(params, state)
    assert np.all(np.asarray(applied["Dense_0"]["kernel"])[~np.asarray(state.masks["Dense_0/kernel"])] == 0.0)
    assert losses[-1] < losses[0], (name, losses)


def test_second_step_does_not_recompile():
    model, params = linen_setup()
    t = jaxqp.transform(RULES)
    tx = jaxqp.wrap(optax.adam(1e-2), t)
    opt_state = tx.init(params)
    traces = []
    step = make_step(model, t, tx, traces)
    for _ in range(15):  # crosses several mask refreshes and the end of the schedule
        params, opt_state, _ = step(params, opt_state)
    assert len(traces) == 1  # (not step._cache_size(): see helpers.counted_jit)


def test_pruned_updates_and_moments():
    params = {"w": jnp.array([3.0, -0.1, 2.0, 0.2])}
    t = jaxqp.transform([Rule("w", prune=PruneSpec(sparsity=jaxqp.one_shot(0.5, step=1)))])
    tx = jaxqp.wrap(optax.sgd(0.5), t)
    opt_state = tx.init(params)
    grads = {"w": jnp.array([1.0, 1.0, 1.0, 1.0])}
    updates, opt_state = tx.update(grads, opt_state, params)  # step 1: prune the two smallest
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(np.asarray(params["w"]), np.array([2.5, 0.0, 1.5, 0.0], np.float32))
    updates, opt_state = tx.update(grads, opt_state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.array([-0.5, -0.0, -0.5, -0.0], np.float32))


def test_wrap_requires_params_and_state_of_finds_state():
    t = jaxqp.transform(RULES)
    _, params = linen_setup()
    tx = jaxqp.wrap(optax.adam(1e-3), t)
    opt_state = tx.init(params)
    with pytest.raises(ValueError, match=r"tx.update\(grads, opt_state, params\)"):
        tx.update(params, opt_state)
    nested = (optax.EmptyState(), {"x": opt_state})
    chex.assert_trees_all_equal(jaxqp.state_of(nested), jaxqp.state_of(opt_state))
    with pytest.raises(ValueError, match="found 0"):
        jaxqp.state_of(optax.adam(1e-3).init(params))
    with pytest.raises(TypeError, match="ParamTransform"):
        jaxqp.wrap(optax.adam(1e-3), RULES)


def test_wrapped_quant_only_passes_updates_through():
    _, params = linen_setup()
    t = jaxqp.transform([Rule(r".*/kernel", quant=QuantSpec(bits=8))])
    wrapped, plain = jaxqp.wrap(optax.adam(1e-2), t), optax.adam(1e-2)
    grads = jax.tree.map(jnp.ones_like, params)
    u1, _ = wrapped.update(grads, wrapped.init(params), params)
    u2, _ = plain.update(grads, plain.init(params), params)
    chex.assert_trees_all_equal(u1, u2)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(12, 20, rngs=rngs)
        self.l2 = nnx.Linear(20, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def test_nnx_trains_with_exact_zeros():
    graphdef, params = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)
    t = jaxqp.transform(RULES)
    tx = jaxqp.wrap(optax.adam(1e-2), t)
    opt_state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, opt_state):
        traces.append(1)
        state = jaxqp.state_of(opt_state)

        def loss_fn(p):
            return xent(nnx.merge(graphdef, t.apply(p, state))(X), Y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    state = jaxqp.state_of(opt_state)
    assert set(state.masks) == {"l1/kernel", "l2/kernel"}
    kernel = np.asarray(params["l1"]["kernel"][...])
    mask = np.asarray(state.masks["l1/kernel"])
    assert (~mask).sum() == round(0.8 * 240) and np.all(kernel[~mask] == 0.0)
    assert losses[-1] < losses[0] and len(traces) == 1
    model = nnx.merge(graphdef, t.apply(params, state))
    assert np.all(np.asarray(model.l1.kernel[...])[~mask] == 0.0)


@pytest.mark.slow  # trains or serves a whole model
def test_multisteps_around_wrap():
    model, params = linen_setup()
    t = jaxqp.transform(RULES)
    tx = optax.MultiSteps(jaxqp.wrap(optax.adam(1e-2), t), every_k_schedule=2)
    opt_state = tx.init(params)
    step = make_step(model, t, tx)
    for _ in range(20):
        params, opt_state, _ = step(params, opt_state)
        assert kernels_zero_where_masked(params, jaxqp.state_of(opt_state))
    state = jaxqp.state_of(opt_state)
    assert int(state.step) == 10  # the wrapped optimizer ran every second mini-step
    for mask in state.masks.values():
        assert int((~mask).sum()) == round(float(SCHEDULE(10)) * mask.size)
