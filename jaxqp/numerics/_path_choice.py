"""Choosing a matmul's compute path by measuring it on this machine (numerics layer: jax only).

An integer matmul can run several ways that give the same numbers (int8 in either
operand order, an exact bf16 dot) or nearly the same (float with dequantized weights).
Which is fastest depends on the CPU (VNNI, native bf16, AMX), the backend, the layer's
shape and the number of rows, so jaxqp does not guess: the first time a
``(kind, shape, row bucket)`` is traced, :func:`decide` times every candidate on
random data of that shape, next to the float matmul it replaces, and keeps the
fastest. Decisions are cached per process, keyed by :func:`machine_key` (backend, CPU
model and flags, jax version) so a cache never crosses machines, and optionally on disk
(``JAXQP_PATH_CACHE=/some/file.json``), which makes later runs deterministic: a cached
decision is reused, never re-measured.

Example:
    >>> choose({"int8": 1.0, "bf16": 0.5, "float": 2.0})
    'bf16'
    >>> row_bucket(5), row_bucket(64), row_bucket(65)
    (8, 64, 128)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
CACHE_ENV = "JAXQP_PATH_CACHE"
ROUNDS = 5  # interleaved timing rounds per candidate; the median is kept
MIN_ROUND_S = 5e-4  # each round repeats a call until it lasts at least this long
_THREAD_NAME = "jaxqp-path-choice"


@functools.cache
def cpu_info() -> dict:
    """The CPU model name and which of ``CPU_FLAGS`` it has (from ``/proc/cpuinfo``; empty elsewhere).

    Returns:
      ``{"model": str, "flags": [...]}``.
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": [flag for flag in CPU_FLAGS if flag in flags]}


@functools.cache
def machine_key() -> str:
    """What a decision is valid for: backend, device kind, CPU model and flags, jax version.

    Returns:
      A string such as ``"cpu|cpu|Intel Xeon|avx2,avx512f|jax 0.10.2"``.
    """
    info = cpu_info()
    device = jax.devices()[0].device_kind
    return "|".join([jax.default_backend(), device, info["model"], ",".join(info["flags"]), f"jax {jax.__version__}"])


def row_bucket(rows: int) -> int:
    """The power of two at or above ``rows``: decisions are made per bucket of row counts.

    Args:
      rows: the number of rows of the matmul's input.

    Returns:
      The bucket (1, 2, 4, 8, ...).
    """
    return 1 << max(int(rows) - 1, 0).bit_length()


def choose(timings: Mapping[str, float]) -> str:
    """The fastest candidate; ties go to the earlier one (the candidates' order is the preference).

    Args:
      timings: seconds per call of each candidate, in order of preference.

    Returns:
      The chosen candidate's name.
    """
    if not timings:
        raise ValueError("choose: no candidate timings")
    best = min(timings.values())
    return next(name for name, t in timings.items() if t == best)


@dataclasses.dataclass(frozen=True)
class Decision:
    """A measured choice for one ``(kind, shape, row bucket)``.

    Attributes:
      path: the chosen candidate.
      seconds: the median seconds per call of every candidate.
      float_seconds: the float matmul's median (float weights, no quantization), for reference.
    """

    path: str
    seconds: dict
    float_seconds: float

    @property
    def ratio(self) -> float:
        """The chosen path's time over the float matmul's."""
        return self.seconds[self.path] / self.float_seconds


_LOCK = threading.Lock()
_DECISIONS: dict[str, Decision] = {}
_LOADED: set[str] = set()


def _key(kind: str, shape: tuple, bucket: int) -> str:
    return f"{machine_key()}|{kind}|{'x'.join(map(str, shape))}|{bucket}"


def _load_disk() -> None:
    path = os.environ.get(CACHE_ENV)
    if not path or path in _LOADED or not os.path.exists(path):
        return
    _LOADED.add(path)
    with open(path) as f:
        for key, d in json.load(f).items():
            _DECISIONS.setdefault(key, Decision(d["path"], d["seconds"], d["float_seconds"]))


def _save_disk() -> None:
    path = os.environ.get(CACHE_ENV)
    if not path:
        return
    data = {key: dataclasses.asdict(d) for key, d in _DECISIONS.items()}
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(f.name, path)  # atomic: a reader never sees half a file


def cached(kind: str, shape: tuple, rows: int) -> Decision | None:
    """The decision already made for ``(kind, shape, row_bucket(rows))`` on this machine, or None.

    Args:
      kind: what is multiplied (e.g. ``"dense-int8"``).
      shape: the layer's shape.
      rows: the input's row count.

    Returns:
      The cached :class:`Decision`, or None.
    """
    with _LOCK:
        _load_disk()
        return _DECISIONS.get(_key(kind, shape, row_bucket(rows)))


