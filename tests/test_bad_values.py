"""Bad values get a clear error or a documented result (session 31): NaN and infinities that
export or calibration would hide, channels without entries, and out-of-range static arguments
of the array-level primitives.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxqp
from jaxqp import ActSpec, PruneSpec, QuantSpec, Rule


class _Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.Dense(8, name="body")(x))


_EMPTY_SPECS = [QuantSpec(bits=8), QuantSpec(bits=4, symmetric=False), QuantSpec(bits=8, calibration="mse"),
                QuantSpec(bits=8, calibration="percentile", symmetric=False), QuantSpec(bits=4, format="pow2"),
                QuantSpec(bits=8, format="e4m3"), QuantSpec(bits=2, format="ternary"), QuantSpec(bits=1),
                QuantSpec(bits=4, group_size=2), QuantSpec(bits=8, axis=None)]


@pytest.mark.parametrize("spec", _EMPTY_SPECS, ids=str)
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_fake_quant_weight_of_an_array_without_entries_returns_it(spec, shape):
    w = jnp.ones(shape)
    y = jaxqp.fake_quant_weight(w, spec)  # no "zero-size array to reduction" from deep inside
    assert y.shape == shape and y.dtype == w.dtype


def test_scales_of_channels_without_entries_are_those_of_all_zero_channels():
    from jaxqp import numerics

    empty, zeros = jnp.ones((0, 3)), jnp.zeros((5, 3))
    np.testing.assert_array_equal(numerics.symmetric_scale(empty, 8), numerics.symmetric_scale(zeros, 8))
    np.testing.assert_array_equal(numerics.symmetric_scale(empty, 8), np.ones((1, 3)))
    for got, want in zip(numerics.affine_scale(empty, 8), numerics.affine_scale(zeros, 8)):
        np.testing.assert_array_equal(got, want)
    for method in ("max", "percentile"):
        for symmetric in (True, False):
            lo, hi = numerics.observe_range(empty, (0,), method, symmetric=symmetric)
            np.testing.assert_array_equal(np.asarray(hi), np.zeros((1, 3)))
            np.testing.assert_array_equal(np.asarray(lo), np.zeros((1, 3)))
    # the guard reads the static shape: a non-empty tensor's range is untouched
    x = jnp.array([[-3.0, 1.0], [2.0, -0.5]])
    np.testing.assert_array_equal(numerics.observe_range(x, (0,), symmetric=False)[0], [[-3.0, -0.5]])


def test_fake_quant_weight_refuses_an_integer_array():
    with pytest.raises(TypeError, match=r"fake_quant_weight: w must be a float array, got dtype int32"):
        jaxqp.fake_quant_weight(jnp.arange(9, dtype=jnp.int32).reshape(3, 3), QuantSpec(bits=2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("spec", [{"quant": QuantSpec(bits=8)}, {"prune": PruneSpec(sparsity=0.25)},
                                  {"quant": QuantSpec(bits=4, format="pow2")}], ids=["int8", "pruned", "pow2"])
def test_export_refuses_a_kept_nan_or_infinity_naming_the_leaf(bad, spec):
    kernel = jnp.arange(1.0, 17.0).reshape(4, 4).at[2, 3].set(bad)
    params = {"dense": {"kernel": kernel, "bias": jnp.full(4, bad)}}  # a float leaf passes as it is
    state = jaxqp.transform([Rule(".*kernel", **spec)]).init(params)
    with pytest.raises(ValueError, match=r"export: 'dense/kernel' holds .*kept values \(the first at index "
                                         r"\(2, 3\)\).*must be finite.*Did training diverge"):
        jaxqp.export(params, state)


def test_export_accepts_a_nan_that_the_mask_prunes():
    t = jaxqp.transform([Rule("kernel", prune=PruneSpec(sparsity=0.25), quant=QuantSpec(bits=8))])
    state = t.init({"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)})
    assert not bool(np.asarray(t.masks(state)["kernel"])[0, 0])  # the smallest entry is pruned
    params = {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4).at[0, 0].set(np.nan)}  # not kept: no matter
    exported = jaxqp.export(params, state)
    np.testing.assert_array_equal(jaxqp.dequantize(exported)["kernel"], t.apply(params, state)["kernel"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_calibrate_refuses_a_batch_with_nan_or_infinity_naming_the_layer(bad):
    model, x = _Two(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    t = jaxqp.transform([Rule(".*kernel", act=ActSpec(bits=8, range="static"))])
    forward = lambda s, b: jaxqp.linen_apply(model, s, {"params": params}, b)
    good = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"calibrate: the input of 'body/kernel' held NaN or an infinity in batch 1"):
        jaxqp.calibrate(t.init(params), forward, [good, good.at[1, 2].set(bad)])
    calibrated = jaxqp.calibrate(t.init(params), forward, [good])  # finite batches calibrate as before
    assert np.isfinite(float(calibrated.ranges["body/kernel"]["hi"]))


def test_numerics_primitives_refuse_static_arguments_out_of_range():
    # before: an axis past the last wrapped around (a modulo), bits=0 gave a negative qmax, and a
    # sparsity of 1.5 or a mask of 4 in every 2 returned masks; each silently
    from jaxqp import numerics

    x = jnp.arange(24.0).reshape(4, 6)
    cases = [
        (lambda: numerics.symmetric_scale(x, 8, axis=5), r"axis 5 is out of range for an array of 2 dimensions"),
        (lambda: jaxqp.fake_quant_weight(x, QuantSpec(bits=8, axis=3)), r"axis 3 is out of range"),
        (lambda: numerics.symmetric_scale(x, 0), r"int_range: bits=0; expected an int in \[2, 16\]"),
        (lambda: numerics.int_range(17, signed=False), r"bits=17; expected an int in \[1, 16\]"),
        (lambda: numerics.fake_quant(x, jnp.ones(()), None, 5, -5), r"fake_quant: qmin=5, qmax=-5"),
        (lambda: numerics.magnitude_mask(x, 1.5), r"magnitude_mask: sparsity=1.5; expected a fraction"),
        (lambda: numerics.global_magnitude_masks([x], -0.1), r"global_magnitude_masks: sparsity=-0.1"),
        (lambda: numerics.nm_mask(x, 4, 2), r"nm_mask: n=4, m=2; expected ints with 1 <= n < m"),
        (lambda: numerics.nm_mask(x, 2, 4, axis=2), r"nm_mask: axis 2 is out of range"),
        (lambda: numerics.channel_mask(x, 0.5, axis=-3), r"channel_mask: axis -3 is out of range"),
        (lambda: numerics.block_mask(x, 0.5, (0, 2)), r"block_mask: block=\(0, 2\)"),
        (lambda: numerics.threshold_mask(x, -1.0), r"threshold_mask: threshold=-1.0"),
        (lambda: numerics.pow2_values(x, 1), r"pow2: bits=1; expected an int in \[2, 8\]"),
        (lambda: numerics.fp8_round(x, "e3m4"), r"fp8: fmt='e3m4'; expected one of \('e4m3', 'e5m2'\)"),
        (lambda: numerics.pact(x, jnp.float32(1.0), 0), r"pact: bits=0"),
        (lambda: numerics.lsq(x, jnp.ones(()), 5, -5, 1.0), r"lsq: qmin=5, qmax=-5"),
        (lambda: numerics.erk_sparsities([(4, 6)], 1.5), r"erk_sparsities: sparsity=1.5"),
        (lambda: numerics.prune_count(-0.5, 10), r"prune_count: sparsity=-0.5"),
        (lambda: numerics.group_view(x, -1, 0, 0), r"group_view: group_size=0"),
        (lambda: numerics.expand_groups(jnp.ones((1, 2)), 1, 0, 6), r"expand_groups: group_size=0"),
        (lambda: numerics.int_dense(x, x.T, 0, 8, True), r"int_dense: x_bits: bits=0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # traced values (a schedule's sparsity under jit) are not checked, and still work
    masks = jax.jit(lambda s: numerics.magnitude_mask(x, s))(jnp.float32(0.5))
    assert int((~masks).sum()) == 12
