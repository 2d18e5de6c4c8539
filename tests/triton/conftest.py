"""Triton kernel tests: on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``.

The interpreter has to be chosen before triton decorates any kernel, so these tests run in their own
pytest process: ``TRITON_INTERPRET=1 pytest tests/triton``. In a plain ``pytest tests`` on a machine
without CUDA they are skipped. Tests marked ``gpu`` (bf16, large shapes) never run in the interpreter.
"""

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _nan_empty(monkeypatch):
    """flash-linear-attention's habit: ``torch.empty`` and ``torch.empty_like`` return NaN-filled floating
    tensors, so an output tile that a kernel forgets to write fails the test instead of passing on whatever
    the allocator left there."""
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)

        def nan_filled(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(math.nan)
            return t

        monkeypatch.setattr(torch, name, nan_filled)


@pytest.fixture(autouse=True)
def _triton_runs(request):
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 "
                    "(run: TRITON_INTERPRET=1 python -m pytest tests/triton)")
    if INTERPRET and request.node.get_closest_marker("gpu") is not None:
        pytest.skip("too large or bf16: not run in the Triton interpreter")


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: CPU tensors under the interpreter, else the GPU."""
    return "cpu" if INTERPRET else "cuda"
