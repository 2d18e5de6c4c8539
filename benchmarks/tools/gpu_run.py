"""What ``benchmarks/gpu_run.sh`` runs on a lent GPU: two calls of at most about 5 minutes each, every step in a
process of its own under its own time limit (a step that hangs is killed and the next one runs), every result under
``--out-dir`` (``$OUT``, the only folder a lent machine gives back), the package imported from this tree (no
install):

- call 1, the kernels: ``probe`` (GPU, SMs, L2, torch/triton/CUDA versions, nvcc, driver, and the copy and bf16
  GEMM ceilings), ``build`` (the CUDA extension in place with ``.ci/build_cuda_ext.sh``, for this GPU's
  architecture, if nvcc is there), ``linear`` and ``mlp`` (``benchmarks/kernels/cublas.py``: fused vs split vs
  the two torch baselines and dense for ViT-B/16's fc1/fc2/qkv/proj at M 12608 and 197; the fused MLP at r 192
  and 304 against the dense MLP and two factored linears), ``covariance`` (d 768 and 3072, bf16 and fp32, with
  the error against fp64);
- call 2, the tests and the model: ``build`` (again only where the extension does not load: a fresh machine),
  ``tests`` (the tests that need CUDA, with pytest-xdist and per-test timeouts; counts written as each test ends,
  so a stopped run still has them), ``small-m`` (M 1, 8, 16 under CUDA graphs), ``tune`` (the backend each
  factored layer of ViT-B/16 at 50% runs, measured choice and fixed rule), ``vit`` (ViT-B/16 at 50% parameters
  end to end against dense: batch 1 with CUDA graphs and batch 64, eager and ``torch.compile``, via
  ``utilrank bench``; eager first, a compile run only where its time is left).

Each step writes ``<out-dir>/<device>_gpu-<step>.json`` (rows of ``benchmarks.tools.rows.Row``, rewritten as
they come); each call ends with one summary table. ``--dry-run`` runs every step's setup on a CPU (the cases with
made-up timings, the torch baselines called once at a few rows, the tests step on a three-test file, the
``utilrank bench`` command lines parsed) and exits 1 if any of it broke.

    bash benchmarks/gpu_run.sh --call 1 | --call 2 | --dry-run   # what to run; the script sets the paths
    python -m benchmarks.tools.gpu_run --help
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a file: the package and benchmarks/ come from this tree
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.kernels.cases import Case, FakeTimer, Impl, gpu_timer, measure_cases  # noqa: E402
from benchmarks.kernels.roofline import DEVICES, device_for  # noqa: E402
from benchmarks.tools import pytest_outcomes  # noqa: E402
from benchmarks.tools.rows import Row, environment, first_line  # noqa: E402
from utilrank_kernels._files import write_json  # noqa: E402
from utilrank_kernels.timing import Timing, device_slug  # noqa: E402

FORMAT = "utilrank.gpu-run/2"
CALL_SECONDS = 285.0  # one call's budget: the device tool's 5 minutes, less the script's own start
KILL_GRACE = 20.0  # a step past its limit by this much is killed (the rows it wrote stay)
CASE_MARGIN = 10.0  # no new case starts this close to a step's limit
DRY_ROWS = 16  # the dry run's cases at most this many rows (tokens), on the CPU
GPU_TESTS = ("tests/triton", "tests/ops", "tests/nn", "tests/analysis/test_stats.py")
TEST_TIMEOUT = 60  # seconds per test (pytest-timeout)
VIT_MODEL = "vit_base_patch16_224"


# ---------------------------------------------------------------------------------------------
# one step's context: where it writes, its limit, its timer
# ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    step: str
    out_dir: Path
    slug: str
    env: dict
    deadline: float  # time.monotonic() by which the step should be done
    dry: bool = False
    rows: list[Row] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    timer: Callable = gpu_timer
    started: float = field(default_factory=time.monotonic)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def max_rows(self) -> int | None:
        return DRY_ROWS if self.dry else None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.write("running")

    def measure(self, cases: Sequence[Case]) -> list[Row]:
        return measure_cases(cases, self.timer, deadline=self.deadline - CASE_MARGIN, on_row=self.add)

    def write(self, status: str) -> Path:
        return write_result(self.out_dir, self.slug, self.step, {
            **self.env, "status": status, "seconds": round(time.monotonic() - self.started, 1), **self.meta,
            "rows": [row.as_dict(self.env) for row in self.rows]})


def result_path(out_dir: Path, slug: str, step: str) -> Path:
    return out_dir / f"{slug}_gpu-{step}.json"


def write_result(out_dir: Path, slug: str, step: str, payload: dict) -> Path:
    """``out_dir/<device>_gpu-<step>.json``, written to a temporary name and renamed."""
    path = result_path(out_dir, slug, step)
    write_json(path, {"format": FORMAT, "step": step, **payload})
    return path


def run_limited(cmd: Sequence[str], seconds: float, *, cwd: Path = ROOT, env: dict | None = None,
                log: Path | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` in a process group of its own; past ``seconds`` the whole group (pytest's workers, a compile's
    children) gets SIGTERM, then SIGKILL. Returns ``(returncode or None if it was stopped, seconds)``; output goes
    to ``log`` if given, else to this process's."""
    start = time.monotonic()
    with open(log, "ab") if log else contextlib.nullcontext() as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(seconds, 1.0))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
                    break
            rc = None
    return rc, time.monotonic() - start


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _scratch(step: str) -> Path:
    """A folder outside ``$OUT`` for what is not a result (logs of subprocesses, a bench's own JSON)."""
    return Path(tempfile.mkdtemp(prefix=f"utilrank-gpu-{step}-"))


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and home and Path(home, "bin", "nvcc").is_file():
            found = str(Path(home, "bin", "nvcc"))
    return found


