"""Exports of a model on a kernel backend: the ExportedProgram keeps the ``utilrank::`` custom ops (and reloads
with the package imported), the ONNX file never sees them."""

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from utilrank_kernels.export import export_onnx, export_program, missing_packages
from utilrank_kernels.nn import FACTORED_MODULES, LowRankLinear, fuse_lowrank_mlps, set_backend

pytest.importorskip("triton")  # every test here runs the kernels
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


class Net(nn.Module):
    """A factored projection and a timm Mlp with both layers factored (fused into one op)."""

    def __init__(self):
        super().__init__()
        self.proj = LowRankLinear(24, 40, 5)
        self.mlp = Mlp(40, 72, 24)
        self.mlp.fc1, self.mlp.fc2 = LowRankLinear(40, 72, 12), LowRankLinear(72, 24, 7)

    def forward(self, x):
        return self.mlp(self.proj(x))


@pytest.fixture
def net(device):
    net = Net().to(device).eval()
    assert fuse_lowrank_mlps(net) == 1
    return set_backend(net, "triton")


def test_exported_program_keeps_the_custom_ops(net, device, tmp_path):
    x = torch.randn(2, 9, 24, device=device)
    result = export_program(net, x, tmp_path / "k.pt2")
    assert result.custom_ops == ("utilrank::lowrank_linear", "utilrank::lowrank_mlp")
    assert result.max_abs_error <= result.tolerance
    reloaded = torch.export.load(str(result.path)).module()  # the package is imported: the ops are registered
    y = torch.randn(5, 9, 24, device=device)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(y), set_backend(net, "torch")(y), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(bool(missing_packages()), reason="the deploy extra (onnx, onnxscript, onnxruntime)")
def test_onnx_export_runs_the_torch_path(net, device, tmp_path):
    result = export_onnx(net, torch.randn(2, 9, 24, device=device), tmp_path / "k.onnx")
    assert result.max_abs_error < 1e-4 and result.operators["MatMul"] == 6
    assert not any("utilrank" in op for op in result.operators)
    assert all(m.backend == "triton" for m in net.modules() if isinstance(m, FACTORED_MODULES))
