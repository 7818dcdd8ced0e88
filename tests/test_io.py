"""save/load: round trips, atomic writes, and every kind of bad file refused."""

import json
import os
import pathlib
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxqp
from jaxqp import PruneSpec, QArray, QuantSpec, Rule, SparseArray


def exported_tree():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "Dense_0": {"kernel": jax.random.normal(k1, (12, 9)), "bias": jnp.linspace(-1, 1, 9)},
        "Dense_1": {"kernel": jax.random.normal(k2, (9, 5)), "bias": jnp.zeros(5, jnp.bfloat16)},
        "embed": [jax.random.normal(k3, (7, 3)), (jnp.arange(4, dtype=jnp.int32), None)],
    }
    t = jaxqp.transform([
        Rule("Dense_0/kernel", quant=QuantSpec(bits=4), prune=PruneSpec(sparsity=0.75)),
        Rule("Dense_1/kernel", quant=QuantSpec(bits=8, symmetric=False, axis=0)),
        Rule("embed/0", prune=PruneSpec(sparsity=0.9)),
    ])
    state = t.init(params)
    return params, t, state, jaxqp.export(params, state)


def test_round_trip_identical_tree_and_outputs(tmp_path):
    params, t, state, packed = exported_tree()
    assert isinstance(packed["Dense_0"]["kernel"], QArray) and isinstance(packed["embed"][0], SparseArray)
    path = tmp_path / "model.jaxqp"
    jaxqp.save(path, packed)
    loaded = jaxqp.load(path)
    chex.assert_trees_all_equal_structs(loaded, packed)
    chex.assert_trees_all_equal(loaded, packed)
    chex.assert_trees_all_equal(jaxqp.dequantize(loaded), t.apply(params, state))
    assert loaded["Dense_1"]["bias"].dtype == jnp.bfloat16 and loaded["embed"][1][1] is None
    assert isinstance(loaded["embed"], list) and isinstance(loaded["embed"][1], tuple)
    # deterministic bytes, and really smaller than the float tree
    jaxqp.save(tmp_path / "again.jaxqp", loaded)
    assert (tmp_path / "again.jaxqp").read_bytes() == path.read_bytes()


def test_file_is_really_smaller(tmp_path):
    params = {"kernel": jax.random.normal(jax.random.key(5), (256, 256))}
    t = jaxqp.transform([Rule("kernel", quant=QuantSpec(bits=4), prune=PruneSpec(sparsity=0.5))])
    jaxqp.save(tmp_path / "float.jaxqp", params)
    jaxqp.save(tmp_path / "packed.jaxqp", jaxqp.export(params, t.init(params)))
    ratio = os.path.getsize(tmp_path / "packed.jaxqp") / os.path.getsize(tmp_path / "float.jaxqp")
    # 32768 kept 4-bit codes (16384 B) + 65536-bit mask (8192 B) + 256 scales (1024 B), plus a header
    assert 25600 < os.path.getsize(tmp_path / "packed.jaxqp") < 25600 + 2048
    assert ratio < 0.105, ratio


def test_file_is_standard_safetensors(tmp_path):
    _, _, _, packed = exported_tree()
    path = tmp_path / "model.jaxqp"
    jaxqp.save(path, packed)
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    info = json.loads(header["__metadata__"]["jaxqp"])  # jaxqp's metadata: one JSON entry
    assert size % 8 == 0 and info["format"] == "jaxqp" and info["format_version"] == 3
    entry = header["Dense_0/kernel:codes"]
    assert entry["dtype"] == "U8" and entry["shape"] == [14]  # 27 kept 4-bit codes, 2 per byte


def test_bit_flips_anywhere_are_refused(tmp_path):
    path = tmp_path / "model.jaxqp"
    jaxqp.save(path, {"w": jaxqp.export({"w": jnp.arange(-4.0, 4.0)}, jaxqp.transform(
        [Rule("w", quant=QuantSpec(bits=4, axis=None))]).init({"w": jnp.arange(-4.0, 4.0)}))["w"]})
    blob = path.read_bytes()
    bad = tmp_path / "bad.jaxqp"
    for i in range(len(blob)):
        bad.write_bytes(blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1:])
        with pytest.raises(ValueError, match="jaxqp.load"):
            jaxqp.load(bad)


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1, -7])
def test_truncated_files_are_refused(tmp_path, cut):
    _, _, _, packed = exported_tree()
    path = tmp_path / "model.jaxqp"
    jaxqp.save(path, packed)
    blob = path.read_bytes()
    path.write_bytes(blob[:cut])  # a prefix; negative cuts drop the tail
    with pytest.raises(ValueError, match="jaxqp.load"):
        jaxqp.load(path)


