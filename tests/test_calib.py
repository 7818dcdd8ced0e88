"""Granularity and calibration: groups with padding, percentile, MSE search, export of groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxqp
from jaxqp import QuantSpec, fake_quant_weight
from jaxqp._transforms.weight_quantizer import weight_quantizer
from jaxqp.numerics import MSE_RATIOS
from jaxqp.numerics._linear import reciprocal

# 5 rows, groups of 2 along axis 0: rows {0, 1}, {2, 3} and the padded {4}.
W = np.array([[1.0, 2.0], [-3.0, 0.5], [0.7, 7.0], [0.0, -1.0], [14.0, 0.1]], np.float32)


def test_group_scales_golden_with_padding():
    spec = QuantSpec(bits=4, group_size=2, group_axis=0)
    q = weight_quantizer(jnp.asarray(W), spec)
    want = np.array([[3.0, 2.0], [0.7, 7.0], [14.0, 0.1]], np.float32) * reciprocal(7)
    np.testing.assert_array_equal(np.asarray(q.scale), want)
    scale = np.repeat(want, 2, axis=0)[:5]
    codes = np.clip(np.round(W / scale), -7, 7)
    np.testing.assert_array_equal(fake_quant_weight(jnp.asarray(W), spec), (codes * scale).astype(np.float32))


@pytest.mark.parametrize("n", [31, 32, 33, 70])
@pytest.mark.parametrize("symmetric", [True, False])
def test_group_padding_any_length_matches_loop_reference(n, symmetric):
    w = np.asarray(jax.random.normal(jax.random.key(n), (n, 3)))
    spec = QuantSpec(bits=4, group_size=32, symmetric=symmetric)
    got = np.asarray(fake_quant_weight(jnp.asarray(w), spec))
    for start in range(0, n, 32):
        block = w[start:start + 32]
        want = np.asarray(fake_quant_weight(jnp.asarray(block), QuantSpec(bits=4, symmetric=symmetric, axis=-1)))
        np.testing.assert_array_equal(got[start:start + 32], want)


def test_group_with_conv_kernel_and_jit():
    w = jax.random.normal(jax.random.key(3), (3, 3, 40, 8))  # 2-D conv (h, w, in, out), in = 40
    spec = QuantSpec(bits=4, group_size=16)
    y = fake_quant_weight(w, spec)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: fake_quant_weight(w, spec))(w)), np.asarray(y))
    assert weight_quantizer(w, spec).scale.shape == (1, 1, 3, 8)


def test_export_of_groups_is_bit_exact_and_saved():
    params = {"w": jax.random.normal(jax.random.key(4), (70, 6))}
    t = jaxqp.transform([jaxqp.Rule("w", quant=QuantSpec(bits=4, group_size=32))])
    state = t.init(params)
    packed = jaxqp.export(params, state)
    assert packed["w"].group == (0, 32) and packed["w"].scale.shape == (3, 6)
    np.testing.assert_array_equal(np.asarray(jaxqp.dequantize(packed)["w"]), np.asarray(t.apply(params, state)["w"]))


def test_percentile_golden():
    x = jnp.arange(1.0, 101.0)
    # 90th percentile of |x|, taking the sample above the interpolation point: index 89.1 -> 91
    spec = QuantSpec(bits=8, axis=None, calibration="percentile", percentile=90.0)
    q = weight_quantizer(x, spec)
    assert float(q.scale.reshape(())) == np.float32(91.0) * reciprocal(127)
    y = fake_quant_weight(x, spec)
    assert float(y[-1]) == pytest.approx(91.0, rel=1e-6)  # clipped
    g = jax.grad(lambda x: jnp.sum(fake_quant_weight(x, spec)))(x)
    np.testing.assert_array_equal(np.asarray(g), (np.arange(1, 101) <= 91).astype(np.float32))  # clipped STE


def _mse_reference(x, bits):
    qmax = 2 ** (bits - 1) - 1
    absmax = np.max(np.abs(x), axis=0)
    best = []
    for c in range(x.shape[1]):
        errs = []
        for r in MSE_RATIOS:
            s = np.float32(absmax[c] * r) * reciprocal(qmax)
            y = np.clip(np.round(x[:, c] / s), -qmax, qmax) * s
            errs.append(np.sum((y - x[:, c]) ** 2, dtype=np.float64))
        best.append(MSE_RATIOS[int(np.argmin(errs))])
    return np.array(best)


def test_mse_search_matches_brute_force():
    x = np.asarray(jax.random.t(jax.random.key(5), 3.0, (512, 6)))  # heavy tails: clipping pays
    spec = QuantSpec(bits=4, calibration="mse")
    q = weight_quantizer(jnp.asarray(x), spec)
    ratio = np.asarray(q.scale).reshape(-1) / (np.max(np.abs(x), axis=0) * reciprocal(7))
    np.testing.assert_allclose(ratio, _mse_reference(x, 4), rtol=1e-5)
    assert np.any(ratio < 1.0)
    err = lambda s: float(jnp.sum((fake_quant_weight(jnp.asarray(x), s) - x) ** 2))
    assert err(spec) < err(QuantSpec(bits=4))
