"""Sharding contract: masks follow their parameter's sharding; sharded step equals unsharded.

Runs tests/sharded_step.py in a subprocess, because the 2 host devices it needs must be
requested before JAX starts.
"""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharded_step.py")


@pytest.mark.slow
def test_sharded_training_step_equals_unsharded():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "sharded step equals unsharded" in proc.stdout
