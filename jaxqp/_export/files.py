"""``jaxqp.save`` / ``jaxqp.load``: exported trees in a safetensors file (export layer).

The container is written and parsed by the ``safetensors`` package (its numpy API for
writing, ``safe_open`` for reading: memory-mapped, validated by the library), so any
safetensors reader can list the tensors. jaxqp's own information is one JSON object under
the metadata key ``jaxqp`` (one key, because safetensors writes its metadata map in no fixed
order: the file's bytes stay deterministic):

* ``format = "jaxqp"`` and ``format_version`` (this code writes 3 and reads 1 to 3:
  version 1 stored 3-bit codes in 4-bit slots and 5-7-bit codes as int8, and N:M
  positions in 1-, 2-, 4- or 8-bit slots, which :func:`load` repacks; versions 1 and 2
  kept these fields directly in the metadata map, as strings);
* ``jaxqp_version``, the library that wrote the file;
* ``tree``: the tree structure (dicts with string keys, lists, tuples, None) with
  each leaf described as an array, a :class:`QArray`, a :class:`SparseArray`, an
  :class:`NMArray`, a :class:`Pow2Array` or an :class:`Fp8Array`
  (its static fields and the names of its tensors);
* ``sha256``: a checksum per tensor, and ``header_sha256``, a checksum of the rest and of
  every tensor's name, dtype and shape (canonical JSON). Versions 1 and 2 checksummed the
  raw header, tensor offsets included; their offsets are rebuilt from the order
  ``safe_open`` reports, so their checksum is still verified.

Writes are atomic (a temporary file in the same folder, then ``os.replace``).
Loading parses JSON and copies bytes, never executes code, and refuses
truncated, corrupt, foreign and newer-version files with a ValueError.

Example:
    >>> import os, tempfile, jax.numpy as jnp, jaxqp
    >>> path = os.path.join(tempfile.mkdtemp(), "model.jaxqp")
    >>> jaxqp.save(path, {"w": jnp.ones((2, 3))})
    >>> jaxqp.load(path)["w"].shape
    (2, 3)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._specs.paths import named_children
from ..numerics._packing import container_width, pack, packed_size, unpack
from .atomic import check_writable, replaced_atomically
from .compressed import require_on_this_host
from .nm_array import NMArray, index_bits
from .qarray import QArray
from .sparse_array import SparseArray
from .value_arrays import Fp8Array, Pow2Array

FORMAT = "jaxqp"
FORMAT_VERSION = 3  # 3: one metadata entry, header checksum without offsets; 2: 3/5/6/7-bit codes at their width
METADATA_KEY = "jaxqp"  # version 3 keeps everything jaxqp writes under this one metadata key

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_CODES = {v: k for k, v in _DTYPES.items()}
_QARRAY_STATIC = ("shape", "dtype", "bits", "qmin", "qmax", "kept")


class _Writer:
    """Collects tensors under unique names while the tree is described."""

    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, name: str, array) -> str | None:
        if array is None:
            return None
        require_on_this_host("jaxqp.save", name, array, "save writes every array from this host")
        array = np.asarray(array)
        if str(array.dtype) not in _CODES:
            raise TypeError(f"jaxqp.save: '{name}' has dtype {array.dtype}, which safetensors cannot store")
        self.tensors[name] = np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes 0-d 1-d
        return name


def _describe(node, path: str, writer: _Writer):
    where = path or "<root>"
    if isinstance(node, QArray):
        fields = {k: getattr(node, k) for k in _QARRAY_STATIC}
        fields["shape"] = list(fields["shape"])
        fields["group"] = None if node.group is None else list(node.group)
        for k in ("codes", "scale", "zero_point", "bitmask"):
            fields[k] = writer.add(f"{where}:{k}", getattr(node, k))
        return {"qarray": fields}
    if isinstance(node, SparseArray):
        return {"sparse": {"values": writer.add(f"{where}:values", node.values),
                           "bitmask": writer.add(f"{where}:bitmask", node.bitmask),
                           "shape": list(node.shape)}}
    if isinstance(node, NMArray):
        return {"nm": {"values": _describe(node.values, f"{where}:values", writer),
                       "index": writer.add(f"{where}:index", node.index),
                       "shape": list(node.shape), "n": node.n, "m": node.m, "axis": node.axis}}
    if isinstance(node, Pow2Array):
        return {"pow2": {"codes": _describe(node.codes, f"{where}:codes", writer),
                         "emin": writer.add(f"{where}:emin", node.emin), "dtype": node.dtype}}
    if isinstance(node, Fp8Array):
        return {"fp8": {"values": _describe(node.values, f"{where}:values", writer),
                        "scale": writer.add(f"{where}:scale", node.scale), "dtype": node.dtype}}
    if node is None:
        return {"none": None}
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, str):
                raise TypeError(f"jaxqp.save: key {key!r} under '{where}' is not a string; use string keys")
        return {"dict": {k: _describe(v, f"{path}/{k}" if path else k, writer) for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
        kind = "list" if isinstance(node, list) else "tuple"
        return {kind: [_describe(v, f"{path}/{i}" if path else str(i), writer) for i, v in enumerate(node)]}
    if isinstance(node, (jax.Array, np.ndarray, np.generic, int, float, bool)):
        return {"array": writer.add(where, node)}
    children = named_children(node)
    if children is not None and list(children) == [""]:  # a wrapper of one value (an NNX Variable): the value
        return _describe(children[""], path, writer)
    if children is not None:  # another pytree node (an Equinox module): a dict of its children
        return {"dict": {k: _describe(v, f"{path}/{k}" if path else k, writer) for k, v in children.items()}}
    raise TypeError(
        f"jaxqp.save: '{where}' is a {type(node).__name__}; save takes dicts with string keys, lists, "
        "tuples, pytree nodes (saved as dicts of their children), arrays and jaxqp's compressed leaves "
        "(for an NNX state, save nnx.to_pure_dict(state))"
    )


def save(path: str | os.PathLike, tree: Any) -> None:
    """Writes ``tree`` (typically ``jaxqp.export(params, state)``) to ``path`` atomically.

    Args:
      path: the file to write (replaced atomically if it exists).
      tree: a pytree of arrays and jaxqp containers (dicts, lists, tuples, None).

    Raises:
      TypeError: if a leaf is not an array or a jaxqp container (nothing is written).
      ValueError: if ``path`` is a folder or its folder does not exist (nothing is written).
    """
    from safetensors.numpy import save_file

    from .. import __version__

    check_writable("jaxqp.save", path)
    writer = _Writer()
    structure = _describe(tree, "", writer)
    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jaxqp_version": __version__,
        "tree": structure,
        "sha256": {n: _tensor_digest(a) for n, a in writer.tensors.items()},
    }
    info["header_sha256"] = _header_digest(info, {n: [_CODES[str(a.dtype)], list(a.shape)]
                                                  for n, a in writer.tensors.items()})
    # one metadata entry: safetensors writes its metadata map in no fixed order, one key keeps files deterministic
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    with replaced_atomically(path) as tmp:
        save_file(writer.tensors, tmp, metadata=metadata)


def _tensor_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


def _header_digest(info: dict, specs: dict) -> str:
    """Version 3: jaxqp's metadata (less this checksum) and each tensor's ``[dtype, shape]``."""
    meta = {k: v for k, v in info.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps({"metadata": meta, "tensors": specs}, sort_keys=True).encode()).hexdigest()


def _raw_header_digest(metadata: dict, entries: dict) -> str:
    """Versions 1 and 2: the raw header as written (tensor entries with offsets, and the metadata)."""
    meta = {k: v for k, v in metadata.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps({**entries, "__metadata__": meta}, sort_keys=True).encode()).hexdigest()


def _refuse(path, why: str) -> ValueError:
    return ValueError(f"jaxqp.load('{path}'): {why}")


def _jaxqp_info(path, metadata) -> tuple[dict, int]:
    """jaxqp's metadata (version 3: the one entry; 1 and 2: the metadata map itself) and its version.

    Refuses foreign and newer files.
    """
    metadata = metadata if isinstance(metadata, dict) else {}
    if METADATA_KEY in metadata:
        try:
            info = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise _refuse(path, "jaxqp's metadata is not valid JSON: the file is corrupt") from None
    else:
        info = metadata
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise _refuse(path, "this is not a jaxqp file (no jaxqp format marker in the safetensors metadata)")
    try:
        version = int(info.get("format_version", ""))
    except (TypeError, ValueError):
        raise _refuse(path, f"unreadable format_version {info.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise _refuse(path, f"written by a newer jaxqp (format version {version}, jaxqp "
                            f"{info.get('jaxqp_version')}); this jaxqp reads up to version "
                            f"{FORMAT_VERSION}: upgrade jaxqp")
    return info, version


def _from_json(value, what: str, path):
    """Versions 1 and 2 stored the tree and the checksums as JSON strings inside the metadata."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise _refuse(path, f"the {what} is corrupt") from None


