"""Pow2Array and Fp8Array: compact power-of-two and fp8 leaves, exact through export, files and serving."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bits_equal

import jaxqp
from jaxqp import Fp8Array, Pow2Array, PruneSpec, QArray, QuantSpec, Rule, SparseArray
from jaxqp.serving import ServingKernel


def exported(w, quant, sparsity=None):
    params = {"w": w}
    prune = None if sparsity is None else PruneSpec(sparsity=sparsity)
    t = jaxqp.transform([Rule("w", quant=quant, prune=prune)])
    state = t.init(params)
    return jaxqp.export(params, state)["w"], t.apply(params, state)["w"]


def normal(shape, key=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def test_pow2_golden_codes_and_packing():
    w = jnp.array([[3.0, -0.7], [0.01, 1.0]])
    leaf, applied = exported(w, QuantSpec(bits=4, format="pow2"))
    assert isinstance(leaf, Pow2Array) and leaf.validate() is leaf
    # column 0: absmax 3 -> emax 2, emin 2 - 6 = -4; 3 -> 2^2 = code 7; 0.01 -> 2^-7 < 2^emin -> 0
    # column 1: absmax 1 -> emin -6; -0.7 -> -2^-1 = code -6; 1 -> 2^0 = code 7
    np.testing.assert_array_equal(np.asarray(leaf.int_codes()), [[7, -6], [0, 7]])
    np.testing.assert_array_equal(np.asarray(leaf.emin), [[-4, -6]])
    assert leaf.emin.dtype == jnp.int16
    # code - qmin (= -7), 4 bits each, first in the low nibble: 14 | 1 << 4, 7 | 14 << 4
    assert np.asarray(leaf.codes.codes).tolist() == [14 | 1 << 4, 7 | 14 << 4]
    assert np.asarray(leaf.dequantize()).tolist() == [[4.0, -0.5], [0.0, 1.0]]
    assert bits_equal(leaf.dequantize(), applied)


@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("axis", [0, None])
@pytest.mark.parametrize("sparsity", [None, 0.9])
def test_pow2_export_decodes_bit_for_bit(bits, axis, sparsity):
    w = normal((96, 40), key=bits) * jnp.logspace(-3, 1, 40)  # columns of very different ranges
    leaf, applied = exported(w, QuantSpec(bits=bits, format="pow2", axis=axis), sparsity)
    assert isinstance(leaf, Pow2Array) and leaf.validate() is leaf
    assert (leaf.codes.bitmask is not None) == (sparsity is not None)  # 90% pruned: sparse is smaller
    assert bits_equal(jaxqp.dequantize(leaf), applied)
    assert bits_equal(jax.jit(lambda x: x.dequantize())(leaf), applied)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_pow2_and_fp8_keep_the_weight_dtype(dtype):
    w = normal((32, 16), dtype=dtype)
    for quant in (QuantSpec(bits=4, format="pow2"), QuantSpec(bits=8, format="e4m3")):
        leaf, applied = exported(w, quant)
        assert leaf.dequantize().dtype == dtype and bits_equal(leaf.dequantize(), applied)


def test_pow2_bytes_are_packed_codes_plus_exponents():
    w = normal((256, 256))
    leaf, _ = exported(w, QuantSpec(bits=4, format="pow2"))
    # 4-bit codes: half a byte each; one int16 exponent per column; the unit scale: 4 bytes
    assert leaf.nbytes == 256 * 256 // 2 + 256 * 2 + 4
    assert leaf.nbytes / w.nbytes <= 0.13  # like int4
    leaf3, _ = exported(w, QuantSpec(bits=3, format="pow2", axis=None))
    assert leaf3.nbytes == 256 * 256 * 3 // 8 + 2 + 4  # 3 bits per code


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_pow2", [False, True])
def test_fp8_export_stores_float8_values(fmt, scale_pow2):
    w = normal((64, 48)) * jnp.logspace(-2, 2, 48)
    leaf, applied = exported(w, QuantSpec(bits=8, format=fmt, scale_pow2=scale_pow2))
    assert isinstance(leaf, Fp8Array) and leaf.validate() is leaf and leaf.format == fmt
    assert leaf.values.dtype == jaxqp.numerics._formats.FP8_DTYPES[fmt] and leaf.scale.shape == (1, 48)
    assert leaf.nbytes == 64 * 48 + 48 * 4
    # the values are the weight over its scale, cast to the float8 dtype (round to nearest even)
    want = (w / leaf.scale).astype(jaxqp.numerics._formats.FP8_DTYPES[fmt])
    assert bits_equal(leaf.values, want)
    assert bits_equal(jaxqp.dequantize(leaf), applied)
    assert bits_equal(jax.jit(lambda x: x.dequantize())(leaf), applied)


def test_pruned_fp8_stores_only_kept_values():
    w = normal((64, 48))
    leaf, applied = exported(w, QuantSpec(bits=8, format="e4m3"), sparsity=0.9)
    assert isinstance(leaf.values, SparseArray) and leaf.validate() is leaf
    kept = int(np.count_nonzero(np.asarray(applied)))
    assert leaf.values.values.size == kept and leaf.nbytes == kept + 64 * 48 // 8 + 48 * 4
    assert bits_equal(leaf.dequantize(), applied)


def test_save_load_round_trip(tmp_path):
    w = normal((64, 48))
    tree = {"p4": exported(w, QuantSpec(bits=4, format="pow2"))[0],
            "p3s": exported(w, QuantSpec(bits=3, format="pow2"), sparsity=0.9)[0],
            "f8": exported(w, QuantSpec(bits=8, format="e5m2"))[0],
            "f8s": exported(w, QuantSpec(bits=8, format="e4m3"), sparsity=0.9)[0]}
    path = os.path.join(tmp_path, "m.jaxqp")
    jaxqp.save(path, tree)
    back = jaxqp.load(path)
    for name, leaf in tree.items():
        assert type(back[name]) is type(leaf)
        assert bits_equal(back[name].dequantize(), leaf.dequantize())
    assert os.path.getsize(path) < sum(leaf.nbytes for leaf in tree.values()) + 8192  # tensors + header


def test_invalid_leaves_are_refused(tmp_path):
    w = normal((16, 8))
    pow2, _ = exported(w, QuantSpec(bits=4, format="pow2"))
    with pytest.raises(ValueError, match="emin must be int16"):
        Pow2Array(pow2.codes, pow2.emin.astype(jnp.int32), pow2.dtype).validate()
    with pytest.raises(ValueError, match="scale must be 1"):
        Pow2Array(QArray(**{**pow2.codes.__dict__, "scale": 2 * pow2.codes.scale}), pow2.emin, pow2.dtype).validate()
    with pytest.raises(ValueError, match="dtype must be a float"):
        Pow2Array(pow2.codes, pow2.emin, "int8").validate()
    fp8, _ = exported(w, QuantSpec(bits=8, format="e4m3"))
    with pytest.raises(ValueError, match="float8"):
        Fp8Array(fp8.values.astype(jnp.float16), fp8.scale, fp8.dtype).validate()
    with pytest.raises(ValueError, match="finite and positive"):
        Fp8Array(fp8.values, -fp8.scale, fp8.dtype).validate()
    # a file whose fp8 leaf breaks its invariants is refused on load
    path = os.path.join(tmp_path, "bad.jaxqp")
    jaxqp.save(path, {"w": Fp8Array(fp8.values, jnp.zeros_like(fp8.scale), fp8.dtype)})
    with pytest.raises(ValueError, match="breaks its invariants"):
        jaxqp.load(path)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_low_bit_pow2_serves_as_an_exact_int8_kernel(bits):
    w = normal((512, 256), key=bits)
    leaf, applied = exported(w, QuantSpec(bits=bits, format="pow2"))
    kernel = jaxqp.prepare({"w": leaf})["w"]
    assert isinstance(kernel, ServingKernel) and kernel.codes.dtype == jnp.int8
    assert bits_equal(kernel.dequantize(), applied)
    # every scale is a power of two, every code 0 or +-2^j
    scale = np.asarray(kernel.scale)
    assert np.all(np.frexp(scale)[0] == 0.5)
    magnitudes = np.unique(np.abs(np.asarray(kernel.int8_codes())))
    assert set(magnitudes.tolist()) <= {0} | {2 ** j for j in range(2 ** (bits - 1) - 1)}
    # the int8 matmul on it is the integer product of the row codes and these codes, rescaled
    x = normal((8, 512), key=9)
    codes, row_scale = jaxqp.serving.quantize_rows(x)
    acc = np.asarray(codes, np.int64) @ np.asarray(kernel.int8_codes(), np.int64).T
    want = acc.astype(np.float32) * np.asarray(row_scale) * scale
    for path in ("int8", "int8_t", "bf16"):
        pinned = dataclasses.replace(kernel, path=path)
        np.testing.assert_array_equal(np.asarray(jaxqp.serving.int8_matmul(x, pinned)), want)


def test_other_value_leaves_serve_as_float():
    w = normal((512, 256))
    for quant in (QuantSpec(bits=5, format="pow2"), QuantSpec(bits=8, format="e4m3"),
                  QuantSpec(bits=4, format="pow2", axis=0)):  # per-input exponents: no per-output scale
        leaf, applied = exported(w, quant)
        served = jaxqp.prepare({"w": leaf})["w"]
        assert isinstance(served, jax.Array) and bits_equal(served, applied)
    small, applied = exported(normal((16, 8)), QuantSpec(bits=4, format="pow2"))
    assert bits_equal(jaxqp.prepare({"w": small}, min_int_size=129)["w"], applied)  # below min_int_size: float
    assert bits_equal(jaxqp.prepare({"w": small})["w"].dequantize(), applied)  # by default: codes


def test_summary_counts_the_compact_bytes():
    params = {"a": normal((64, 32)), "b": normal((32, 16))}
    t = jaxqp.transform([Rule("a", quant=QuantSpec(bits=4, format="pow2")),
                         Rule("b", quant=QuantSpec(bits=8, format="e5m2"))])
    state = t.init(params)
    rows = {r["path"]: r["bytes_compressed"] for r in jaxqp.summary(params, state).rows}
    assert rows == {"a": 64 * 32 // 2 + 32 * 2 + 4, "b": 32 * 16 + 16 * 4}
