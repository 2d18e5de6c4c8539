"""The CUDA extension's plan and index math on the CPU: ``small_m_selftest.cc`` (beside this file) emulates
``csrc/small_m.cu`` with the kernel's own header, ``csrc/small_m_plan.h``, against a float64 reference."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from utilrank_kernels.ops._dispatch import SMALL_M_MAX_ROWS

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the host selftest")
def test_kernel_index_math_selftest(tmp_path):
    """The kernel's tiling, shared-memory layout, work split and warp reduce-scatter, emulated on the
    CPU against a float64 reference."""
    exe = tmp_path / "small_m_selftest"
    subprocess.run(["g++", "-std=c++17", "-O2", f"-I{CSRC}", str(HERE / "small_m_selftest.cc"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_the_dispatch_rule_knows_the_kernels_row_limit():
    """The package's one copy of the row limit is the kernel's own (``kMaxM``)."""
    found = re.search(r"constexpr int kMaxM = (\d+);", (CSRC / "small_m_plan.h").read_text())
    assert found and int(found.group(1)) == SMALL_M_MAX_ROWS