def write_safetensors(path, metadata, tensors=None):
    header = {"__metadata__": metadata}
    data = b""
    for name, array in (tensors or {}).items():
        offsets = [len(data), len(data) + array.nbytes]
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": offsets}
        data += array.tobytes()
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_foreign_and_newer_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    write_safetensors(foreign, {"format": "pt"}, {"w": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="not a jaxqp file"):
        jaxqp.load(foreign)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(ValueError, match="jaxqp.load"):
        jaxqp.load(junk)
    from safetensors.numpy import save_file

    from jaxqp._export.files import FORMAT_VERSION, _header_digest, _tensor_digest

    w = np.ones(3, np.float32)
    info = {"format": "jaxqp", "format_version": FORMAT_VERSION + 1, "jaxqp_version": "9.9",
            "tree": {"dict": {"w": {"array": "w"}}}, "sha256": {"w": _tensor_digest(w)}}
    info["header_sha256"] = _header_digest(info, {"w": ["F32", [3]]})  # a valid file, only newer
    newer = tmp_path / "newer.jaxqp"
    save_file({"w": w}, str(newer), metadata={"jaxqp": json.dumps(info)})
    info["format_version"] = FORMAT_VERSION  # the same file at this version loads: only the version refuses
    info["header_sha256"] = _header_digest(info, {"w": ["F32", [3]]})
    save_file({"w": w}, str(tmp_path / "same.jaxqp"), metadata={"jaxqp": json.dumps(info)})
    np.testing.assert_array_equal(jaxqp.load(tmp_path / "same.jaxqp")["w"], w)
    with pytest.raises(ValueError, match="newer jaxqp.*upgrade jaxqp"):
        jaxqp.load(newer)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "model.jaxqp"
    jaxqp.save(path, {"w": jnp.ones(3)})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="'bad' is a object"):
        jaxqp.save(path, {"w": jnp.zeros(3), "bad": object()})
    assert path.read_bytes() == before  # the failed save did not touch the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.jaxqp"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not a temp file's 0600
    with pytest.raises(TypeError, match="not a string"):
        jaxqp.save(path, {1: jnp.ones(2)})


FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("version", [1, 2, 3])
def test_committed_files_of_every_format_version_load_bit_exact(version):
    """Files written by earlier releases (tests/fixtures/make_fixtures.py) load to the same weights.

    Version 1 stored 3-bit codes in 4-bit slots, 5-7-bit codes as int8 and N:M positions in
    1/2/4/8-bit slots; loading repacks them at today's widths. Version 2's container was
    written by jaxqp's own code, version 3's by the safetensors package.
    """
    path = FIXTURES / f"v{version}.jaxqp"
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    meta = header["__metadata__"]
    info = json.loads(meta["jaxqp"]) if "jaxqp" in meta else meta  # version 3 keeps it under one key
    assert str(info["format_version"]) == str(version)
    back = jaxqp.load(path)
    want = np.load(FIXTURES / "expected.npz")
    assert sorted(back) == sorted(want.files) == list("abcde")
    for name in want.files:
        assert np.asarray(jaxqp.dequantize(back[name])).tobytes() == want[name].tobytes(), name
    assert back["a"].codes.size == 64 * 16 * 3 // 8  # repacked at 3 bits
    assert back["b"].codes.dtype == jnp.uint8 and back["b"].codes.size == 64 * 16 * 6 // 8
    assert back["c"].bitmask is not None and back["c"].kept == round(0.1 * 64 * 16)
    assert back["d"].index.size == -(-(2 * 64 // 8 * 16 * 3) // 8)  # 3-bit positions, 2 of every 8
    assert back["e"].index.size == -(-(2 * 16 * 5) // 8)  # 5-bit positions, 1 of every 32


def test_scalars_keep_their_shape(tmp_path):
    # before: np.ascontiguousarray turned every 0-d leaf (an optimizer's count, a learned
    # temperature) into shape (1,), so the loaded tree differed from the saved one
    tree = {"count": jnp.asarray(7, jnp.int32), "temperature": jnp.float32(0.5), "host": np.float32(1.5),
            "one": jnp.ones((1,)), "none": jnp.ones((0, 3))}
    path = tmp_path / "scalars.jaxqp"
    jaxqp.save(path, tree)
    back = jaxqp.load(path)
    for key, value in tree.items():
        assert back[key].shape == np.shape(value) and back[key].dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(back[key], value)
