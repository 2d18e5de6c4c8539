"""The one dispatch rule (ops/_dispatch.py), decided on the CPU: CUDA tensors, autocast, the CUDA extension,
its small-M table and Triton are faked by replacing the predicates the rule reads; the tensors live on the
meta device, which the fake ``on_cuda`` calls CUDA."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

import utilrank_kernels.ops.lowrank as lowrank_ops
from utilrank_kernels._files import cache_dir
from utilrank_kernels.ops import _dispatch, conv_covariance_update, lowrank_linear, lowrank_mlp
from utilrank_kernels.ops._dispatch import KernelFallbackWarning, choose
from utilrank_kernels.ops.lowrank import mlp_choice
from utilrank_kernels.timing import device_slug


@pytest.fixture
def gpu(monkeypatch):
    """A machine with a CUDA device, Triton, no CUDA extension, autocast off, the fixed rule (the measured choice
    off: tests/ops/test_tune.py drives it); returns a setter."""
    state = {"triton": True, "ext": False, "autocast": None, "table": None}
    monkeypatch.setenv("UTILRANK_TUNE", "0")
    monkeypatch.setattr(_dispatch, "on_cuda", lambda t: t.device.type == "meta")
    monkeypatch.setattr(_dispatch, "triton_available", lambda: state["triton"])
    monkeypatch.setattr(_dispatch, "cuda_extension_loaded", lambda: state["ext"])
    monkeypatch.setattr(_dispatch, "autocast_dtype", lambda t: state["autocast"])
    monkeypatch.setattr(_dispatch, "small_m_choice", lambda op, rows, shape, dtype: state["table"])
    monkeypatch.setattr(_dispatch, "_warned", set())
    return state


def linear_args(m=197, k=768, n=3072, r=192, dtype=torch.bfloat16, weight_dtype=None, device="meta"):
    x = torch.empty(m, k, dtype=dtype, device=device)
    w = weight_dtype or dtype
    a, b, bias = (torch.empty(*s, dtype=w, device=device) for s in ((r, k), (n, r), (n,)))
    return x, (a, b, bias), {"rows": m, "shape": (k, n, r)}


def decide(backend="auto", needs_grad=False, **kw):
    x, operands, extra = linear_args(**kw)
    return choose("lowrank_linear", backend, x, operands, needs_grad=needs_grad, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_supported_dtypes_take_triton(gpu, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing passed over, nothing said
        assert decide(dtype=dtype) == _dispatch.Choice("triton")


def test_fp64_takes_torch_and_says_why(gpu):
    with pytest.warns(KernelFallbackWarning, match="not torch.float64"):
        assert decide(dtype=torch.float64).impl == "torch"
    with pytest.raises(ValueError, match="backend='triton'.*not torch.float64"):
        decide("triton", dtype=torch.float64)


def test_mixed_dtypes_outside_autocast(gpu):
    with pytest.warns(KernelFallbackWarning, match="mixed dtypes"):
        choice = decide(dtype=torch.bfloat16, weight_dtype=torch.float32)
    assert choice.impl == "torch" and "mixed dtypes" in choice.reason
    with pytest.raises(ValueError, match="mixed dtypes"):
        decide("triton", dtype=torch.bfloat16, weight_dtype=torch.float32)


def test_bias_dtype_is_checked_too(gpu):
    x, (a, b, _), extra = linear_args()
    bias = torch.empty(3072, dtype=torch.float32, device="meta")
    with pytest.warns(KernelFallbackWarning, match="mixed dtypes"):
        assert choose("lowrank_linear", "auto", x, (a, b, bias), **extra).impl == "torch"


def test_autocast_casts_to_its_dtype(gpu):
    """Under autocast a bf16 input with fp32 weights runs on the kernel in bf16, as F.linear would."""
    gpu["autocast"] = torch.bfloat16
    assert decide(dtype=torch.bfloat16, weight_dtype=torch.float32) == _dispatch.Choice("triton", torch.bfloat16)
    assert decide(dtype=torch.float32) == _dispatch.Choice("triton", torch.bfloat16)
    assert decide(dtype=torch.bfloat16) == _dispatch.Choice("triton")  # nothing to cast
    with pytest.warns(KernelFallbackWarning, match="not torch.float64"):  # autocast leaves fp64 alone
        assert decide(dtype=torch.float64).impl == "torch"


def test_autocast_reaches_the_kernel_with_cast_operands(gpu, monkeypatch):
    gpu["autocast"] = torch.bfloat16
    seen = []

    def fake_run(impl, x, a, b, bias, activation):
        seen.append((impl, x.dtype, a.dtype, b.dtype, bias.dtype))
        return x.new_empty(*x.shape[:-1], b.shape[0])

    monkeypatch.setattr(lowrank_ops, "run_linear", fake_run)
    x, (a, b, bias), _ = linear_args(dtype=torch.bfloat16, weight_dtype=torch.float32)
    y = lowrank_linear(x, a, b, bias)
    assert seen == [("triton", *[torch.bfloat16] * 4)] and y.dtype == torch.bfloat16


def test_gradient_needed(gpu):
    with pytest.warns(KernelFallbackWarning, match="gradient"):
        assert decide(needs_grad=True).impl == "torch"
    for backend in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match="inference-only"):
            decide(backend, needs_grad=True)


@pytest.mark.parametrize("m", [1, 16])
def test_small_m_takes_the_cuda_extension_when_built(gpu, m):
    assert decide(m=m).impl == "triton"  # not built
    gpu["ext"] = True
    assert decide(m=m).impl == "cuda"
    gpu["table"] = "triton"  # a recorded table that measured Triton faster here
    assert decide(m=m).impl == "triton"
    gpu["table"] = "torch"
    with pytest.warns(KernelFallbackWarning, match="small-M table"):
        assert decide(m=m).impl == "torch"


def test_more_than_16_rows_never_take_the_extension(gpu):
    gpu["ext"] = True
    assert decide(m=17).impl == "triton"
    with pytest.raises(ValueError, match="at most 16 rows"):
        decide("cuda", m=17)


def test_named_cuda_backend(gpu):
    with pytest.raises(RuntimeError, match="needs the compiled extension"):
        decide("cuda", m=4)
    gpu["ext"] = True
    assert decide("cuda", m=4).impl == "cuda"
    x = torch.empty(2, 3, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="no kernel for this op"):
        choose("lowrank_conv2d", "cuda", x, ())


def test_mlp_rule_is_the_same(gpu):
    gpu["ext"] = True
    x = torch.empty(1, 5, 768, dtype=torch.float16, device="meta")
    params = [torch.empty(*s, dtype=torch.float16, device="meta")
              for s in ((96, 768), (3072, 96), (3072,), (96, 3072), (768, 96), (768,))]
    assert mlp_choice(x, *params, backend="auto").impl == "cuda"
    params[5] = params[5].float()
    with pytest.warns(KernelFallbackWarning, match="mixed dtypes"):
        assert mlp_choice(x, *params, backend="auto").impl == "torch"


def test_the_mlp_module_asks_the_rule_once(gpu, monkeypatch):
    """``LowRankMlp`` asks the rule, then hands its choice to the op, which does not ask again."""
    from utilrank_kernels.nn import LowRankLinear, LowRankMlp

    asked, ran = [], []
    real_choose = lowrank_ops.choose
    monkeypatch.setattr(lowrank_ops, "choose", lambda *a, **kw: asked.append(a[0]) or real_choose(*a, **kw))
    monkeypatch.setattr(lowrank_ops, "run_mlp", lambda impl, x, *rest: ran.append(impl) or x.new_empty(x.shape))
    kw = {"device": "meta", "dtype": torch.float16}
    mlp = LowRankMlp(LowRankLinear(768, 3072, 96, **kw), LowRankLinear(3072, 768, 96, **kw)).eval()
    with torch.no_grad():
        mlp(torch.empty(1, 5, 768, **kw))
    assert asked == ["lowrank_mlp"] and ran == ["triton"]


def test_triton_absent(gpu):
    gpu["triton"] = False
    with pytest.warns(KernelFallbackWarning, match="triton is not installed"):
        assert decide().impl == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        decide("triton")
    x = torch.empty(2, 64, 56, 56, device="meta")
    with pytest.warns(KernelFallbackWarning, match="im2col patches are formed on the GPU"):
        assert choose("conv_covariance_update", "auto", x).impl == "torch"


def test_covariance_takes_fp64_and_ignores_autocast(gpu):
    gpu["autocast"] = torch.bfloat16
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.empty(8, 197, 768, dtype=dtype, device="meta")
        assert choose("covariance_update", "auto", x) == _dispatch.Choice("triton")
    with pytest.raises(RuntimeError, match="no kernel for this op"):
        choose("covariance_update", "cuda", x)


def test_cpu_tensors_take_torch_silently(gpu):
    x, operands, extra = linear_args(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose("lowrank_linear", "auto", x, operands, **extra) == _dispatch.Choice("torch")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        choose("lowrank_linear", "triton", x, operands, **extra)


def test_each_reason_is_said_once(gpu):
    with pytest.warns(KernelFallbackWarning) as record:
        for _ in range(3):
            decide(needs_grad=True)
            decide(dtype=torch.float64)
    assert len(record) == 2


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        decide("fast")


def test_eager_calls_skip_the_custom_op():
    """The op is for torch.compile and dispatch modes (FlopCounterMode); eager calls run the launcher."""
    from torch.utils.flop_counter import FlopCounterMode

    assert not _dispatch.through_op()
    with FlopCounterMode(display=False):
        assert _dispatch.through_op()


def test_cpu_ops_still_run(gpu):
    """The real CPU path through the same front ends (no fake needed): torch reference results."""
    x = torch.randn(3, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    torch.testing.assert_close(lowrank_linear(x, a, b), x @ a.T @ b.T)
    params = [torch.randn(2, 8), torch.randn(6, 2), None, torch.randn(3, 6), torch.randn(8, 3), None]
    assert lowrank_mlp(x, *params).shape == (3, 8)
    acc = torch.zeros(27, 27, dtype=torch.float64)
    conv_covariance_update(acc, torch.randn(1, 3, 5, 5), 3, padding=1)
    assert acc.diagonal().gt(0).all()


# ------------------------------------------------------------------------------------------------
# The small-M table (read from the cache folder, or $UTILRANK_SMALL_M_TABLE)
# ------------------------------------------------------------------------------------------------
ENTRIES = [
    {"op": "lowrank_linear", "m": 1, "in_features": 768, "out_features": 3072, "rank": 307,
     "dtype": "float16", "fastest": "cuda", "us": {"cuda": 4.0, "triton": 6.0, "torch": 9.0}},
    {"op": "lowrank_linear", "m": 16, "in_features": 768, "out_features": 3072, "rank": 307,
     "dtype": "float16", "fastest": "triton", "us": {"cuda": 8.0, "triton": 6.0, "torch": 9.0}},
]
TABLE = {"format": _dispatch.SMALL_M_TABLE_FORMAT, "device": "Some GPU", "entries": ENTRIES}


@pytest.fixture
def fresh_table(monkeypatch):
    monkeypatch.delenv("UTILRANK_SMALL_M_TABLE", raising=False)
    _dispatch.small_m_table.cache_clear()
    yield
    _dispatch.small_m_table.cache_clear()


def test_small_m_table_absent_means_no_choice(tmp_path, monkeypatch, fresh_table):
    monkeypatch.setenv("UTILRANK_SMALL_M_TABLE", str(tmp_path / "missing.json"))
    assert _dispatch.small_m_table("cuda") is None
    assert _dispatch.small_m_choice("lowrank_linear", 1, (768, 3072, 307), torch.float16, device="cuda") is None


def test_small_m_choice_takes_the_nearest_recorded_shape(tmp_path, monkeypatch, fresh_table):
    """``$UTILRANK_SMALL_M_TABLE`` may name a benchmark result file, which holds the table under "dispatch"."""
    (tmp_path / "t.json").write_text(json.dumps({"rows": [], "dispatch": TABLE}))
    monkeypatch.setenv("UTILRANK_SMALL_M_TABLE", str(tmp_path / "t.json"))
    choice = functools.partial(_dispatch.small_m_choice, device="cuda")
    assert choice("lowrank_linear", 1, (768, 3072, 300), torch.float16) == "cuda"
    assert choice("lowrank_linear", 12, (768, 3072, 300), torch.float16) == "triton"
    assert choice("lowrank_linear", 1, (768, 3072, 300), torch.float16, available=("triton", "torch")) == "triton"
    assert choice("lowrank_linear", 1, (768, 3072, 300), torch.bfloat16) is None
    assert choice("lowrank_linear", 17, (768, 3072, 300), torch.float16) is None


def test_small_m_table_is_written_to_the_cache(fresh_table):
    """What benchmarks/kernels/cuda_small_m.py records is what the rule then reads (a CPU device stands in
    for the GPU here: the table is filed under the device's slug)."""
    path = _dispatch.write_small_m_table(TABLE, device="cpu")
    assert path == cache_dir() / "small_m" / f"{device_slug('cpu')}.json"
    assert _dispatch.small_m_table("cpu") == TABLE
    assert _dispatch.small_m_choice("lowrank_linear", 16, (768, 3072, 307), torch.float16, device="cpu") == "triton"
    with pytest.raises(ValueError, match="small_m_table/1"):
        _dispatch.write_small_m_table({"entries": ENTRIES}, device="cpu")
