"""Pruning criteria (random, saliency, movement), RigL/SET and straight-through (SR-STE) pruning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import counted_jit

import jaxqp
from jaxqp import PruneSpec, RigL, Rule
from jaxqp._transforms.rigl import drop_and_grow, drop_fraction, reset_moments


def _params():
    return {"a": {"w": jax.random.normal(jax.random.key(0), (32, 16))}, "b": jnp.ones(3)}


def _grads(params, seed=1):
    return jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), params)


@pytest.mark.parametrize("criterion", ["random", "saliency", "movement"])
def test_criteria_prune_exactly(criterion):
    params = _params()
    spec = PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.7, begin=0, end=2, every=1), criterion=criterion)
    t = jaxqp.transform([Rule("a/w", prune=spec)], seed=0)
    state = t.init(params)
    grads = _grads(params)
    for _ in range(3):
        state = t.update(params, state, grads=grads)
    mask = np.asarray(state.masks["a/w"])
    assert (~mask).sum() == round(0.7 * mask.size)
    w, g = np.asarray(params["a"]["w"]), np.asarray(grads["a"]["w"])
    if criterion == "saliency":  # the kept entries have the largest |w * g|
        assert np.abs(w * g)[mask].min() >= np.abs(w * g)[~mask].max()
    if criterion == "movement":  # scores -sum(w * g) over the 3 updates; the largest are kept
        score = -3 * w * g
        np.testing.assert_allclose(np.asarray(state.scores["a/w"]), score, rtol=1e-6)
        assert score[mask].min() >= score[~mask].max()
    if criterion == "random":  # not magnitude, and reproducible
        assert not np.array_equal(mask, np.asarray(jaxqp.numerics.magnitude_mask(params["a"]["w"], 0.7)))
        again = t.init(params)
        for _ in range(3):
            again = t.update(params, again, grads=grads)
        np.testing.assert_array_equal(np.asarray(again.masks["a/w"]), mask)


def test_random_criterion_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        jaxqp.transform([Rule("a/w", prune=PruneSpec(sparsity=0.5, criterion="random"))]).init(_params())


def test_drop_and_grow_keeps_count_and_uses_gradients():
    w = jnp.array([3.0, 0.1, 2.0, 0.0, 0.0, 0.0])
    mask = jnp.array([True, True, True, False, False, False])
    grad = jnp.array([0.0, 0.0, 0.0, 1.0, 9.0, 4.0])
    new = drop_and_grow(w, mask, grad, jnp.int32(2), "gradient", None)
    # drops 0.1 and 2.0 (smallest |w| among active), grows the two largest |g| among inactive
    np.testing.assert_array_equal(np.asarray(new), [True, False, False, False, True, True])


def test_drop_fraction_is_cosine():
    spec = RigL(every=10, drop_fraction=0.4, end=100)
    assert float(drop_fraction(spec, 0)) == pytest.approx(0.4)
    assert float(drop_fraction(spec, 50)) == pytest.approx(0.2)
    assert float(drop_fraction(spec, 100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.standard_promotion  # optax.adam
@pytest.mark.parametrize("make_tx", [lambda: optax.adam(1e-2),
                                     lambda: optax.chain(optax.clip(1.0), optax.adamw(1e-2))],
                         ids=["adam", "chain(clip, adamw)"])
@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_rigl_constant_sparsity_changing_masks_zero_moments(make_tx, grow):
    params = _params()
    spec = PruneSpec(sparsity=0.75, regrow=RigL(every=2, drop_fraction=0.5, end=100, grow=grow))
    t = jaxqp.transform([Rule("a/w", prune=spec)], seed=0)
    tx = jaxqp.wrap(make_tx(), t)
    opt_state = tx.init(params)
    x = jax.random.normal(jax.random.key(2), (8, 32))

    def loss(p, s):
        q = t.apply(p, s)
        return jnp.sum(jnp.tanh(x @ q["a"]["w"]) ** 2) + jnp.sum(q["b"] ** 2)

    def train(params, opt_state):
        grads = jax.grad(loss)(params, jaxqp.state_of(opt_state))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step, traces = counted_jit(train)

    changed = 0
    for _ in range(6):
        old = np.asarray(jaxqp.state_of(opt_state).masks["a/w"])
        params, opt_state = step(params, opt_state)
        mask = np.asarray(jaxqp.state_of(opt_state).masks["a/w"])
        assert mask.sum() == 128  # 25% of 512, every step
        w = np.asarray(params["a"]["w"])
        assert np.all(w[~mask] == 0.0)
        grown = mask & ~old
        changed += grown.sum()
        if grown.any():
            assert np.all(w[grown] == 0.0)  # grown weights start at 0
            moments = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(opt_state.inner)
                       if getattr(leaf, "shape", None) == (32, 16)]
            assert len(moments) == 2  # mu and nu, found by structure
            assert all(np.all(m[grown] == 0.0) for m in moments)
    assert changed > 0
    assert len(traces) == 1


def test_reset_moments_matches_param_shaped_subtrees_only():
    params = {"w": jnp.ones((2, 2)), "v": jnp.ones(3)}
    state = optax.chain(optax.clip(1.0), optax.adam(1e-3)).init(params)
    state = jax.tree_util.tree_map(lambda a: a + 1 if a.dtype != jnp.int32 else a, state)
    grown = {"w": jnp.array([[True, False], [False, False]])}
    out = reset_moments(state, params, grown)
    adam = out[1][0]
    assert float(adam.mu["w"][0, 0]) == 0.0 and float(adam.nu["w"][0, 0]) == 0.0
    assert float(adam.mu["w"][1, 1]) == 1.0 and float(adam.mu["v"][0]) == 1.0
    assert int(adam.count) == int(state[1][0].count)  # not params-shaped: untouched


@pytest.mark.standard_promotion
def test_straight_through_pruning_trains_dense_weights_with_srste_decay():
    params = {"w": jnp.array([[0.1, -2.0], [3.0, 0.05]])}
    spec = PruneSpec(sparsity=0.5, straight_through=True, decay=0.5)
    t = jaxqp.transform([Rule("w", prune=spec)])
    tx = jaxqp.wrap(optax.sgd(1.0), t)
    opt_state = tx.init(params)
    state = jaxqp.state_of(opt_state)
    assert t.masks(state) == {}  # wrap does not zero straight-through leaves
    mask = np.asarray(state.masks["w"])
    np.testing.assert_array_equal(np.asarray(t.apply(params, state)["w"]), np.where(mask, params["w"], 0.0))
    g = jax.grad(lambda p: jnp.sum(t.apply(p, state)["w"] * 2.0))(params)
    np.testing.assert_array_equal(np.asarray(g["w"]), 2.0)  # dense gradient through the mask
    updates, _ = tx.update(g, opt_state, params)
    want = -(2.0 + np.where(mask, 0.0, 0.5 * np.asarray(params["w"])))  # SR-STE decay on pruned entries
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-6)


def test_dynamic_spec_errors_name_the_field():
    with pytest.raises(ValueError, match=r"PruneSpec\(criterion='wanda2'\): unknown criterion"):
        PruneSpec(sparsity=0.5, criterion="wanda2")
    with pytest.raises(ValueError, match=r"regrow=RigL.*unstructured layer-wise"):
        PruneSpec(structure=jaxqp.NM(2, 4), regrow=RigL())
    with pytest.raises(ValueError, match="straight_through=True"):
        PruneSpec(sparsity=0.5, decay=1e-4)
    with pytest.raises(ValueError, match=r"RigL\(drop_fraction=1.5\)"):
        RigL(drop_fraction=1.5)


def test_wanda_scores_from_calibration_and_one_shot_masks():
    import flax.linen as nn

    model = nn.Dense(3)
    x = jnp.concatenate([jnp.full((16, 1), 100.0), jnp.full((16, 3), 0.01)], axis=1)  # feature 0 is loud
    params = {"kernel": jnp.array([[0.1, -0.1, 0.1], [1.0, -2.0, 3.0], [2.0, 1.0, -1.0], [1.5, 1.5, 1.5]]),
              "bias": jnp.zeros(3)}
    t = jaxqp.transform([Rule("kernel", prune=PruneSpec(sparsity=0.25, criterion="wanda"))])
    state = t.init(params)
    assert not np.asarray(state.masks["kernel"])[0].any()  # uncalibrated: magnitude prunes row 0

    def forward(state, x):
        return jaxqp.linen_apply(model, state, {"params": t.apply(params, state)}, x)

    cal = jaxqp.calibrate(state, forward, [x[:8], x[8:]], params=params)
    norms = np.sqrt(np.sum(np.square(np.asarray(x)), axis=0))
    np.testing.assert_allclose(np.asarray(cal.scores["kernel"]), norms, rtol=1e-6)
    mask = np.asarray(cal.masks["kernel"])
    assert (~mask).sum() == 3 and mask[0].all()  # |w| * ||x|| keeps the loud feature's row
    score = np.abs(np.asarray(params["kernel"])) * norms[:, None]
    assert score[mask].min() >= score[~mask].max()
