"""jaxqp.summary: bits, measured sparsity and byte estimates per leaf."""

import jax.numpy as jnp
import optax
import pytest

import jaxqp
from jaxqp import PruneSpec, QuantSpec, Rule


def test_rows_and_totals():
    params = {"a": {"kernel": jnp.arange(1.0, 81.0).reshape(8, 10), "bias": jnp.zeros(10)},
              "b": {"kernel": jnp.ones((10, 4), jnp.bfloat16)}}
    t = jaxqp.transform([
        Rule("a/kernel", quant=QuantSpec(bits=4), prune=PruneSpec(sparsity=0.75)),
        Rule("b/kernel", quant=QuantSpec(bits=8, symmetric=False, axis=None)),
    ])
    s = jaxqp.summary(params, t.init(params))
    rows = {r["path"]: r for r in s.to_dicts()}
    # 80 entries, 60 pruned: dense 4-bit = 40 bytes; bitmask 10 + 20 survivors * 4 bits = 10 -> 20; + 10 scales * 4
    assert rows["a/kernel"] == {"path": "a/kernel", "shape": (8, 10), "bits": 4, "sparsity": 0.75,
                                "bytes_float": 320, "bytes_compressed": 20 + 40}
    assert rows["a/bias"]["bits"] == 32 and rows["a/bias"]["bytes_compressed"] == 40
    # bfloat16 counts 2 bytes each; affine per tensor: 40 bytes of int8 + scale + zero point
    assert rows["b/kernel"]["bytes_float"] == 80 and rows["b/kernel"]["bytes_compressed"] == 40 + 8
    assert s.bytes_float == 320 + 40 + 80 and s.bytes_compressed == 60 + 40 + 48
    text = str(s)
    assert "a/kernel" in text and "8x10" in text and "total" in text and "0.750" in text


def test_summary_reads_optimizer_state_and_chains():
    params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
    t = jaxqp.chain(jaxqp.transform([Rule("w", prune=PruneSpec(sparsity=0.5))]),
                    jaxqp.transform([Rule("w", quant=QuantSpec(bits=8, axis=None))]))
    opt_state = jaxqp.wrap(optax.sgd(0.1), t).init(params)
    (row,) = jaxqp.summary(params, opt_state).rows
    assert row["bits"] == 8 and row["sparsity"] == 0.5
    assert row["bytes_compressed"] == min(16, 2 + 8) + 4


def test_summary_errors():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="no jaxqp state found"):
        jaxqp.summary(params, {})
    state = jaxqp.transform([]).init(params)
    with pytest.raises(ValueError, match="another tree"):
        jaxqp.summary({"v": jnp.ones((2, 2))}, state)
