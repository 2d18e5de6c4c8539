"""``export_onnx`` / ``export_program``: files that run without this package and compute what the model
computes (against an fp64 run of the same weights), dynamic batch axes, and refusals that leave nothing."""

import copy

import pytest
import torch
from _models import TokenMLP
from _without_package import run_without_package

from utilrank_kernels import set_backend
from utilrank_kernels.bench import cut_to_ratio
from utilrank_kernels.export import (
    ExportError,
    agreement,
    export_onnx,
    export_program,
    int8_path,
    missing_packages,
    quantize_onnx,
    tolerance,
)
from utilrank_kernels.models import build_builtin
from utilrank_kernels.nn import FACTORED_MODULES

pytestmark = pytest.mark.skipif(bool(missing_packages()), reason="the deploy extra (onnx, onnxscript, onnxruntime)")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def vit_digits():
    """The built-in ViT, one block deep, with every layer factored at half its parameters, MLPs fused (random
    weights: the graph, not the accuracy, is under test; tests/cli/test_export.py exports the whole one)."""
    compressed, _ = cut_to_ratio(build_builtin("vit-digits", depth=1).eval(), 0.5, multiple=1, arch="vit-digits")
    return compressed


def _fp64_errors(model, x: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(|got - fp64|, |PyTorch fp32 - fp64|): the exported model's error and PyTorch's own at fp32."""
    with torch.inference_mode():
        exact = set_backend(copy.deepcopy(model).double(), "torch")(x.double())
        own = model(x)
    return float((got.double() - exact).abs().max()), float((own.double() - exact).abs().max())


def test_onnx_and_program_run_without_the_package(vit_digits, tmp_path):
    """The ONNX file (plain nodes, no custom domain) in onnxruntime and the ExportedProgram (the CPU's torch
    path: aten ops only) in torch.export.load, both in a process without utilrank_kernels, at batch sizes
    other than the traced one: within 2x PyTorch's own fp32 error against fp64, and < 1e-4 of PyTorch."""
    set_backend(vit_digits, "auto")
    example = torch.randn(2, 1, 16, 16)
    onnx = export_onnx(vit_digits, example, tmp_path / "m.onnx")
    program = export_program(vit_digits, example, tmp_path / "m.pt2")
    assert all(m.backend == "auto" for m in vit_digits.modules() if isinstance(m, FACTORED_MODULES))  # restored
    assert onnx.batch is None and onnx.check_batch == 3 and onnx.max_abs_error < 1e-4 <= onnx.tolerance
    assert onnx.operators["MatMul"] >= 2 * 4  # two per factored linear layer of the block
    assert program.custom_ops == () and program.max_abs_error < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2"]  # no temporary left behind

    inputs = [torch.randn(1, 1, 16, 16), torch.randn(5, 1, 16, 16)]
    outputs = run_without_package(inputs, tmp_path, onnx=onnx.path, program=program.path)
    for x, got_onnx, got_program in zip(inputs, outputs["onnx"], outputs["program"], strict=True):
        for got in (got_onnx, got_program):
            error, own = _fp64_errors(vit_digits, x, got)
            assert error <= 2 * own + 1e-6, (error, own)
            with torch.inference_mode():
                assert float((got - vit_digits(x)).abs().max()) < 1e-4


def test_static_batch_and_half_precision(tmp_path):
    """A fixed batch axis stays fixed; fp16 passes the half-precision rule (the exported model at most 2x as far
    from fp32 as PyTorch's own fp16 run); bfloat16 ONNX is refused before any export."""
    compressed, _ = cut_to_ratio(TokenMLP().eval(), 0.5, multiple=1)
    x = torch.randn(4, 6, 12)
    result = export_onnx(compressed, x, tmp_path / "s.onnx", dynamic_batch=False)
    import onnx

    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 6, 12] and result.batch == 4 and result.max_abs_error < 1e-5

    half = copy.deepcopy(compressed).half()
    result = export_onnx(half, x.half(), tmp_path / "h.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 6, 12)
    got = torch.from_numpy(session.run(None, {"input": y.half().numpy()})[0]).float()
    with torch.inference_mode():
        fp32 = copy.deepcopy(half).float()(y)  # the same (fp16-rounded) weights in fp32
        own = float((half(y.half()).float() - fp32).abs().max())
    assert 0 < result.max_abs_error <= result.tolerance
    assert float((got - fp32).abs().max()) <= 2 * own + 1e-6, own
    with pytest.raises(ExportError, match="bfloat16"):
        export_onnx(copy.deepcopy(compressed).bfloat16(), x.bfloat16(), tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


def test_fp32_tolerance_scales_with_the_outputs():
    assert tolerance(torch.tensor([0.5, -0.2])) == pytest.approx(1e-4)
    assert tolerance(torch.tensor([30.0, -50.0])) == pytest.approx(5e-3)


def test_an_export_that_differs_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    import utilrank_kernels.export as export

    compressed, _ = cut_to_ratio(TokenMLP().eval(), 0.5, multiple=1)
    x = torch.randn(2, 6, 12)
    real_run = export.run_onnxruntime
    monkeypatch.setattr(export, "run_onnxruntime", lambda session, x: real_run(session, x) + 1e-2)
    with pytest.raises(ExportError, match=r"differ from the PyTorch model's by 0\.01.*nothing written"):
        export_onnx(compressed, x, tmp_path / "m.onnx")
    real_load = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda f: _Shifted(real_load(f)))
    with pytest.raises(ExportError, match="torch.export.load's outputs differ"):
        export_program(compressed, x, tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


class _Shifted:
    """A reloaded program whose outputs are off by 1e-2."""

    def __init__(self, program):
        self.program = program

    def module(self):
        module = self.program.module()
        return lambda x: module(x) + 1e-2


def test_a_text_model_exports_with_named_inputs_and_dynamic_batch_and_sequence(tmp_path):
    """A transformers text model (called with input_ids and attention_mask, returning a ModelOutput) exports with
    those two inputs, both axes dynamic, and its outputs named after the ModelOutput's fields; onnxruntime runs it at
    another batch and length, padded, as PyTorch does."""
    pytest.importorskip("transformers")
    import onnxruntime as ort
    from _hf import bert_config
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(bert_config()).eval()
    ids = torch.randint(0, 90, (2, 12))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = export_onnx(model, example, tmp_path / "t.onnx")
    assert result.input_names == ("input_ids", "attention_mask")
    assert result.output_names == ("last_hidden_state", "pooler_output") and result.max_abs_error < 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, len(i.shape)) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)", 2), ("attention_mask", "tensor(int64)", 2)]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)  # batch and sequence: symbolic
    ids = torch.randint(0, 90, (5, 7))
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0
    hidden, pooled = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask)
    assert float((torch.from_numpy(hidden) - want.last_hidden_state).abs().max()) < 1e-4
    assert float((torch.from_numpy(pooled) - want.pooler_output).abs().max()) < 1e-4


