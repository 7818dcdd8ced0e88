"""Equinox models: the same rules, transforms, wrap, export and summary, with Rule(layout="out_in")."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxqp

eqx = pytest.importorskip("equinox")

Q, P = jaxqp.QuantSpec, jaxqp.PruneSpec
SPECS = {
    "per-channel int8": dict(quant=Q(bits=8)),
    "int4 groups of 8": dict(quant=Q(bits=4, group_size=8)),
    "2:4": dict(prune=P(structure=jaxqp.NM(2, 4))),
    "channels": dict(prune=P(sparsity=0.5, structure=jaxqp.Channels(bias=False))),
    "blocks": dict(prune=P(sparsity=0.5, structure=jaxqp.Blocks(2, 4))),
    "80% + int8": dict(quant=Q(bits=8), prune=P(sparsity=0.8)),
}


def model():
    return eqx.nn.MLP(16, 4, 32, 2, key=jax.random.key(0))


def test_paths_of_an_equinox_model():
    params, _ = eqx.partition(model(), eqx.is_inexact_array)
    plan = jaxqp.resolve([jaxqp.Rule(r"layers/\d+/weight", quant=Q(bits=8), layout="out_in")], params)
    assert [e.path for e in plan.leaves if e.quant is not None] == ["layers/0/weight", "layers/1/weight",
                                                                    "layers/2/weight"]
    assert plan.by_path()["layers/0/weight"].quant.axis == 0  # one scale per output row of (out, in)


@pytest.mark.parametrize("name", SPECS)
def test_out_in_layout_equals_the_flax_layout_transposed(name):
    """A rule with layout="out_in" on W (out, in) does exactly what the same rule does to W.T (in, out)."""
    w = jax.random.normal(jax.random.key(1), (24, 32))  # (out, in)
    spec = SPECS[name]
    eq = jaxqp.transform([jaxqp.Rule("w", **spec, layout="out_in")])
    fx = jaxqp.transform([jaxqp.Rule("w", **spec)])
    got = eq.apply({"w": w}, eq.init({"w": w}))["w"]
    want = fx.apply({"w": w.T}, fx.init({"w": w.T}))["w"].T
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_conv_weight_axes():
    w = jax.random.normal(jax.random.key(2), (8, 4, 3))  # Equinox Conv1d: (out, in, width)
    rule = jaxqp.Rule("w", quant=Q(bits=8), prune=P(structure=jaxqp.NM(2, 4)), layout="out_in")
    entry = jaxqp.resolve([rule], {"w": w}).by_path()["w"]
    assert entry.quant.axis == 0 and entry.prune.structure.axis == 1  # output channels; NM over inputs
    flax = jnp.transpose(w, (2, 1, 0))  # Flax Conv: (width, in, out)
    t = jaxqp.transform([rule])
    f = jaxqp.transform([jaxqp.Rule("w", quant=Q(bits=8), prune=P(structure=jaxqp.NM(2, 4)))])
    got = t.apply({"w": w}, t.init({"w": w}))["w"]
    want = jnp.transpose(f.apply({"w": flax}, f.init({"w": flax}))["w"], (2, 1, 0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be 'in_out'"):
        jaxqp.Rule("w", quant=Q(bits=8), layout="oi")
    with pytest.raises(ValueError, match="Channels\\(next=...\\) assumes the Flax"):
        jaxqp.resolve([jaxqp.Rule("w", prune=P(sparsity=0.5, structure=jaxqp.Channels(next="v")),
                                  layout="out_in")], {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))})


@pytest.mark.standard_promotion
def test_train_export_and_summary_of_an_equinox_mlp():
    net = model()
    params, static = eqx.partition(net, eqx.is_inexact_array)
    rules = [jaxqp.Rule(r"layers/\d+/weight", quant=Q(bits=8),
                        prune=P(sparsity=jaxqp.polynomial(0.0, 0.75, 2, 10, 2)), layout="out_in")]
    t = jaxqp.transform(rules)
    tx = jaxqp.wrap(optax.adam(1e-2), t)
    opt_state = tx.init(params)
    x = jax.random.normal(jax.random.key(3), (32, 16))
    y = jax.random.normal(jax.random.key(4), (32, 4))

    @jax.jit
    def step(params, opt_state):
        state = jaxqp.state_of(opt_state)

        def loss(p):
            m = eqx.combine(t.apply(p, state), static)
            return jnp.mean((jax.vmap(m)(x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(12):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    state = jaxqp.state_of(opt_state)
    packed = jaxqp.export(params, state)
    applied = t.apply(params, state)
    for path in ("layers/0/weight", "layers/1/weight", "layers/2/weight"):
        mask = np.asarray(state.mask(path))
        assert (~mask).sum() == round(0.75 * mask.size)
        layer = int(path.split("/")[1])
        np.testing.assert_array_equal(np.asarray(jaxqp.dequantize(packed).layers[layer].weight),
                                      np.asarray(applied.layers[layer].weight))
        assert packed.layers[layer].weight.scale.shape[0] == mask.shape[0]  # a scale per output row
    table = jaxqp.summary(params, state)
    assert table.bytes_compressed < 0.2 * table.bytes_float


def served_mlp(bits=8, path="int8", seed=1, **spec):
    net = eqx.nn.MLP(64, 10, 96, 2, key=jax.random.key(seed))
    params = eqx.filter(net, eqx.is_inexact_array)
    t = jaxqp.transform([jaxqp.Rule(r"layers/\d+/weight", quant=Q(bits=bits, **spec), layout="out_in")])
    exported = jaxqp.export(params, t.init(params))
    return net, exported, jaxqp.serving.equinox_serving_model(net, exported, path=path)


def test_served_linear_equals_int8_matmul_of_its_kernel_bit_for_bit():
    _, exported, served = served_mlp()
    assert [type(layer).__name__ for layer in served.layers] == ["EqxInt8Linear"] * 3
    x = jax.random.normal(jax.random.key(2), (32, 64))
    layer = served.layers[0]
    expected = jax.jit(lambda x: jaxqp.serving.int8_matmul(x, layer.kernel) + layer.bias)(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(layer))(x)), np.asarray(expected))
    # eager: the same integers and scales; XLA may fuse the rescale and the bias into one rounding (1 ulp)
    np.testing.assert_allclose(np.asarray(jax.vmap(layer)(x)), np.asarray(expected), rtol=2e-7, atol=2e-7)
    # the kernel decodes to the exported (out, in) weight, transposed to the (in, out) of x @ W
    np.testing.assert_array_equal(np.asarray(layer.kernel.dequantize()),
                                  np.asarray(exported.layers[0].weight.dequantize()).T)


def test_served_mlp_is_close_to_the_decoded_model_and_matmuls_see_the_whole_batch():
    from jaxqp.numerics._path_choice import record_paths

    net, exported, served = served_mlp(bits=8, path="int8")
    decoded = eqx.combine(jaxqp.dequantize(exported), eqx.filter(net, eqx.is_inexact_array, inverse=True))
    x = jax.random.normal(jax.random.key(3), (4, 8, 64))
    with record_paths() as used:
        out = jax.jit(jax.vmap(jax.vmap(served)))(x)
    assert 32 in {entry["rows"] for entry in used}  # custom_vmap also traces the unbatched body (1 and 8 rows)
    # the compiled program quantizes all 4 x 8 rows at once: int8 codes of (32, 64), no per-example rows
    hlo = jax.jit(jax.vmap(jax.vmap(served))).lower(x).compile().as_text()
    assert "s8[32,64]" in hlo and "s8[4,8,4,64]" not in hlo and "s8[1,64]" not in hlo
    reference = jax.vmap(jax.vmap(decoded))(x)
    # the only difference is the int8 rounding of each layer's input (per row, 1/254 of its absmax)
    assert float(jnp.max(jnp.abs(out - reference))) < 0.05 * float(jnp.max(jnp.abs(reference)))


def test_layers_without_an_integer_path_are_decoded_and_bad_inputs_are_refused():
    net, exported, served = served_mlp(bits=4, path="int8", group_size=16)  # per-group scales: no int8 kernel
    assert [type(layer).__name__ for layer in served.layers] == ["Linear"] * 3
    assert isinstance(served.layers[0].weight, jax.Array)
    np.testing.assert_array_equal(np.asarray(served.layers[0].weight),
                                  np.asarray(exported.layers[0].weight.dequantize()))
    with pytest.raises(ValueError, match="path='fast'"):
        jaxqp.serving.equinox_serving_model(net, exported, path="fast")
    other = eqx.nn.MLP(64, 10, 96, 3, key=jax.random.key(1))  # one more layer than the export
    with pytest.raises(ValueError, match="does not have the model's structure"):
        jaxqp.serving.equinox_serving_model(other, exported)


def test_a_vmapped_served_equinox_model_exports_to_onnx_bit_exact():
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    _, _, served = served_mlp()
    apply = lambda model, x: jax.vmap(model)(x)
    exported = jaxqp.deploy.to_onnx(apply, served, jnp.ones((1, 64)))
    assert [n.op_type for n in exported.graph.node].count("MatMulInteger") == 3
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 32):
        x = jax.random.normal(jax.random.key(batch), (batch, 64))
        out = session.run(None, {session.get_inputs()[0].name: np.asarray(x)})[0]
        np.testing.assert_array_equal(out, np.asarray(apply(served, x)))  # eager jaxqp: the same ops, in order


def test_a_vmapped_served_equinox_model_runs_in_litert():
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    _, _, served = served_mlp()
    apply = lambda model, x: jax.vmap(model)(x)
    x = np.asarray(jax.random.normal(jax.random.key(3), (16, 64)))
    flatbuffer = jaxqp.deploy.to_litert(apply, served, x)  # LiteRT's int8 composites never vmapped
    builtin = interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES  # the kernels that round like jaxqp
    runner = interpreter.Interpreter(model_content=flatbuffer, experimental_op_resolver_type=builtin)
    out = next(iter(runner.get_signature_runner()(x0=x).values()))
    expected = np.asarray(apply(served, jnp.asarray(x)))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6 * np.abs(expected).max())  # float rounding only


def test_exporters_refuse_stacked_equinox_kernels():
    pytest.importorskip("jax2onnx")
    layers = [served_mlp()[2].layers[1], served_mlp(seed=2)[2].layers[1]]  # stacked kernels, mapped over
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    with pytest.raises(ValueError, match=r"ServingKernel \(96, 96\)\) reached the exporter as a traced value"):
        jaxqp.deploy.to_onnx(lambda s, x: jax.vmap(lambda layer, x: layer(x))(s, x), stacked, jnp.ones((2, 96)),
                             dynamic_batch=False)


def test_a_vmap_over_stacked_kernels_multiplies_each_with_its_own_kernel():
    from jaxqp.serving._equinox import _served_matmul

    layers = [served_mlp()[2].layers[1], served_mlp(seed=2)[2].layers[1]]  # two different kernels
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(layer.kernel for layer in layers))
    x = jax.random.normal(jax.random.key(5), (2, 6, 96))
    got = jax.jit(jax.vmap(lambda k, x: jax.vmap(lambda row: _served_matmul(row, k))(x)))(stacked, x)
    for i, layer in enumerate(layers):
        expected = jax.jit(jaxqp.serving.int8_matmul)(x[i], layer.kernel)
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(expected), rtol=2e-7, atol=2e-7)


def test_two_four_pruned_int8_layers_serve_from_codes():
    net = eqx.nn.MLP(64, 10, 96, 2, key=jax.random.key(1))
    params = eqx.filter(net, eqx.is_inexact_array)
    t = jaxqp.transform([jaxqp.Rule(r"layers/\d+/weight", quant=Q(bits=8), prune=P(structure=jaxqp.NM(2, 4)),
                                    layout="out_in")])
    exported = jaxqp.export(params, t.init(params))
    assert type(exported.layers[0].weight).__name__ == "NMArray"
    served = jaxqp.serving.equinox_serving_model(net, exported, path="int8")
    assert [type(layer).__name__ for layer in served.layers] == ["EqxInt8Linear"] * 3
    np.testing.assert_array_equal(np.asarray(served.layers[0].kernel.dequantize()),
                                  np.asarray(exported.layers[0].weight.dequantize()).T)


def test_a_saved_equinox_export_loads_and_serves_like_the_export(tmp_path):
    net, exported, served = served_mlp()
    jaxqp.save(tmp_path / "mlp.jaxqp", exported)  # an Equinox module: saved as the dict of its fields
    loaded = jaxqp.load(tmp_path / "mlp.jaxqp")
    assert len(loaded["layers"]) == 3 and sorted(loaded["layers"][0]) == ["bias", "weight"]
    from_file = jaxqp.serving.equinox_serving_model(net, loaded, path="int8")
    x = jax.random.normal(jax.random.key(6), (8, 64))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(from_file))(x)), np.asarray(jax.jit(jax.vmap(served))(x)))
    del loaded["layers"][2]["weight"]
    with pytest.raises(ValueError, match="the loaded tree has no 'layers/2/weight'"):
        jaxqp.serving.equinox_serving_model(net, loaded)


def test_an_nnx_state_saves_like_its_pure_dict(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    _, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Param)
    jaxqp.save(tmp_path / "state.jaxqp", state)
    loaded, pure = jaxqp.load(tmp_path / "state.jaxqp"), nnx.to_pure_dict(state)
    assert sorted(loaded) == sorted(pure) == ["bias", "kernel"]
    for key in pure:
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(pure[key]))


def test_a_scalar_linear_is_decoded_and_runs_like_the_decoded_layer():
    layer = eqx.nn.Linear("scalar", 8, key=jax.random.key(7))
    params = eqx.filter(layer, eqx.is_inexact_array)
    t = jaxqp.transform([jaxqp.Rule("weight", quant=Q(bits=8), layout="out_in")])
    exported = jaxqp.export(params, t.init(params))
    served = jaxqp.serving.equinox_serving_model(layer, exported)
    assert type(served).__name__ == "Linear" and isinstance(served.weight, jax.Array)
    np.testing.assert_array_equal(np.asarray(served(jnp.float32(0.5))),
                                  np.asarray(eqx.combine(jaxqp.dequantize(exported), layer)(jnp.float32(0.5))))


@pytest.mark.parametrize("axis_spec", [dict(), dict(axis=None)])
def test_an_embedding_keeps_its_table_as_codes_and_looks_up_the_exported_rows_exactly(axis_spec):
    table = eqx.nn.Embedding(50, 16, key=jax.random.key(8))
    params = eqx.filter(table, eqx.is_inexact_array)
    t = jaxqp.transform([jaxqp.Rule("weight", quant=Q(bits=8, **axis_spec), layout="out_in")])
    exported = jaxqp.export(params, t.init(params))
    served = jaxqp.serving.equinox_serving_model(table, exported)
    assert type(served).__name__ == "EqxInt8Embedding" and served.codes.dtype == jnp.int8
    tokens = jnp.array([[0, 7, 49], [3, 3, 12]])
    expected = np.asarray(jaxqp.dequantize(exported.weight))[np.asarray(tokens)]
    np.testing.assert_array_equal(np.asarray(jax.vmap(jax.vmap(served))(tokens)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(jax.vmap(served)))(tokens)), expected)
    if importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime"):  # the ONNX export too
        import onnxruntime as ort

        exported_onnx = jaxqp.deploy.to_onnx(lambda m, t: jax.vmap(jax.vmap(m))(t), served, tokens[:1])
        assert "Gather" in {n.op_type for n in exported_onnx.graph.node}  # from the int8 initializer's decode
        assert onnx_int8_initializers(exported_onnx) == [(50, 16)]
        session = ort.InferenceSession(exported_onnx.SerializeToString(), providers=["CPUExecutionProvider"])
        for batch in (tokens, jnp.arange(15).reshape(5, 3) * 3 % 50):  # the batch axis is symbolic
            out = session.run(None, {session.get_inputs()[0].name: np.asarray(batch, np.int32)})[0]
            np.testing.assert_array_equal(out, np.asarray(jaxqp.dequantize(exported.weight))[np.asarray(batch)])


def onnx_int8_initializers(model) -> list:
    return [tuple(i.dims) for i in model.graph.initializer if i.data_type == 3]  # onnx.TensorProto.INT8


def test_an_equinox_model_timed_as_a_whole(monkeypatch):
    """timed_as_a_whole gives an Equinox model the whole-model choice of the Flax adapters."""
    from jaxqp.numerics import _path_choice as pc

    pc.clear_decisions()
    monkeypatch.setattr(pc, "time_candidates", lambda fns, **timing: {n: 1.0 if n == "bf16" else 2.0 for n in fns})
    _, _, served = served_mlp(path="auto")
    run = lambda model, x: jax.vmap(model)(x)
    x = jax.random.normal(jax.random.key(4), (8, 64))
    with pc.record_paths() as used:
        y = eqx.filter_jit(jaxqp.serving.timed_as_a_whole(run, "eqx-mlp"))(served, x)
    assert used and {u["path"] for u in used} == {"bf16"}  # as if bf16 had been timed fastest
    assert [(m["model"].split(":")[0], m["rows"], m["policy"]) for m in jaxqp.serving.describe(served).models] == \
        [("eqx-mlp", 8, "bf16")]
    _, _, pinned = served_mlp(path="bf16")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(eqx.filter_jit(run)(pinned, x)))
    with pytest.raises(TypeError, match=r"timed_as_a_whole: fn must be fn\(served, \*args, \*\*kwargs\)"):
        jaxqp.serving.timed_as_a_whole(None, "eqx-mlp")
    pc.clear_decisions()
