"""Build hook: the CUDA extension ``utilrank_kernels._C`` is built only when asked.

A plain ``pip install -e .`` stays pure Python (no compiler, no GPU). With
``UTILRANK_BUILD_CUDA=1 pip install -e . --no-build-isolation`` the sources in ``csrc/`` are
compiled with torch's ``CUDAExtension`` for the architectures in ``TORCH_CUDA_ARCH_LIST``.
"""

import glob
import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("UTILRANK_BUILD_CUDA", "0") != "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]  # -lineinfo: source lines in profilers
    if os.environ.get("UTILRANK_PTXAS_VERBOSE", "0") == "1":
        nvcc.append("-Xptxas=-v")  # registers and spills per kernel
    ext = CUDAExtension(
        name="utilrank_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
