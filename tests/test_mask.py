"""Pruning masks: exact counts, deterministic ties, thresholds, monotonicity."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxqp
from jaxqp.numerics import apply_mask, magnitude_mask, threshold_mask

jit_mask = jax.jit(magnitude_mask)  # property tests: compile once per shape, not per op


def test_magnitude_mask_keeps_largest():
    mask = magnitude_mask(jnp.array([3.0, -1.0, 1.0, 2.0, -5.0]), 0.4)
    np.testing.assert_array_equal(np.asarray(mask), [True, False, False, True, True])


def test_ties_broken_by_lower_index_first():
    mask = magnitude_mask(jnp.ones(6), 0.5)
    np.testing.assert_array_equal(np.asarray(mask), [False, False, False, True, True, True])
    mask = magnitude_mask(jnp.array([[2.0, 1.0], [1.0, 1.0]]), 0.5)
    np.testing.assert_array_equal(np.asarray(mask), [[True, False], [False, True]])


@given(
    # A few fixed shapes (sizes 1, odd, rank 3), so jit compiles once per shape, not per example.
    x=hnp.arrays(np.float32, st.sampled_from([(1,), (12,), (3, 4), (12, 12), (5, 1, 7), (2, 3, 12)]),
                 elements=st.floats(-10, 10, width=32, allow_subnormal=False)),  # XLA flushes subnormals
    sparsity=st.floats(0.0, 0.99),
)
def test_exact_count_property(x, sparsity):
    # Exact: the count is round(float32(sparsity) * size), computed the same way as the library.
    mask = np.asarray(jit_mask(jnp.asarray(x), sparsity))
    assert mask.shape == x.shape
    assert (~mask).sum() == int(np.round(np.float32(sparsity) * x.size))
    if mask.any() and (~mask).any():  # every survivor is at least as large as every pruned entry
        assert np.abs(x[mask]).min() >= np.abs(x[~mask]).max()


def test_exact_sparsity_on_kernel_sizes():
    x = jax.random.normal(jax.random.key(0), (320, 160))
    mask = magnitude_mask(x, 0.8)
    assert int((~mask).sum()) == 40960 and int((~mask).sum()) / mask.size == 0.8


def test_previous_mask_stays_pruned():
    x = jnp.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    prev = jnp.array([False, True, True, True, True, True])  # the largest was pruned before
    mask = magnitude_mask(x, 0.5, prev)
    np.testing.assert_array_equal(np.asarray(mask), [False, True, True, True, False, False])


def test_traced_sparsity_under_jit():
    x = jax.random.normal(jax.random.key(1), (50,))
    f = jax.jit(magnitude_mask)
    for s in [0.0, 0.2, 0.5]:
        np.testing.assert_array_equal(np.asarray(f(x, s)), np.asarray(magnitude_mask(x, s)))
        assert int((~f(x, s)).sum()) == round(s * 50)


def test_threshold_mask():
    x = jnp.array([0.1, -0.2, 0.05, -0.01, 0.2])
    np.testing.assert_array_equal(np.asarray(threshold_mask(x, 0.1)), [True, True, False, False, True])
    prev = jnp.array([False, True, True, True, True])
    np.testing.assert_array_equal(np.asarray(threshold_mask(x, 0.1, prev)), [False, True, False, False, True])


def test_apply_mask_exact_zero_and_zero_gradient():
    x = jnp.array([1.5, -2.0, 3.0])
    mask = jnp.array([True, False, True])
    np.testing.assert_array_equal(np.asarray(apply_mask(x, mask)), [1.5, 0.0, 3.0])
    grad = jax.grad(lambda v: jnp.sum(apply_mask(v, mask) ** 2))(x)
    np.testing.assert_array_equal(np.asarray(grad), [3.0, 0.0, 6.0])


@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.75])
def test_count_rounds_to_nearest(s):
    assert int((~magnitude_mask(jnp.arange(1.0, 9.0), s)).sum()) == round(s * 8)


def reference_mask(x, sparsity, prev=None):
    """Stable argsort of |x| (pruned-before entries first): the definition the bisection must match."""
    score = np.abs(x.astype(np.float32)).ravel().astype(np.float64)
    if prev is not None:
        score = np.where(prev.ravel(), score, -1.0)
    k = int(np.round(np.float32(sparsity) * np.float32(x.size)))
    keep = np.ones(x.size, bool)
    keep[np.argsort(score, kind="stable")[:k]] = False
    return keep.reshape(x.shape)


@given(
    x=hnp.arrays(np.float32, st.sampled_from([(1,), (30,), (6, 5), (1, 30), (30, 30)]),
                 elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e-3, -7.0, 3e38])),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_matches_stable_argsort_reference_with_ties(x, sparsity, seed):
    prev = np.random.default_rng(seed).random(x.shape) > 0.3
    got = np.asarray(jit_mask(jnp.asarray(x), sparsity, jnp.asarray(prev)))
    np.testing.assert_array_equal(got, reference_mask(x, sparsity, prev))
    np.testing.assert_array_equal(np.asarray(jit_mask(jnp.asarray(x), sparsity)), reference_mask(x, sparsity))


def test_inf_and_nan_rank_largest():
    x = jnp.array([jnp.inf, 1.0, jnp.nan, -jnp.inf, 0.5])
    np.testing.assert_array_equal(np.asarray(magnitude_mask(x, 0.4)), [True, False, True, True, False])


@pytest.mark.parametrize("shape", [(), (1,), (7,), (8,), (13, 5), (16, 4, 3), (1025, 10)])
def test_masks_packed_along_the_first_axis_round_trip(shape):
    """The transform state stores masks 8 per byte along axis 0: lossless, and 1/32 of float32 bytes."""
    from jaxqp.numerics import pack_mask_rows, unpack_mask_rows

    mask = jnp.asarray(np.random.default_rng(len(shape)).random(shape) > 0.3)
    packed = pack_mask_rows(mask)
    assert packed.dtype == jnp.uint8 and packed.shape == ((-(-shape[0] // 8), *shape[1:]) if shape else (1,))
    np.testing.assert_array_equal(np.asarray(unpack_mask_rows(packed, shape)), np.asarray(mask))
    np.testing.assert_array_equal(np.asarray(jax.jit(unpack_mask_rows, static_argnums=1)(packed, shape)),
                                  np.asarray(mask))


def test_state_holds_packed_masks_and_reads_bool_masks():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.ones(32)}
    t = jaxqp.transform([jaxqp.Rule("w", prune=jaxqp.PruneSpec(sparsity=0.75))])
    state = t.init(params)
    assert state.mask_bits["w"].dtype == jnp.uint8 and state.mask_bits["w"].shape == (8, 32)
    mask = np.asarray(state.masks["w"])
    assert mask.dtype == bool and mask.sum() == 64 * 32 // 4
    np.testing.assert_array_equal(np.asarray(t.apply(params, state)["w"]), np.where(mask, params["w"], 0.0))
    state_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(state.mask_bits))
    assert state_bytes * 32 == params["w"].nbytes


def test_first_masks_compile_once_and_equal_the_eager_masks():
    # t.init computes every first mask in one jit (cached per plan); the masks are the eager ones.
    from jaxqp._specs.paths import paths_and_leaves
    from jaxqp._transforms.pruning import MaskInputs, _first_masks_jit, masks_for

    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "bias": jnp.zeros(8)},
              "b": {"kernel": jnp.asarray(np.round(rng.normal(size=(8, 12)), 1), jnp.float32)},  # many ties
              "c": {"kernel": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)},
              "d": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32), "bias": jnp.zeros(8)}}
    rules = [jaxqp.Rule("a/kernel", prune=jaxqp.PruneSpec(structure=jaxqp.Channels(), sparsity=0.25)),
             jaxqp.Rule("b/kernel", prune=jaxqp.PruneSpec(sparsity=0.7, scope="global")),
             jaxqp.Rule("c/kernel", prune=jaxqp.PruneSpec(sparsity=0.7, scope="global")),
             jaxqp.Rule("d/kernel", prune=jaxqp.PruneSpec(structure=jaxqp.NM(2, 4)))]
    t = jaxqp.transform(rules)
    state = t.init(params)
    misses = _first_masks_jit._cache_size()
    again = t.init(jax.tree.map(lambda x: x + 1.0, params))  # new values, same shapes: no new compile
    assert _first_masks_jit._cache_size() == misses
    flat = paths_and_leaves(params)[0]
    eager = masks_for(state.plan, flat, None, 0, MaskInputs())
    got = t.masks(state)
    assert set(got) == set(eager) == {"a/kernel", "a/bias", "b/kernel", "c/kernel", "d/kernel"}
    for path in eager:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(eager[path]), err_msg=path)
    assert not np.array_equal(np.asarray(t.masks(again)["b/kernel"]), np.asarray(got["b/kernel"]))


def test_count_true_is_exact_past_float32_integers():
    # Counts are summed in float32 (faster on CPU) only where every partial sum stays exact.
    from jaxqp.numerics._masks import count_true

    big = jnp.ones((2, 2**24), bool).at[1, 5].set(False)  # rows of 2**24: float32 per row, int32 across
    assert int(jax.jit(count_true)(big)) == 2**25 - 1
    long = jnp.ones(2**24 + 3, bool)  # one row past 2**24: int32 throughout
    assert int(jax.jit(count_true)(long)) == 2**24 + 3
    flags = jax.random.bernoulli(jax.random.key(0), 0.3, (1000, 999))
    assert int(jax.jit(count_true)(flags)) == int(np.asarray(flags).sum())
