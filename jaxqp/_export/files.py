"""``jaxqp.save`` / ``jaxqp.load``: exported trees in a safetensors file (export layer).

The file is a standard safetensors file (8-byte little-endian header length, a
JSON header, raw little-endian tensor bytes), so any safetensors reader can
list its tensors. jaxqp's own information lives in the header's
``__metadata__``:

* ``format = "jaxqp"`` and ``format_version`` (this code writes 2 and reads 1 and 2:
  version 1 stored 3-bit codes in 4-bit slots and 5-7-bit codes as int8, and N:M
  positions in 1-, 2-, 4- or 8-bit slots; :func:`load` repacks them);
* ``jaxqp_version``, the library that wrote the file;
* ``tree``: the tree structure (dicts with string keys, lists, tuples, None) with
  each leaf described as an array, a :class:`QArray`, a :class:`SparseArray`, an
  :class:`NMArray`, a :class:`Pow2Array` or an :class:`Fp8Array`
  (its static fields and the names of its tensors);
* ``sha256``: a checksum per tensor, and ``header_sha256``, a checksum of the
  rest of the header (tensor entries and metadata, as canonical JSON).

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
import struct
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..numerics._packing import container_width, pack, packed_size, unpack
from .nm_array import NMArray, index_bits
from .qarray import QArray
from .sparse_array import SparseArray
from .value_arrays import Fp8Array, Pow2Array

FORMAT = "jaxqp"
FORMAT_VERSION = 2  # 2: codes of 3, 5, 6 and 7 bits packed at their width (1: 4-bit slots / int8)
MAX_HEADER_BYTES = 100 * 2**20

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
        array = np.asarray(array)
        if str(array.dtype) not in _CODES:
            raise TypeError(f"jaxqp.save: '{name}' has dtype {array.dtype}, which safetensors cannot store")
        self.tensors[name] = np.ascontiguousarray(array)
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
    raise TypeError(
        f"jaxqp.save: '{where}' is a {type(node).__name__}; save takes dicts with string keys, lists, "
        "tuples, arrays and jaxqp's compressed leaves (for an NNX state, save nnx.to_pure_dict(state))"
    )


def save(path: str | os.PathLike, tree: Any) -> None:
    """Writes ``tree`` (typically ``jaxqp.export(params, state)``) to ``path`` atomically.

    Args:
      path: the file to write (replaced atomically if it exists).
      tree: a pytree of arrays and jaxqp containers (dicts, lists, tuples, None).

    Raises:
      TypeError: if a leaf is not an array or a jaxqp container (nothing is written).
    """
    writer = _Writer()
    structure = _describe(tree, "", writer)
    header: dict[str, Any] = {}
    offset = 0
    blobs = []
    for name, array in writer.tensors.items():
        data = array.tobytes()
        header[name] = {"dtype": _CODES[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    from .. import __version__

    header["__metadata__"] = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "jaxqp_version": __version__,
        "tree": json.dumps(structure, sort_keys=True),
        "sha256": json.dumps({n: hashlib.sha256(b).hexdigest() for n, b in zip(writer.tensors, blobs)},
                             sort_keys=True),
    }
    header["__metadata__"]["header_sha256"] = _header_digest(header)
    raw = json.dumps(header, sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".jaxqp-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for blob in blobs:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _header_digest(header: dict) -> str:
    meta = {k: v for k, v in header["__metadata__"].items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps({**header, "__metadata__": meta}, sort_keys=True).encode()).hexdigest()


def _refuse(path, why: str) -> ValueError:
    return ValueError(f"jaxqp.load('{path}'): {why}")


def _read_header(path, blob: bytes) -> tuple[dict, dict, int]:
    if len(blob) < 8:
        raise _refuse(path, f"the file is {len(blob)} bytes long: truncated, or not a jaxqp file")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise _refuse(path, "the header length is impossible: not a jaxqp/safetensors file, or truncated")
    try:
        header = json.loads(blob[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _refuse(path, "the header is not valid JSON: not a jaxqp file, or corrupt") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _refuse(path, "this is not a jaxqp file (no jaxqp format marker in the safetensors metadata)")
    if meta.get("header_sha256") != _header_digest(header):
        raise _refuse(path, "header checksum mismatch: the file is corrupt")
    header = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise _refuse(path, f"unreadable format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise _refuse(path, f"written by a newer jaxqp (format version {version}, jaxqp "
                            f"{meta.get('jaxqp_version')}); this jaxqp reads up to version "
                            f"{FORMAT_VERSION}: upgrade jaxqp")
    return header, meta, 8 + size


def _tensors(path, blob: bytes, header: dict, meta: dict, start: int) -> dict[str, np.ndarray]:
    try:
        sums = json.loads(meta["sha256"])
    except (KeyError, json.JSONDecodeError):
        raise _refuse(path, "the checksum table is missing or corrupt") from None
    buffer = memoryview(blob)[start:]
    tensors, end_max = {}, 0
    for name, info in header.items():
        try:
            dtype = np.dtype(jnp.dtype(_DTYPES[info["dtype"]]))
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _refuse(path, f"tensor '{name}' has a malformed entry in the header") from None
        if begin < 0 or end > len(buffer) or end - begin != math.prod(shape) * dtype.itemsize:
            raise _refuse(path, f"tensor '{name}' lies outside the file: truncated or corrupt")
        data = bytes(buffer[begin:end])
        if hashlib.sha256(data).hexdigest() != sums.get(name):
            raise _refuse(path, f"checksum mismatch for tensor '{name}': the file is corrupt")
        tensors[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        end_max = max(end_max, end)
    if end_max != len(buffer):
        raise _refuse(path, f"{len(buffer) - end_max} unexpected bytes after the tensors: corrupt")
    return tensors


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
    with open(path, "rb") as f:
        blob = f.read()
    header, meta, start = _read_header(path, blob)
    tensors = _tensors(path, blob, header, meta, start)
    try:
        structure = json.loads(meta["tree"])
    except (KeyError, json.JSONDecodeError):
        raise _refuse(path, "the tree description is missing or corrupt") from None
    try:
        return _build(structure, tensors, path, int(meta["format_version"]))
    except (KeyError, TypeError, AttributeError):
        raise _refuse(path, "the tree description is malformed") from None