def time_candidates(fns: Mapping[str, Callable[[], object]], rounds: int = ROUNDS,
                    min_round_s: float = MIN_ROUND_S) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, timed in interleaved rounds.

    Args:
      fns: name -> a function that runs the candidate once and returns its (jax) result.
      rounds: how many interleaved rounds.
      min_round_s: each round repeats a call until it lasts at least this long.

    Returns:
      name -> median seconds per call; ``inf`` for a candidate that fails to compile or run
      here (XLA's CPU runtime lacks some dot kernels for some shapes and shardings, e.g. a bf16
      dot into float32), so that :func:`choose` never picks it.

    Raises:
      The first candidate's error when every candidate fails.
    """
    calls, failed = {}, {}
    for name, fn in fns.items():
        try:
            jax.block_until_ready(fn())  # compile and warm up
        except Exception as error:  # any failure rules the candidate out; all failing re-raises
            failed[name] = error
            continue
        start = time.perf_counter()
        jax.block_until_ready(fn())
        calls[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-7)))
    if not calls:
        raise next(iter(failed.values()))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, count in calls.items():
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(count):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / count)
    return {name: float(np.median(times[name])) if name in calls else float("inf") for name in fns}


def _time_built(build, timing: dict) -> dict[str, float]:
    candidates, reference = build()
    return time_candidates({**candidates, "_float": reference}, **timing)


def _in_clean_thread(fn):
    """``fn()`` run in a new thread (outside any trace of this one), its exception re-raised here."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as error:
            result["error"] = error

    thread = threading.Thread(target=target, name=_THREAD_NAME)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def decide(kind: str, shape: tuple, rows: int,
           build: Callable[[], tuple[Mapping[str, Callable[[], object]], Callable[[], object]]],
           **timing) -> Decision:
    """The cached decision for ``(kind, shape, row_bucket(rows))``, measuring the candidates if there is none.

    Runs eagerly even inside a trace: ``build`` and the timing run in a fresh thread, whose
    trace state is clean (JAX's trace state is per thread), so calls dispatch as fast as in
    a plain program. ``build`` must make concrete arrays of the bucket's shape and may only
    read shapes and dtypes from tracers.

    Args:
      kind: what is multiplied (e.g. ``"dense-int8"``); part of the cache key.
      shape: the layer's shape; part of the cache key.
      rows: the input's row count (its bucket is part of the cache key).
      build: returns ``(candidates, reference)``: path name -> zero-argument function running
        that path, in order of preference; and the float matmul the paths replace.
      **timing: ``rounds`` and ``min_round_s`` for :func:`time_candidates`.

    Returns:
      The :class:`Decision`.
    """
    found = cached(kind, shape, rows)
    if found is not None:
        return found
    seconds = _in_clean_thread(lambda: _time_built(build, timing))
    float_seconds = seconds.pop("_float")
    if all(t == float("inf") for t in seconds.values()):
        raise RuntimeError(f"no candidate path of {kind} {shape} at {rows} rows runs on this backend "
                           f"({', '.join(seconds)} all failed to compile or run); pin one with path=...")
    decision = Decision(choose(seconds), seconds, float_seconds)
    with _LOCK:
        decision = _DECISIONS.setdefault(_key(kind, shape, row_bucket(rows)), decision)
        _save_disk()
    return decision


def decisions() -> dict[str, Decision]:
    """Every decision made (or loaded) in this process, by cache key.

    Returns:
      A copy of the cache.
    """
    with _LOCK:
        _load_disk()
        return dict(_DECISIONS)


def clear_decisions() -> None:
    """Forgets every decision of this process (a disk cache file is left as it is)."""
    with _LOCK:
        _DECISIONS.clear()
        _LOADED.clear()


_RECORDERS: list[list] = []


@contextlib.contextmanager
def record_paths():
    """Collects every path looked up while tracing inside the block (pinned or measured).

    Yields:
      A list that fills with ``{"kind", "shape", "rows", "path"}`` dicts, one per matmul traced.
    """
    used: list = []
    _RECORDERS.append(used)
    try:
        yield used
    finally:
        _RECORDERS.remove(used)


def note(kind: str, shape: tuple, rows: int, path: str) -> None:
    """Tells every active :func:`record_paths` which path a matmul of ``(kind, shape, rows)`` takes.

    Traces made while measuring (in a :func:`decide` thread) are candidates, not the traced
    program, and are not recorded.
    """
    if threading.current_thread().name == _THREAD_NAME:
        return
    for used in _RECORDERS:
        used.append({"kind": kind, "shape": tuple(shape), "rows": int(rows), "path": path})
