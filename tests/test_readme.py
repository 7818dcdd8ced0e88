"""The README's quickstart runs as written and does what it says."""

import pathlib
import re

import numpy as np
import pytest

import jaxqp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # trains or serves a whole model
@pytest.mark.standard_promotion  # the quickstart runs optax's adam
def test_quickstart_and_export_run_as_written(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the export snippet writes model.jaxqp
    quickstart, export_snippet = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    exec(compile(quickstart, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "Dense_0/kernel" in out and "total" in out
    state = jaxqp.state_of(namespace["opt_state"])
    assert int(state.step) == 200
    for layer in ("Dense_0", "Dense_1"):
        kernel = np.asarray(namespace["params"][layer]["kernel"])
        assert np.count_nonzero(kernel == 0.0) == round(0.8 * kernel.size)
    assert float(namespace["loss"]) < 0.1
    exec(compile(export_snippet, str(README), "exec"), namespace)
    assert (tmp_path / "model.jaxqp").exists() and (tmp_path / "model.tflite").exists()
    assert namespace["logits"].shape == (256, 10)


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block == ['python -m pip install -e ".[examples]" && python -m jaxqp.demo',
                     'python -m pip install -e ".[test]" && python -m pytest -q']
    ci = (README.parent / ".ci" / "run").read_text()
    assert block[1] in ci
