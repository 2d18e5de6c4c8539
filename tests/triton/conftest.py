"""Triton kernel tests: on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``.

The interpreter has to be chosen before triton decorates any kernel, so these tests run in their own
pytest process: ``TRITON_INTERPRET=1 pytest tests/triton``. In a plain ``pytest tests`` on a machine
without CUDA they are skipped. Tests marked ``gpu`` (bf16, large shapes) never run in the interpreter.
"""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