def _command_line(cmd: Sequence[str], seconds: float = 20) -> str | None:
    """The last line ``cmd`` prints, or None where it cannot run."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=seconds)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[-1].strip() if lines else None


def _tune_api():
    """``utilrank_kernels.nn``'s ``(tune, layer_backends)`` where the measured choice exists, else None."""
    nn_mod = importlib.import_module("utilrank_kernels.nn")
    tune, backends = getattr(nn_mod, "tune", None), getattr(nn_mod, "layer_backends", None)
    return (tune, backends) if callable(tune) and callable(backends) else None


def machine() -> dict:
    """What the results depend on: the GPU and its properties, the versions, nvcc, the driver, where the package
    was imported from."""
    import utilrank_kernels
    from utilrank_kernels.ops._dispatch import cuda_extension

    package = Path(utilrank_kernels.__file__).resolve().parent
    info = {"python": sys.version.split()[0], "executable": sys.executable, "package_path": str(package),
            "package_from_tree": package == ROOT / "utilrank_kernels", "cuda_extension": cuda_extension() is not None,
            "measured_choice": _tune_api() is not None, "cpu_count": os.cpu_count(),
            "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("UTILRANK_", "TRITON_", "CUDA_"))}}
    nvcc = _nvcc()
    info["nvcc"] = {"path": nvcc, "version": _command_line([nvcc, "--version"]) if nvcc else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                       "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)}
        if shutil.which("nvidia-smi"):  # read-only queries: the card's settings are left as found
            info["nvidia_smi"] = _command_line(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,"
                 "power.draw,power.limit", "--format=csv,noheader"])
    return info


def ceiling_cases(device: str, dry: bool) -> list[Case]:
    """The two ceilings every kernel time is read against: a device-to-device copy (bytes read + written) and an
    8192-cube bf16 GEMM on random data (the dry run: 1 MiB and 64)."""
    n_copy, n = (1 << 19, 64) if dry else (1 << 29, 8192)

    def copy_impls():
        x = torch.randn(n_copy, device=device, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        return {"copy": Impl(lambda: y.copy_(x), True, extra={"bytes": 2 * x.numel() * x.element_size()})}

    def gemm_impls():
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        return {"torch.mm": Impl(lambda: torch.mm(a, b), True, extra={"flops": 2 * n**3})}

    return [Case("ceiling", "copy", "bf16", {"elements": n_copy}, copy_impls),
            Case("ceiling", "gemm", "bf16", {"n": n}, gemm_impls)]


def step_probe(ctx: Context) -> None:
    ctx.meta["machine"] = info = machine()
    print(json.dumps(info, indent=1), flush=True)
    if not info["package_from_tree"]:
        raise RuntimeError(f"utilrank_kernels was imported from {info['package_path']}, not from {ROOT}: "
                           "an installed copy shadows the tree (PYTHONPATH must start with the tree)")
    ctx.measure(ceiling_cases(ctx.device, ctx.dry))


def step_build(ctx: Context) -> None:
    """The CUDA extension in place, for this GPU's architecture only (half the compile of the default two)."""
    from utilrank_kernels.ops._dispatch import cuda_extension

    nvcc = _nvcc()
    if cuda_extension() is not None:
        ctx.meta.update(status_note="already built: utilrank_kernels._C loads", loaded=True)
        print("gpu_run: the CUDA extension already loads; not rebuilt", flush=True)
        return
    if nvcc is None:
        ctx.meta.update(status_note="no nvcc on PATH or in CUDA_HOME: the extension is not built", loaded=False)
        print("gpu_run: no nvcc: the CUDA extension is not built; its tests skip, cuda rows say why", flush=True)
        return
    arch = "9.0" if ctx.dry else "{}.{}".format(*torch.cuda.get_device_capability())
    env = {**os.environ, "PYTHON": sys.executable, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    # the dry run checks the build script's syntax and the command, not the compile
    cmd = ["bash", "-n" if ctx.dry else "-e", str(ROOT / ".ci" / "build_cuda_ext.sh")]
    log = _scratch("build") / "build.log"
    rc, seconds = run_limited(cmd, ctx.remaining() - 5, env=env, log=log)
    loaded = rc == 0 and not ctx.dry and _command_line(
        [sys.executable, "-c", "import torch, utilrank_kernels._C; print('loaded')"]) == "loaded"
    ctx.meta.update(command=" ".join(cmd), nvcc=nvcc, torch_cuda_arch_list=env["TORCH_CUDA_ARCH_LIST"],
                    max_jobs=env["MAX_JOBS"], returncode=rc, build_seconds=round(seconds, 1), loaded=loaded,
                    tail=_tail(log))
    print(_tail(log, 1500), flush=True)
    if rc != 0:
        ctx.meta["status_note"] = "stopped at the time limit" if rc is None else f"build failed (rc {rc})"
        if ctx.dry:
            raise RuntimeError(f"bash -n .ci/build_cuda_ext.sh: rc {rc}: {_tail(log, 300)}")


def _spec(ctx: Context):
    return DEVICES["h200"] if ctx.dry else device_for(torch.cuda.get_device_name())


# The kernel modules are imported by the steps that time them: a module that cannot be imported on a machine
# (a Triton or torch version it does not support) fails that step with its error, not the whole call.
def step_linear(ctx: Context) -> None:
    from benchmarks.kernels import cublas

    spec = _spec(ctx)
    ctx.meta["roofline_device"] = spec.name if spec else None
    ctx.measure(cublas.linear_cases(ctx.device, max_rows=ctx.max_rows, spec=spec))


def step_mlp(ctx: Context) -> None:
    from benchmarks.kernels import cublas

    spec = _spec(ctx)
    ctx.meta["roofline_device"] = spec.name if spec else None
    ctx.measure(cublas.mlp_cases(ctx.device, max_rows=ctx.max_rows, spec=spec))


def step_covariance(ctx: Context) -> None:
    from benchmarks.kernels import covariance

    # the dry run: d 768 alone (d 3072's setup is the same code; its fp64 references take seconds on a CPU)
    ctx.measure(covariance.syrk_cases(ctx.device, ds=(768,) if ctx.dry else (768, 3072), ns=(12608,),
                                      dtypes=("bf16", "fp32"), max_rows=ctx.max_rows))


def step_small_m(ctx: Context) -> None:
    from benchmarks.kernels import cublas, cuda_small_m

    layers = list({layer: (layer, k, n, r, act) for layer, k, n, r, act in reversed(cublas.LINEAR_LAYERS)}.values())
    mlp = cublas.MLP + (max(cublas.MLP_RANKS),)
    ctx.measure(cuda_small_m.graph_cases(layers[::-1], [mlp], (1, 8, 16), torch.bfloat16, ctx.device,
                                         max_copies=2 if ctx.dry else 256))


# --- tests ---
MINI_TESTS = """import pytest

def test_passes():
    assert 1 + 1 == 2

def test_fails():
    assert 1 + 1 == 3

def test_skips():
    pytest.skip("skipped on purpose")
"""


def tests_command(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """The pytest command (xdist across the CPUs, per-test timeouts, the outcomes plugin), and the plugins
    missing here (their options are then left out)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
           "-p", "benchmarks.tools.pytest_outcomes", "-m", "not slow"]
    missing = []
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "auto"]
    else:
        missing.append("pytest-xdist")
    if importlib.util.find_spec("pytest_timeout") is not None:
        # thread: a test stuck in C code (a CUDA sync) is stopped too; its worker dies and xdist reports it
        cmd += [f"--timeout={TEST_TIMEOUT}", "--timeout-method=thread"]
    else:
        missing.append("pytest-timeout")
    return cmd + list(paths), missing


def step_tests(ctx: Context) -> None:
    """The tests that need CUDA (one autotune row per kernel: compiles, not tuning, bound the time). The dry run
    runs the same command on a three-test file (one passes, one fails, one skips) and checks the counts."""
    scratch = _scratch("tests")
    outcomes = scratch / "outcomes.jsonl"
    if ctx.dry:
        (scratch / "test_three.py").write_text(MINI_TESTS)
        paths, cwd = [str(scratch / "test_three.py")], scratch
    else:
        paths, cwd = list(GPU_TESTS), ROOT
    cmd, missing = tests_command(paths)
    env = {**os.environ, pytest_outcomes.ENV: str(outcomes), "UTILRANK_TRITON_CONFIG": "first",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    ctx.meta.update(command=" ".join(cmd[1:]), missing_plugins=missing, test_timeout=TEST_TIMEOUT)
    print(f"gpu_run: {' '.join(cmd[1:])}" + (f" (missing here: {', '.join(missing)})" if missing else ""), flush=True)
    # the dry run's three tests (one fails on purpose) print to a scratch log, not among the real steps' output
    log = scratch / "pytest.log" if ctx.dry else None
    rc, seconds = run_limited(cmd, ctx.remaining() - 5, cwd=cwd, env=env, log=log)
    found = pytest_outcomes.counts(outcomes) if outcomes.exists() else {}
    ctx.meta.update(returncode=rc, stopped_at_limit=rc is None, test_seconds=round(seconds, 1), **found)
    if ctx.dry and (found.get("passed"), found.get("failed"), found.get("skipped")) != (1, 1, 1):
        raise RuntimeError(f"the tests step counted {found} on its three-test file, not 1 passed, 1 failed, 1 skipped")


# --- tune: the backend each factored layer runs ---
@contextlib.contextmanager
def _env(name: str, value: str):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _backend_counts(layers: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer["backend"]] = counts.get(layer["backend"], 0) + 1
    return counts


def step_tune(ctx: Context) -> None:
    """ViT-B/16 cut to 50% parameters as ``utilrank bench --param-ratio 0.5`` cuts it (the dry run: ViT-Ti, two
    blocks), then
    per batch the backend each factored layer runs: the measured choice (``utilrank_kernels.nn.tune``, timed
    here) and the fixed rule's (``UTILRANK_TUNE=0``); without the measured choice in the package, the backend
    each layer is set to."""
    import timm

    from utilrank_kernels.bench.models import cut_to_ratio

    name, kwargs = ("vit_tiny_patch16_224", {"depth": 2}) if ctx.dry else (VIT_MODEL, {})
    dense = timm.create_model(name, pretrained=False, **kwargs).to(ctx.device).eval()  # the SVDs on the GPU
    model = cut_to_ratio(dense, 0.5)[0].to(ctx.device, torch.bfloat16)
    api = _tune_api()
    ctx.meta.update(model=name, param_ratio=0.5, measured_choice=api is not None)
    for batch in (1,) if ctx.dry else (1, 64):
        if ctx.remaining() < CASE_MARGIN:
            ctx.meta[f"batch_{batch}"] = {"skipped": "step time limit"}
            continue
        x = torch.randn(batch, 3, 224, 224, device=ctx.device, dtype=torch.bfloat16)
        start = time.monotonic()
        if api is None:
            from utilrank_kernels.nn import FACTORED_MODULES

            measured, fixed = [], [{"layer": n, "backend": m.backend} for n, m in model.named_modules()
                                   if isinstance(m, FACTORED_MODULES)]
        else:
            measured = api[0](model, x)
            with _env("UTILRANK_TUNE", "0"):
                fixed = api[1](model, x)
        ctx.meta[f"batch_{batch}"] = {"seconds": round(time.monotonic() - start, 1),
                                      "backends": _backend_counts(measured), "fixed_rule": _backend_counts(fixed),
                                      "layers": measured, "fixed_rule_layers": fixed}
        print(f"gpu_run: {name} at 50%, batch {batch}: measured {_backend_counts(measured)}, fixed rule "
              f"{_backend_counts(fixed)}", flush=True)
        ctx.write("running")


# --- vit: utilrank bench end to end ---
# (label, batch, engine, CUDA graphs, backends of the factored model, the least seconds worth starting it with)
VIT_RUNS = (("b1-eager", 1, "eager", True, "torch,auto", 25), ("b64-eager", 64, "eager", False, "torch,auto", 25),
            ("b1-compile", 1, "compile", True, "auto", 40), ("b64-compile", 64, "compile", False, "auto", 40))


def bench_argv(batch: int, engine: str, graphs: bool, backends: str, out: Path, seconds: float) -> list[str]:
    return ["bench", "--model", VIT_MODEL, "--param-ratio", "0.5", "--batch-sizes", str(batch), "--dtype", "bf16",
            "--backend", backends, "--engine", engine, "--device", "cuda", "--warmup", "3", "--iters", "20",
            "--max-seconds", str(max(2, int(seconds / 6))), "--out", str(out), "--no-plot", "--keep-going",
            *(["--cuda-graphs"] if graphs else [])]


def bench_rows(rows: list[dict], label: str) -> list[Row]:
    """``utilrank bench``'s rows (``utilrank.bench/1``) as :class:`Row` s, each compressed row against the dense
    row of its engine and batch."""
    def timing(r: dict) -> Timing | None:
        return Timing(r["infer_step_time"], r["step_time_p20"], r["step_time_p80"]) if "error" not in r else None

    dense = {(r.get("engine"), r.get("batch_size")): timing(r) for r in rows if r.get("variant") == "dense"}
    out = []
    for r in rows:
        impl = "dense" if r.get("variant") == "dense" else f"compressed-{r.get('backend')}"
        base = dense.get((r.get("engine"), r.get("batch_size")))
        keep = ("infer_samples_per_sec", "param_count", "infer_gmacs", "speedup", "theoretical_speedup",
                "realized_fraction", "layer_backends", "backends")
        out.append(Row(VIT_MODEL, impl, r.get("dtype", "bf16"),
                       {"batch": r.get("batch_size"), "engine": r.get("engine"), "cuda_graphs": "b1" in label},
                       timing(r), {"dense": base} if base and impl != "dense" and timing(r) else {},
                       {"layer": f"vit_b16@50% {label}", **{k: r[k] for k in keep if k in r}}, r.get("error")))
    return out


def _fake_bench_rows(batch: int, engine: str, backends: str) -> list[dict]:
    """What ``utilrank bench`` writes, with made-up times: the dry run's input to :func:`bench_rows`."""
    base = {"engine": engine, "dtype": "bf16", "batch_size": batch, "step_time_p20": 0.9, "step_time_p80": 1.1}
    rows = [{**base, "variant": "dense", "backend": "torch", "infer_step_time": 1.0}]
    rows += [{**base, "variant": "compressed", "backend": b, "infer_step_time": 0.8, "speedup": 1.25}
             for b in backends.split(",")]
    return rows + [{**base, "variant": "compressed", "backend": "cuda", "error": "eager: made-up failure"}]


def step_vit(ctx: Context) -> None:
    from utilrank_kernels.cli import build_parser

    scratch = _scratch("vit")
    runs = VIT_RUNS
    for i, (label, batch, engine, graphs, backends, floor) in enumerate(runs):
        seconds = ctx.remaining() - sum(run[-1] for run in runs[i + 1:])
        out = scratch / f"{label}.json"
        argv = bench_argv(batch, engine, graphs, backends, out, seconds)
        build_parser().parse_args(argv)  # the dry run's check; on a GPU a bad option fails here, not in a child
        if seconds < floor:
            ctx.add(Row(VIT_MODEL, "-", "bf16", {"batch": batch, "engine": engine}, None,
                        extra={"layer": f"vit_b16@50% {label}", "skipped": "step time limit"}))
            continue
        if ctx.dry:
            found = _fake_bench_rows(batch, engine, backends)
        else:
            print(f"gpu_run: utilrank {' '.join(argv)} (at most {seconds:.0f} s)", flush=True)
            cmd = [sys.executable, "-c", "import sys; from utilrank_kernels.cli import main; sys.exit(main())", *argv]
            rc, _ = run_limited(cmd, seconds)
            found = json.loads(out.read_text())["rows"] if out.exists() else [
                {"engine": engine, "batch_size": batch, "variant": "dense", "backend": "torch",
                 "error": "stopped at the time limit" if rc is None else f"utilrank bench exited {rc}"}]
        for row in bench_rows(found, label):
            ctx.add(row)


@dataclass(frozen=True)
class Step:
    run: Callable[[Context], None]
    cap: float  # seconds at most
    floor: float  # seconds the steps before it leave for it
    what: str


STEPS = {
    "probe": Step(step_probe, 40, 15, "the machine, the versions, nvcc, the copy and GEMM ceilings"),
    "build": Step(step_build, 150, 0, "the CUDA extension in place (if nvcc; skipped where it loads)"),
    "linear": Step(step_linear, 100, 45, "fc1/fc2/qkv/proj: fused, split, the torch baselines, dense"),
    "mlp": Step(step_mlp, 80, 35, "the MLP at r 192 and 304: fused, two linears, torch, dense"),
    "covariance": Step(step_covariance, 45, 20, "the covariance at d 768/3072, bf16 and fp32, error vs fp64"),
    "tests": Step(step_tests, 110, 60, "the tests that need CUDA (xdist, per-test timeouts)"),
    "small-m": Step(step_small_m, 45, 25, "M 1/8/16 under CUDA graphs: extension, Triton, torch, dense"),
    "tune": Step(step_tune, 35, 15, "the backend each factored layer of ViT-B/16 at 50% runs"),
    "vit": Step(step_vit, 170, 60, "ViT-B/16 at 50%: batch 1 (CUDA graphs) and 64, eager and compile"),
}
# call 1 is the kernels' (the design's numbers first); call 2 the tests and the model. A call's steps share its
# budget: each gets at most its cap, and no less than the floors of the steps after it are kept back.
CALLS = {1: ("probe", "build", "linear", "mlp", "covariance"), 2: ("build", "tests", "small-m", "tune", "vit")}


# ---------------------------------------------------------------------------------------------
# running steps
# ---------------------------------------------------------------------------------------------
def run_step(name: str, seconds: float, out_dir: Path, *, dry: bool = False) -> Context:
    """One step in this process: its rows and status in its results file, whatever happens."""
    device = "cpu" if dry else "cuda"
    ctx = Context(name, out_dir, device_slug(device), environment(device), time.monotonic() + seconds, dry,
                  timer=FakeTimer() if dry else gpu_timer)
    ctx.write("running")
    status = "done"
    try:
        STEPS[name].run(ctx)
    except Exception as exc:  # the step's failure is its result: the next step still runs
        traceback.print_exc()
        ctx.meta.update(error=first_line(exc), traceback=traceback.format_exc()[-3000:])
        status = "failed"
    if dry and getattr(ctx.timer, "failures", None):
        ctx.meta["cpu_failures"] = ctx.timer.failures
        status = "failed"
    ctx.write(status)
    return ctx


def _child(name: str, seconds: float, out_dir: Path, *, dry: bool = False) -> dict:
    """The step in a process of its own, killed ``KILL_GRACE`` past its limit; its results file, marked where
    the process did not finish it (``dry``: the step's dry run, for the tests of this machinery)."""
    cmd = [sys.executable, "-m", "benchmarks.tools.gpu_run", "--step", name, "--seconds", f"{seconds:.0f}",
           "--out-dir", str(out_dir), *(["--dry-run"] if dry else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    rc, took = run_limited(cmd, seconds + KILL_GRACE, env=env)
    path = result_path(out_dir, device_slug("cpu" if dry else "cuda"), name)
    for tmp in out_dir.glob(f".{path.name}.*.tmp"):  # a write the kill cut short: not a result
        tmp.unlink(missing_ok=True)
    result = json.loads(path.read_text()) if path.exists() else {"format": FORMAT, "step": name, "rows": []}
    if rc is None:
        result["status"] = f"killed after {took:.0f} s"
    elif result.get("status") in (None, "running"):
        result["status"] = f"exit {rc} before the step finished"
    else:
        return result  # the step wrote its own end: done or failed
    write_json(path, result)
    return result


def run_call(steps: Sequence[str], out_dir: Path, *, call_seconds: float = CALL_SECONDS,
             dry: bool = False) -> dict[str, dict]:
    """Each step under ``min(cap, what the call has left less the floors of the steps after it)``."""
    end = time.monotonic() + call_seconds
    results = {}
    for i, name in enumerate(steps):
        step = STEPS[name]
        seconds = min(step.cap, end - time.monotonic() - sum(STEPS[s].floor for s in steps[i + 1:]))
        if seconds < 5:
            slug = device_slug("cpu" if dry else "cuda")
            write_result(out_dir, slug, name, {"status": "skipped: no time left in this call", "rows": []})
            results[name] = {"status": "skipped: no time left in this call", "rows": []}
            continue
        print(f"\n=== gpu_run: {name} (at most {seconds:.0f} s): {step.what}", flush=True)
        if dry:
            ctx = run_step(name, seconds, out_dir, dry=True)
            results[name] = json.loads(result_path(out_dir, ctx.slug, name).read_text())
        else:
            results[name] = _child(name, seconds, out_dir)
        print(f"=== gpu_run: {name}: {results[name].get('status')} in {results[name].get('seconds', '?')} s"
              + (f": {results[name]['error']}" if results[name].get("error") else ""), flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# the summary: one line per case (every implementation's median), one per step's status
# ---------------------------------------------------------------------------------------------
def _case_key(row: dict) -> tuple:
    return row.get("op"), row.get("layer"), json.dumps(row.get("shape"), sort_keys=True), row.get("dtype")


def _time(ms: float) -> str:
    return f"{ms:.2f} ms" if ms >= 1 else f"{ms * 1e3:.1f} us"


def case_lines(step: str, rows: list[dict]) -> list[str]:
    """One table line per case: each implementation's median (or why it has none) and the fastest."""
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        cases.setdefault(_case_key(row), []).append(row)
    lines = []
    for (_, layer, _, dtype), group in cases.items():
        shape = " ".join(f"{k}={v}" for k, v in (group[0].get("shape") or {}).items() if v is not None)
        timed = [r for r in group if "median_ms" in r]
        cells = [f"{r['impl']} {_time(r['median_ms'])}" for r in timed]
        cells += [f"{r['impl']}: {r.get('error') or r.get('skipped')}"[:90] for r in group if "median_ms" not in r]
        best = min(timed, key=lambda r: r["median_ms"])["impl"] if timed else "-"
        ideal = min((r["ideal_us"] for r in timed if r.get("ideal_us")), default=None)
        lines.append(f"| {step} | {layer} {shape} {dtype} | {'; '.join(cells)} | {best} |"
                     + (f" ideal {ideal:.1f} us |" if ideal else " |"))
    return lines


def step_line(step: str, result: dict) -> str:
    status = result.get("status", "?")
    note = result.get("error") or result.get("status_note") or ""
    if step == "tests" and "passed" in result:
        note = (f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, "
                f"{result['skipped']} skipped, {result.get('not_run')} not run of {result.get('collected')}"
                + (f"; first failure {result['failures'][0]}" if result.get("failures") else ""))[:400]
    if step == "tune":
        note = "; ".join(f"batch {k.removeprefix('batch_')}: measured {v.get('backends', v.get('skipped'))}, "
                         f"fixed rule {v.get('fixed_rule')}" for k, v in result.items() if k.startswith("batch_"))
    if step == "probe" and result.get("machine"):
        m = result["machine"]
        gpu = m.get("gpu") or {}
        note = (f"{gpu.get('name', 'no GPU')} ({gpu.get('sm_count')} SMs, L2 {gpu.get('l2_mib')} MiB), "
                f"python {m['python']}, nvcc {m['nvcc']['version']}, extension {m['cuda_extension']}, "
                f"measured choice {m['measured_choice']}")
    return f"| {step} | {status} | {result.get('seconds', '?')} s | | {note} |"


def summary_table(results: dict[str, dict]) -> str:
    lines = ["| step | case | median per implementation | fastest | ideal |", "|---|---|---|---|---|"]
    for step, result in results.items():
        lines += case_lines(step, result.get("rows") or [])
    lines += ["", "| step | status | seconds | | note |", "|---|---|---|---|---|"]
    lines += [step_line(step, result) for step, result in results.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--call", type=int, choices=sorted(CALLS), help="run this call's steps (see above)")
    what.add_argument("--steps", help=f"comma list of steps: {', '.join(STEPS)}")
    what.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in this process
    p.add_argument("--dry-run", action="store_true", help="every step's setup on the CPU, made-up timings")
    p.add_argument("--out-dir", type=Path, default=None, help="where results go (default: $OUT, else a new folder "
                   "under the temporary directory)")
    p.add_argument("--seconds", type=float, default=None, help="--step: its limit")
    p.add_argument("--call-seconds", type=float, default=CALL_SECONDS, help="a call's budget for all its steps")
    args = p.parse_args(argv)
    if args.steps:
        args.steps = [s for s in args.steps.split(",") if s]
        unknown = [s for s in args.steps if s not in STEPS]
        if unknown:
            p.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    elif args.call:
        args.steps = list(CALLS[args.call])
    elif not args.step:
        # the dry run checks every step of both calls; a plain run must say which call
        args.steps = list(dict.fromkeys(CALLS[1] + CALLS[2])) if args.dry_run else None
        if args.steps is None:
            p.error("say what to run: --call 1, --call 2, --steps A,B or --dry-run")
    if args.out_dir is None:
        args.out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="utilrank-gpu-run-"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.dry_run or torch.cuda.is_available()):
        print("gpu_run: no CUDA device here; this script measures GPU kernels and runs where one is lent "
              "(--dry-run checks its setup on a CPU)", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.step:
        ctx = run_step(args.step, args.seconds or STEPS[args.step].cap, args.out_dir, dry=args.dry_run)
        return 0 if ctx.meta.get("error") is None else 1
    print(f"gpu_run: results in {args.out_dir}", flush=True)
    started = time.monotonic()
    results = run_call(args.steps, args.out_dir, call_seconds=args.call_seconds, dry=args.dry_run)
    print("\n" + summary_table(results))
    print(f"\ngpu_run: {len(results)} steps in {time.monotonic() - started:.0f} s; results in {args.out_dir}:\n  "
          + "\n  ".join(sorted(p.name for p in args.out_dir.iterdir())), flush=True)
    failed = [name for name, r in results.items() if r.get("status") == "failed"]
    if args.dry_run and failed:
        print(f"gpu_run: the dry run failed in {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
