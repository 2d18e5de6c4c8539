"""Backend selection shared by every op: ``"auto" | "torch" | "triton" | "cuda"``."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
logger = logging.getLogger("utilrank_kernels")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cuda_extension():
    """The compiled ``utilrank_kernels._C`` module, or None; a missing build never breaks import."""
    try:
        from utilrank_kernels import _C  # noqa: F401

        return _C
    except ImportError as exc:  # built only with UTILRANK_BUILD_CUDA=1
        logger.debug("utilrank_kernels._C not loaded: %s", exc)
        return None


def triton_runs_on(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    if not triton_available():
        return False
    return t.is_cuda or (t.device.type == "cpu" and triton_interpret())


def check_backend(op: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def require_triton(op: str, t: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if not triton_runs_on(t):
        raise RuntimeError(
            f"{op}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got a tensor on {t.device}"
        )


def require_cuda_extension(op: str, t: torch.Tensor):
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(
            f"{op}: backend='cuda' needs the compiled extension; build it with "
            "UTILRANK_BUILD_CUDA=1 pip install -e . --no-build-isolation"
        )
    if not t.is_cuda:
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors; got a tensor on {t.device}")
    return ext
