"""Specs validation, parameter paths and rule resolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxqp
from jaxqp import PruneSpec, QuantSpec, Rule, resolve
from jaxqp._specs.paths import paths_and_leaves


@pytest.mark.parametrize("bits", [0, 17, 33, -8])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=rf"QuantSpec\(bits={bits}\): bits must lie in \[1, 16\]"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [8.0, "8", True])
def test_bits_must_be_int(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=rf"PruneSpec\(sparsity\)={sparsity}: sparsity must lie in \[0, 1\)"):
        PruneSpec(sparsity=sparsity)


def test_prune_spec_needs_exactly_one():
    with pytest.raises(ValueError, match="exactly one of sparsity=, threshold= or structure="):
        PruneSpec()
    with pytest.raises(ValueError, match="exactly one"):
        PruneSpec(sparsity=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="threshold must be a float >= 0"):
        PruneSpec(threshold=-1.0)


def test_other_bad_specs():
    with pytest.raises(ValueError, match="unknown ste; use one of 'clipped', 'identity'"):
        QuantSpec(ste="round")
    with pytest.raises(TypeError, match="axis must be an int"):
        QuantSpec(axis="last")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Rule("(")
    with pytest.raises(TypeError, match="quant must be a jaxqp.QuantSpec"):
        Rule(".*", quant=8)
    with pytest.raises(TypeError, match=r"rules\[1\]"):
        jaxqp.transform([Rule(".*"), ".*"])


def test_specs_are_hashable_and_frozen():
    assert hash(QuantSpec(bits=4)) == hash(QuantSpec(bits=4))
    assert PruneSpec(sparsity=0.5) == PruneSpec(sparsity=jaxqp.constant(0.5))
    with pytest.raises(AttributeError):
        QuantSpec().bits = 4


def test_linen_paths():
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    assert [p for p, _ in paths_and_leaves(params)[0]] == [
        "layers_0/bias", "layers_0/kernel", "layers_2/bias", "layers_2/kernel"]


def test_nnx_paths_drop_variable_value():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs)])

    _, state = nnx.split(Model(nnx.Rngs(0)))
    assert [p for p, _ in paths_and_leaves(state)[0]] == [
        "blocks/0/bias", "blocks/0/kernel", "l1/bias", "l1/kernel"]
    pure = nnx.to_pure_dict(state)
    assert [p for p, _ in paths_and_leaves(pure)[0]] == [
        "blocks/0/bias", "blocks/0/kernel", "l1/bias", "l1/kernel"]


def test_nested_dicts_lists_tuples():
    tree = {"encoder": {"layers": [{"w": jnp.ones(2)}, ({"w": jnp.ones(2)},)]}}
    assert [p for p, _ in paths_and_leaves(tree)[0]] == ["encoder/layers/0/w", "encoder/layers/1/0/w"]


def test_first_match_wins_and_exclusion_rules():
    params = {"head": {"kernel": jnp.ones((2, 2))}, "body": {"kernel": jnp.ones((2, 2))}}
    plan = resolve([Rule("head/.*"), Rule(".*/kernel", quant=QuantSpec(bits=4))], params)
    got = {leaf.path: leaf.quant for leaf in plan.leaves}
    assert got == {"body/kernel": QuantSpec(bits=4), "head/kernel": None}


def test_non_float_leaves_never_touched():
    params = {"w": jnp.ones((2, 2)), "count": jnp.array(3, jnp.int32), "flag": jnp.array([True])}
    plan = resolve([Rule(".*", quant=QuantSpec(bits=8, axis=None))], params)
    assert {leaf.path: leaf.quant is not None for leaf in plan.leaves} == {"count": False, "flag": False, "w": True}
    t = jaxqp.transform([Rule(".*", quant=QuantSpec(bits=8, axis=None))])
    out = t.apply(params, t.init(params))
    assert out["count"] is params["count"] and out["flag"] is params["flag"]


def test_rule_matching_nothing_lists_paths():
    params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"rules\[0\] \(pattern 'kernel'\) matches no float parameter.*Dense_0/kernel"):
        resolve([Rule("kernel", quant=QuantSpec())], params)
    with pytest.raises(ValueError, match=r"rules\[1\].*not already taken by an earlier rule"):
        resolve([Rule(".*", quant=QuantSpec(axis=None)), Rule(".*/kernel", quant=QuantSpec())], params)


def test_axis_out_of_range_names_path():
    with pytest.raises(ValueError, match=r"matches 'b' of shape \(\), but QuantSpec\(axis=-1\) is out of range"):
        resolve([Rule(".*", quant=QuantSpec())], {"a": jnp.ones((2, 2)), "b": jnp.ones(())})


def test_resolve_accepts_shape_dtype_structs():
    params = {"w": jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)}
    plan = resolve([Rule("w", quant=QuantSpec())], params)
    assert plan.leaves[0].shape == (4, 3) and plan.leaves[0].dtype == "bfloat16"
