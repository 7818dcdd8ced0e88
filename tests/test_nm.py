"""N:M structured sparsity: every group holds exactly N, any axis, padding, export size."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxqp
from jaxqp import NM, PruneSpec, QuantSpec, Rule
from jaxqp.numerics import nm_mask

jit_nm = jax.jit(nm_mask, static_argnums=(1, 2, 3))


def reference_nm(x, n, m, axis):
    """Loop over groups: keep the n largest |x| per group of m along axis (stable ties)."""
    moved = np.moveaxis(np.abs(x.astype(np.float32)), axis, -1)
    keep = np.zeros(moved.shape, bool)
    for idx in np.ndindex(moved.shape[:-1]):
        row = moved[idx]
        for start in range(0, row.size, m):
            group = row[start:start + m]
            order = np.argsort(group, kind="stable")
            kept = order[max(group.size - n, 0):] if group.size > n else order
            keep[idx + (start + kept,)] = True
    return np.moveaxis(keep, -1, axis)


@given(
    # A few fixed shapes (groups with and without a tail, rank 3), so jit compiles once per shape.
    x=hnp.arrays(np.float32, st.sampled_from([(1,), (11,), (4, 8), (3, 11), (8, 5), (2, 3, 8), (5, 2, 11)]),
                 elements=st.sampled_from([0.0, 1.0, -1.0, 2.5, -3.0, 0.5, 7.0])),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 5)]),
    axis_pick=st.integers(0, 2),
)
def test_matches_reference_and_every_group_holds_n(x, nm, axis_pick):
    # Exact: a per-group stable ranking of |x|; values from a small set so that ties occur.
    n, m = nm
    axis = axis_pick % x.ndim
    got = np.asarray(jit_nm(jnp.asarray(x), n, m, axis))
    np.testing.assert_array_equal(got, reference_nm(x, n, m, axis))
    moved = np.moveaxis(got, axis, -1)
    full = moved.shape[-1] // m * m
    if full:
        counts = moved[..., :full].reshape(*moved.shape[:-1], -1, m).sum(-1)
        assert np.all(counts == n)
    if moved.shape[-1] > full:  # the padded tail keeps min(n, its length)
        assert np.all(moved[..., full:].sum(-1) == min(n, moved.shape[-1] - full))


def test_two_four_on_a_dense_kernel_input_axis():
    w = jax.random.normal(jax.random.key(0), (64, 10))
    t = jaxqp.transform([Rule("w", prune=PruneSpec(structure=NM(2, 4)))])
    state = t.init({"w": w})
    out = np.asarray(t.apply({"w": w}, state)["w"])
    groups = (out != 0).reshape(16, 4, 10)
    assert np.all(groups.sum(axis=1) == 2)
    assert np.count_nonzero(out == 0) == 320


def test_nm_stays_fixed_through_training_and_zeros_stay_exact():
    params = {"w": jax.random.normal(jax.random.key(1), (8, 6))}
    t = jaxqp.transform([Rule("w", quant=QuantSpec(bits=8), prune=PruneSpec(structure=NM(1, 4, axis=0)))])
    tx = jaxqp.wrap(optax.sgd(0.1), t)
    opt_state = tx.init(params)
    first = np.asarray(jaxqp.state_of(opt_state).masks["w"])
    for _ in range(3):
        updates, opt_state = tx.update({"w": jnp.ones((8, 6))}, opt_state, params)
        params = optax.apply_updates(params, updates)
    mask = np.asarray(jaxqp.state_of(opt_state).masks["w"])
    np.testing.assert_array_equal(mask, first)
    assert np.all(np.asarray(params["w"])[~mask] == 0.0) and np.all(mask.reshape(2, 4, 6).sum(1) == 1)


def test_export_size_of_two_four_int8():
    params = {"w": jax.random.normal(jax.random.key(2), (256, 256))}
    t = jaxqp.transform([Rule("w", quant=QuantSpec(bits=8), prune=PruneSpec(structure=NM(2, 4)))])
    state = t.init(params)
    q = jaxqp.export(params, state)["w"]
    assert isinstance(q, jaxqp.NMArray) and q.values.kept == 256 * 128 and q.values.codes.dtype == jnp.int8
    # kept codes + 2-bit positions of the kept codes (as many bytes as a bitmask) + scales
    assert q.nbytes == 256 * 128 + 256 * 128 * 2 // 8 + 256 * 4
    assert np.asarray(jaxqp.dequantize(q)).tobytes() == np.asarray(t.apply(params, state)["w"]).tobytes()


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: NM(4, 4), ValueError, r"NM\(n=4, m=4\): n must be smaller than m"),
        (lambda: NM(5, 4), ValueError, "n must be smaller than m"),
        (lambda: NM(0, 4), ValueError, r"NM\(n\)=0"),
        (lambda: PruneSpec(sparsity=0.5, structure=NM(2, 4)), ValueError, "exactly one of"),
        (lambda: PruneSpec(structure=(2, 4)), TypeError, "use jaxqp.NM"),
    ],
)
def test_bad_nm_specs(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_nm_axis_out_of_range_names_the_path():
    message = r"rules\[0\] \(pattern '.*'\) matches 'b' of shape \(4,\), but NM\(axis=-2\) is out of range"
    with pytest.raises(ValueError, match=message):
        jaxqp.resolve([Rule(".*", prune=PruneSpec(structure=NM(2, 4)))], {"a": jnp.ones((4, 4)), "b": jnp.ones(4)})


@pytest.mark.parametrize("m", [2, 4, 7, 16, 17, 32])
def test_group_rank_equals_a_stable_double_argsort(m):
    # pairwise counting (groups up to 16) and the sort fallback must give a stable sort's positions
    from jaxqp.numerics._masks import _rank_in_groups

    groups = np.random.default_rng(m).integers(0, 4, size=(50, m)).astype(np.uint32)  # many ties
    expected = np.argsort(np.argsort(groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    np.testing.assert_array_equal(np.asarray(_rank_in_groups(jnp.asarray(groups))), expected)
