"""jaxqp.choose: sensitivity sweep, Hessian-trace proxy, exact knapsack allocation, plots."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxqp
from jaxqp.choose import Candidate, allocate, hessian_traces, pareto_front, sensitivity, spearman

Q, P = jaxqp.QuantSpec, jaxqp.PruneSpec
CANDIDATES = [Q(bits=8), Q(bits=4), Q(bits=2, group_size=8), P(sparsity=0.75), (Q(bits=4), P(structure=jaxqp.NM(2, 4)))]


def mlp_params(widths=(16, 24, 12, 4)):
    keys = jax.random.split(jax.random.key(0), len(widths))
    return {f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": 0.1 * jnp.ones(b)}
            for i, (k, a, b) in enumerate(zip(keys, widths[:-1], widths[1:]))}


def mlp_forward(params, x):
    for i in range(len(params)):
        layer = params[f"l{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        x = jnp.tanh(x) if i < len(params) - 1 else x
    return x


def mlp_loss(params, batch):
    x, y = batch
    return jnp.mean((mlp_forward(params, x) - y) ** 2)


def mlp_batches(count=3, rows=32, widths=(16, 24, 12, 4)):
    """Targets from the model itself: the params sit at a minimum, as after training (HAWQ's premise)."""
    keys = jax.random.split(jax.random.key(1), count)
    xs = [jax.random.normal(k, (rows, widths[0])) for k in keys]
    return [(x, mlp_forward(mlp_params(widths), x)) for x in xs]


@pytest.fixture(scope="module")
def swept():
    params, batches = mlp_params(), mlp_batches()
    return params, batches, sensitivity(mlp_loss, params, batches, CANDIDATES, progress=False, proxy_samples=32)


def test_each_delta_is_the_loss_with_only_that_layer_compressed(swept):
    params, batches, s = swept
    base = np.mean([float(mlp_loss(params, b)) for b in batches])
    assert s.base_loss == pytest.approx(base, rel=1e-6)
    for j, cand in enumerate(s.candidates):
        t = jaxqp.transform([cand.rule(path) for path in s.layers])
        compressed = t.apply(params, t.init(params))
        for i, path in enumerate(s.layers):
            name = path.split("/")[0]
            swapped = {**params, name: {**params[name], "kernel": compressed[name]["kernel"]}}
            direct = np.mean([float(mlp_loss(swapped, b)) for b in batches]) - base
            assert s.delta[i, j] == pytest.approx(direct, abs=2e-6), (path, cand.name)


def test_bytes_are_what_export_stores(swept):
    params, _, s = swept
    for j, cand in enumerate(s.candidates):
        t = jaxqp.transform([cand.rule(path) for path in s.layers])
        packed = jaxqp.export(params, t.init(params))
        for i, path in enumerate(s.layers):
            name = path.split("/")[0]
            assert s.bytes[i, j] == packed[name]["kernel"].nbytes
        assert s.uniform(cand.name)[0] == jaxqp.summary(params, t.init(params)).bytes_compressed
    assert s.other_bytes == sum(params[n]["bias"].nbytes for n in params)
    assert s.uniform("keep")[0] == sum(x.nbytes for x in jax.tree.leaves(params))


def test_the_sweep_traces_the_loss_once_for_every_layer_and_candidate():
    calls = []

    def counting_loss(params, batch):
        calls.append(1)
        return mlp_loss(params, batch)

    sensitivity(counting_loss, mlp_params(), mlp_batches(), CANDIDATES, proxy=False, progress=False)
    assert len(calls) == 1  # 3 layers x 5 candidates x 3 batches, one trace


def test_unfit_pairs_are_reported_and_skipped():
    params = mlp_params()
    s = sensitivity(mlp_loss, params, mlp_batches(1), {"g8": Q(bits=4, group_size=8), "w8": Q(bits=8)},
                    layers=["l0/kernel", "l0/bias"], proxy=False, progress=False)
    # groups run along axis -2: a 1-D bias has no such axis
    assert s.bytes[0, 0] > 0 and s.bytes[1, 0] == -1 and np.isnan(s.delta[1, 0])
    assert ("l0/bias", "g8") in s.unfit and "group_axis" in s.unfit[("l0/bias", "g8")]
    assert np.isfinite(s.delta[:, 1]).all()


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    c = jnp.array([0.5, 2.0, 3.0, 7.0])
    loss = lambda p, b: jnp.sum(b * p["a"] ** 2) + jnp.sum(p["b"] ** 4)
    params = {"a": jnp.ones(4), "b": jnp.full((2, 3), 0.5)}
    traces = hessian_traces(loss, params, [c], ["a", "b"], samples=3)
    np.testing.assert_allclose(traces, [2 * float(c.sum()), 12 * 0.25 * 6], rtol=1e-6)


def test_hutchinson_trace_averages_out_cross_terms():
    a = jnp.array([[2.0, 1.5], [1.5, 1.0]])
    loss = lambda p, _: 0.5 * p["w"] @ a @ p["w"] + 3.0 * jnp.sum(p["w"] * p["v"])  # v's block is 0
    traces = hessian_traces(loss, {"w": jnp.ones(2), "v": jnp.ones(2)}, [0.0], ["w", "v"], samples=2000)
    # w's probe errs by 3 v1 v2 + 3 v_w . v_v (variance 9 + 18: the mean's std is sqrt(27 / 2000) = 0.12);
    # v's by 3 v_v . v_w (std 0.09)
    assert traces[0] == pytest.approx(3.0, abs=0.45) and traces[1] == pytest.approx(0.0, abs=0.35)


def test_spearman_golden_values():
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(95), abs=1e-12)  # tied ranks
    assert spearman([1, 2, 3], [30, 20, 10]) == -1.0
    assert spearman([1, 2, np.nan, 4], [1, 2, 9, 3]) == 1.0
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_the_proxy_ranks_layers_like_the_measured_deltas(swept):
    rho = swept[2].spearman()
    assert set(rho) == {*swept[2].names, "all"}
    assert rho["all"] > 0.8