def test_an_opset_the_exporter_cannot_write_is_refused(tmp_path, monkeypatch):
    """Outside 18 to the version converter's newest: refused before tracing; inside it, a file that holds another
    opset than asked for (the converter can give up and keep its own) is refused, nothing written."""
    import utilrank_kernels.export as export

    compressed, _ = cut_to_ratio(TokenMLP().eval(), 0.5, multiple=1)
    x = torch.randn(2, 6, 12)
    low, high = export.opset_range()
    assert low == 18 and high >= 20
    for opset in (7, low - 1, high + 1):
        with pytest.raises(ExportError, match=f"opset {opset}: the exporter writes opset {low} to {high}"):
            export_onnx(compressed, x, tmp_path / "m.onnx", opset=opset)
    assert export_onnx(compressed, x, tmp_path / "m.onnx", opset=high).opset == high
    (tmp_path / "m.onnx").unlink()
    real = export._onnx_operators
    monkeypatch.setattr(export, "_onnx_operators", lambda path: (*real(path)[:2], 18))
    with pytest.raises(ExportError, match="opset 19: the exporter wrote opset 18 instead"):
        export_onnx(compressed, x, tmp_path / "m.onnx", opset=19)
    assert list(tmp_path.iterdir()) == []


def test_an_int8_export_runs_in_onnxruntime_without_the_package(vit_digits, tmp_path):
    """``quantize_onnx`` (onnxruntime's quantize_dynamic, QInt8 weights) on the checked fp32 file: the int8 file holds
    int8 weights for the factors (every constant-weight MatMul), runs in onnxruntime in a process that has only
    onnxruntime and numpy, and agrees with the PyTorch model within int8's tolerance at batch sizes other than the
    traced one; a file that agrees below the bar is refused, nothing written."""
    import onnx

    example = torch.randn(2, 1, 16, 16)
    fp32 = export_onnx(vit_digits, example, tmp_path / "m.onnx")
    result = quantize_onnx(fp32.path, int8_path(fp32.path), example)
    assert result.path == tmp_path / "m-int8.onnx" and result.check_batch == 2
    assert result.logit_cosine >= 0.99 and result.bytes < result.fp32_bytes
    proto = onnx.load(str(result.path))
    ops = {n.op_type for n in proto.graph.node}
    assert "DynamicQuantizeLinear" in ops and ({"MatMulInteger", "DynamicQuantizeMatMul"} & ops), ops
    assert "Conv" in ops and "ConvInteger" not in ops  # the patch embedding stays fp32: ConvInteger is slow on CPUs
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 2 * 4  # both factors of each factored linear of the block
    inputs = [torch.randn(1, 1, 16, 16), torch.randn(5, 1, 16, 16)]
    outputs = run_without_package(inputs, tmp_path, onnx=result.path)
    for x, got in zip(inputs, outputs["onnx"], strict=True):
        with torch.inference_mode():
            want = vit_digits(x)
        assert got.shape == want.shape
        assert agreement(got, want)["logit_cosine"] >= 0.99
    with pytest.raises(ExportError, match=r"logit cosine .* \(below 1.5\)"):
        quantize_onnx(fp32.path, tmp_path / "refused.onnx", example, min_cosine=1.5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".onnx") == ["m-int8.onnx", "m.onnx"]
