"""The measured choice of a matmul's path: the decision logic, its cache, and describe()."""

import json

import jax
import numpy as np
import pytest

import jaxqp
from jaxqp import QuantSpec, Rule
from jaxqp.numerics import _path_choice as pc


def test_choose_picks_the_fastest_and_breaks_ties_by_order():
    assert pc.choose({"int8": 3.0, "int8_t": 2.0, "bf16": 2.5, "float": 4.0}) == "int8_t"
    assert pc.choose({"int8": 1.0, "bf16": 1.0}) == "int8"
    with pytest.raises(ValueError, match="no candidate timings"):
        pc.choose({})


@pytest.mark.parametrize("rows, bucket", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (4096, 4096)])
def test_row_buckets_are_powers_of_two(rows, bucket):
    assert pc.row_bucket(rows) == bucket


def test_machine_key_names_backend_cpu_flags_and_jax():
    key = pc.machine_key()
    assert key.startswith(jax.default_backend() + "|") and key.endswith(f"jax {jax.__version__}")
    assert set(pc.cpu_info()["flags"]) <= set(pc.CPU_FLAGS)


def fake_build(calls, fast):
    """Candidates that sleep: ``fast`` is quick, the others and the float reference slow."""
    import time

    def make(seconds):
        return lambda: time.sleep(seconds) or jax.numpy.zeros(())

    def build():
        calls.append(1)
        candidates = {name: make(0.0 if name == fast else 0.002) for name in ("int8", "bf16", "float")}
        return candidates, make(0.001)

    return build


def test_decide_measures_once_per_bucket_and_caches_on_disk(tmp_path, monkeypatch):
    cache = tmp_path / "paths.json"
    monkeypatch.setenv(pc.CACHE_ENV, str(cache))
    pc.clear_decisions()
    calls = []
    first = pc.decide("test-kind", (3, 5), 5, fake_build(calls, "bf16"))
    assert first.path == "bf16" and first.ratio < 1.0 and len(calls) == 1
    assert pc.decide("test-kind", (3, 5), 7, fake_build(calls, "int8")).path == "bf16"  # same bucket (8)
    assert len(calls) == 1
    assert pc.decide("test-kind", (3, 5), 9, fake_build(calls, "int8")).path == "int8"  # bucket 16: measured
    saved = json.loads(cache.read_text())
    assert {k.rsplit("|", 1)[1] for k in saved} == {"8", "16"}
    pc.clear_decisions()  # a new process: the disk cache decides, nothing is measured
    assert pc.decide("test-kind", (3, 5), 8, fake_build(calls, "float")).path == "bf16"
    assert len(calls) == 2
    pc.clear_decisions()


def test_describe_reports_bytes_paths_and_slower_than_float():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 96)), "b": jax.numpy.zeros(96)}
    t = jaxqp.transform([Rule("w", quant=QuantSpec(bits=4))])
    served = jaxqp.prepare(jaxqp.export(params, t.init(params)))
    report = jaxqp.serving.describe(served, rows=[1, 40])
    (row,) = report.rows
    assert row["bytes"] == 96 * 32 + 96 * 4 and report.served_bytes == row["bytes"] + 96 * 4
    assert set(row["paths"]) == {1, 64} and set(row["paths"].values()) <= set(jaxqp.serving.PATHS)
    for measured in row["measured"].values():
        assert measured["ratio"] > 0 and set(measured["ms"]) == set(jaxqp.serving.PATHS)
    assert "served bytes in memory" in str(report) and json.loads(report.to_json())["served_bytes"] > 0
    slow = [line for line in report.slower_than_float() if "keep_float=True" in line]
    assert len(slow) == sum(m["ratio"] > 1.0 for m in row["measured"].values())
    with pytest.raises(ValueError, match=r"rows=\[0\] must be positive"):
        jaxqp.serving.describe(served, rows=[0])
    pinned = jaxqp.prepare(jaxqp.export(params, t.init(params)), path="bf16")
    assert jaxqp.serving.describe(pinned, rows=[3]).rows[0]["paths"] == {4: "bf16"}
    assert np.isfinite(report.served_bytes)