def brute_force(costs, deltas, fixed, budget):
    best = None
    for picks in itertools.product(*[np.flatnonzero(row >= 0) for row in costs]):
        total = fixed + sum(costs[i, k] for i, k in enumerate(picks))
        loss = sum(deltas[i, k] for i, k in enumerate(picks))
        if total <= budget and (best is None or loss < best[0] - 1e-12):
            best = (loss, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_knapsack_front_is_exact(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(1, 40, (5, 4)).astype(np.int64)
    costs[rng.random(costs.shape) < 0.15] = -1
    costs[:, 0] = np.abs(costs[:, 0]) + 1  # every layer keeps one option
    deltas = rng.exponential(1.0, costs.shape) - 0.1
    front = pareto_front(costs, deltas, fixed=7)
    assert np.all(np.diff(front.bytes) > 0) and np.all(np.diff(front.delta) < 0)
    for budget in range(int(front.bytes[0]), int(front.bytes[-1]) + 2, 3):
        loss, _ = brute_force(costs, deltas, 7, budget)
        point = np.flatnonzero(front.bytes <= budget)[-1]
        assert front.delta[point] == pytest.approx(loss, abs=1e-9)
        picks = front.choice(point)
        assert 7 + sum(costs[i, k] for i, k in enumerate(picks)) == front.bytes[point]


def test_allocation_fits_the_budget_beats_uniform_and_its_rules_give_those_bytes(swept):
    params, _, s = swept
    for name in ("w4", "w2g8", "s75"):
        budget, uniform_delta = s.uniform(name)
        a = allocate(s, budget)
        assert a.bytes <= budget and a.predicted_delta <= uniform_delta + 1e-12
        state = jaxqp.transform(a.rules).init(params)
        assert jaxqp.summary(params, state).bytes_compressed == a.bytes
        chosen = {c: s.names.index(c) for c in a.choice.values() if c != "keep"}
        assert a.predicted_delta == pytest.approx(
            sum(s.delta[s.layers.index(p), chosen[c]] for p, c in a.choice.items() if c != "keep"), abs=1e-9)


def test_a_larger_budget_never_predicts_a_larger_loss(swept):
    s = swept[2]
    budgets = sorted({s.uniform(n)[0] for n in s.names})
    deltas = [allocate(s, b).predicted_delta for b in budgets]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(deltas))


def test_allocate_can_exclude_candidates_and_use_the_proxy(swept):
    s = swept[2]
    a = allocate(s, s.uniform("w8")[0], exclude=r"nm.*|s.*|w4\+nm2:4")
    assert not any(c.startswith(("nm", "s", "w4+")) for c in a.choice.values())
    b = allocate(s, s.uniform("w4")[0], use="proxy")
    assert b.bytes <= s.uniform("w4")[0]


def test_bad_inputs_get_clear_errors(swept):
    params, batches, s = swept
    with pytest.raises(ValueError, match="below the smallest choice"):
        allocate(s, 100)
    with pytest.raises(TypeError, match="budget_bytes must be an int"):
        allocate(s, 1e5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must return a scalar"):
        sensitivity(lambda p, b: mlp_loss(p, b) * jnp.ones(2), params, batches, CANDIDATES, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        sensitivity(mlp_loss, params, [], CANDIDATES, progress=False)
    with pytest.raises(ValueError, match="differs in structure or shapes"):
        sensitivity(mlp_loss, params, [batches[0], (batches[1][0][:3], batches[1][1][:3])], CANDIDATES)
    with pytest.raises(ValueError, match="final sparsity as a number"):
        sensitivity(mlp_loss, params, batches, [P(sparsity=jaxqp.polynomial(0.0, 0.8, 0, 100, 10))])
    with pytest.raises(ValueError, match="share the name"):
        sensitivity(mlp_loss, params, batches, [Q(bits=4), Q(bits=4, rounding="nearest")])
    with pytest.raises(ValueError, match="matches no float parameter"):
        sensitivity(mlp_loss, params, batches, CANDIDATES, layers=".*/weight")
    with pytest.raises(ValueError, match="'keep'"):
        Candidate("keep", quant=Q(bits=4))
    with pytest.raises(ValueError, match="measure=False and proxy=False"):
        sensitivity(mlp_loss, params, batches, CANDIDATES, measure=False, proxy=False)
    # before: re.error from deep inside, an all-float "allocation", and an IndexError
    with pytest.raises(ValueError, match=r"allocate: exclude='\(' is not a valid regular expression"):
        allocate(s, 10**6, exclude="(")
    with pytest.raises(ValueError, match=r"allocate: exclude='\.\*' matches every candidate"):
        allocate(s, 10**6, exclude=".*")
    with pytest.raises(ValueError, match=r"pareto_front: costs and deltas must both be \(layers, options\)"):
        jaxqp.choose.pareto_front(np.ones((2, 3)), np.ones((2, 2)))


def test_candidate_names():
    names = [Candidate.of(c).name for c in CANDIDATES]
    assert names == ["w8", "w4", "w2g8", "s75", "w4+nm2:4"]
    assert Candidate.of((P(sparsity=0.5), Q(bits=3))).name == "w3+s50"
    assert Candidate.of(Q(bits=8, format="pow2")).name == "pow2"


def test_proxy_only_sweep_allocates_with_the_proxy():
    params, batches = mlp_params(), mlp_batches()
    s = sensitivity(mlp_loss, params, batches, CANDIDATES[:3], measure=False, progress=False)
    assert not s.measured and np.isnan(s.delta).all() and s.spearman() == {}
    assert allocate(s, s.uniform("w4")[0]).bytes <= s.uniform("w4")[0]
    assert "HAWQ-v2 proxy" in str(s)


def test_table_and_json(swept, tmp_path):
    s = swept[2]
    text = str(s)
    assert "l0/kernel" in text and "w4+nm2:4" in text and "Spearman" in text
    s.to_json(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["candidates"] == list(s.names) and data["bytes"] == s.bytes.tolist()
    assert data["delta"][0][0] == pytest.approx(s.delta[0, 0])


def test_plots_write_readable_pngs(swept, tmp_path):
    pytest.importorskip("matplotlib")
    s = swept[2]
    heat = jaxqp.choose.plot_sensitivity(s, tmp_path / "heat.png")
    a = allocate(s, s.uniform("w4")[0])
    pareto = jaxqp.choose.plot_pareto({"uniform": [s.uniform(n) for n in s.names]}, tmp_path / "pareto.png",
                                      front=a.front, base=s.base_loss, labels={"uniform": list(s.names)})
    for path in (heat, pareto):
        with open(path, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert width >= 600 and height >= 300


def test_plots_and_json_refuse_a_folder_before_drawing(swept, tmp_path):
    pytest.importorskip("matplotlib")
    s = swept[2]
    with pytest.raises(ValueError, match=r"plot_sensitivity: '.*' is a folder; .*model\.png"):
        jaxqp.choose.plot_sensitivity(s, tmp_path)
    with pytest.raises(ValueError, match=r"plot_pareto: the folder of .* does not exist"):
        jaxqp.choose.plot_pareto({"uniform": [s.uniform(n) for n in s.names]}, tmp_path / "no" / "p.png")
    with pytest.raises(ValueError, match=r"Sensitivity\.to_json: '.*' is a folder"):
        s.to_json(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_allocate_and_uniform_name_what_they_were_given(swept):
    s = swept[2]
    with pytest.raises(TypeError, match=r"allocate: sensitivity must be what jaxqp\.choose\.sensitivity"):
        allocate(None, 10_000)
    with pytest.raises(ValueError, match=r"Sensitivity\.uniform: no candidate is named 'w3'; the candidates are \["):
        s.uniform("w3")
