"""Value formats: binary, ternary, power-of-two values and scales, fp8, unsigned, stochastic rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxqp import QuantSpec, fake_quant_weight
from jaxqp.numerics import fp8_round, pow2_ceil, pow2_values, stochastic_round


def fq(x, spec):
    return np.asarray(fake_quant_weight(jnp.asarray(x, jnp.float32), spec))


def test_binary_golden_per_channel():
    # column 0: mean |x| over non-zeros is 0.5 and the zero stays 0; column 1: 1.25
    x = [[0.5, -1.5], [0.0, 1.0]]
    np.testing.assert_array_equal(fq(x, QuantSpec(bits=1)), [[0.5, -1.25], [0.0, 1.25]])


def test_ternary_golden():
    # mean|x| = 0.9, threshold 0.63: 1.0 and -2.0 survive with scale 1.5
    x = [1.0, -0.1, 0.5, -2.0]
    np.testing.assert_array_equal(fq(x, QuantSpec(bits=2, format="ternary", axis=None)), [1.5, 0.0, 0.0, -1.5])


def test_pow2_golden_and_rounding_point():
    # bits 3: exponents {emax-2, emax-1, emax}; emax = round(log2 3.0) = 2 -> values {1, 2, 4}.
    # 1.4 < 2^0.5 rounds down to 1, 1.5 rounds up to 2; -0.7 (k = -1 < emin) and 0.01 become 0.
    x = [3.0, -0.7, 0.01, 1.4, 1.5, -1.0, 0.0]
    np.testing.assert_array_equal(np.asarray(pow2_values(jnp.array(x), bits=3, axis=None)),
                                  [4.0, 0.0, 0.0, 1.0, 2.0, -1.0, 0.0])
    # The rounding point is sqrt(2) in float32 (mantissa >= f32(sqrt(0.5)) rounds up).
    root2 = np.float32(np.sqrt(2.0))
    below = np.nextafter(root2, np.float32(0))
    got = pow2_values(jnp.array([4.0, root2, below]), bits=4, axis=None)
    np.testing.assert_array_equal(np.asarray(got), [4.0, 2.0, 1.0])


def test_pow2_values_are_powers_of_two_and_jit_equals_eager():
    w = jax.random.normal(jax.random.key(0), (64, 8))
    spec = QuantSpec(bits=4, format="pow2")
    y = fake_quant_weight(w, spec)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: fake_quant_weight(w, spec))(w)), np.asarray(y))
    nonzero = np.abs(np.asarray(y))[np.asarray(y) != 0]
    mantissa, _ = np.frexp(nonzero)
    assert np.all(mantissa == 0.5)
    exps = np.log2(np.abs(np.asarray(y)) + (np.asarray(y) == 0))
    per_channel = [np.unique(exps[:, c][np.asarray(y)[:, c] != 0]) for c in range(8)]
    assert all(len(e) <= 7 for e in per_channel)  # 2^(4-1) - 1 exponents at most
    # the gradient is the identity (nothing is clipped)
    g = jax.grad(lambda w: jnp.sum(fake_quant_weight(w, spec) * 3.0))(w)
    np.testing.assert_array_equal(np.asarray(g), 3.0)


def test_pow2_ceil_exact():
    s = jnp.array([0.3, 0.5, 1.0, 3.0, 1e-30], jnp.float32)
    np.testing.assert_array_equal(np.asarray(pow2_ceil(s)), np.array([0.5, 0.5, 1.0, 4.0, 2.0**-99], np.float32))


def test_pow2_scale_spec():
    x = [3.0, -1.3, 0.2]  # absmax 3 / qmax 7 = 0.43 -> scale 0.5
    np.testing.assert_array_equal(fq(x, QuantSpec(bits=4, axis=None, scale_pow2=True)), [3.0, -1.5, 0.0])


@pytest.mark.parametrize("fmt,dtype,big", [("e4m3", jnp.float8_e4m3fn, 448.0), ("e5m2", jnp.float8_e5m2, 57344.0)])
def test_fp8_equals_cast_and_saturates(fmt, dtype, big):
    x = jax.random.normal(jax.random.key(1), (4096,)) * jnp.logspace(-6, 2, 4096)
    want = x.astype(dtype).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(fp8_round(x, fmt)), np.asarray(want))
    # saturation: a cast overflows (NaN or inf), fake-quant clips to the largest finite value
    np.testing.assert_array_equal(np.asarray(fp8_round(jnp.array([1e6, -1e6]), fmt)), [big, -big])
    # the spec: a channel whose max |w| is exactly the format's max has scale 1, so it equals the cast
    w = jnp.stack([x[:64] * 0 + jnp.linspace(-big, big, 64), x[:64]], axis=1)
    w = w.at[0, 1].set(big)
    got = fake_quant_weight(w, QuantSpec(format=fmt))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w.astype(dtype).astype(jnp.float32)))


def test_unsigned_golden():
    # scale 3/15 = 0.2; -1 clips to 0; 0.5 is 2.5 steps -> 2 (half to even)
    x = [-1.0, 0.5, 3.0]
    got = fq(x, QuantSpec(bits=4, axis=None, signed=False))
    np.testing.assert_allclose(got, [0.0, 0.4, 3.0], rtol=1e-6)
    assert got[0] == 0.0


def test_stochastic_rounding_unbiased_and_keyed():
    x = jnp.full((20000,), 2.3)
    r = stochastic_round(x, jax.random.key(0))
    assert set(np.unique(np.asarray(r))) == {2.0, 3.0}
    assert abs(float(r.mean()) - 2.3) < 0.01
    np.testing.assert_array_equal(np.asarray(r), np.asarray(stochastic_round(x, jax.random.key(0))))
    assert not np.array_equal(np.asarray(r), np.asarray(stochastic_round(x, jax.random.key(1))))


def test_stochastic_weight_rounding_through_transform():
    import jaxqp

    params = {"w": jax.random.normal(jax.random.key(2), (256, 4))}
    rules = [jaxqp.Rule("w", quant=QuantSpec(bits=4, rounding="stochastic"))]
    with pytest.raises(ValueError, match="seed"):
        jaxqp.transform(rules).init(params)
    t = jaxqp.transform(rules, seed=0)
    state = t.init(params)
    a = t.apply(params, state)["w"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jax.jit(t.apply)(params, state)["w"]))
    b = t.apply(params, t.update(params, state))["w"]
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # a new draw each step
    nearest = fake_quant_weight(params["w"], QuantSpec(bits=4))
    scale = np.max(np.abs(np.asarray(params["w"])), axis=0) / 7
    # floor or ceil of the code: one step apart at most, plus the float32 rounding of both
    # values (half an ulp each at their magnitude, up to max|w|) - not a relative slack on scale.
    ulp = np.spacing(np.max(np.abs(np.asarray(params["w"])), axis=0))
    assert np.all(np.abs(np.asarray(a - nearest)) <= scale + ulp)
    assert abs(float(jnp.mean(a - params["w"]))) < 0.02  # unbiased
