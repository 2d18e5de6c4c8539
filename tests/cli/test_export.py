"""``utilrank export`` on a built-in folder and on a compressed timm ViT: ONNX that onnxruntime runs without
this package, an ExportedProgram that reloads and runs, and one-line errors for bad options."""

import re

import pytest
import timm
import torch
from _without_package import run_without_package

from utilrank_kernels import load_compressed, save_compressed
from utilrank_kernels.bench import cut_to_ratio
from utilrank_kernels.cli import main
from utilrank_kernels.export import missing_packages
from utilrank_kernels.models import build_builtin
from utilrank_kernels.models.builtin import VIT_DIGITS_KWARGS

TIMM_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10}  # vit_tiny's 192 width, 2 blocks


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module", params=["vit-digits", "vit_tiny_patch16_224"])
def folder(request, tmp_path_factory):
    """A compressed folder as ``utilrank compress`` writes it: the built-in ViT, or a timm ViT (random
    weights, every layer at half its parameters)."""
    if request.param == "vit-digits":
        dense = build_builtin("vit-digits").eval()
        config = {"arch": "vit-digits", "source": "builtin", "num_classes": 10, "model_kwargs": VIT_DIGITS_KWARGS}
        shape = (1, 16, 16)
    else:
        dense = timm.create_model(request.param, pretrained=False, **TIMM_VIT).eval()
        config = {"arch": request.param, "source": "timm", "num_classes": 10, "model_kwargs": TIMM_VIT}
        shape = (3, 32, 32)
    compressed, plan = cut_to_ratio(dense, 0.5, multiple=1, arch=request.param)
    out = tmp_path_factory.mktemp("compressed") / request.param
    save_compressed(compressed, plan, config, out)
    return out, shape


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_packages()), reason="the deploy extra (onnx, onnxscript, onnxruntime)")
def test_export_onnx_and_program(folder, tmp_path, capsys):
    """The command's file computes what the folder's model computes (< 1e-4), in a process that never
    imports utilrank_kernels; the printed error is within that bound; the ExportedProgram reloads and runs."""
    path, shape = folder
    onnx_file, program_file = tmp_path / "m.onnx", tmp_path / "m.pt2"
    assert main(["export", str(path), "--out", str(onnx_file)]) == 0
    text = capsys.readouterr().out
    printed = float(re.search(r"max abs error (\S+) against the PyTorch model", text).group(1))
    assert printed < 1e-4 and "no custom ops" in text and f"wrote {onnx_file}" in text
    assert main(["export", str(path), "--format", "exported-program", "--out", str(program_file)]) == 0
    assert "aten ops only" in capsys.readouterr().out

    model = load_compressed(path)
    inputs = [torch.randn(4, *shape), torch.randn(1, *shape)]
    outputs = run_without_package(inputs, tmp_path, onnx=onnx_file, program=program_file)
    reloaded = torch.export.load(str(program_file)).module()
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            want = model(x)
            assert float((outputs["onnx"][i] - want).abs().max()) < 1e-4
            assert float((outputs["program"][i] - want).abs().max()) < 1e-4
            assert float((reloaded(x) - want).abs().max()) < 1e-4


def test_export_usage_errors(tmp_path, capsys, monkeypatch):
    """Each bad option or file is one line naming it, before the model is loaded."""
    missing = tmp_path / "none"
    monkeypatch.chdir(tmp_path)
    cases = [
        ([], "utilrank-out/compress-vit-digits: no such folder (run `utilrank compress` first)"),
        ([str(missing)], f"{missing}: no such folder"),
        ([str(missing), "--format", "exported-program", "--opset", "18"], "--opset applies to --format onnx"),
        ([str(missing), "--dtype", "bf16"], "--dtype bf16 with --format onnx"),
        ([str(missing), "--backend", "triton"], "--backend triton: an ONNX file holds the torch path"),
        ([str(missing), "--backend", "fast"], "--backend fast: choose one of"),
        ([str(missing), "--out", str(tmp_path)], f"--out {tmp_path}: is a folder"),
        # what the exporter cannot write: below 18 it would write 18, past its converter's newest too
        ([str(missing), "--opset", "7"], "--opset 7: the exporter writes opset 18 to"),
        ([str(missing), "--opset", "99"], "--opset 99: the exporter writes opset 18 to"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "missing model.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--batch", "0"])
    assert "--batch: expected a batch size >= 1 or 'dynamic'" in capsys.readouterr().err


@pytest.mark.skipif(bool(missing_packages()), reason="the deploy extra (onnx, onnxscript, onnxruntime)")
def test_export_quantize_int8_writes_the_int8_file_beside_the_fp32_one(tmp_path, capsys):
    """``--quantize int8``: the checked fp32 file and ``NAME-int8.onnx`` beside it, smaller, with its agreement with
    the fp32 file printed; the int8 file agrees with the folder's model in onnxruntime."""
    import onnxruntime as ort

    kwargs = {**VIT_DIGITS_KWARGS, "depth": 1}
    compressed, plan = cut_to_ratio(build_builtin("vit-digits", **kwargs).eval(), 0.5, multiple=1, arch="vit-digits")
    save_compressed(compressed, plan, {"arch": "vit-digits", "source": "builtin", "num_classes": 10,
                                       "model_kwargs": kwargs}, tmp_path / "c")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "c"), "--quantize", "int8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    cosine = float(re.search(r"logit cosine (\S+),", text).group(1))
    assert cosine >= 0.99 and f"wrote {out}" in text and f"wrote {tmp_path / 'm-int8.onnx'}" in text
    int8 = tmp_path / "m-int8.onnx"
    assert int8.stat().st_size < out.stat().st_size
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 16, 16)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.inference_mode():
        want = load_compressed(tmp_path / "c")(x)
    assert float(torch.nn.functional.cosine_similarity(got, want).min()) >= 0.99
