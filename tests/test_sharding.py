"""Sharding contract on 8 simulated CPU devices: dp, tp, fsdp and a 2-D mesh, for w8a8, gradual
pruning + int8, 2:4 and global pruning, each against the same training on one device.

Runs tests/sharded_layouts.py in a subprocess, because the 8 host devices it needs must be
requested before JAX starts.
"""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharded_layouts.py")

# Largest |sharded - unsharded| of any parameter after 6 adam steps (lr 1e-2). Cross-shard sums
# (gradients over a data axis, matmuls over a split input axis) reorder float additions: float
# training itself moves by ~3e-7. Pruning adds no error of its own (masks are bit-equal). A
# reordered sum can move a dynamic int8 activation code by one, which changes that step's gradient
# by a quantization step (measured up to 4.3e-5 for w8a8); adam amplifies tiny gradient
# differences of the 2:4-masked layers (measured up to 9.2e-6).
TOLERANCE = {"float": 1e-6, "pruned80+int8": 1e-6, "global90": 1e-6, "nm2:4": 5e-5, "w8a8": 2e-4}


@pytest.mark.slow
def test_sharded_training_on_8_devices_equals_one_device():
    """One subprocess for every layout and config (a module fixture would run once per xdist worker)."""
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = [r for r in rows if "check" in r]
    assert checks == [{"check": "masks_on_the_same_weights",
                       "equal": {"0.5": True, "0.8": True, "0.9": True, "nm2:4": True}},
                      {"check": "separate_refresh_on_sharded_weights", "params_equal": True, "masks_equal": True,
                       "kernel_zeros": [round(0.7 * 64 * 256), round(0.7 * 256 * 32)], "params_resharded": [],
                       "not_following": []}]
    rows = [r for r in rows if "check" not in r]
    assert {(r["layout"], r["config"]) for r in rows} == {
        (layout, config) for layout in ("dp", "tp", "fsdp", "2d") for config in TOLERANCE}
    for r in rows:
        assert r["masks_equal"], r  # bit for bit
        assert r["max_abs_diff"] <= TOLERANCE[r["config"]], r
        assert r["not_following"] == [] and r["init_not_following"] == [], r  # masks sharded like params
        assert r["collectives_extra"] == [], r  # no collective of a kernel shard's size beyond float's
        assert r["state_bytes_per_device_ratio"] <= 0.04, r  # packed masks, sharded like their params


@pytest.mark.slow
def test_sharded_qat_example_quick():
    example = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sharded_qat.py"
    proc = subprocess.run([sys.executable, str(example), "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "same masks as on one device: True" in proc.stdout
    assert "l1/kernel: kernel P(None, 'model'), packed mask P(None, 'model')" in proc.stdout


@pytest.mark.slow
def test_tensor_parallel_int8_serving_equals_one_device():
    script = pathlib.Path(__file__).with_name("sharded_serving.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["path"]: r for r in map(json.loads, filter(lambda line: line.startswith("{"), proc.stdout.splitlines()))}
    assert rows["int8"]["max_abs_diff"] == 0.0  # int32 sums over split inputs are exact in any order
    assert rows["auto"]["max_abs_diff"] <= 1e-5  # a layer measured faster as float reorders float sums
    assert rows["int8"]["codes_sharding"] == "P('model',)" and rows["int8"]["out_devices"] == 8
