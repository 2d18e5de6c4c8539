"""Issue 26's CPU modes: int8 and bf16 beside fp32, inductor's freezing (``compile-freeze``), each row's agreement
with eager fp32, rows with reasons for what cannot run, and ``fastest_mode``."""

from __future__ import annotations

import pytest
import timm
import torch

from utilrank_kernels.bench import bench, cut_to_ratio, fastest_mode
from utilrank_kernels.bench import modes as modes_module
from utilrank_kernels.bench.modes import BF16_FLAGS, int8_torch, linear_twin
from utilrank_kernels.export import agreement, missing_packages
from utilrank_kernels.nn import LowRankLinear, LowRankMlp

# each dtype's tolerance against eager fp32 (test_vit, random weights; outputs of magnitude ~0.5): fp32 engines
# reorder sums only; bf16 has 8 mantissa bits; dynamic int8 rounds weights and activations to 256 levels
FP32_MAX_ABS = 1e-4
BF16_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.99


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    dense = timm.create_model("test_vit", pretrained=False).eval()
    compressed, _ = cut_to_ratio(dense, 0.5, 16, "test_vit")
    return dense, compressed, tuple(dense.default_cfg["input_size"])


def _has_bf16() -> bool:
    return bool(modes_module.cpu_flags() & set(BF16_FLAGS))


def _check_agreement(row: dict) -> None:
    assert "error" not in row, row["error"]
    if row["dtype"] == "fp32":
        assert row["max_abs_error"] <= FP32_MAX_ABS and row["top1_agreement"] == 1.0, row
    elif row["dtype"] == "bf16":
        assert row["logit_cosine"] >= BF16_MIN_COSINE, row
    else:
        assert row["logit_cosine"] >= INT8_MIN_COSINE, row


def test_agreement_known_answers():
    want = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 1.0]])
    same = agreement(want.clone(), want)
    assert same == {"logit_cosine": 1.0, "top1_agreement": 1.0, "max_abs_error": 0.0}
    flipped = agreement(-want, want)
    assert flipped["logit_cosine"] == pytest.approx(-1.0) and flipped["top1_agreement"] == 0.0
    assert flipped["max_abs_error"] == 6.0
    scaled = agreement(2 * want, want)  # a cosine ignores the scale; the arg-max too
    assert scaled["logit_cosine"] == pytest.approx(1.0) and scaled["top1_agreement"] == 1.0


def test_linear_twin_computes_what_the_factored_model_computes(vit):
    """The Linear pairs dynamic quantization finds compute B(Ax)+b: the twin against the factored model in fp64."""
    _, compressed, shape = vit
    assert any(isinstance(m, (LowRankLinear, LowRankMlp)) for m in compressed.modules())
    twin = linear_twin(compressed)
    assert not any(isinstance(m, (LowRankLinear, LowRankMlp)) for m in twin.modules())
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.inference_mode():
        want = compressed.double()(x)
        got = twin.double()(x)
    compressed.float()
    assert float((got - want).abs().max()) < 1e-10
    quantized = int8_torch(compressed)  # every Linear, the factors included, is a dynamic int8 one
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert "Linear" in kinds and not any(type(m) is torch.nn.Linear for m in quantized.modules())


def test_eager_modes_agree_with_eager_fp32_within_their_dtype(vit):
    dense, compressed, shape = vit
    dtypes = ("fp32", "int8", "bf16")
    rows = bench(dense, compressed, model_name="test_vit", input_shape=shape, batch_sizes=(2,), dtypes=dtypes,
                 engines=("eager",), warmup=0, iters=1, log=lambda _: None)
    assert [(r["dtype"], r["variant"]) for r in rows] == [(d, v) for d in dtypes for v in ("dense", "compressed")]
    for row in rows:
        if row["dtype"] == "bf16" and not _has_bf16():
            assert "no BF16 instructions" in row["error"]
            continue
        _check_agreement(row)
        assert row["bytes_on_disk"] > 0
    by = {(r["dtype"], r["variant"]): r for r in rows}
    # int8 weights: about a quarter of fp32's bytes (scales and the fp32 biases, norms, embeddings on top)
    assert by["int8", "dense"]["bytes_on_disk"] < 0.6 * by["fp32", "dense"]["bytes_on_disk"]
    assert by["fp32", "compressed"]["dense_logit_cosine"] < 1.0  # random factors: another function than dense


