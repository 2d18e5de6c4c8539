"""The measured backend choice: on CUDA, ``backend="auto"`` times the candidates of each factored op once per key
and runs the fastest, keeping the choice in an on-disk cache that later processes reuse (as Triton's autotuner
and cuDNN's benchmark mode do). So a factored layer is never slower than the best of its candidates, the torch
path among them, beyond timing noise, whatever the kernels' tuning.

What is timed: the candidates of ``_dispatch.TUNE_CANDIDATES``, those :func:`_dispatch.candidate_problem` rules
out passed over with its reason: for ``lowrank_linear`` the torch path (two calls, the second with cuBLASLt's
bias + activation epilogue where it applies), Triton's fused and split paths and the CUDA extension (at most 16
rows); for ``lowrank_mlp`` the fused kernel, two factored linears (each with its own measured choice) and the
extension; for ``lowrank_conv2d`` the torch path and Triton. Each candidate runs once first (one that raises is
passed over with the first line of its error, warned once), then the survivors are timed with CUDA events in
interleaved rounds (:func:`cuda_event_timer`; any ``timer`` can be given to a :class:`Tuner`).

The key: the device's name, the dtype, the row count rounded up to a power of two, the op's sizes exactly (in,
out, rank; for the MLP in, hidden, out and both ranks), the activation, whether there is a bias, and the versions
of torch, Triton, the CUDA extension (a digest of its file) and this package: another GPU or version is another
key, timed anew.

When: at the first eager call of a key (or ahead, with ``nn.tune(model, example)`` / ``utilrank bench --tune``).
Never inside CUDA-graph capture, ``torch.compile`` tracing or a dispatch mode (``FlopCounterMode``, fake
tensors): there the recorded choice is read (under ``torch.compile``, once, as a constant of the graph) or, with
none recorded, the fixed rule of ``_dispatch`` runs.

Where: ``<UTILRANK_CACHE>/tune/<device slug>.json`` (``{"format": "utilrank.tune/1", "device", "entries": {key:
{"choice", "us", "passed_over", "date"}}}``), merged under an exclusive ``flock`` and written atomically, so
processes tuning at once keep each other's entries.

Off: ``UTILRANK_TUNE=0`` gives the fixed rule back (reproducible runs); nothing is timed, read or written.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import env
from .._files import cache_dir, sha256, write_json
from .._version import __version__
from ._dispatch import TUNE_CANDIDATES, candidate_problem, cuda_extension, through_op

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: writes still merge, without the lock
    fcntl = None

logger = logging.getLogger(__name__)

TUNE_FORMAT = "utilrank.tune/1"
Timer = Callable[[dict[str, Callable[[], object]]], dict[str, float]]


class TuneWarning(UserWarning):
    """A candidate of the measured choice raised when run; it is passed over (the message says why)."""


@dataclass(frozen=True)
class Candidate:
    """One implementation the measured choice may time: ``run`` computes the op on the call's operands; None
    where it is not eligible (``reason`` says why)."""

    name: str
    run: Callable[[], object] | None
    reason: str = ""


# ------------------------------------------------------------------------------------------------
# What the choice reads: the switch, where timing is allowed, the key.
# ------------------------------------------------------------------------------------------------
def enabled() -> bool:
    """``UTILRANK_TUNE`` is not ``0``."""
    return env.get("UTILRANK_TUNE", "1") != "0"


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream (no timing, no probe: nothing may run twice)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def can_time() -> bool:
    """Not in CUDA-graph capture, ``torch.compile`` tracing or a dispatch mode."""
    return not (through_op() or capturing())


def rows_bucket(rows: int) -> int:
    """The power of two at or above ``rows`` (0 stays 0): one measured choice per bucket of row counts."""
    return 1 << (rows - 1).bit_length() if rows > 0 else 0


def device_name(device: str) -> str:
    """``NVIDIA H200`` for a CUDA device; the device type otherwise."""
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else d.type


@functools.cache
def versions() -> str:
    """The versions a measured choice holds for: torch, Triton, the CUDA extension's file, this package; and
    ``UTILRANK_TRITON_CONFIG`` (the Triton kernels timed with their first autotune row only are another key)."""
    try:
        import triton  # optional

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    ext = cuda_extension()
    ext_file = getattr(ext, "__file__", None)
    ext_id = sha256(ext_file)[:12] if ext_file else "none"
    configs = env.get("UTILRANK_TRITON_CONFIG") or "autotuned"
    return f"torch={torch.__version__} triton={triton_version} ext={ext_id} utilrank={__version__} configs={configs}"


def make_key(op: str, x: torch.Tensor, rows: int, dims: Sequence[int], activation: str | None,
             bias: int) -> tuple:
    """The process's key of a measured choice: ``(op, device, dtype, rows bucket, dims, activation, bias)``, the
    device by index (:func:`disk_key` adds its name and the versions). The device and dtype are torch's objects
    (no string formatting per call); :func:`recorded` takes them as strings."""
    return (op, x.device, x.dtype, rows_bucket(rows), tuple(dims), activation or "none", int(bias))


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def disk_key(key: tuple) -> str:
    """The key in the cache file: the device's name in place of its index, and the versions."""
    op, device, dtype, rows, dims, activation, bias = key
    return (f"{op} | {device_name(str(device))} | {_dtype_name(dtype)} | rows<={rows} | "
            f"{'x'.join(map(str, dims))} | act={activation} | bias={int(bias)} | {versions()}")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _finite(seconds: float | None) -> float:
    return seconds if seconds is not None and math.isfinite(seconds) else math.inf


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------
# The cache file.
# ------------------------------------------------------------------------------------------------
def read_entries(path: str | Path) -> dict[str, dict]:
    """The entries of a tune cache file; {} where it is missing or not one (it is then rewritten whole)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        logger.debug("no tune cache read from %s: %s", path, exc)
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("format") == TUNE_FORMAT else None
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def write_entries(path: str | Path, entries: dict[str, dict], device: str = "") -> None:
    """Merge ``entries`` into the tune cache file ``path``: under an exclusive ``flock`` on ``<path>.lock`` the
    file is read, merged and written atomically, so processes writing at once keep each other's entries and a
    reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        merged = {**read_entries(path), **entries}
        write_json(path, {"format": TUNE_FORMAT, "device": device, "entries": merged})


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------
def cuda_event_timer(fns: dict[str, Callable[[], object]], *, rounds: int = 7, round_seconds: float = 5e-4,
                     max_reps: int = 100) -> dict[str, float]:
    """Seconds per call of each callable on the current CUDA stream: one warm-up call each, then ``rounds``
    interleaved rounds (the order reversed every other round) of as many calls as take about ``round_seconds``
    (at most ``max_reps``), timed with CUDA events; the median round. About 10 ms per candidate."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    reps = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        reps[name] = max(1, min(max_reps, int(round_seconds / max(time.perf_counter() - start, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps[name]):
                fns[name]()
            end.record()
            end.synchronize()
            samples[name].append(begin.elapsed_time(end) / 1e3 / reps[name])
    return {name: statistics.median(s) for name, s in samples.items()}


# ------------------------------------------------------------------------------------------------
# The chooser.
# ------------------------------------------------------------------------------------------------
class Tuner:
    """Measured choices: a process memo over the cache files in ``folder`` (default
    ``<UTILRANK_CACHE>/tune``, resolved when read), timed with ``timer`` (default :func:`cuda_event_timer`)."""

    def __init__(self, folder: str | Path | None = None, timer: Timer | None = None):
        self._folder = Path(folder) if folder is not None else None
        self.timer = timer or cuda_event_timer
        self.memo: dict[tuple, str] = {}
        self._files: dict[Path, tuple[int, dict]] = {}  # path -> (mtime_ns, entries) as last read
        self._fresh: set[tuple] | None = None  # under retuning(): the keys timed since it began
        self._said: set[tuple[str, str, str]] = set()

    @property
    def folder(self) -> Path:
        return self._folder if self._folder is not None else cache_dir() / "tune"

    def path(self, device: str | torch.device) -> Path:
        """The cache file of the device ``device`` (``cuda:0``) names."""
        return self.folder / f"{_slug(device_name(str(device)))}.json"

    def _entries(self, device: str | torch.device) -> dict[str, dict]:
        path = self.path(device)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return {}
        if path not in self._files or self._files[path][0] != mtime:
            self._files[path] = (mtime, read_entries(path))
        return self._files[path][1]

    def lookup(self, key: tuple) -> str | None:
        """The recorded choice of ``key`` (this process's, else the cache file's), or None."""
        if self._fresh is not None and key not in self._fresh:
            return None
        hit = self.memo.get(key)
        if hit is None:
            choice = self._entries(key[1]).get(disk_key(key), {}).get("choice")
            if choice in TUNE_CANDIDATES.get(key[0], ()):
                hit = self.memo[key] = choice
        return hit

    def choose(self, key: tuple, candidates: Sequence[Candidate], fallback: str) -> str:
        """The recorded choice of ``key``; else, where timing is allowed, the fastest candidate that runs
        (recorded); else ``fallback``."""
        hit = self.lookup(key)
        if hit is not None:
            return hit
        if not can_time():
            return fallback
        op = key[0]
        passed = {c.name: c.reason for c in candidates if c.run is None}
        working = {}
        with recording():  # the probes' and timings' calls are not what the layer ran
            for c in candidates:
                if c.run is None:
                    continue
                try:
                    c.run()  # fails here, not while timing
                except Exception as exc:  # a kernel that cannot take these operands: compile/launch errors of any kind
                    passed[c.name] = _first_line(exc)
                    self._say(op, c.name, passed[c.name], failed=True)
                else:
                    working[c.name] = c.run
            for name, reason in passed.items():
                self._say(op, name, reason)
            if not working:
                return fallback
            if len(working) == 1:  # nothing to compare: recorded untimed
                seconds, best = dict.fromkeys(working, math.nan), next(iter(working))
            else:
                seconds = self.timer(working)
                best = min(working, key=lambda n: _finite(seconds.get(n)))  # ties: the first (torch, for a linear)
        us = {n: round(s * 1e6, 3) if math.isfinite(s) else None for n, s in seconds.items()}
        logger.info("%s: measured %s, runs %s", disk_key(key), us, best)
        self.record(key, {"choice": best, "us": us, "passed_over": passed,
                          "date": datetime.date.today().isoformat()})
        return best

    def record(self, key: tuple, entry: dict) -> None:
        """Keep ``entry`` (its ``"choice"``) for ``key`` in this process and in the device's cache file."""
        self.memo[key] = entry["choice"]
        if self._fresh is not None:
            self._fresh.add(key)
        try:
            write_entries(self.path(key[1]), {disk_key(key): entry}, device_name(str(key[1])))
        except OSError as exc:  # a read-only cache: the choice still holds for this process
            logger.warning("measured choice not recorded in %s: %s", self.path(key[1]), exc)

    def _say(self, op: str, name: str, reason: str, failed: bool = False) -> None:
        if (op, name, reason) in self._said:
            return
        self._said.add((op, name, reason))
        logger.info("%s: the measured choice passes over %s: %s", op, name, reason)
        if failed:
            warnings.warn(f"{op}: the measured choice passes over {name}, which failed: {reason}", TuneWarning,
                          stacklevel=2)


