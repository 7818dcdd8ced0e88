"""NMArray: N:M storage as kept values + packed positions, exact through export, files and serving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bits_equal

import jaxqp
from jaxqp import NM, NMArray, PruneSpec, QArray, QuantSpec, Rule
from jaxqp._export.nm_array import index_width, nm_positions


def exported(shape, quant, nm, key=0):
    params = {"w": jax.random.normal(jax.random.key(key), shape)}
    t = jaxqp.transform([Rule("w", quant=quant, prune=PruneSpec(structure=nm))])
    state = t.init(params)
    return jaxqp.export(params, state)["w"], t.apply(params, state)["w"]


def test_golden_layout():
    w = jnp.array([[0.0, 3.0], [2.0, 0.0], [0.0, -1.0], [5.0, 0.0]])
    s = NMArray.from_dense(w, w != 0, n=2, m=4, axis=0).validate()
    np.testing.assert_array_equal(np.asarray(s.values), [[2.0, 3.0], [5.0, -1.0]])
    # positions with the axis moved last: column 0 keeps rows (1, 3), column 1 rows (0, 2);
    # 2-bit slots, first in the lowest bits: 1 | 3 << 2 | 0 << 4 | 2 << 6
    assert s.index.dtype == jnp.uint8 and np.asarray(s.index).tolist() == [1 | 3 << 2 | 0 << 4 | 2 << 6]
    assert bits_equal(s.dequantize(), w)


def test_index_widths_and_too_full_groups():
    assert [index_width(m) for m in (2, 3, 4, 5, 8, 16, 17, 128, 256)] == [1, 2, 2, 3, 3, 4, 5, 7, 8]
    mask = np.array([True, True, True, False])[:, None]
    assert nm_positions(mask, 2, 4, 0) is None  # 3 kept in a group of 4: not 2:4
    assert NMArray.from_dense(np.ones((4, 1)), mask, 2, 4, 0) is None
    # a group keeping fewer than n is completed with a pruned position (stored as 0)
    np.testing.assert_array_equal(nm_positions(np.array([[False], [False], [True], [False]]), 2, 4, 0), [[[0, 2]]])


@pytest.mark.parametrize("quant", [None, QuantSpec(bits=8), QuantSpec(bits=4), QuantSpec(bits=1),
                                   QuantSpec(bits=8, symmetric=False),
                                   QuantSpec(bits=4, group_size=32, group_axis=0),
                                   QuantSpec(bits=4, symmetric=False, group_size=16, group_axis=0)])
@pytest.mark.parametrize("shape,nm", [((64, 32), NM(2, 4)), ((64, 32), NM(1, 4)), ((3, 3, 16, 6), NM(2, 8)),
                                      ((48, 32), NM(4, 16))])
def test_export_stores_nm_and_decodes_bit_for_bit(quant, shape, nm):
    leaf, applied = exported(shape, quant, nm)
    assert isinstance(leaf, NMArray) and leaf.validate() is leaf
    assert isinstance(leaf.values, QArray) == (quant is not None)
    assert bits_equal(jaxqp.dequantize({"w": leaf})["w"], applied)
    assert bits_equal(jax.jit(lambda s: s.dequantize())(leaf), applied)
    if quant is not None:
        dense = leaf.dense_qarray().validate()
        assert bits_equal(dense.dequantize(), applied)


@pytest.mark.parametrize("quant", [None, QuantSpec(bits=8, axis=0), QuantSpec(bits=4, axis=0, symmetric=False)])
def test_nm_along_the_last_axis(quant):
    leaf, applied = exported((8, 64), quant, NM(2, 4, axis=1))  # per-row scales: across the N:M axis
    assert isinstance(leaf, NMArray) and leaf.axis == 1 and leaf.values.shape == (8, 32)
    assert bits_equal(leaf.dequantize(), applied)


def test_bytes_are_values_plus_two_bits_per_kept_entry():
    leaf, _ = exported((64, 32), QuantSpec(bits=8), NM(1, 4))
    kept = 64 * 32 // 4
    assert leaf.values.codes.nbytes == kept and leaf.index.nbytes == kept * 2 // 8
    assert leaf.nbytes == kept + kept // 4 + 32 * 4  # codes, positions, one float32 scale per column
    # 1:4 positions (0.5 bit per entry) beat the bitmask (1 bit per entry)
    bitmask_form = jaxqp.QArray.from_codes(
        leaf.dense_qarray().int_codes(), leaf.values.scale, None, 8, -127, 127, "float32",
        mask=np.asarray(leaf.dequantize() != 0))
    assert leaf.nbytes < bitmask_form.nbytes
    summary = jaxqp.summary(*_params_state((64, 32), QuantSpec(bits=8), NM(1, 4)))
    assert summary.rows[0]["bytes_compressed"] == leaf.nbytes


def _params_state(shape, quant, nm):
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    t = jaxqp.transform([Rule("w", quant=quant, prune=PruneSpec(structure=nm))])
    return params, t.init(params)


@pytest.mark.parametrize("quant,shape,nm", [
    (QuantSpec(bits=8), (37, 20), NM(2, 4)),  # short last group: padding makes the bitmask smaller
    (QuantSpec(bits=8, axis=0), (64, 32), NM(2, 4)),  # one scale per entry along the N:M axis
    (QuantSpec(bits=4, group_size=6, group_axis=0), (64, 32), NM(2, 4)),  # groups of scales split by m
])
def test_other_layouts_fall_back_exactly(quant, shape, nm):
    leaf, applied = exported(shape, quant, nm)
    assert isinstance(leaf, QArray)
    assert bits_equal(leaf.dequantize(), applied)


def test_save_load_round_trip_and_invalid_leaf_refused(tmp_path):
    leaf, applied = exported((64, 32), QuantSpec(bits=4), NM(2, 4))
    path = tmp_path / "nm.jaxqp"
    jaxqp.save(path, {"w": leaf})
    loaded = jaxqp.load(path)["w"]
    assert isinstance(loaded, NMArray) and (loaded.n, loaded.m, loaded.axis) == (2, 4, 0)
    assert bits_equal(loaded.dequantize(), applied)
    # positions that repeat within a group break the invariants: refused on load
    bad = NMArray(leaf.values, jnp.zeros_like(leaf.index), leaf.shape, 2, 4, 0)
    with pytest.raises(ValueError, match="increasing within a group"):
        bad.validate()
    jaxqp.save(tmp_path / "bad.jaxqp", {"w": bad})
    with pytest.raises(ValueError, match="breaks its invariants"):
        jaxqp.load(tmp_path / "bad.jaxqp")


def test_validate_checks_values_shape_and_index_size():
    leaf, _ = exported((64, 32), None, NM(2, 4))
    with pytest.raises(ValueError, match="values have shape"):
        NMArray(leaf.values[:8], leaf.index, leaf.shape, 2, 4, 0).validate()
    with pytest.raises(ValueError, match="index must be uint8"):
        NMArray(leaf.values, leaf.index[:-1], leaf.shape, 2, 4, 0).validate()


def test_serving_densifies_int8_codes_exactly():
    leaf, applied = exported((256, 256), QuantSpec(bits=8), NM(2, 4))
    kernel = jaxqp.prepare({"w": leaf})["w"]
    assert isinstance(kernel, jaxqp.serving.ServingKernel)
    assert bits_equal(kernel.dequantize(), applied)
    float_leaf, float_applied = exported((64, 32), None, NM(2, 4))
    assert bits_equal(jaxqp.prepare({"w": float_leaf})["w"], float_applied)