@pytest.mark.slow
def test_every_engine_and_dtype_agrees_with_eager_fp32_on_a_small_vit(vit):
    """compile-freeze and onnxruntime, fp32/int8/bf16: each timed row's outputs against eager fp32.
    torch's dynamic int8 linears do not trace under torch.compile(fullgraph=True): those rows say so; bf16 has no
    onnxruntime CPU kernels: those rows say so."""
    if missing_packages():
        pytest.skip("the deploy extra (onnx, onnxscript, onnxruntime)")
    dense, compressed, shape = vit
    engines = ("compile-freeze", "onnxruntime")
    rows = bench(dense, compressed, model_name="test_vit", input_shape=shape, batch_sizes=(2,),
                 dtypes=("fp32", "int8", "bf16"), engines=engines, warmup=0, iters=1, log=lambda _: None)
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        if row["dtype"] == "bf16" and (row["engine"] != "compile-freeze" or not _has_bf16()):
            assert "bfloat16" in row["error"] or "BF16" in row["error"], row
        elif row["dtype"] == "int8" and row["engine"] == "compile-freeze":
            assert row["error"].startswith("compile-freeze:"), row
        else:
            _check_agreement(row)
    assert all("freezing=True" in r["compile_settings"] for r in rows if r["engine"] == "compile-freeze"
               and "error" not in r)


def test_a_missing_engine_or_instruction_set_is_a_row_with_its_reason(vit, monkeypatch):
    dense, compressed, shape = vit
    monkeypatch.setattr(modes_module, "missing_packages", lambda names=(): list(names))
    monkeypatch.setattr(modes_module, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    rows = bench(dense, compressed, model_name="test_vit", input_shape=shape, batch_sizes=(1,),
                 dtypes=("fp32", "bf16"), engines=("eager", "onnxruntime"), warmup=0, iters=1,
                 log=lambda _: None)
    keyed = {(r["dtype"], r["engine"], r["variant"]): r for r in rows}
    assert len(keyed) == 8 == len(rows)
    for variant in ("dense", "compressed"):
        assert "error" not in keyed["fp32", "eager", variant]
        assert keyed["fp32", "onnxruntime", variant]["error"].startswith("onnxruntime: needs onnx")
        for engine in ("eager", "onnxruntime"):
            assert "this CPU has no BF16 instructions" in keyed["bf16", engine, variant]["error"]


def test_fastest_mode_names_the_fastest_agreeing_mode(vit):
    dense, compressed, shape = vit
    found = fastest_mode(dense, compressed, shape, batch=2, modes=(("eager", "fp32"), ("eager", "int8")),
                         warmup=0, iters=2, max_seconds=None)
    timed = [r for r in found.rows if r["variant"] == "compressed"]
    assert found.name in {f"eager {r['dtype']}" for r in timed}
    assert found.compressed_ms == min(r["infer_step_time"] for r in timed)
    assert found.speedup == pytest.approx(found.dense_ms / found.compressed_ms, rel=1e-3)
    assert found.logit_cosine >= 0.99 and found.name in found.describe()
    assert found.compressed_timing.median == found.compressed_ms and found.dense_timing.median == found.dense_ms
    with pytest.raises(ValueError, match="no CPU mode"):
        fastest_mode(dense, compressed, shape, batch=2, modes=(("eager", "fp32"),), warmup=0, iters=1,
                     min_cosine=1.5)
