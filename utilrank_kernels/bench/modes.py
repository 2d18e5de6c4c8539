"""CPU deployment modes of ``utilrank bench``: int8 and bf16 beside fp32, inductor's freezing, and the fastest
of them for a dense/compressed pair (``fastest_mode``).

- ``int8``, dynamic quantization (int8 weights, activations quantized per batch at run time): for the PyTorch
  engines ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` of ``linear_twin(model)``, where each
  factored linear is two ``nn.Linear`` (``A`` then ``B``: the factors are quantized too; a ``LowRankConv2d`` and
  every convolution stay fp32, as dynamic quantization has no conv); for the onnxruntime engines
  ``export.quantize_onnx`` (onnxruntime's ``quantize_dynamic``, QInt8, constant-weight MatMul/Gemm) on the fp32
  export. CPU only. torchao is not a dependency: where it is installed it is not used either (not measured here).
- ``bf16`` on the CPU only where it has BF16 instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo);
  elsewhere every row of it says so (a bf16 run without them is an emulation, slower than fp32).
- ``compile-freeze``: ``torch.compile`` (inductor, fullgraph, static shapes) with ``freezing=True`` (weights
  folded into the graph as constants, which needs inference mode: the bench runs under ``torch.inference_mode``).
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from ..export import missing_packages
from ..nn import LowRankLinear, LowRankMlp
from ..ops.lowrank import apply_activation

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
QUANTIZED_DTYPES = ("int8",)
COMPILE_SETTINGS = {"compile": "inductor, fullgraph, static shapes",
                    "compile-freeze": "inductor, fullgraph, static shapes, freezing=True, inference_mode"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo; empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def dtype_problem(dtype: str, device: torch.device) -> str | None:
    """Why ``dtype`` is not timed on ``device`` (None if it is): int8 (dynamic quantization) is a CPU mode; bf16
    on a CPU needs its BF16 instructions."""
    if dtype in QUANTIZED_DTYPES and device.type != "cpu":
        return f"{dtype}: dynamic int8 quantization runs on the CPU only (torch's and onnxruntime's)"
    if dtype == "bf16" and device.type == "cpu":
        flags = cpu_flags()
        if not flags & set(BF16_FLAGS):
            capability = torch.backends.cpu.get_cpu_capability()
            return (f"bf16: this CPU has no BF16 instructions ({' or '.join(BF16_FLAGS)} not in /proc/cpuinfo; "
                    f"torch's capability {capability}): a bf16 run would be emulated, not timed")
    return None


def engine_problem(engine: str) -> str | None:
    """Why ``engine`` cannot run here (a package missing), or None."""
    needs = {"onnxruntime": ("onnx", "onnxscript", "onnxruntime")}.get(engine, ())
    missing = []
    for name in needs:
        try:
            missing += missing_packages((name,))
        except ModuleNotFoundError:  # a submodule of a package that is not there
            missing.append(name)
    if missing:
        return f"{engine}: needs {', '.join(missing)} (pip install -e '.[deploy]')"
    return None


class _LinearMlp(nn.Module):
    """A ``LowRankMlp`` as plain modules: ``fc2(act(fc1(x)))``, each factored linear two ``nn.Linear``."""

    def __init__(self, mlp: LowRankMlp):
        super().__init__()
        self.fc1, self.fc2, self.activation = _linear_pair(mlp.fc1), _linear_pair(mlp.fc2), mlp.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(apply_activation(self.fc1(x), self.activation))


def _linear_pair(layer: LowRankLinear) -> nn.Sequential:
    """``B (A x) + b`` as ``nn.Sequential(Linear(in, r, bias=False), Linear(r, out))``, the weights copied."""
    a = nn.Linear(layer.in_features, layer.rank, bias=False)
    b = nn.Linear(layer.rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        a.weight.copy_(layer.weight_a.float())
        b.weight.copy_(layer.weight_b.float())
        if layer.bias is not None:
            b.bias.copy_(layer.bias.float())
    return nn.Sequential(a, b)


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (fp32) in which every ``LowRankMlp`` and ``LowRankLinear`` is plain ``nn.Linear``
    modules computing the same (what dynamic quantization finds); convolutions are left as they are."""
    twin = copy.deepcopy(model).float()

    def replace(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, LowRankMlp):
                setattr(parent, name, _LinearMlp(child))
            elif isinstance(child, LowRankLinear):
                setattr(parent, name, _linear_pair(child))
            else:
                replace(child)

    replace(twin)
    return twin


def int8_torch(model: nn.Module) -> nn.Module:
    """``model`` with dynamic int8 ``nn.Linear`` layers (``torch.ao.quantization.quantize_dynamic``, qint8
    weights), the factored linears included (``linear_twin``)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices (torchao is its successor)
        return quantize_dynamic(linear_twin(model).eval(), {nn.Linear}, dtype=torch.qint8)


def state_bytes(model: nn.Module) -> int:
    """The bytes of ``torch.save(model.state_dict())``: the model's weights on disk in their dtype (an int8
    model's packed weights included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
