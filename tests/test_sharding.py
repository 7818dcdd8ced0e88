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


@pytest.fixture(scope="module")
def rows():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_layout_and_config_ran(rows):
    assert {(r["layout"], r["config"]) for r in rows} == {
        (layout, config) for layout in ("dp", "tp", "fsdp", "2d") for config in TOLERANCE}


@pytest.mark.slow
def test_sharded_training_equals_unsharded(rows):
    for r in rows:
        assert r["masks_equal"], r
        assert r["max_abs_diff"] <= TOLERANCE[r["config"]], r


@pytest.mark.slow
def test_masks_follow_their_parameters_sharding(rows):
    for r in rows:
        assert r["not_following"] == [] and r["init_not_following"] == [], r


@pytest.mark.slow
def test_no_parameter_sized_collective_beyond_float_training(rows):
    for r in rows:  # all-gathers, all-reduces... of at least a kernel shard that the float step lacks
        assert r["collectives_extra"] == [], r


@pytest.mark.slow
def test_state_is_small_per_device(rows):
    for r in rows:  # masks are packed 8 per byte and sharded like their parameters
        assert r["state_bytes_per_device_ratio"] <= 0.04, r


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
