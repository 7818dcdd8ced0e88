"""ParamTransform: exact zeros, prune-then-quantize order, jit, state checks, chain."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxqp
from jaxqp import PruneSpec, QuantSpec, Rule


def make_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (20, 10)), "bias": jnp.full((10,), 0.1)},
        "Dense_1": {"kernel": jax.random.normal(k2, (10, 5)), "bias": jnp.zeros((5,))},
    }


RULES = [Rule(r".*/kernel", quant=QuantSpec(bits=8), prune=PruneSpec(sparsity=0.8))]


@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_weights_exactly_zero_after_quantization(symmetric):
    params = make_params()
    t = jaxqp.transform([Rule(r".*/kernel", quant=QuantSpec(bits=4, symmetric=symmetric),
                              prune=PruneSpec(sparsity=0.8))])
    state = t.init(params)
    out = t.apply(params, state)
    for name, n in [("Dense_0", 200), ("Dense_1", 50)]:
        mask = np.asarray(state.masks[f"{name}/kernel"])
        kernel = np.asarray(out[name]["kernel"])
        assert (~mask).sum() == round(0.8 * n)
        assert np.all(kernel[~mask] == 0.0) and np.all(np.signbit(kernel[~mask]) == False)
    chex.assert_trees_all_equal(out["Dense_0"]["bias"], params["Dense_0"]["bias"])


def test_scales_calibrated_on_survivors():
    w = jnp.array([[10.0, 1.0], [0.5, 2.0]])  # 10.0 is pruned below: it must not set the scale
    t = jaxqp.transform([Rule("w", quant=QuantSpec(bits=8, axis=None), prune=PruneSpec(sparsity=0.25))])
    state = t.init({"w": w}).with_masks({"w": jnp.array([[False, True], [True, True]])})
    got = t.apply({"w": w}, state)["w"]
    want = jaxqp.fake_quant_weight(jnp.array([[0.0, 1.0], [0.5, 2.0]]), QuantSpec(bits=8, axis=None))
    chex.assert_trees_all_equal(got, want)
    assert float(got[1, 1]) == 2.0  # the largest survivor is exact: it sets the scale


def test_apply_does_not_mutate_input():
    params = make_params()
    copy = jax.tree.map(np.array, params)
    t = jaxqp.transform(RULES)
    t.apply(params, t.init(params))
    chex.assert_trees_all_equal(params, jax.tree.map(jnp.asarray, copy))


def test_jit_equals_eager():
    params = make_params()
    t = jaxqp.transform(RULES)
    state = t.init(params)
    chex.assert_trees_all_equal(t.apply(params, state), jax.jit(t.apply)(params, state))
    chex.assert_trees_all_equal(t.update(params, state), jax.jit(t.update)(params, state))
    chex.assert_trees_all_equal(jax.jit(t.init)(params), state)


def test_gradient_through_apply_is_masked_ste():
    params = make_params()
    t = jaxqp.transform(RULES)
    state = t.init(params)
    grads = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(t.apply(p, state))))(params)
    mask = np.asarray(state.masks["Dense_0/kernel"])
    np.testing.assert_array_equal(np.asarray(grads["Dense_0"]["kernel"]), mask.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(grads["Dense_0"]["bias"]), np.ones(10, np.float32))


def test_update_follows_schedule():
    params = make_params()
    sched = jaxqp.polynomial(0.0, 0.5, begin=2, end=4, every=1)
    t = jaxqp.transform([Rule(".*/kernel", prune=PruneSpec(sparsity=sched))])
    state = t.init(params)
    seen = []
    update = jax.jit(t.update)
    for _ in range(6):
        state = update(params, state)
        seen.append(int((~state.masks["Dense_0/kernel"]).sum()))
    want = [round(float(sched(s)) * 200) for s in range(1, 7)]
    assert seen == want and want[-1] == 100


def test_threshold_pruning():
    params = {"w": jnp.array([0.5, -0.01, 0.02, -0.3])}
    t = jaxqp.transform([Rule("w", prune=PruneSpec(threshold=0.05))])
    out = t.apply(params, t.init(params))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.array([0.5, 0.0, 0.0, -0.3], np.float32))


def test_state_from_another_tree_names_the_path():
    t = jaxqp.transform(RULES)
    state = t.init(make_params())
    other = make_params()
    other["Dense_1"]["kernel"] = jnp.ones((10, 6))
    with pytest.raises(ValueError, match=r"'Dense_1/kernel' has shape \(10, 6\).*t.init"):
        t.apply(other, state)
    del other["Dense_1"]
    with pytest.raises(ValueError, match=r"state was made for another tree.*Dense_1/kernel"):
        t.update(other, state)


def test_state_from_another_transform_is_refused():
    params = make_params()
    state = jaxqp.transform([Rule(".*/kernel", quant=QuantSpec(bits=4))]).init(params)
    with pytest.raises(ValueError, match=r"other rules.*'Dense_0/kernel'"):
        jaxqp.transform(RULES).apply(params, state)
    with pytest.raises(TypeError, match="state must be the jaxqp state"):
        jaxqp.transform(RULES).apply(params, {"step": 0})


def test_chain_prune_then_quantize_equals_single_transform():
    params = make_params()
    single = jaxqp.transform(RULES)
    chained = jaxqp.chain(jaxqp.transform([Rule(".*/kernel", prune=PruneSpec(sparsity=0.8))]),
                          jaxqp.transform([Rule(".*/kernel", quant=QuantSpec(bits=8))]))
    s1, s2 = single.init(params), chained.init(params)
    chex.assert_trees_all_equal(single.apply(params, s1), chained.apply(params, s2))
    chex.assert_trees_all_equal(single.masks(s1), chained.masks(s2))
    assert int(chained.update(params, s2)[0].step) == 1


def test_vmap_over_stacked_params():
    params = jax.tree.map(lambda *x: jnp.stack(x), make_params(0), make_params(1))
    t = jaxqp.transform([Rule(".*/kernel", quant=QuantSpec(bits=4))])
    state = t.init(make_params(0))
    vm = jax.vmap(t.apply, in_axes=(0, None))(params, state)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], vm), t.apply(make_params(1), state))


def test_masks_are_recomputed_only_on_steps_that_can_change_them():
    """update skips the mask work off schedule; on schedule it gives what masks_for gives."""
    from jaxqp._transforms.pruning import masks_for, refresh_due

    params = {"w": jax.random.normal(jax.random.key(0), (16, 8)), "n": jax.random.normal(jax.random.key(1), (16, 8))}
    t = jaxqp.transform([Rule("w", prune=PruneSpec(sparsity=jaxqp.polynomial(0.0, 0.5, begin=2, end=6, every=2))),
                         Rule("n", prune=PruneSpec(structure=jaxqp.NM(2, 4)))])
    state = t.init(params)
    due = [bool(refresh_due(state.plan, s)) for s in range(9)]
    assert due == [False, False, True, False, True, False, True, False, False]
    for step in range(8):
        new = t.update(params, state)
        want = masks_for(state.plan, state.plan.check(params)[0], state.masks, step + 1)
        for path in ("w", "n"):
            np.testing.assert_array_equal(np.asarray(new.masks[path]), np.asarray(want[path]))
        state = new
    assert float(np.mean(~np.asarray(state.masks["w"]))) == 0.5
