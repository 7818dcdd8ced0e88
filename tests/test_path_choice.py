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


def _mlp_served(path="auto"):
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32)(nn.relu(nn.Dense(48)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), jax.numpy.ones((1, 16)))["params"]
    t = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))])
    return model, jaxqp.prepare(jaxqp.export(params, t.init(params)), path=path)


def _bf16_timed_fastest(monkeypatch) -> list:
    """Clears the decisions and fakes every timing: "bf16" fastest. Returns the list of what was timed."""
    pc.clear_decisions()
    timed = []

    def fake_time(fns, **timing):
        timed.append(sorted(fns))
        return {name: (1.0 if name == "bf16" else 2.0) for name in fns}

    monkeypatch.setattr(pc, "time_candidates", fake_time)
    return timed


def test_whole_model_choice_takes_the_fastest_policy_and_caches_it(monkeypatch):
    """The model is timed once per signature under every policy; the fastest policy's path
    is the one every auto kernel then takes, and traces made while timing are not recorded."""
    from jaxqp.serving import _model_choice

    timed = _bf16_timed_fastest(monkeypatch)
    model, served = _mlp_served()
    apply = jaxqp.linen_serving_apply(model)
    x = jax.numpy.ones((3, 16))
    with pc.record_paths() as used:
        y = jax.jit(apply)(served, x)
    model_timings = [names for names in timed if "auto" in names]
    assert model_timings == [sorted([*_model_choice.MODEL_POLICIES, "_float"])]  # the model, once
    assert [u["path"] for u in used] == ["bf16", "bf16"]  # the two Dense layers, not the timing traces
    assert [d.path for k, d in pc.decisions().items() if "|model|" in k] == ["bf16"]
    report = jaxqp.serving.describe(served)  # the choice that overrides the per-layer rows is shown too
    assert [(m["rows"], m["policy"]) for m in report.models] == [(4, "bf16")]  # 3 rows: bucket 4
    assert "whole model MLP:" in str(report) and "at 4 rows: bf16 for every auto kernel" in str(report)
    with pc.record_paths() as used:
        jax.jit(lambda s, x: apply(s, x))(served, x)  # traced again: the cached decision, no timing
    assert len([names for names in timed if "auto" in names]) == 1 and len(used) == 2
    # same bits as the path pinned
    _, pinned = _mlp_served("bf16")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(apply)(pinned, x)))
    pc.clear_decisions()


def test_whole_model_choice_skips_pinned_models_and_can_be_turned_off(monkeypatch):
    from jaxqp.serving import _model_choice

    calls = []
    monkeypatch.setattr(_model_choice, "decide", lambda *a, **k: calls.append(a) or pc.Decision("int8", {}, 1.0))
    model, pinned = _mlp_served("int8")
    jax.jit(jaxqp.linen_serving_apply(model))(pinned, jax.numpy.ones((2, 16)))
    _, auto = _mlp_served()
    jax.jit(jaxqp.linen_serving_apply(model, measure_model=False))(auto, jax.numpy.ones((2, 16)))
    assert calls == []
    jax.jit(jaxqp.linen_serving_apply(model))(auto, jax.numpy.ones((2, 16)))
    assert len(calls) == 1 and calls[0][0] == "model"


def _nnx_served(path="auto"):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.norm = nnx.Linear(16, 48, rngs=rngs), nnx.BatchNorm(48, use_running_average=True, rngs=rngs)
            self.l2 = nnx.Linear(48, 32, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.norm(self.l1(x))))

    graphdef, params, stats = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    t = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))])
    return graphdef, jaxqp.prepare(jaxqp.export(params, t.init(params)), path=path), stats


def test_nnx_serving_apply_times_the_whole_model_like_linen(monkeypatch):
    """The functional NNX form gets the whole-model choice: timed once, every auto kernel then on the
    fastest policy, the same bits as that path pinned; pinned states and measure_model=False skip it."""
    from jaxqp.serving import _model_choice, nnx_serving_apply, nnx_serving_model

    timed = _bf16_timed_fastest(monkeypatch)
    graphdef, served, stats = _nnx_served()
    apply = nnx_serving_apply(graphdef)
    x = jax.numpy.ones((3, 16))
    with pc.record_paths() as used:
        y = jax.jit(apply)((served, stats), x)
    assert [names for names in timed if "auto" in names] == [sorted([*_model_choice.MODEL_POLICIES, "_float"])]
    assert [u["path"] for u in used] == ["bf16", "bf16"]
    assert [(k.split("|")[-3], d.path) for k, d in pc.decisions().items() if "|model|" in k] == [("model", "bf16")]
    assert any("nnx:MLP" in k for k in pc.decisions())
    _, pinned, _ = _nnx_served("bf16")
    reference = jax.jit(lambda s, b, x: nnx_serving_model(graphdef, s, b)(x))(pinned, stats, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(reference))
    calls = []
    monkeypatch.setattr(_model_choice, "decide", lambda *a, **k: calls.append(a) or pc.Decision("int8", {}, 1.0))
    jax.jit(apply)((pinned, stats), x)  # every kernel pinned: nothing to choose
    jax.jit(nnx_serving_apply(graphdef, measure_model=False))((served, stats), x)
    assert calls == []
    with pytest.raises(TypeError, match=r"nnx_serving_apply: graphdef must be the model's nnx\.GraphDef"):
        nnx_serving_apply(served)
    pc.clear_decisions()


def test_cpu_heuristics_are_not_assumed_on_another_backend(monkeypatch):
    """Row padding was measured on CPU only; a decision made on one backend is never reused on another."""
    from jaxqp.numerics import _int_dot

    assert _int_dot.min_rows("cpu") == _int_dot.MIN_ROWS == 4 and _int_dot.min_rows("gpu") == 1
    x = jax.numpy.ones((1, 8))
    cpu_rows, _ = _int_dot.padded_rows(x, 8)
    cpu_key = pc._key("dense-int8", (8, 8), 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    pc.machine_key.cache_clear()
    try:
        gpu_rows, n = _int_dot.padded_rows(x, 8)
        gpu_key = pc._key("dense-int8", (8, 8), 1)
    finally:
        monkeypatch.undo()
        pc.machine_key.cache_clear()
    assert cpu_rows.shape == (4, 8) and gpu_rows.shape == (1, 8) and n == 1
    assert gpu_key.startswith("gpu|") and gpu_key != cpu_key


def test_a_candidate_that_cannot_run_here_is_never_chosen():
    # XLA's CPU runtime lacks some dot kernels for some shapes and shardings: measuring must not crash.
    from jaxqp.numerics import _path_choice as pc

    def broken():
        raise RuntimeError("UNIMPLEMENTED: Unsupported element type for DotThunk::Execute")

    ok = lambda: jax.numpy.ones(3) * 2.0
    seconds = pc.time_candidates({"bf16": broken, "int8": ok}, rounds=2, min_round_s=1e-4)
    assert seconds["bf16"] == float("inf") and 0 < seconds["int8"] < float("inf")
    assert pc.choose(seconds) == "int8"
    with pytest.raises(RuntimeError, match="DotThunk"):  # nothing runs: the first error, not a silent pick
        pc.time_candidates({"bf16": broken, "int8_t": broken}, rounds=2, min_round_s=1e-4)
    pc.clear_decisions()
    with pytest.raises(RuntimeError, match="no candidate path of test-kind"):
        pc.decide("test-kind", (3,), 1, lambda: ({"bf16": broken}, ok), rounds=2, min_round_s=1e-4)
    pc.clear_decisions()
