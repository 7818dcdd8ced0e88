"""Block sparsity, next-layer input rows, iterative schedules and frozen masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxqp
from jaxqp import Blocks, Channels, PruneSpec, Rule
from jaxqp.numerics import block_mask


def _block_reference(x, sparsity, br, bc):
    rows, cols = x.shape
    norms, index = [], []
    for i in range(0, rows, br):
        for j in range(0, cols, bc):
            norms.append(np.sqrt(np.sum(np.square(x[i:i + br, j:j + bc]))))
            index.append((i, j))
    order = np.argsort(np.array(norms, np.float32), kind="stable")
    mask = np.ones_like(x, bool)
    for k in order[:round(sparsity * len(norms))]:
        i, j = index[k]
        mask[i:i + br, j:j + bc] = False
    return mask


@pytest.mark.parametrize("shape", [(8, 8), (10, 7), (3, 13)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_block_mask_matches_reference_with_ragged_edges(shape, sparsity):
    x = np.asarray(jax.random.normal(jax.random.key(shape[0] * 13 + shape[1]), shape))
    got = np.asarray(block_mask(jnp.asarray(x), sparsity, (4, 2), axes=(0, 1)))
    np.testing.assert_array_equal(got, _block_reference(x, sparsity, 4, 2))


def test_blocks_through_transform_on_conv_kernel():
    params = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 16, 8))}}
    t = jaxqp.transform([Rule("conv/kernel", prune=PruneSpec(sparsity=0.5, structure=Blocks(4, 4)))])
    mask = np.asarray(t.init(params).masks["conv/kernel"])
    assert (~mask).sum() == 0.5 * mask.size  # 4 of 8 blocks, each spanning the 3 taps
    assert np.all(mask == mask[:1])  # taps share blocks
    tiles = mask[0].reshape(4, 4, 2, 4).transpose(0, 2, 1, 3).reshape(8, 16)
    assert np.all(tiles.all(axis=1) | ~tiles.any(axis=1))  # whole blocks


def test_channels_next_layer_rows():
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(1), (5, 6)), "bias": jnp.ones(6)},
              "Dense_1": {"kernel": jax.random.normal(jax.random.key(2), (6, 3)), "bias": jnp.ones(3)}}
    spec = PruneSpec(sparsity=0.5, structure=Channels(next="Dense_1/kernel"))
    t = jaxqp.transform([Rule("Dense_0/kernel", prune=spec)])
    state = t.init(params)
    neurons = np.asarray(state.masks["Dense_0/kernel"]).any(axis=0)
    assert neurons.sum() == 3
    rows = np.asarray(state.masks["Dense_1/kernel"])
    np.testing.assert_array_equal(rows, np.broadcast_to(neurons[:, None], (6, 3)))
    out = t.apply(params, state)
    assert np.all(np.asarray(out["Dense_1"]["kernel"])[~neurons] == 0.0)
    assert np.all(np.asarray(out["Dense_0"]["bias"])[~neurons] == 0.0)
    bad = PruneSpec(sparsity=0.5, structure=Channels(next="Dense_1/bias"))
    with pytest.raises(ValueError, match=r"'Dense_0/kernel': Channels\(next='Dense_1/bias'\).*axis -2 must have 6"):
        jaxqp.transform([Rule("Dense_0/kernel", prune=bad)]).init(params)


def test_iterative_schedule_closed_form():
    s = jaxqp.iterative(0.9, rounds=4, every=50, begin=100)
    for step, r in [(0, 0), (99, 0), (100, 1), (149, 1), (150, 2), (250, 4), (10_000, 4)]:
        assert float(s(step)) == pytest.approx(1 - 0.1 ** (r / 4), abs=1e-6)
    assert [int(t) for t in range(0, 400) if bool(s.update_at(t))] == [100, 150, 200, 250]
    assert float(jax.jit(s)(175)) == float(s(175))
    with pytest.raises(ValueError, match=r"iterative\(rounds=0\)"):
        jaxqp.iterative(0.9, rounds=0, every=10)


def test_freeze_masks_stops_refreshes():
    params = {"w": jax.random.normal(jax.random.key(3), (64,))}
    sched = jaxqp.polynomial(0.0, 0.8, begin=0, end=4, every=1)
    t = jaxqp.transform([Rule("w", prune=PruneSpec(sparsity=sched), quant=jaxqp.QuantSpec(bits=4))])
    state = t.update(params, t.init(params))
    frozen = jaxqp.freeze_masks(state)
    for _ in range(4):
        frozen = t.update(params, frozen)
        state = t.update(params, state)
    assert int(frozen.step) == 5
    assert (~np.asarray(frozen.masks["w"])).sum() < (~np.asarray(state.masks["w"])).sum() == round(0.8 * 64)
    np.testing.assert_array_equal(np.asarray(jaxqp.freeze_masks(frozen, False).masks["w"]),
                                  np.asarray(frozen.masks["w"]))


def test_erk_distribution_meets_the_overall_budget_and_caps_dense_layers():
    from jaxqp.numerics import erk_sparsities

    shapes = [(3, 3, 1, 16), (3, 3, 16, 32), (512, 10), (2, 2)]
    got = erk_sparsities(shapes, 0.9)
    sizes = np.array([np.prod(s) for s in shapes])
    density = 1 - np.array(got)
    assert np.sum(density * sizes) == pytest.approx(0.1 * sizes.sum())
    assert got[3] == 0.0  # the tiny layer would exceed density 1: dense
    raw = np.array([sum(s) / np.prod(s) for s in shapes])
    ratio = density[:3] / raw[:3]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)  # density proportional to sum/prod

    params = {f"l{i}": jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)}
    t = jaxqp.transform([Rule(".*", prune=PruneSpec(sparsity=0.9, scope="erk"))])
    state = t.init(params)
    for i, s in enumerate(got):
        mask = np.asarray(state.masks[f"l{i}"])
        assert (~mask).sum() == round(np.float32(s) * mask.size)  # exact per layer
