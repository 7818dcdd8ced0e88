"""The main job and the benchmarks run end to end in quick mode."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_quick(command: list[str], out: pathlib.Path):
    """Runs ``command --quick --json out``; returns (stdout, the JSON rows)."""
    proc = subprocess.run([sys.executable, *command, "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_demo_quick_writes_the_table(tmp_path):
    stdout, rows = run_quick(["-m", "jaxqp.demo", "--plots", str(tmp_path / "plots")], tmp_path / "demo.json")
    assert [r["config"] for r in rows] == ["float32", "int8", "pruned", "pruned+int8"]
    assert set(rows[0]) == {"config", "accuracy", "nll", "sparsity", "bytes_float", "bytes_compressed"}
    by = {r["config"]: r for r in rows}
    assert by["pruned"]["sparsity"] == 0.8 and by["pruned+int8"]["sparsity"] == 0.8
    assert by["float32"]["sparsity"] == 0.0 and by["float32"]["bytes_compressed"] == by["float32"]["bytes_float"]
    # The README's table: stored bytes depend only on shapes, bits and sparsity, so they are exact.
    assert {n: (r["bytes_float"], r["bytes_compressed"]) for n, r in by.items()} == {
        "float32": (295080, 295080), "int8": (295080, 77200), "pruned": (295080, 69744),
        "pruned+int8": (295080, 27736)}
    assert all(r["accuracy"] > 95 for r in rows), rows  # 96.1-98.1% measured after 150 steps
    assert "pruned weights exactly 0.0 in params and in t.apply(params, state): yes" in stdout
    assert "export -> save -> load -> jit serve" in stdout
    file_line = next(line for line in stdout.splitlines() if "file size" in line)
    file_bytes, float_file_bytes = (int(w) for w in file_line.split() if w.isdigit())
    assert file_bytes / float_file_bytes < 0.11  # README: 0.105x
    served = next(line for line in stdout.splitlines() if "served from the loaded file" in line)
    assert f"{by['pruned+int8']['accuracy']:.2f}%" in served  # the loaded file serves the trained accuracy
    line = re.compile(r"  budget +(\d+) bytes: uniform NLL ([\d.]+), allocated \((\d+) bytes\) ([\d.]+)$")
    budgets = [m.groups() for m in map(line.match, stdout.splitlines()) if m]
    assert len(budgets) == 6, stdout
    for budget, uniform, allocated_bytes, allocated in budgets:
        assert int(allocated_bytes) <= int(budget) and np.isfinite([float(uniform), float(allocated)]).all()
    # at the bytes of w8+s80 and w8+s90, measured: 0.09 vs 0.70 and 0.29 vs 1.74
    assert all(float(b[3]) < float(b[1]) for b in budgets[3:4] + budgets[5:])
    for name in ("sensitivity.png", "pareto.png"):
        head = (tmp_path / "plots" / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") >= 800
    memory = next(line for line in stdout.splitlines() if "served memory" in line)
    assert "77200 bytes vs float32 295080 (0.262x" in memory  # int8 codes + scales, float biases


@pytest.mark.slow
def test_serving_benchmark_quick_writes_rows(tmp_path):
    _, rows = run_quick([str(ROOT / "benchmarks" / "serving.py")], tmp_path / "serving.json")
    latency = [r for r in rows if "latency_ratio" in r]
    sizes = {r["config"]: r["bytes_ratio"] for r in rows if "bytes_ratio" in r}
    models = ("mlp256", "eqx_mlp256", "transformer", "tiny_lm")
    assert {(r["model"], r["batch"]) for r in latency} == {(m, b) for m in models for b in (1, 4)}
    configs = {m: {r["config"] for r in latency if r["model"] == m} for m in models}
    assert configs == {"mlp256": {"int8", "int4", "nm2:4+int8", "sparse90+int8"},
                       "eqx_mlp256": {"int8", "int4", "int8+whole"},
                       "transformer": {"int8"}, "tiny_lm": {"int8", "int8+keep_float"}}  # quick mode
    # Served memory follows from the shapes: 256x256 kernels stay int8 codes (or two 4-bit codes a
    # byte) plus a float32 scale per output; biases stay float32.
    float_bytes = 2 * (256 * 256 + 256) * 4
    mlp = {bits: round(2 * (256 * 256 * bits // 8 + 256 * 4 + 256 * 4) / float_bytes, 4) for bits in (8, 4)}
    assert (mlp[8], mlp[4]) == (0.2568, 0.1323)
    for r in latency:
        if r["model"] in ("mlp256", "eqx_mlp256"):  # the same MLP as linen Dense or eqx.nn.Linear layers
            assert r["served_bytes_ratio"] == (mlp[4] if r["config"] == "int4" else mlp[8]), r
            assert r["path"] and sum(r["path"].values()) == 2  # both layers, by the path measured fastest
        elif r["config"] == "int8":  # small models: every Dense, DenseGeneral and Embed weight stays codes
            assert r["served_bytes_ratio"] < 0.30, r
        else:  # keep_float: a float copy next to the codes
            assert r["config"] == "int8+keep_float" and r["served_bytes_ratio"] > 1.0, r
        assert set(r["path"]) <= {"int8", "int8_t", "bf16", "float"}
    machine = rows[0]
    assert machine["cpu"] and set(machine["cpu_flags"]) <= {"avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                            "avx512_bf16", "amx_int8", "amx_bf16"}
    assert set(sizes) == {"int8", "int4", "nm2:4+int8", "sparse90+int8"}
    assert sizes["sparse90+int8"] < sizes["int4"] < sizes["nm2:4+int8"] < sizes["int8"] < 0.3


@pytest.mark.slow
def test_serving_benchmark_pins_every_path(tmp_path):
    stdout, rows = run_quick([str(ROOT / "benchmarks" / "serving.py"), "--models", "lm", "--pins"],
                             tmp_path / "pins.json")
    latency = [r for r in rows if "latency_ratio" in r]
    assert {r["config"] for r in latency} == {"int8", "int8+keep_float"} and len(latency) == 4
    for r in latency:  # every config also timed on each one path, in the same rounds
        assert set(r["pinned"]) == {"int8", "int8_t", "bf16", "float"}
        assert all(ratio > 0 for ratio in r["pinned"].values())
        assert r["best_pinned"] == min(r["pinned"], key=r["pinned"].get)
    assert stdout.count("(best pinned: ") == 4


@pytest.mark.slow  # starts an interpreter
def test_int8_dot_benchmark_quick_writes_rows(tmp_path):
    _, rows = run_quick([str(ROOT / "benchmarks" / "int8_dot.py")], tmp_path / "dot.json")
    assert [(r["shape"], r["rows"]) for r in rows] == [([256, 256], 4), ([256, 256], 64)]
    ratios = ("rows_first_ratio", "kernel_first_ratio", "bf16_ratio")
    assert all(r["float_ms"] > 0 and min(r[k] for k in ratios) > 0 for r in rows)


@pytest.mark.slow
def test_step_overhead_quick_writes_rows(tmp_path):
    _, rows = run_quick([str(ROOT / "benchmarks" / "step_overhead.py")], tmp_path / "steps.json")
    assert [r["config"] for r in rows] == ["int8", "w8a8", "w8a8-int", "pruned", "pruned+int8", "global90", "nm2:4",
                                           "movement", "rigl", "pruned sep", "pruned+int8 sep", "global90 sep"]
    assert all(r["step_ratio"] > 0 and r["compile_ratio"] > 0 and r["state_bytes_ratio"] >= 0 for r in rows)
    assert all(r["cached_rebuild_s"] > 0 and r["cached_rebuild_ratio"] > 0 for r in rows)  # the child process ran
    assert all(r["refresh_ratio"] > 0 for r in rows if r["config"] in ("pruned", "global90", "movement", "rigl"))
    separate = [r for r in rows if r["config"].endswith(" sep")]
    assert all(r["refresh_ratio"] > 0 and r["refresh_compile_s"] > 0 for r in separate)


@pytest.mark.slow
def test_quant_quality_quick_writes_rows(tmp_path):
    _, rows = run_quick([str(ROOT / "benchmarks" / "quant_quality.py")], tmp_path / "quant.json")
    assert [r["config"] for r in rows][:6] == ["float32", "w8a8", "w4a8", "w4a4", "w4g32", "w4g32-lsq"]
    assert all(r["config"].startswith(("qwix-", "aqt-")) for r in rows[6:])  # peers, when installed
    rows = rows[:6]
    assert all({"accuracy", "nll", "step_ratio"} <= set(r) for r in rows)
    assert rows[0]["step_ratio"] == 1.0 and all(r["nll"] > 0 for r in rows)
    assert all(r["untrained_kernels"] == [] for r in rows)  # QAT reaches every conv and Dense kernel


@pytest.mark.slow
def test_prune_quality_quick_writes_rows(tmp_path):
    _, rows = run_quick([str(ROOT / "benchmarks" / "prune_quality.py")], tmp_path / "prune.json")
    by = {r["config"]: r for r in rows}
    assert list(by) == ["float32", "gmp90", "nm2:4", "filters50", "rigl90", "pruned80+int8"]
    want = {"float32": 0.0, "gmp90": 0.9, "nm2:4": 0.5, "filters50": 0.5, "rigl90": 0.9, "pruned80+int8": 0.8}
    for name, sparsity in want.items():  # exact zeros over the pruned kernels, at the end of training
        assert by[name]["sparsity"] == pytest.approx(sparsity, abs=2e-3), name
    assert all(r["nll"] > 0 and r["step_ratio"] > 0 for r in rows)


def test_demo_and_benchmarks_refuse_an_unwritable_json_before_running(tmp_path, capsys):
    # before: the demo trained for a minute, then failed with FileNotFoundError on --json
    from jaxqp import demo

    missing = str(tmp_path / "no" / "such" / "demo.json")
    for argv, message in ((["--json", missing], r"--json: the folder of .* does not exist"),
                          (["--json", str(tmp_path)], r"--json: .* is a folder"),
                          (["--plots", __file__], r"--plots: .* is a file; give a folder")):
        with pytest.raises(SystemExit):
            demo.main(argv)
        assert re.search(message, capsys.readouterr().err)
    proc = subprocess.run([sys.executable, "benchmarks/step_overhead.py", "--quick", "--json", missing],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and re.search(r"argument --json: the folder of .* does not exist", proc.stderr)


def test_benchmark_json_is_written_atomically(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import write_json
    finally:
        sys.path.pop(0)
    out = tmp_path / "rows.json"
    out.write_text("[]")
    with pytest.raises(TypeError):  # not JSON-serializable: the old file stays whole, no temporary is left
        write_json(str(out), [{"bad": object()}])
    assert out.read_text() == "[]" and [p.name for p in tmp_path.iterdir()] == ["rows.json"]
    write_json(str(out), [{"ok": 1}])
    assert json.loads(out.read_text()) == [{"ok": 1}]
