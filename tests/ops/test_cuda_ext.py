"""The CUDA extension utilrank_kernels._C: build, load, registration, argument checks, fakes, and (on a
GPU) the small-M kernels against a float64 reference, eagerly and inside a captured CUDA graph.

Without the built extension the extension tests skip, unless UTILRANK_REQUIRE_CUDA_EXT=1 (set by CI,
which builds it with .ci/build_cuda_ext.sh): then they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from utilrank_kernels.ops import _cuda_ext
from utilrank_kernels.ops._dispatch import cuda_extension
from utilrank_kernels.ops.lowrank import apply_activation

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


def require_ext():
    ext = cuda_extension()
    if ext is None:
        msg = "utilrank_kernels._C is not built (build it with .ci/build_cuda_ext.sh)"
        if os.environ.get("UTILRANK_REQUIRE_CUDA_EXT", "0") == "1":
            pytest.fail(msg + "; UTILRANK_REQUIRE_CUDA_EXT=1 requires it")
        pytest.skip(msg)
    return ext


def _ops():
    require_ext()
    return _cuda_ext


# ------------------------------------------------------------------------------------------------
# Build and load (CPU)
# ------------------------------------------------------------------------------------------------
SCHEMAS = {  # as csrc/ops.cpp defines them
    "lowrank_linear_small_m": "utilrank_C::lowrank_linear_small_m(Tensor x, Tensor a, Tensor b, "
    "Tensor? bias=None, str? activation=None) -> Tensor",
    "lowrank_mlp_small_m": "utilrank_C::lowrank_mlp_small_m(Tensor x, Tensor a1, Tensor b1, Tensor? bias1, "
    'Tensor a2, Tensor b2, Tensor? bias2, str? activation="gelu") -> Tensor',
}


def test_extension_loads_and_registers_ops():
    ext = require_ext()
    assert Path(ext.__file__).name.startswith("_C")
    for name, schema in SCHEMAS.items():
        packet = getattr(torch.ops.utilrank_C, name)
        assert str(packet.default._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"utilrank_C::{name}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"utilrank_C::{name}", "Meta")  # the fake


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param({}, "runs on CUDA tensors only", id="cpu-tensors"),
        pytest.param({"activation": "swish"}, "activation must be None, 'relu', 'gelu' or 'gelu_tanh'",
                     id="act"),
        pytest.param({"a": "transposed"}, "a must be contiguous", id="a-noncontig"),
        pytest.param({"a": "short"}, "a must have shape (rank, in_features) with 24 columns", id="a-shape"),
        pytest.param({"b": "rank"}, "b must have shape (out_features, rank) with 5 columns", id="b-shape"),
        pytest.param({"bias": "short"}, "bias must have shape (7,)", id="bias-shape"),
        pytest.param({"dtype": torch.float16}, "a has dtype Float but x has Half", id="dtype-mismatch"),
        pytest.param({"dtype": torch.float64}, "x must be float16, bfloat16 or float32", id="fp64"),
        pytest.param({"m": 17}, "takes at most 16 rows (tokens); x has 17", id="M17"),
    ],
)
def test_linear_checks_arguments(change, message):
    require_ext()
    x = torch.randn(change.get("m", 3), 24, dtype=change.get("dtype", torch.float32))
    a, b, bias = torch.randn(5, 24), torch.randn(7, 5), torch.randn(7)
    if change.get("a") == "transposed":
        a = torch.randn(24, 5).t()
    if change.get("a") == "short":
        a = torch.randn(5, 23)
    if change.get("b") == "rank":
        b = torch.randn(7, 6)
    if change.get("bias") == "short":
        bias = torch.randn(6)
    with pytest.raises(RuntimeError, match=None) as err:
        torch.ops.utilrank_C.lowrank_linear_small_m(x, a, b, bias, change.get("activation", "gelu"))
    assert message in str(err.value)
    assert "utilrank_C::lowrank_linear_small_m" in str(err.value)


def test_mlp_checks_arguments():
    require_ext()
    x = torch.randn(2, 16)
    a1, b1, a2, b2 = torch.randn(3, 16), torch.randn(40, 3), torch.randn(5, 40), torch.randn(16, 5)
    with pytest.raises(RuntimeError, match="a2 must have shape \\(rank2, hidden_features\\) with 40 columns"):
        torch.ops.utilrank_C.lowrank_mlp_small_m(x, a1, b1, None, torch.randn(5, 39), b2, None, "gelu")
    with pytest.raises(RuntimeError, match="bias2 must have shape \\(16,\\)"):
        torch.ops.utilrank_C.lowrank_mlp_small_m(x, a1, b1, None, a2, b2, torch.randn(15), "gelu")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        torch.ops.utilrank_C.lowrank_mlp_small_m(x, a1, b1, torch.randn(40), a2, b2, torch.randn(16), None)


def test_python_entry_points_refuse_cpu_and_large_m():
    ce = _ops()
    x, a, b = torch.randn(2, 8), torch.randn(3, 8), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ce.lowrank_linear_cuda(x, a, b)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="at most 16 rows"):
            ce.lowrank_linear_cuda(torch.randn(17, 8, device="cuda"), a.cuda(), b.cuda())


def test_fake_implementations_give_shapes():
    require_ext()
    _ops()
    meta = {"device": "meta", "dtype": torch.bfloat16}
    x = torch.empty(1, 3, 768, **meta)
    a, b = torch.empty(97, 768, **meta), torch.empty(3072, 97, **meta)
    y = torch.ops.utilrank_C.lowrank_linear_small_m(x, a, b, torch.empty(3072, **meta), "gelu")
    assert y.shape == (1, 3, 3072) and y.dtype == torch.bfloat16
    a2, b2 = torch.empty(51, 3072, **meta), torch.empty(768, 51, **meta)
    y = torch.ops.utilrank_C.lowrank_mlp_small_m(x, a, b, None, a2, b2, None, "gelu")
    assert y.shape == (1, 3, 768)


def test_torch_compile_traces_the_op():
    require_ext()
    _ops()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, a, b = torch.empty(4, 64), torch.empty(9, 64), torch.empty(33, 9)
        assert torch.ops.utilrank_C.lowrank_linear_small_m(x, a, b, None, None).shape == (4, 33)
    fn = torch.compile(lambda x, a, b: torch.ops.utilrank_C.lowrank_linear_small_m(x, a, b, None, "relu") + 1,
                       backend="eager", fullgraph=True)
    dev = "cuda" if HAS_CUDA else "cpu"
    x, a, b = torch.randn(4, 64, device=dev), torch.randn(9, 64, device=dev), torch.randn(33, 9, device=dev)
    if HAS_CUDA:
        torch.testing.assert_close(fn(x, a, b), torch.relu(x @ a.T @ b.T) + 1, rtol=1e-4, atol=1e-4)
    else:  # traced through the fake; the CPU kernel then reports that it needs CUDA tensors
        with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
            fn(x, a, b)


# ------------------------------------------------------------------------------------------------
# The plain install stays pure Python
# ------------------------------------------------------------------------------------------------
def _env_without_cuda_build() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UTILRANK_BUILD_CUDA"}
    for var in ("CC", "CXX", "NVCC", "CUDAHOSTCXX"):
        env[var] = "false"  # any compiler call fails
    return env


def test_setup_without_flag_declares_no_extension():
    code = (
        "import runpy, sys, setuptools\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
        "assert seen['ext_modules'] == [], seen\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
        "print('pure')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env_without_cuda_build(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "pure" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_plain_wheel_build_is_pure_python(tmp_path):
    """What ``pip install -e .`` builds without UTILRANK_BUILD_CUDA: a py3-none-any wheel, no compiler."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copytree(ROOT / "utilrank_kernels", src / "utilrank_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path),
         "."],
        cwd=src, env=_env_without_cuda_build(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    wheels = list(tmp_path.glob("*.whl"))
    assert len(wheels) == 1 and wheels[0].name.endswith("-py3-none-any.whl"), wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd"))]


# ------------------------------------------------------------------------------------------------
# GPU: the kernels against float64
# ------------------------------------------------------------------------------------------------
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (in, rank, out): ViT-B fc1/fc2 at ~50% parameters, and odd widths and ranks.
LINEAR_SHAPES = [(768, 307, 3072), (3072, 307, 768), (145, 17, 33), (1, 1, 1), (1024, 97, 4096),
                 (33, 145, 17)]
# (in, rank1, hidden, rank2, out)
MLP_SHAPES = [(768, 307, 3072, 307, 768), (145, 31, 1000, 17, 33), (64, 7, 4097, 9, 64),
              (1024, 410, 4096, 410, 1024)]


def _tol(y: torch.Tensor, y_torch: torch.Tensor, ref: torch.Tensor) -> float:
    """flash-attention's rule: the kernel's error against fp64 is at most twice torch's own error at
    the same precision, plus a rounding allowance of the output dtype."""
    torch_err = (y_torch.double() - ref).abs().max().item()
    return 2 * torch_err + 2 * torch.finfo(y.dtype).eps * (ref.abs().max().item() + 1)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float64) * scale).to(dtype)