def _read(path, handle) -> tuple[Any, int, dict[str, np.ndarray]]:
    """The tree description, the format version and the tensors of an open ``safe_open`` handle.

    Every checksum is verified before anything is built.
    """
    info, version = _jaxqp_info(path, handle.metadata())
    specs, entries, offset = {}, {}, 0
    for name in handle.offset_keys():  # in file order: offsets follow from the sizes
        piece = handle.get_slice(name)
        code, shape = piece.get_dtype(), [int(d) for d in piece.get_shape()]
        if code not in _DTYPES:
            raise _refuse(path, f"tensor '{name}' has dtype {code}, which jaxqp never writes")
        size = math.prod(shape) * np.dtype(jnp.dtype(_DTYPES[code])).itemsize
        specs[name] = [code, shape]
        entries[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    digest = _header_digest(info, specs) if version >= 3 else _raw_header_digest(info, entries)
    if info.get("header_sha256") != digest:
        raise _refuse(path, "header checksum mismatch: the file is corrupt")
    sums = _from_json(info.get("sha256"), "checksum table", path)
    if not isinstance(sums, dict):
        raise _refuse(path, "the checksum table is missing or corrupt")
    tensors, raw = {}, None
    for name, (code, shape) in specs.items():
        if code.startswith("F8_"):  # safetensors' numpy API has no float8: the raw bytes, viewed
            raw = _raw_bytes(path) if raw is None else raw  # the file read once, for all float8 tensors
            array = np.frombuffer(raw[name], dtype=jnp.dtype(_DTYPES[code])).reshape(shape)
        else:
            array = handle.get_tensor(name)
        if _tensor_digest(array) != sums.get(name):
            raise _refuse(path, f"checksum mismatch for tensor '{name}': the file is corrupt")
        tensors[name] = array
    return _from_json(info.get("tree"), "tree description", path), version, tensors


def _raw_bytes(path) -> dict[str, bytes]:
    import safetensors

    with open(path, "rb") as f:
        return {name: bytes(info["data"]) for name, info in safetensors.deserialize(f.read())}


def _v1_width(bits: int) -> int:
    """The storage width version 1 files used for ``bits``-bit codes (and N:M positions)."""
    return next(w for w in (1, 2, 4, 8, 16) if bits <= w)


def _repacked(stored, bits: int, count: int, offset: int = 0):
    """Version-1 storage of ``count`` codes of ``bits`` bits (``code - offset`` when packed), in today's layout."""
    old, new = _v1_width(bits), container_width(bits)
    flat = np.asarray(stored).reshape(-1)
    if old == new or flat.size != (packed_size(count, old) if old < 8 else count):
        return stored  # nothing to repack, or malformed: validation refuses it
    values = unpack(jnp.asarray(flat), old, count) if old < 8 else jnp.asarray(flat[:count].astype(np.int32) - offset)
    return pack(values, new)


def _build(node, tensors: dict, path, version: int = FORMAT_VERSION):
    def maybe(name) -> jax.Array | None:
        return None if name is None else get(name)

    def get(name) -> jax.Array:
        if name is None:
            raise _refuse(path, "the tree description leaves out a required tensor")
        if name not in tensors:
            raise _refuse(path, f"the tree names a tensor '{name}' that the file does not hold")
        return jnp.asarray(tensors[name])

    if not isinstance(node, dict) or len(node) != 1:
        raise _refuse(path, "the tree description is malformed")
    (kind, value), = node.items()
    if kind == "array":
        return get(value)
    if kind == "none":
        return None
    if kind == "dict":
        return {k: _build(v, tensors, path, version) for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [_build(v, tensors, path, version) for v in value]
        return items if kind == "list" else tuple(items)
    if kind == "qarray":
        static = {k: value[k] for k in _QARRAY_STATIC}
        static["shape"] = tuple(static["shape"])
        group = value.get("group")
        static["group"] = None if group is None else (int(group[0]), int(group[1]))
        codes = get(value["codes"])
        if version == 1:
            codes = _repacked(codes, static["bits"], static["kept"], static["qmin"])
        q = QArray(codes, get(value["scale"]), maybe(value["zero_point"]), maybe(value["bitmask"]), **static)
        return _validated(q, path)
    if kind == "sparse":
        return _validated(SparseArray(get(value["values"]), get(value["bitmask"]), tuple(value["shape"])), path)
    if kind == "nm":
        values = _build(value["values"], tensors, path, version)
        if not isinstance(values, (QArray, jax.Array)):
            raise _refuse(path, "an N:M leaf's values are neither an array nor a QArray")
        static = {k: int(value[k]) for k in ("n", "m", "axis")}
        index = get(value["index"])
        if version == 1:
            index = _repacked(index, index_bits(static["m"]), math.prod(values.shape))
        return _validated(NMArray(values, index, tuple(value["shape"]), **static), path)
    if kind == "pow2":
        codes = _build(value["codes"], tensors, path, version)
        if not isinstance(codes, QArray):
            raise _refuse(path, "a power-of-two leaf's codes are not a QArray")
        return _validated(Pow2Array(codes, get(value["emin"]), str(value["dtype"])), path)
    if kind == "fp8":
        values = _build(value["values"], tensors, path, version)
        if not isinstance(values, (SparseArray, jax.Array)):
            raise _refuse(path, "an fp8 leaf's values are neither an array nor a SparseArray")
        return _validated(Fp8Array(values, get(value["scale"]), str(value["dtype"])), path)
    raise _refuse(path, f"unknown leaf kind '{kind}' in the tree description")


def _validated(leaf, path):
    try:
        return leaf.validate()
    except (ValueError, TypeError) as err:
        raise _refuse(path, f"a compressed leaf breaks its invariants ({err})") from None


def load(path: str | os.PathLike) -> Any:
    """Reads a tree written by :func:`save`; refuses anything else with a ValueError.

    Args:
      path: the file.

    Returns:
      The tree, with the compressed containers it was saved with.

    Raises:
      ValueError: if the file is truncated, corrupt (a checksum differs), not a jaxqp file,
        or of a newer format version than this jaxqp reads.
    """
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise _refuse(path, "is a folder; give the file jaxqp.save wrote")
    try:
        with safe_open(os.fspath(path), framework="numpy") as handle:
            structure, version, tensors = _read(path, handle)
    except SafetensorError as err:
        raise _refuse(path, f"not a safetensors file, or truncated or corrupt ({err})") from None
    try:
        return _build(structure, tensors, path, version)
    except (KeyError, TypeError, AttributeError):
        raise _refuse(path, "the tree description is malformed") from None
