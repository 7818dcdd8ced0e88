"""Bad inputs get a clear error naming the parameter path and the fix, before any work is done (issue 14).

Each class of mistake: a rule that matches an empty leaf, a state made for another tree, a
gradient criterion advanced without gradients, and bytes that are not a serialized model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxqp
from jaxqp import ActSpec, PruneSpec, QuantSpec, RigL, Rule


@pytest.mark.parametrize("spec", [{"prune": PruneSpec(sparsity=0.5)}, {"quant": QuantSpec(bits=8)},
                                  {"prune": PruneSpec(sparsity=0.5), "quant": QuantSpec(bits=4)},
                                  {"act": ActSpec(bits=8)}], ids=["prune", "quant", "both", "act"])
def test_a_rule_matching_a_zero_size_leaf_names_it(spec):
    params = {"empty": {"kernel": jnp.ones((0, 4))}, "full": {"kernel": jnp.ones((4, 4))}}
    t = jaxqp.transform([Rule(".*kernel", **spec)])
    with pytest.raises(ValueError, match=r"matches 'empty/kernel' of shape \(0, 4\).*holds no values.*skips"):
        t.init(params)
    # the fix the message gives: an exclusion rule first
    state = jaxqp.transform([Rule("empty/.*"), Rule(".*kernel", **spec)]).init(params)
    assert state.plan.by_path()["empty/kernel"].quant is None


def test_global_pruning_over_a_zero_size_leaf_names_it():
    params = {"a": jnp.ones((0, 3)), "b": jnp.arange(12.0).reshape(3, 4)}
    with pytest.raises(ValueError, match=r"'a' of shape \(0, 3\).*holds no values"):
        jaxqp.transform([Rule(".*", prune=PruneSpec(sparsity=0.5, scope="global"))]).init(params)


class _Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.Dense(8, name="body")(x))


def test_linen_apply_refuses_a_state_made_for_another_tree():
    model, x = _Two(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    t = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8), act=ActSpec(bits=8))])
    other = {"body": params["body"]}  # a state for a tree that lacks the head
    state = t.init(other)
    with pytest.raises(ValueError, match=r"linen_apply: params do not match.*missing from params: \[\].*"
                                         r"not in the state: \['head/bias', 'head/kernel'\]"):
        jaxqp.linen_apply(model, state, {"params": params}, x)
    with pytest.raises(TypeError, match="linen_apply: state must be the jaxqp state returned by t.init"):
        jaxqp.linen_apply(model, params, {"params": params}, x)
    out, _ = jaxqp.linen_apply(model, t.init(params), {"params": params}, x)  # the right state works
    assert out.shape == (2, 3)


def test_nnx_apply_refuses_a_state_made_for_another_model():
    class Net(nnx.Module):
        def __init__(self, width, rngs):
            self.a = nnx.Linear(4, width, rngs=rngs)

        def __call__(self, x):
            return self.a(x)

    t = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8), act=ActSpec(bits=8))])
    wide, narrow = Net(8, nnx.Rngs(0)), Net(6, nnx.Rngs(0))
    state = t.init(nnx.state(narrow, nnx.Param))
    with pytest.raises(ValueError, match=r"nnx_apply: params leaf 'a/bias' has shape \(8,\) but the jaxqp "
                                         r"state was made for shape \(6,\)"):
        jaxqp.nnx_apply(wide, state, jnp.ones((2, 4)))


@pytest.mark.parametrize("prune,what", [
    (PruneSpec(sparsity=0.5, criterion="movement"), "'movement'"),
    (PruneSpec(sparsity=0.5, criterion="saliency"), "'saliency'"),
    (PruneSpec(sparsity=0.5, regrow=RigL(every=1, drop_fraction=0.1, end=10)), r"RigL\(grow='gradient'\)"),
])
def test_a_gradient_criterion_without_gradients_says_so(prune, what):
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    t = jaxqp.transform(Rule("w", prune=prune))
    state = t.init(params)
    with pytest.raises(ValueError, match=rf"'w' is pruned by {what}, which needs gradients.*grads=grads"):
        t.update(params, state)
    moved = t.update(params, state, grads={"w": jnp.ones((8, 8))})  # with gradients it advances
    assert int(moved.step) == 1


@pytest.mark.parametrize("blob", [b"", b"hello", bytes(range(256)) * 4, "half", "flipped"])
def test_load_serving_of_foreign_bytes_is_a_value_error(blob):
    good = jaxqp.export_serving(lambda x: 2 * x, jnp.ones(3))
    if blob == "half":
        blob = good[: len(good) // 2]
    elif blob == "flipped":  # parses as a container, but its StableHLO is corrupt
        blob = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]
    with pytest.raises(ValueError, match=r"load_serving: these \d+ bytes are not a function serialized by "
                                         r"jaxqp\.export_serving"):
        jaxqp.load_serving(blob)
    with pytest.raises(TypeError, match="load_serving: blob must be the bytes"):
        jaxqp.load_serving(np.zeros(3))
    np.testing.assert_array_equal(jaxqp.load_serving(good)(jnp.ones(3)), 2 * np.ones(3))


def _exported():
    params = {"l1": {"kernel": jnp.ones((4, 8))}}
    return params, jaxqp.export(params, jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))]).init(params))


def test_save_and_load_refuse_folders_before_writing(tmp_path):
    _, exported = _exported()
    with pytest.raises(ValueError, match=r"jaxqp\.save: '.*' is a folder; give a file path inside it, e\.g\. "
                                         r"'.*model\.jaxqp'"):
        jaxqp.save(tmp_path, exported)
    with pytest.raises(ValueError, match=r"jaxqp\.save: the folder of '.*x\.jaxqp' does not exist .*os\.makedirs"):
        jaxqp.save(tmp_path / "missing" / "x.jaxqp", exported)
    with pytest.raises(ValueError, match=r"jaxqp\.load\('.*'\): is a folder; give the file jaxqp\.save wrote"):
        jaxqp.load(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    jaxqp.save(tmp_path / "x.jaxqp", exported)  # the fix
    assert [p.name for p in tmp_path.iterdir()] == ["x.jaxqp"]


@pytest.mark.parametrize("exporter,suffix", [("to_onnx", ".onnx"), ("to_litert", ".tflite")])
def test_exporters_refuse_a_bad_file_or_function_before_tracing(tmp_path, exporter, suffix):
    export = getattr(jaxqp.deploy, exporter)
    traced = []

    def apply(p, x):
        traced.append(True)
        return x @ p["w"]

    params = {"w": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match=rf"jaxqp\.deploy\.{exporter}: '.*' is a folder; .*model\{suffix}"):
        export(apply, params, jnp.ones((1, 4)), file=tmp_path)
    with pytest.raises(ValueError, match=rf"jaxqp\.deploy\.{exporter}: the folder of .* does not exist"):
        export(apply, params, jnp.ones((1, 4)), file=tmp_path / "missing" / f"m{suffix}")
    with pytest.raises(TypeError, match=rf"jaxqp\.deploy\.{exporter}: apply_fn must be the serving function.*"
                                        "got NoneType"):
        export(None, params, jnp.ones((1, 4)))
    assert traced == [] and list(tmp_path.iterdir()) == []


def test_freeze_masks_of_a_tree_without_state_is_an_error():
    params = {"w": jnp.arange(1.0, 5.0)}
    with pytest.raises(ValueError, match=r"jaxqp\.freeze_masks: no jaxqp state found"):
        jaxqp.freeze_masks(params)
    state = jaxqp.transform([Rule("w", prune=PruneSpec(sparsity=0.5))]).init(params)
    assert bool(jaxqp.freeze_masks(state).frozen)
    # before: a state that prunes nothing was "frozen" silently, and frozen="yes" was taken as True
    quantized = jaxqp.transform([Rule("w", quant=QuantSpec(bits=8))]).init(params)
    with pytest.raises(ValueError, match=r"freeze_masks: no rule of this state prunes, so there is no mask"):
        jaxqp.freeze_masks(quantized)
    with pytest.raises(TypeError, match=r"freeze_masks: frozen must be a bool .* got 'yes'"):
        jaxqp.freeze_masks(state, frozen="yes")
    assert not bool(jaxqp.freeze_masks(state, jnp.array(False)).frozen)


def test_rewind_with_a_state_that_prunes_nothing_is_an_error():
    params = {"w": jnp.arange(1.0, 5.0)}
    quantized = jaxqp.transform([Rule("w", quant=QuantSpec(bits=8))]).init(params)
    with pytest.raises(ValueError, match=r"rewind: the state holds no pruning mask .* unchanged"):
        jaxqp.rewind(params, quantized)
    pruned = jaxqp.transform([Rule("w", prune=PruneSpec(sparsity=0.5))]).init(params)
    np.testing.assert_array_equal(jaxqp.rewind(params, pruned)["w"], [0.0, 0.0, 3.0, 4.0])


def test_serving_functions_refuse_what_prepare_did_not_make():
    params, exported = _exported()
    with pytest.raises(TypeError, match=r"int8_matmul: kernel must be a ServingKernel from jaxqp\.prepare"):
        jaxqp.serving.int8_matmul(jnp.ones((2, 4)), params["l1"]["kernel"])
    with pytest.raises(TypeError, match=r"int8_matmul_general: kernel must be a GeneralKernel"):
        jaxqp.serving.int8_matmul_general(jnp.ones((2, 4)), exported["l1"]["kernel"], 1)
    with pytest.raises(ValueError, match=r"describe: \['l1'\]\['kernel'\] is a QArray, not a served kernel; "
                                         r"describe jaxqp\.prepare\(tree\)"):
        jaxqp.serving.describe(exported)
    assert "['l1']['kernel']" in str(jaxqp.serving.describe(jaxqp.prepare(exported)))
    with pytest.raises(TypeError, match=r"nnx_serving_model: graphdef must be the model's nnx\.GraphDef"):
        jaxqp.nnx_serving_model(None, exported)


def test_serving_an_export_that_was_not_prepared_names_the_leaf():
    # before: "Could not convert QArray(...)" from flax (linen), "'QArray' object is not
    # subscriptable" when the NNX model was called
    model, x = _Two(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    exported = jaxqp.export(params, jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))]).init(params))
    apply = jaxqp.linen_serving_apply(model)
    for serve in (apply, jax.jit(apply)):
        with pytest.raises(ValueError, match=r"linen_serving_apply: 'body/kernel' is a QArray, not a served "
                                             r"kernel; serve jaxqp\.prepare\(exported\)"):
            serve(exported, x)
    assert apply(jaxqp.prepare(exported), x).shape == (2, 3)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.body = nnx.Linear(4, 8, rngs=rngs)

        def __call__(self, x):
            return self.body(x)

    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    nnx_exported = jaxqp.export(state, jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))]).init(state))
    with pytest.raises(ValueError, match=r"nnx_serving_model: 'body/kernel' is a QArray, not a served kernel"):
        jaxqp.nnx_serving_model(graphdef, nnx_exported)
    assert jaxqp.nnx_serving_model(graphdef, jaxqp.prepare(nnx_exported))(x).shape == (2, 8)


def test_prepare_refuses_a_pin_that_would_do_nothing_and_a_negative_size():
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
    asymmetric = jaxqp.export(params, jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8, symmetric=False))])
                              .init(params))
    # before: path="int8" was accepted and every kernel decoded to float all the same
    with pytest.raises(ValueError, match=r"prepare: path='int8' pins the kernels served from codes, but this tree "
                                         r"has none"):
        jaxqp.prepare(asymmetric, path="int8")
    assert isinstance(jaxqp.prepare(asymmetric)["a"]["kernel"], jax.Array)  # auto decodes them, as documented
    symmetric = jaxqp.export(params, jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))]).init(params))
    with pytest.raises(ValueError, match=r"prepare: min_int_size=-1 must be >= 0"):
        jaxqp.prepare(symmetric, min_int_size=-1)
    assert jaxqp.prepare(symmetric, path="int8")["a"]["kernel"].path == "int8"


def test_equinox_serving_model_refuses_a_model_that_is_not_a_module():
    pytest.importorskip("equinox")
    _, exported = _exported()
    with pytest.raises(TypeError, match=r"equinox_serving_model: model must be the Equinox model \(an eqx\.Module\)"):
        jaxqp.serving.equinox_serving_model({"l1": None}, exported)


def test_calibrate_refuses_nothing_to_calibrate():
    params = {"l1": {"kernel": jnp.ones((4, 8))}}
    forward = lambda state, x: (x, {})
    weights_only = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))]).init(params)
    with pytest.raises(ValueError, match=r"calibrate: no jaxqp state found"):
        jaxqp.calibrate(None, forward, [jnp.ones((2, 4))])
    with pytest.raises(ValueError, match=r"calibrate: nothing to calibrate: no rule of this state quantizes"):
        jaxqp.calibrate(weights_only, forward, [jnp.ones((2, 4))])
    with_inputs = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8),
                                        act=ActSpec(bits=8, range="static"))]).init(params)
    with pytest.raises(ValueError, match=r"calibrate: batches is empty"):
        jaxqp.calibrate(with_inputs, forward, iter([]))
    with pytest.raises(TypeError, match=r"calibrate: forward must be forward\(state, batch\)"):
        jaxqp.calibrate(with_inputs, None, [jnp.ones((2, 4))])


def test_functions_given_the_wrong_kind_of_object_say_which():
    params = {"l1": {"kernel": jnp.ones((4, 8))}}
    state = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))]).init(params)
    with pytest.raises(TypeError, match=r"linen_apply: model must be the flax\.linen Module"):
        jaxqp.linen_apply(None, state, {"params": params}, jnp.ones((1, 4)))
    with pytest.raises(TypeError, match=r"fake_quant_weight: spec must be a jaxqp\.QuantSpec"):
        jaxqp.fake_quant_weight(jnp.ones(4), None)
    with pytest.raises(TypeError, match=r"fake_quant_weight: w must be an array, got NoneType"):
        jaxqp.fake_quant_weight(None, QuantSpec(bits=8))
    with pytest.raises(TypeError, match=r"jaxqp\.transform: seed='0' must be an int"):
        jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))], seed="0")
    with pytest.raises(TypeError, match=r"export_serving: apply_fn must be the serving function"):
        jaxqp.export_serving(None, jnp.ones(3))
    with pytest.raises(TypeError, match=r"sensitivity: loss_fn must be loss_fn\(params, batch\)"):
        jaxqp.choose.sensitivity(None, params, [jnp.ones((2, 4))], [QuantSpec(bits=4)], progress=False)
    exported = jaxqp.export(params, state)
    with pytest.raises(TypeError, match=r"prepare: min_int_size='a' must be an int"):
        jaxqp.prepare(exported, min_int_size="a")


def test_wrapped_update_names_gradients_of_another_tree():
    import optax

    params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
    t = jaxqp.transform([Rule(".*kernel", quant=QuantSpec(bits=8))])
    tx = jaxqp.wrap(optax.sgd(0.1), t)
    opt_state = tx.init(params)
    with pytest.raises(ValueError, match=r"wrap: grads and params are different trees \(missing from grads: "
                                         r"\['b/kernel'\]; not in params: \[\]\)"):
        tx.update({"a": params["a"]}, opt_state, params)
    with pytest.raises(ValueError, match=r"wrap: the gradient of 'a/kernel' has shape \(3, 2\) but the param "
                                         r"has shape \(2, 3\)"):
        tx.update({"a": {"kernel": jnp.ones((3, 2))}, "b": params["b"]}, opt_state, params)
    with pytest.raises(ValueError, match=r"params do not match the jaxqp state.*missing from params: \['b/kernel'\]"):
        tx.update({"a": params["a"]}, opt_state, {"a": params["a"]})


def test_chain_refuses_two_quantizers_of_one_path_and_an_empty_chain():
    params = {"k": jax.random.normal(jax.random.key(0), (16, 8))}
    q8, q4 = (jaxqp.transform([Rule("k", quant=QuantSpec(bits=b))]) for b in (8, 4))
    # before: accepted, and the export decoded to other values than the trained model's (by up to 0.18)
    with pytest.raises(ValueError, match=r"chain: 'k' gets a QuantSpec from transform 0 and from transform 1"):
        jaxqp.chain(q8, q4).init(params)
    a8, a4 = (jaxqp.transform([Rule("k", act=ActSpec(bits=b))]) for b in (8, 4))
    with pytest.raises(ValueError, match=r"chain: 'k' gets an ActSpec from transform 0 and from transform 2"):
        jaxqp.chain(a8, q4, a4).init(params)
    with pytest.raises(ValueError, match=r"chain: give at least one transform"):
        jaxqp.chain()
    # pruning and quantizing one path from two transforms stays the way to compose them
    t = jaxqp.chain(jaxqp.transform([Rule("k", prune=PruneSpec(sparsity=0.5))]), q4)
    state = t.init(params)
    np.testing.assert_array_equal(jaxqp.dequantize(jaxqp.export(params, state))["k"], t.apply(params, state)["k"])


def test_masks_state_of_and_integer_inputs():
    params = {"a": {"kernel": jnp.arange(12.0).reshape(4, 3)}}
    t = jaxqp.transform([Rule(".*kernel", prune=PruneSpec(sparsity=0.5), act=ActSpec(bits=4))])
    state = t.init(params)
    with pytest.raises(TypeError, match=r"t\.masks: state must be the jaxqp state .* got dict"):
        t.masks(params)  # before: AttributeError: 'dict' object has no attribute 'plan'
    assert jaxqp.state_of(state) is state  # before: "expected one jaxqp state in opt_state, found 0"
    # an integer input is quantized as floats and stays float (before: the values were cast back and truncated)
    x = jnp.array([[0, 3, 700, 1000]], jnp.int32)
    y, _ = jaxqp.quantize_input(x, state, "a/kernel")
    want, _ = jaxqp.quantize_input(x.astype(jnp.float32), state, "a/kernel")
    assert y.dtype == jnp.float32 and bool((y == want).all()) and float(y[0, 2]) != 700.0
