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

    ext = CUDAExtension(
        name="utilrank_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
