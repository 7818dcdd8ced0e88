"""The public surface: sorted __all__ equal to the API reference, and 0.1 names as deprecated aliases."""

import inspect
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

import jaxqp
import jaxqp.deploy
import jaxqp.numerics
import jaxqp.serving
from jaxqp import _deprecated

API_DOC = (pathlib.Path(__file__).parents[1] / "docs" / "api.md").read_text()

# jaxqp 0.1.0's top-level __all__ (81 names), frozen: each must still resolve in 0.2.
NAMES_0_1 = [
    "ActSpec", "Blocks", "Channels", "Fp8Array", "GeneralKernel", "Int8Linear", "LeafPlan", "NM", "NMArray",
    "ParamTransform", "Plan", "Pow2Array", "PruneSpec", "QArray", "QuantSpec", "QuantizedInput", "RigL", "Rule",
    "Schedule", "ServingKernel", "SparseArray", "Summary", "TransformState", "WrapState", "affine_scale",
    "apply_mask", "binary", "block_mask", "calibrate", "chain", "channel_mask", "constant", "dequantize",
    "expand_groups", "export", "export_serving", "fake_quant", "fake_quant_weight", "fp8_round", "freeze_masks",
    "global_magnitude_masks", "group_view", "init_step", "int8_matmul", "int8_matmul_general", "int_bounds",
    "int_range", "iterative", "linen_apply", "linen_serving_apply", "load", "load_serving", "lsq",
    "lsq_grad_scale", "magnitude_mask", "mse_range", "nm_mask", "nnx_apply", "nnx_serving_model",
    "observe_range", "one_shot", "pact", "polynomial", "pow2_ceil", "pow2_values", "prepare", "quantize_input",
    "resolve", "rewind", "save", "scale_from_range", "state_of", "stochastic_round", "straight_through",
    "summary", "symmetric_scale", "threshold_mask", "transform", "weight_codes", "weight_quantizer", "wrap",
]


def isort_key(name: str):
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


MODULES = [jaxqp, jaxqp.numerics, jaxqp.serving, jaxqp.deploy, jaxqp.choose]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_is_sorted_and_unique(module):
    assert module.__all__ == sorted(set(module.__all__), key=isort_key)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_equals_the_api_reference(module):
    prefix = re.escape(module.__name__ + ".")
    documented = set(re.findall(rf"^::: {prefix}(\w+)$", API_DOC, re.M))
    documented |= set(re.findall(rf"^`{prefix}(\w+)`:", API_DOC, re.M))  # constants, described inline
    submodules = {"choose", "deploy", "numerics", "serving"} if module is jaxqp else set()
    assert documented - submodules == set(module.__all__) - submodules
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_core_api_is_small():
    assert len(jaxqp.__all__) <= 50 and len(NAMES_0_1) == 81


@pytest.mark.parametrize("name", sorted(set(NAMES_0_1) - set(jaxqp.__all__)))
def test_moved_names_warn_and_resolve(name):
    with pytest.warns(DeprecationWarning, match=rf"jaxqp\.{name} is deprecated since jaxqp 0\.2"):
        value = getattr(jaxqp, name)
    if name in jaxqp.numerics.__all__:
        assert value is getattr(jaxqp.numerics, name)
    elif name in jaxqp.serving.__all__:
        assert value is getattr(jaxqp.serving, name)
    else:
        assert name in ("QuantizedInput", "init_step", "weight_codes", "weight_quantizer", "int_bounds")
        assert callable(value)


def test_every_0_1_name_still_resolves_and_only_moved_ones_warn():
    assert set(NAMES_0_1) - set(jaxqp.__all__) == set(_deprecated.NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a core name must not warn
        for name in jaxqp.__all__:
            getattr(jaxqp, name)


def test_int_bounds_alias_keeps_its_0_1_defaults():
    with pytest.warns(DeprecationWarning, match="int_range"):
        int_bounds = jaxqp.int_bounds
    assert int_bounds(8) == jaxqp.numerics.int_range(8, narrow=True) == (-127, 127)
    assert int_bounds(8, symmetric=False) == (-128, 127)
    assert int_bounds(4, signed=False, symmetric=False) == (0, 15)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        jaxqp.not_a_name  # noqa: B018


@pytest.mark.slow  # starts an interpreter
def test_numerics_never_imports_flax():
    """The numerics layer stays free of Flax and of the layers above it (docs/design.md).

    ``import jaxqp.numerics`` runs ``jaxqp/__init__.py``, which imports the Flax adapters, so the
    check loads ``jaxqp/numerics/`` as a package of its own in a fresh interpreter.
    """
    out = subprocess.run([sys.executable, "-c", _NUMERICS_ONLY], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# Imports jaxqp/numerics/*.py as a package of its own, without running jaxqp/__init__.py.
_NUMERICS_ONLY = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location(
    "numerics_alone", {str(pathlib.Path(jaxqp.numerics.__file__))!r},
    submodule_search_locations=[{str(pathlib.Path(jaxqp.numerics.__file__).parent)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["numerics_alone"] = module
spec.loader.exec_module(module)
print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'))
"""


def public_objects():
    for module in (jaxqp, jaxqp.numerics, jaxqp.serving):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not inspect.ismodule(obj):
                yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("name,obj", list(public_objects()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_docstrings_have_google_sections(name, obj):
    """Every public class documents its fields, every public function its arguments and result."""
    doc = inspect.getdoc(getattr(obj, "__wrapped__", obj)) or inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        assert "Attributes:" in doc or "Args:" in doc, name
        return
    signature = inspect.signature(getattr(obj, "__wrapped__", obj))
    if signature.parameters:
        assert "Args:" in doc, name
        for parameter in signature.parameters:
            assert re.search(rf"^\s+\*{{0,2}}{parameter}:", doc, re.M), f"{name}: Args does not name {parameter}"
    if signature.return_annotation not in (None, "None", inspect.Signature.empty):
        assert "Returns:" in doc, name


def test_to_onnx_moved_to_deploy_in_0_3():
    moved = r"jaxqp\.to_onnx is deprecated since jaxqp 0\.3.*jaxqp\.deploy\.to_onnx"
    with pytest.warns(DeprecationWarning, match=moved):
        value = jaxqp.to_onnx
    assert value is jaxqp.deploy.to_onnx
