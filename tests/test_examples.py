"""Examples run in quick mode and do what their docstrings say."""

import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_nnx_quickstart_quick(capsys):
    accuracy, params, state, served_accuracy = load("nnx_quickstart").main(["--quick"])
    assert accuracy > 0.85  # 90.3% measured: 60 steps already learn digits with a 90%-sparse int8 layer
    assert abs(served_accuracy - accuracy) <= 0.02  # int8 serving: the same model up to input rounding
    mask = np.asarray(state.masks["l1/kernel"])
    kernel = np.asarray(params["l1"]["kernel"][...])
    assert (~mask).sum() == round(0.9 * mask.size) and np.all(kernel[~mask] == 0.0)
    assert "l2/kernel" not in state.masks
    assert "l1/kernel" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("refresh", ["in_update", "separate"])
def test_prune_cnn_quick(capsys, refresh):
    accuracy, params, state = load("prune_cnn").main(["--quick", "--refresh", refresh])
    assert accuracy > 0.9  # 95.6% measured with half the filters and 60% of the neurons gone
    filters = np.asarray(state.masks["Conv_0/kernel"]).any(axis=(0, 1, 2))
    neurons = np.asarray(state.masks["Dense_0/kernel"]).any(axis=0)
    assert filters.sum() == 16 and neurons.sum() == 40
    assert np.all(np.asarray(params["Conv_0"]["kernel"])[..., ~filters] == 0.0)
    assert np.all(np.asarray(params["Dense_0"]["bias"])[~neurons] == 0.0)
    assert "Conv_0/kernel" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_qat_cnn_mnist1d_quick(capsys):
    accuracy = load("qat_cnn_mnist1d").main(["--quick"])
    assert accuracy > 0.35  # 43% measured: 60 steps of w4a8 QAT on 1600 signals, 4x chance (10%)
    out = capsys.readouterr().out
    assert "input of Conv_0/kernel" in out and "Dense_1/kernel" in out


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_nnx_transformer_text_quick(capsys):
    module = load("nnx_transformer_text")
    _, _, vocab = module.load_text()
    test_loss = module.main(["--quick", "--time"])
    assert test_loss < 0.8 * np.log(vocab)  # learned something beyond the uniform guess
    out = capsys.readouterr().out
    assert "bits/char" in out and "w8a8-int" in out


@pytest.mark.slow
@pytest.mark.standard_promotion
@pytest.mark.parametrize("bits,forms", [(8, "halves, halves"), (7, "u8s8, u8s8")])
def test_deploy_onnx_quick(capsys, bits, forms):
    pytest.importorskip("onnxruntime")
    accuracy, onnx_logits, jax_logits, _ = load("deploy_onnx").main(["--quick", "--bits", str(bits)])
    assert accuracy > 0.85  # 60 steps of int8 + 80% pruning already learn digits
    np.testing.assert_array_equal(onnx_logits, jax_logits)
    out = capsys.readouterr().out
    assert f"2 MatMulInteger nodes, forms: {forms}" in out and "bit for bit: True" in out


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_deploy_litert_quick(capsys):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("litert_converter")
    logits, jax_logits, labels = load("deploy_litert").main(["--quick"])
    builtin, xnnpack = logits["builtin kernels"], logits["XNNPACK"]
    assert np.mean(builtin.argmax(-1) == labels) > 0.85
    np.testing.assert_allclose(builtin, jax_logits, rtol=1e-5, atol=1e-4 * np.abs(jax_logits).max())
    assert np.mean(xnnpack.argmax(-1) == jax_logits.argmax(-1)) > 0.98  # its own activation codes
    assert "FULLY_CONNECTED" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_choose_bits_quick(capsys, tmp_path):
    sens, chosen, results = load("choose_bits").main(["--quick", "--plots", str(tmp_path)])
    budget = sens.uniform("w3")[0]
    assert chosen.bytes <= budget and results["allocated"]["stored"] == chosen.bytes
    assert results["uniform w3"]["stored"] == budget
    assert len(sens.layers) == 5 and (tmp_path / "sensitivity.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "budget:" in out and "Spearman" in out


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_equinox_qat_quick(capsys):
    pytest.importorskip("equinox")
    accuracy, params, state, packed, served_accuracy = load("equinox_qat").main(["--quick"])
    assert accuracy > 0.8  # 89.4% measured after 60 steps, 80% sparse w8a8
    assert abs(served_accuracy - accuracy) <= 0.02  # int8 serving: the same model up to input rounding
    for i in range(3):
        mask = np.asarray(state.mask(f"layers/{i}/weight"))
        assert (~mask).sum() == round(0.8 * mask.size)
        assert np.all(np.asarray(params.layers[i].weight)[~mask] == 0.0)
        assert packed.layers[i].weight.scale.shape == (mask.shape[0], 1)  # one scale per output row
    out = capsys.readouterr().out
    assert "layers/1/weight" in out
    if importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime"):  # CI installs the extra
        assert "largest difference from jaxqp's integer path 0\n" in out  # ONNX Runtime: bit for bit


@pytest.mark.parametrize("name,argv,message", [
    ("deploy_onnx", ["--out", "/nonexistent-folder/model.onnx"], "--out '/nonexistent-folder/model.onnx': give a file"),
    ("deploy_litert", ["--out", "."], "--out '.': give a file path in an existing folder"),
    ("choose_bits", ["--plots", __file__], "is a file; give a folder"),
])
def test_examples_refuse_an_unwritable_output_before_training(capsys, name, argv, message):
    with pytest.raises(SystemExit):
        load(name).main(argv)
    assert message in capsys.readouterr().err