def _linear_case(m, k, r, n, dtype, lead=()):
    x = _rand(*lead, m, k, dtype=dtype)
    a = _rand(r, k, dtype=dtype, scale=k**-0.5)
    b = _rand(n, r, dtype=dtype, scale=r**-0.5)
    bias = _rand(n, dtype=dtype, scale=0.1)
    return x, a, b, bias


def _linear_ref(x, a, b, bias, activation):
    return apply_activation(torch.nn.functional.linear(torch.nn.functional.linear(x.double(), a.double()),
                                                       b.double(), None if bias is None else bias.double()),
                            activation)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "K{}-R{}-N{}".format(*s))
@pytest.mark.parametrize("m", [1, 3, 16], ids=lambda m: f"M{m}")
def test_linear_matches_fp64(m, shape, dtype):
    ce = _ops()
    k, r, n = shape
    for activation, with_bias in ((None, True), ("gelu", False), ("gelu_tanh", True), ("relu", True)):
        x, a, b, bias = _linear_case(m, k, r, n, dtype)
        bias = bias if with_bias else None
        y = ce.lowrank_linear_cuda(x, a, b, bias, activation)
        ref = _linear_ref(x, a, b, bias, activation)
        lin = torch.nn.functional.linear
        y_torch = apply_activation(lin(lin(x, a), b, bias), activation)
        assert y.shape == (m, n) and y.dtype == dtype
        err = (y.double() - ref).abs().max().item()
        assert err <= _tol(y, y_torch, ref), f"{activation}: error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "K{}-R{}-H{}-R{}-N{}".format(*s))
