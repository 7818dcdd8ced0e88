"""Global magnitude pruning: one threshold over many leaves, equal to concatenation."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import counted_jit
from hypothesis import given
from hypothesis import strategies as st

import jaxqp
from jaxqp import PruneSpec, Rule


def reference_global(arrays, sparsity):
    """Concatenate, stable argsort (ties: earlier array, then lower index), prune the k smallest."""
    flat = np.concatenate([np.abs(a.astype(np.float32)).ravel() for a in arrays])
    k = int(np.round(np.float32(sparsity) * np.float32(flat.size)))
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    out, start = [], 0
    for a in arrays:
        out.append(keep[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


# A few fixed shapes (edge sizes 1, odd, square), so jit compiles once per shape, not per example.
small = hnp.arrays(np.float32, st.sampled_from([(1,), (7,), (3, 5), (1, 7), (7, 7)]),
                   elements=st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 0.25]))


@given(a=small, b=small, c=small, sparsity=st.floats(0.0, 0.99))
def test_matches_concatenated_reference(a, b, c, sparsity):
    # Exact: masks are integer counts over |w| with ties broken by flat index, and the values
    # are drawn from a small set on purpose so ties occur; no float arithmetic is compared.
    got = jaxqp.numerics.global_magnitude_masks([jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)], sparsity)
    for g, w in zip(got, reference_global([a, b, c], sparsity)):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_global_rule_over_a_tree():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"a": {"kernel": jax.random.normal(k1, (20, 10)) * 0.1},   # small weights: pruned more
              "b": {"kernel": jax.random.normal(k2, (10, 30))},
              "c": {"kernel": jax.random.normal(k3, (30, 5)) * 3.0, "bias": jnp.ones(5)}}
    t = jaxqp.transform([Rule(r".*/kernel", prune=PruneSpec(sparsity=0.7, scope="global"))])
    state = t.init(params)
    leaves = [params[n]["kernel"] for n in ("a", "b", "c")]
    for n, want in zip(("a", "b", "c"), reference_global([np.asarray(x) for x in leaves], 0.7)):
        np.testing.assert_array_equal(np.asarray(state.masks[f"{n}/kernel"]), want)
    pruned = sum(int((~state.masks[f"{n}/kernel"]).sum()) for n in ("a", "b", "c"))
    assert pruned == round(0.7 * 650)
    per_leaf = [float(1 - state.masks[f"{n}/kernel"].mean()) for n in ("a", "b", "c")]
    assert per_leaf[0] > per_leaf[1] > per_leaf[2]  # one threshold, so layers differ


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.standard_promotion
def test_global_schedule_under_wrap_compiles_once():
    params = {"a": jax.random.normal(jax.random.key(1), (16, 8)), "b": jax.random.normal(jax.random.key(2), (8, 8))}
    sched = jaxqp.polynomial(0.0, 0.75, begin=1, end=4, every=1)
    t = jaxqp.transform([Rule(".*", prune=PruneSpec(sparsity=sched, scope="global"))])
    tx = jaxqp.wrap(optax.sgd(0.01), t)
    opt_state = tx.init(params)

    def update(params, opt_state):
        updates, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step, traces = counted_jit(update)

    for i in range(6):
        params, opt_state = step(params, opt_state)
        masks = jaxqp.state_of(opt_state).masks
        assert sum(int((~m).sum()) for m in masks.values()) == round(float(sched(i + 1)) * 192)
        assert all(np.all(np.asarray(params[k])[~np.asarray(masks[k])] == 0.0) for k in params)
    assert len(traces) == 1


def test_bad_global_specs():
    with pytest.raises(ValueError, match="unknown scope; use one of 'layer', 'global', 'erk'"):
        PruneSpec(sparsity=0.5, scope="model")
    with pytest.raises(ValueError, match="unstructured magnitude pruning"):
        PruneSpec(threshold=0.1, scope="global")
