"""``t = transform(..., refresh="separate")`` and ``t.refresh``: the mask refresh out of the train step.

At every refresh the masks equal what ``update`` computes in-update from the same state and
weights, newly pruned weights are exactly 0, the train step compiles without any refresh code,
and the refresh compiles once for steps rebuilt around it.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxqp
from jaxqp._transforms import separate_refresh
from jaxqp.demo import make_train_step


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(48)(nn.relu(nn.Dense(40)(x)))))


EVERY = 3


def _rules(scope="layer", criterion="magnitude", quant=False):
    sparsity = jaxqp.polynomial(0.0, 0.8, begin=0, end=4 * EVERY, every=EVERY)
    return [jaxqp.Rule(r".*/kernel", prune=jaxqp.PruneSpec(sparsity=sparsity, scope=scope, criterion=criterion),
                       quant=jaxqp.QuantSpec(bits=8) if quant else None)]


def _data():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(32, 16)), jnp.float32), jnp.asarray(rng.integers(0, 10, 32), jnp.int32)


def _setup(rules, refresh, optimizer=None):
    model, (x, y) = Net(), _data()
    t = jaxqp.transform(rules, refresh=refresh)
    tx = jaxqp.wrap(optimizer or optax.sgd(0.1, momentum=0.9), t)  # adam needs standard dtype promotion
    params = model.init(jax.random.key(0), x[:1])["params"]
    return model, t, tx, params, tx.init(params), make_train_step(model, t, tx), (x, y)


@pytest.mark.parametrize("scope,criterion,quant", [("layer", "magnitude", False), ("layer", "magnitude", True),
                                                   ("global", "magnitude", False), ("layer", "movement", False)])
def test_each_refresh_computes_the_in_update_masks(scope, criterion, quant):
    rules = _rules(scope, criterion, quant)
    _, t, _, params, opt_state, step, (x, y) = _setup(rules, "separate")
    in_update = jaxqp.transform(rules)
    refreshes = 0
    for _ in range(5 * EVERY):
        state = jaxqp.state_of(opt_state)
        new_params, new_opt_state = t.refresh(params, opt_state)
        # the reference: update() of the same state in in-update mode, from the same weights
        reference = in_update.update(params, dataclasses.replace(state, refresh="in_update"),
                                     **({"grads": jax.tree.map(jnp.zeros_like, params)}
                                        if criterion == "movement" else {}))
        got = jaxqp.state_of(new_opt_state)
        if new_opt_state is opt_state:
            assert new_params is params
            for path, bits in reference.mask_bits.items():
                np.testing.assert_array_equal(got.mask_bits[path], bits, err_msg=path)
        else:
            refreshes += 1
            for path, mask in reference.masks.items():
                np.testing.assert_array_equal(got.masks[path], mask, err_msg=path)
            flat = dict(jaxqp.resolve(rules, new_params).check(new_params)[0])
            for path, mask in got.masks.items():
                assert not np.any(np.asarray(flat[path])[~np.asarray(mask)]), path  # pruned weights exactly 0
        params, opt_state, _ = step(new_params, new_opt_state, x, y)
    assert refreshes == 4  # steps 3, 6, 9, 12
    masks = jaxqp.state_of(opt_state).masks
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == sum(round(0.8 * m.size) for m in masks.values()) or scope == "global"
    if scope == "global":
        assert pruned == round(0.8 * sum(m.size for m in masks.values()))


def test_the_train_step_compiles_without_refresh_code():
    def control_flow(refresh):
        _, _, _, params, opt_state, step, (x, y) = _setup(_rules(), refresh)
        text = step.lower(params, opt_state, x, y).as_text()
        return text.count("stablehlo.while"), text.count("stablehlo.case")

    assert control_flow("separate") == (0, 0)
    assert min(control_flow("in_update")) > 0  # the bisections and the cond of the in-update refresh


def test_refresh_compiles_once_for_rebuilt_steps_and_skips_when_not_due(monkeypatch):
    separate_refresh._refresh.clear_cache()
    traces, refreshed_state = [], separate_refresh._refreshed  # _refresh calls it once per trace (one state)
    monkeypatch.setattr(separate_refresh, "_refreshed", lambda *args: (traces.append(1), refreshed_state(*args))[1])
    # a research loop rebuilding its step, with another learning rate, then another optimizer: one refresh
    for optimizer in (optax.sgd(0.1, momentum=0.9), optax.sgd(0.05, momentum=0.9), optax.sgd(0.1)):
        _, t, _, params, opt_state, step, (x, y) = _setup(_rules(), "separate", optimizer)
        for _ in range(2 * EVERY):
            refreshed = t.refresh(params, opt_state)
            due = int(jaxqp.state_of(opt_state).step) + 1
            assert (refreshed[1] is opt_state) == (due % EVERY != 0)
            params, opt_state, _ = step(*refreshed, x, y)
    assert len(traces) == 1  # counted, not _refresh._cache_size(): see helpers.counted_jit


def test_frozen_masks_stay():
    _, t, _, params, opt_state, step, (x, y) = _setup(_rules(), "separate")
    for _ in range(EVERY - 1):
        params, opt_state, _ = step(params, opt_state, x, y)
    frozen = jaxqp.freeze_masks(opt_state)
    assert t.refresh(params, frozen)[1] is frozen
    assert t.refresh(params, opt_state)[1] is not opt_state  # due now, when not frozen


def test_bad_uses_are_refused():
    params = {"w": jnp.ones((8, 4))}
    with pytest.raises(ValueError, match=r"refresh='later'; expected one of \('in_update', 'separate'\)"):
        jaxqp.transform(_rules(), refresh="later")
    for spec in (jaxqp.PruneSpec(sparsity=0.5, criterion="saliency"),
                 jaxqp.PruneSpec(sparsity=0.5, regrow=jaxqp.RigL(every=10, end=100))):
        t = jaxqp.transform([jaxqp.Rule("w", prune=spec)], refresh="separate")
        with pytest.raises(ValueError, match=r"'w' is pruned with .* keep refresh='in_update'"):
            t.init(params)
    in_update = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))])
    with pytest.raises(ValueError, match=r"no transform state made with refresh='separate'.*1 in-update"):
        in_update.refresh(params, in_update.init(params))
    with pytest.raises(ValueError, match=r"holds no jaxqp transform state \(got dict\)"):
        in_update.refresh(params, {"not": "a state"})
    with pytest.raises(ValueError, match=r"holds no jaxqp transform state \(got NoneType\)"):
        in_update.refresh(params, None)
    t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.5))], refresh="separate")
    state = t.init(params)
    with pytest.raises(ValueError, match=r"'w'"):
        t.refresh({"v": jnp.ones((8, 4))}, state)
    with pytest.raises(TypeError, match=r"outside jit"):
        jax.jit(t.refresh)(params, state)


def test_a_chain_refreshes_its_separate_transform():
    prune = jaxqp.transform(_rules(), refresh="separate")
    t = jaxqp.chain(prune, jaxqp.transform([jaxqp.Rule(r".*/kernel", quant=jaxqp.QuantSpec(bits=8))]))
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
    state = t.init(params)
    state = (dataclasses.replace(state[0], step=jnp.asarray(EVERY - 1, jnp.int32)), state[1])  # due next
    new_params, new_state = t.refresh(params, state)
    kernel = np.asarray(new_params["Dense_0"]["kernel"])
    reference = prune.update(params, dataclasses.replace(state[0], refresh="in_update")).masks["Dense_0/kernel"]
    np.testing.assert_array_equal(new_state[0].masks["Dense_0/kernel"], reference)
    assert np.count_nonzero(kernel == 0) == np.count_nonzero(~np.asarray(reference)) > 0
    assert int(new_state[1].step) == int(state[1].step) == 0 and not new_state[1].mask_bits  # the quantizer's state


def test_a_refresh_that_did_not_run_is_refused_not_silent():
    """Forgetting ``t.refresh`` before a due step leaves the masks stale: ``t.refresh`` and
    ``jaxqp.export`` refuse such a state, naming the step; calling it every step never trips."""
    _, t, _, params, opt_state, step, (x, y) = _setup(_rules(), "separate")
    for _ in range(EVERY + 1):  # no t.refresh: the refresh due at step EVERY does not run
        params, opt_state, _ = step(params, opt_state, x, y)
    assert int(jaxqp.state_of(opt_state).refresh_check) == EVERY
    with pytest.raises(ValueError, match=rf"masks due at step {EVERY} were never refreshed.*before every train step"):
        t.refresh(params, opt_state)
    with pytest.raises(ValueError, match=rf"jaxqp.export: the masks due at step {EVERY} were never refreshed"):
        jaxqp.export(params, jaxqp.state_of(opt_state))
    _, t, _, params, opt_state, step, (x, y) = _setup(_rules(), "separate")
    for _ in range(2 * EVERY + 1):
        params, opt_state = t.refresh(params, opt_state)
        params, opt_state, _ = step(params, opt_state, x, y)
        assert int(jaxqp.state_of(opt_state).refresh_check) <= 0
    jaxqp.export(params, jaxqp.state_of(opt_state))
    frozen = jaxqp.freeze_masks(opt_state)  # frozen masks are not due: nothing is missed
    for _ in range(EVERY):
        params, frozen, _ = step(params, frozen, x, y)
    assert int(jaxqp.state_of(frozen).refresh_check) <= 0
