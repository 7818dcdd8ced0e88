"""Training resumes from an orbax checkpoint bit for bit (issue 14): pruning schedule, int8, static ranges.

The run stops halfway through a gradual pruning schedule with static-range (EMA) activation
quantization, saves ``params`` and the ``jaxqp.wrap`` optimizer state with orbax's
``StandardCheckpointer``, and a fresh Python process restores them into the abstract tree of
a fresh ``tx.init(params)`` and trains on. Its result equals the uninterrupted run's, leaf by leaf.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import jaxqp

ocp = pytest.importorskip("orbax.checkpoint")
sys.path.insert(0, os.path.dirname(__file__))
import _resume  # noqa: E402

N = 5


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("freeze_at", [None, 3], ids=["pruning", "frozen-before-the-stop"])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, freeze_at):
    params, tx, run = _resume.setup(freeze_at)
    straight = run(params, tx.init(params), 0, 2 * N)
    half_params, half_state = run(params, tx.init(params), 0, N)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": half_params, "opt_state": half_state})
    checkpointer.wait_until_finished()
    out = tmp_path / "resumed.npz"
    subprocess.run([sys.executable, _resume.__file__, str(tmp_path / "ckpt"), str(out), str(N), str(freeze_at)],
                   check=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    resumed = np.load(out)
    want = _resume.leaves({"params": straight[0], "opt_state": straight[1]})
    assert sorted(resumed.files) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    pruned = lambda opt_state: 1 - np.mean(np.concatenate([np.asarray(m).ravel()
                                                           for m in jaxqp.state_of(opt_state).masks.values()]))
    if freeze_at is None:
        assert 0.2 < pruned(half_state) < 0.75 and pruned(straight[1]) == pytest.approx(0.8, abs=0.01)  # mid-way
    else:
        assert pruned(straight[1]) == pruned(half_state) < 0.75  # frozen before the stop: it stayed frozen
    assert any("ranges" in k for k in want)  # the EMA ranges went through the checkpoint too