_tuner: list[Tuner] = []


def get_tuner() -> Tuner:
    """The process's tuner (made at first use)."""
    if not _tuner:
        _tuner.append(Tuner())
    return _tuner[0]


def set_tuner(tuner: Tuner) -> Tuner | None:
    """Make ``tuner`` the process's; returns the one it replaces (tests inject timers and folders)."""
    before = _tuner[0] if _tuner else None
    _tuner[:] = [tuner]
    return before


@contextlib.contextmanager
def retuning() -> Iterator[Tuner]:
    """Inside, recorded choices are timed anew (each key once)."""
    tuner = get_tuner()
    before, tuner._fresh = tuner._fresh, set()
    try:
        yield tuner
    finally:
        tuner._fresh = before


@torch.compiler.assume_constant_result
def recorded(op: str, device: str, dtype: str, rows: int, dims: tuple, activation: str, bias: int) -> str:
    """The recorded choice of a key given as strings and numbers, or "". Under ``torch.compile`` it is read
    once, at trace time, and is a constant of the graph."""
    if not enabled():
        return ""
    key = (op, torch.device(device), getattr(torch, dtype), rows, dims, activation, bias)
    return get_tuner().lookup(key) or ""


def pick(op: str, x: torch.Tensor, rows: int, dims: Sequence[int], activation: str | None, bias: bool,
         fallback: str, run: Callable[[str], Callable[[], object]]) -> str:
    """The implementation ``op`` runs on these operands: the measured choice (``run(name)`` makes candidate
    ``name``'s call), or ``fallback`` (the fixed rule's) where it is off or nothing may be timed and nothing is
    recorded."""
    if through_op():  # torch.compile tracing, a dispatch mode: what is recorded, never a timing
        return recorded(op, str(x.device), _dtype_name(x.dtype), rows_bucket(rows), tuple(dims),
                        activation or "none", int(bias)) or fallback
    if not enabled():
        return fallback
    key = make_key(op, x, rows, dims, activation, bias)
    tuner = get_tuner()
    hit = tuner.lookup(key)
    if hit is not None:
        return hit
    if not can_time():
        return fallback
    candidates = []
    for name in TUNE_CANDIDATES[op]:
        problem = candidate_problem(op, name, rows, x.dtype)
        candidates.append(Candidate(name, None, problem) if problem else Candidate(name, run(name)))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # the timer's events: x's GPU
        return tuner.choose(key, candidates, fallback)


# ------------------------------------------------------------------------------------------------
# What each call ran (``nn.tune.layer_backends``, ``utilrank bench``'s per-layer column).
# ------------------------------------------------------------------------------------------------
_recorders: list[list[tuple[str, str]]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(op, implementation)`` of every eager factored-op call made inside."""
    calls: list[tuple[str, str]] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:  # by identity: an equal list (two empty ones) is not this one
        del _recorders[next(i for i in range(len(_recorders) - 1, -1, -1) if _recorders[i] is calls)]


def note(op: str, impl: str) -> None:
    if not torch.compiler.is_compiling() and _recorders:
        _recorders[-1].append((op, impl))