@pytest.mark.parametrize("m", [1, 3, 16], ids=lambda m: f"M{m}")
def test_mlp_matches_fp64(m, shape, dtype):
    ce = _ops()
    k, r1, h, r2, n = shape
    x = _rand(1, m, k, dtype=dtype)
    a1, b1 = _rand(r1, k, dtype=dtype, scale=k**-0.5), _rand(h, r1, dtype=dtype, scale=r1**-0.5)
    a2, b2 = _rand(r2, h, dtype=dtype, scale=h**-0.5), _rand(n, r2, dtype=dtype, scale=r2**-0.5)
    bias1, bias2 = _rand(h, dtype=dtype, scale=0.1), _rand(n, dtype=dtype, scale=0.1)
    y = ce.lowrank_mlp_cuda(x, a1, b1, bias1, a2, b2, bias2, "gelu")
    ref = _linear_ref(_linear_ref(x, a1, b1, bias1, "gelu"), a2, b2, bias2, None)
    lin = torch.nn.functional.linear
    y_torch = lin(lin(torch.nn.functional.gelu(lin(lin(x, a1), b1, bias1)), a2), b2, bias2)
    assert y.shape == (1, m, n) and y.dtype == dtype
    err = (y.double() - ref).abs().max().item()
    assert err <= _tol(y, y_torch, ref), f"error {err:.3g}"


@pytest.mark.gpu
def test_noncontiguous_inputs_and_empty_batch():
    ce = _ops()
    x, a, b, bias = _linear_case(4, 96, 13, 40, torch.float16)
    xt = torch.empty(96, 4, device="cuda", dtype=torch.float16).t()
    xt.copy_(x)
    at = a.t().contiguous().t()
    y = ce.lowrank_linear_cuda(xt, at, b, bias, None)
    torch.testing.assert_close(y, ce.lowrank_linear_cuda(x, a, b, bias, None))
    empty = ce.lowrank_linear_cuda(x[:0], a, b, bias, None)
    assert empty.shape == (0, 40)


@pytest.mark.gpu
def test_kernels_inside_a_captured_cuda_graph():
    ce = _ops()
    dtype = torch.bfloat16
    x, a, b, bias = _linear_case(1, 768, 307, 3072, dtype)
    k, r1, h, r2, n = 768, 97, 3072, 101, 768
    x16 = _rand(16, k, dtype=dtype)
    a1, b1 = _rand(r1, k, dtype=dtype, scale=k**-0.5), _rand(h, r1, dtype=dtype, scale=r1**-0.5)
    a2, b2 = _rand(r2, h, dtype=dtype, scale=h**-0.5), _rand(n, r2, dtype=dtype, scale=r2**-0.5)
    bias1, bias2 = _rand(h, dtype=dtype, scale=0.1), _rand(n, dtype=dtype, scale=0.1)

    def run():
        y1 = ce.lowrank_linear_cuda(x, a, b, bias, "gelu")
        y2 = ce.lowrank_mlp_cuda(x16, a1, b1, bias1, a2, b2, bias2, "gelu")
        return y1, y2

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capturing stream, as torch.cuda.graphs asks
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1, y2 = run()
    for _ in range(3):  # new inputs each replay
        x.copy_(_rand(1, 768, dtype=dtype))
        x16.copy_(_rand(16, k, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        e1, e2 = run()  # eager, same inputs: equal up to the order of the kernels' float atomics
        torch.testing.assert_close(y1, e1, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(y2, e2, rtol=2e-2, atol=2e-2)
        ref1 = _linear_ref(x, a, b, bias, "gelu")
        assert (y1.double() - ref1).abs().max().item() <= 0.05 * (ref1.abs().max().item() + 1)
        ref2 = _linear_ref(_linear_ref(x16, a1, b1, bias1, "gelu"), a2, b2, bias2, None)
        assert (y2.double() - ref2).abs().max().item() <= 0.05 * (ref2.abs().max().item() + 1)
