"""Bad quantization specs fail at construction or resolution, naming the field or rule and the fix."""

import jax.numpy as jnp
import pytest

import jaxqp
from jaxqp import ActSpec, QuantSpec, Rule


@pytest.mark.parametrize("owner", [QuantSpec, ActSpec])
@pytest.mark.parametrize("bits", [0, 17])
def test_bits_out_of_range(owner, bits):
    name = owner.__name__
    message = rf"{name}\(bits={bits}\): bits must lie in \[1, 16\]; e\.g\. {name}\(bits=8\)"
    with pytest.raises(ValueError, match=message):
        owner(bits=bits)


def test_unknown_format_and_choices():
    with pytest.raises(ValueError, match=r"QuantSpec\(format='int3'\): unknown format; use one of 'int', 'ternary'"):
        QuantSpec(format="int3")
    with pytest.raises(ValueError, match=r"ActSpec\(range='ema'\): unknown range; use one of 'dynamic', 'static'"):
        ActSpec(range="ema")
    with pytest.raises(ValueError, match=r"QuantSpec\(calibration='kl'\): unknown calibration"):
        QuantSpec(calibration="kl")


@pytest.mark.parametrize("size", [0, -4])
def test_group_size_must_be_positive(size):
    with pytest.raises(ValueError, match=rf"QuantSpec\(group_size\)={size}: must be an integer >= 1"):
        QuantSpec(bits=4, group_size=size)


@pytest.mark.parametrize("p", [0, -1, 100.5, 250])
@pytest.mark.parametrize("owner", [QuantSpec, ActSpec])
def test_percentile_outside_range(owner, p):
    with pytest.raises(ValueError, match=rf"{owner.__name__}\(percentile={p}\): percentile must lie in \(0, 100\]"):
        owner(calibration="percentile", percentile=p)


def test_format_combinations():
    with pytest.raises(ValueError, match=r"ternary codes take 2 bits; use QuantSpec\(bits=2, format='ternary'\)"):
        QuantSpec(format="ternary")
    with pytest.raises(ValueError, match="fp8 formats take bits=8"):
        QuantSpec(bits=4, format="e4m3")
    with pytest.raises(ValueError, match=r"group_size=32\) does not apply to format='pow2'"):
        QuantSpec(bits=4, format="pow2", group_size=32)
    with pytest.raises(ValueError, match=r"does not apply to 1-bit binary"):
        QuantSpec(bits=1, symmetric=False)
    with pytest.raises(ValueError, match="learned='lsq'.*symmetric=True"):
        QuantSpec(bits=4, learned="lsq", symmetric=False)
    with pytest.raises(ValueError, match=r"ActSpec\(bits=1\): activations take 2 to 16 bits"):
        ActSpec(bits=1)
    with pytest.raises(ValueError, match="per_token=True.*range='dynamic'"):
        ActSpec(per_token=True, range="static")
    QuantSpec(bits=1)  # binary
    QuantSpec(bits=2, format="ternary")
    QuantSpec(bits=16)


def test_group_axis_errors_name_the_rule():
    params = {"w": jnp.ones((8, 4))}
    with pytest.raises(ValueError, match=r"rules\[0\] \(pattern 'w'\) matches 'w' of shape \(8, 4\), but "
                                         r"QuantSpec\(group_axis=-1\) is also its channel axis"):
        jaxqp.transform([Rule("w", quant=QuantSpec(bits=4, group_size=2, group_axis=-1))]).init(params)
    with pytest.raises(ValueError, match=r"rules\[1\] \(pattern 'w'\).*QuantSpec\(group_axis=2\) is out of range"):
        jaxqp.transform([Rule("v", quant=None), Rule("w", quant=QuantSpec(bits=4, group_size=2, group_axis=2))]).init(
            {"v": jnp.ones(2), **params})
    with pytest.raises(TypeError, match=r"act must be a jaxqp.ActSpec"):
        Rule("w", act=QuantSpec())
